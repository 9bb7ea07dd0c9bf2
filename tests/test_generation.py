"""Every generation parameter of the talk, on the real model (fp32, CPU)."""
from __future__ import annotations

import collections

import pytest
import torch

from libinfer import GenerationParams, ParamError
from libinfer import sampling

LIST_PROMPT = "List of fruits:\n1. apple\n2. banana\n3."
CHAT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def greedy(**kw) -> GenerationParams:
    return GenerationParams(greedy=True, **kw)


def first(gen, prompt, params):
    res = gen.generate([prompt], params)[0]
    assert res.ok, res.error
    return res.outputs[0]


# ------------------------------------------------------------------ parameters

@pytest.mark.parametrize("field,value", [
    ("top_p", 0.0), ("top_p", 1.5), ("temperature", -0.1), ("n", 0), ("top_k", -1),
    ("out_seq_length", 0), ("repetition_penalty", 0.0), ("min_tokens", 99), ("greedy", "yes"),
    ("stop_sequences", [""]), ("seed", 1.5),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ParamError) as e:
        GenerationParams(**{field: value})
    assert e.value.field == field and field in str(e.value)


def test_unknown_name_is_an_error():
    with pytest.raises(ParamError, match="top_q"):
        GenerationParams.from_dict({"top_q": 0.5})


def test_talk_presets():
    t1, t2 = GenerationParams.preset("test1"), GenerationParams.preset("test2")
    assert (t1.temperature, t1.top_p, t1.top_k, t1.out_seq_length, t1.repetition_penalty, t1.greedy,
            t1.stop_sequences, t1.recompute, t1.start, t1.restart) == (0.0, 0.8, 0, 16, 5.0, True, ("\n",), False, "", "")
    assert (t2.out_seq_length, t2.repetition_penalty) == (50, 3.0)
    assert GenerationParams.preset("test2", greedy=False).is_greedy   # temperature 0 is argmax either way


# ------------------------------------------------------------------ sampling

def test_topk_topp_draw_only_the_allowed_set_with_the_right_frequencies():
    from scipy.stats import chisquare
    probs = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
    logits = probs.log()[None]
    n = 20000
    for params, allowed in [(GenerationParams(top_k=3), [0, 1, 2]),
                            (GenerationParams(top_p=0.75), [0, 1, 2]),      # 0.40+0.25 < 0.75 <= +0.15
                            (GenerationParams(top_p=0.5, top_k=5), [0, 1]),
                            (GenerationParams(temperature=0.5, top_k=2), [0, 1])]:
        processed = sampling.process(logits.clone(), params, None, None, [])
        g = torch.Generator().manual_seed(0)
        draws = sampling.draw(processed.expand(n, -1), params, [g] * n).tolist()
        counts = collections.Counter(draws)
        assert set(counts) == set(allowed), (params, counts)
        p = probs[allowed].double() ** (1 / params.temperature)
        expected = (p / p.sum() * n).tolist()
        stat = chisquare([counts[a] for a in allowed], expected)
        assert stat.pvalue > 1e-3, (params, counts, expected)


def test_repetition_penalty_matches_transformers_processor():
    from transformers import RepetitionPenaltyLogitsProcessor
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, generator=g)
    ids = torch.tensor([[1, 5, 5, 7], [0, 2, 49, 3]])
    seen = torch.zeros(2, 50, dtype=torch.bool)
    seen.scatter_(1, ids, True)
    ref = RepetitionPenaltyLogitsProcessor(2.5)(ids, logits.clone())
    assert torch.equal(sampling.apply_repetition_penalty(logits, seen, 2.5), ref)


def test_seeded_sampling_is_reproducible_and_seed_dependent(smollm2):
    p = GenerationParams(temperature=1.0, top_p=0.95, out_seq_length=16, seed=123, ignore_eos=True)
    a = smollm2.generate([LIST_PROMPT, CHAT], p)
    b = smollm2.generate([CHAT, LIST_PROMPT], p)    # other order, same seeds per prompt
    assert a[0].outputs[0].token_ids == b[1].outputs[0].token_ids
    assert a[1].outputs[0].token_ids == b[0].outputs[0].token_ids
    c = smollm2.generate([LIST_PROMPT], p.replace(seed=124))
    assert c[0].outputs[0].token_ids != a[0].outputs[0].token_ids


def test_top_k_1_equals_greedy(smollm2):
    g = first(smollm2, LIST_PROMPT, greedy(out_seq_length=16, ignore_eos=True))
    s = first(smollm2, LIST_PROMPT, GenerationParams(temperature=1.3, top_k=1, out_seq_length=16, ignore_eos=True,
                                                     seed=5))
    assert s.token_ids == g.token_ids


