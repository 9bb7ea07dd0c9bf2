"""libinfer.quality against hand-computed values; Generator.score against transformers."""
from __future__ import annotations

import math

import pytest
import torch

from libinfer import quality


def test_chrf_hand_computed():
    # hyp "ab" vs ref "a bc" (whitespace is dropped: "abc"):
    #   1-grams: hyp {a,b} ref {a,b,c} match 2 -> P 1, R 2/3
    #   2-grams: hyp {ab}  ref {ab,bc} match 1 -> P 1, R 1/2
    #   3-grams: hyp none -> this order and the longer ones do not count
    # P = 1, R = 7/12, F2 = 5 * P * R / (4 * P + R) = 35/55
    assert quality.chrf("ab", "a bc") == pytest.approx(100 * 35 / 55)
    assert quality.chrf("same text", "same text") == pytest.approx(100.0)
    assert quality.chrf("xyz", "abc") == 0.0
    assert quality.chrf("", "abc") == 0.0
    # recall weighs more than precision (beta=2): a short prefix scores below a padded copy
    assert quality.chrf("abcdefgh", "abcd") > quality.chrf("ab", "abcd")


def test_corpus_chrf_pools_statistics():
    rows = [("ab", "a bc"), ("abc", "abc")]
    stats = [sum(c) for c in zip(*(quality.chrf_stats(h, r) for h, r in rows))]
    # pooled 1-grams: hyp 2+3, ref 3+3, match 2+3; 2-grams: hyp 1+2, ref 2+2, match 1+2;
    # 3-grams: hyp 0+1, ref 1+1, match 0+1
    p = (5 / 5 + 3 / 3 + 1 / 1) / 3
    r = (5 / 6 + 3 / 4 + 1 / 2) / 3
    assert quality.chrf_from_stats(stats) == pytest.approx(100 * 5 * p * r / (4 * p + r))


def test_exact_match_and_repetition():
    assert quality.exact_match("  hello   world\n", "hello world")
    assert not quality.exact_match("hello", "Hello")
    # "a b a b a": bigrams ab ba ab ba -> 2 repeated of 4
    assert quality.repetition("a b a b a") == (2, 4)
    assert quality.repetition("one") == (0, 0)
    assert quality.perplexity([math.log(0.5)] * 3) == pytest.approx(2.0)


def test_chrf_and_bleu_are_sacrebleus():
    """summarize's corpus chrF and BLEU are sacrebleu's corpus_score over the same rows
    (a row without n-grams of some order must not count its hypothesis n-grams there)."""
    import sacrebleu
    hyps = ["cheap yoga mats for kids", "ramen price", "x", "best tea kettles under 100 dollars"]
    refs = ["cheap yoga mats for kids", "ramen prices", "a b", "tea kettles top rated"]
    rows = [quality.RowQuality(str(i), h, "stop", 3, reference=r) for i, (h, r) in enumerate(zip(hyps, refs))]
    m = quality.summarize(rows)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert 0.0 < m["bleu"] < 100.0
    assert quality.bleu("ramen price", "ramen price") == pytest.approx(100.0)
    assert rows[0].metrics()["bleu"] == pytest.approx(100.0) and rows[2].metrics()["bleu"] == 0.0


def test_summarize_tiny_example():
    rows = [
        quality.RowQuality("1", "Paris", "stop", 2, reference="Paris", reference_logprobs=[math.log(0.5)]),
        quality.RowQuality("2", "a b a b", "length", 4, reference="c", reference_logprobs=[math.log(0.25)]),
        quality.RowQuality("3", "x", "eos", 3),                # no reference: rates only
    ]
    m = quality.summarize(rows)
    assert m["rows"] == 3 and m["rows_with_reference"] == 2
    assert m["exact_match"] == pytest.approx(0.5)
    assert m["stop_hit_rate"] == pytest.approx(1 / 3)
    assert m["avg_generated_tokens"] == pytest.approx(3.0)
    assert m["repetition_rate"] == pytest.approx(1 / 3)        # 1 repeated of 3 bigrams in all rows
    assert m["reference_perplexity"] == pytest.approx(math.sqrt(8))   # exp((ln2 + ln4) / 2)
    assert m["chrf_sentence_mean"] == pytest.approx(50.0)


def test_forward_logits_and_score_match_transformers(random_models):
    from transformers import AutoModelForCausalLM
    from libinfer import Generator
    path = random_models["gqa_untied"]
    gen = Generator.from_pretrained(path, warmup=False)
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = [1, 17, 923, 4051, 88, 9, 310, 77]
    ours = gen.runner.model.forward_logits(torch.tensor(ids))
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].float()
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    lp = gen.score(ids[:3], ids[3:])
    want = torch.log_softmax(theirs, -1)[2:-1].gather(1, torch.tensor(ids[3:])[:, None])[:, 0]
    assert lp == pytest.approx(want.tolist(), abs=1e-4)
    # the last prompt logits equal what generation's prefill sees
    assert gen.score(ids, []) == []