def test_n_candidates(smollm2):
    res = smollm2.generate([LIST_PROMPT], GenerationParams(temperature=1.0, n=4, out_seq_length=12, seed=7))[0]
    assert len(res.outputs) == 4
    assert len({tuple(o.token_ids) for o in res.outputs}) > 1
    again = smollm2.generate([LIST_PROMPT], GenerationParams(temperature=1.0, n=4, out_seq_length=12, seed=7))[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in res.outputs]
    g = smollm2.generate([LIST_PROMPT], greedy(n=2, out_seq_length=8))[0]
    assert g.outputs[0].token_ids == g.outputs[1].token_ids


# -------------------------------------------------------------- stop and text

def test_stop_sequence_cuts_text_at_newline(smollm2):
    free = first(smollm2, LIST_PROMPT, greedy(out_seq_length=16, ignore_eos=True))
    assert "\n" in free.text, free.text
    out = first(smollm2, LIST_PROMPT, greedy(out_seq_length=16, stop_sequences=["\n"]))
    assert out.finish_reason == "stop"
    assert out.text == free.text.split("\n")[0]
    assert smollm2.decode_text(out.token_ids).startswith(out.text + "\n")


def test_stop_sequence_across_token_boundaries(smollm2):
    free = first(smollm2, LIST_PROMPT, greedy(out_seq_length=16, ignore_eos=True)).text
    cut = free.index("\n") + 1
    stop = free[cut - 2:cut + 3]     # spans the newline token and the next token(s)
    toks = smollm2.tokenizer(stop, add_special_tokens=False).input_ids
    assert len(toks) >= 2
    out = first(smollm2, LIST_PROMPT, greedy(out_seq_length=16, stop_sequences=["never-there", stop]))
    assert out.finish_reason == "stop" and out.text == free[:free.index(stop)]


def test_start_is_injected_after_the_prompt(smollm2):
    q = "Q: What is the capital of France?"
    with_start = first(smollm2, q, greedy(out_seq_length=8, start="\nA:"))
    joined = first(smollm2, q + "\nA:", greedy(out_seq_length=8))
    assert with_start.token_ids == joined.token_ids


def test_restart_is_appended_to_the_completion(smollm2):
    plain = first(smollm2, LIST_PROMPT, greedy(out_seq_length=8, stop_sequences=["\n"]))
    out = first(smollm2, LIST_PROMPT, greedy(out_seq_length=8, stop_sequences=["\n"], restart="\nQ:"))
    assert out.text == plain.text + "\nQ:"


def test_ignore_eos_and_finish_reasons(smollm2):
    short = first(smollm2, CHAT, greedy(out_seq_length=24))
    assert short.finish_reason == "eos" and len(short.token_ids) < 24
    assert short.token_ids[-1] in smollm2.eos_ids and "<|im_end|>" not in short.text
    full = first(smollm2, CHAT, greedy(out_seq_length=24, ignore_eos=True))
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    assert full.token_ids[:len(short.token_ids)] == short.token_ids


# ------------------------------------------------------------------ bad rows

def test_over_long_and_empty_prompts_are_rejected_per_row(smollm2):
    ctx = smollm2.config.max_position
    too_long = [5] * (ctx + 10)
    edge = [5] * (ctx - 4)          # fits alone, not with 8 new tokens
    res = smollm2.generate([LIST_PROMPT, too_long, edge, "", [10**9]], greedy(out_seq_length=8))
    assert res[0].ok and res[0].outputs[0].text
    assert "too long" in res[1].error and str(ctx) in res[1].error and not res[1].outputs
    assert "too long" in res[2].error
    assert "empty" in res[3].error
    assert "vocabulary" in res[4].error
    assert res.metrics.n_rejected == 4


def test_token_id_prompts(smollm2):
    ids = smollm2.tokenizer(LIST_PROMPT).input_ids
    a = first(smollm2, ids, greedy(out_seq_length=8))
    b = first(smollm2, LIST_PROMPT, greedy(out_seq_length=8))
    assert a.token_ids == b.token_ids


def test_metrics_are_reported(smollm2):
    res = smollm2.generate([LIST_PROMPT, CHAT], greedy(out_seq_length=8, ignore_eos=True))
    m = res.metrics
    n_prompt = sum(len(r.prompt_token_ids) for r in res)
    assert m.prompt_tokens == n_prompt and m.generated_tokens == 16
    assert m.prefill_s > 0 and m.decode_s > 0 and m.wall_s >= m.prefill_s + m.decode_s
    assert m.tokens_per_s > 0 and m.peak_memory_bytes > 100 * 2**20
    assert 0 < m.padding_waste < 1 and m.real_tokens > 0      # two rows of different lengths
    assert len(m.latencies_s) == 2 and len(m.ttft_s) == 2
    assert {"tokens_per_s", "prefill_s", "decode_s", "padding_waste", "peak_memory_bytes"} <= set(m.summary())
