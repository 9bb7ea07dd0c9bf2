"""Shared few-shot prefixes: computed once and stored once (engine/kv_cache.py), with the
same tokens as without reuse and as transformers."""
from __future__ import annotations

import pytest

from libinfer import Generator, GenerationParams

HEADERS = ["You suggest search queries. Examples:\n" + "".join(
    f"Q: topic {i} things\nA: best topic {i}, cheap topic {i}, topic {i} near me\n" for i in range(10)),
    "Classify the sentiment. Examples:\n" + "".join(f"Text: I feel {w} today\nLabel: {w}\n"
                                                    for w in ("good", "bad", "fine", "sad", "happy", "calm"))]
QUERIES = ["cheap flights to tokyo", "best pizza", "used cars under 5000"]
PROMPTS = [h + f"Q: {q}\nA:" for q in QUERIES for h in HEADERS] + ["Hi", "The capital of France is"]
GREEDY = GenerationParams(greedy=True, out_seq_length=10, ignore_eos=True)


def tokens(results):
    return [[o.token_ids for o in r.outputs] for r in results]


class Reference:
    """Generation without reuse (the reference), each (prompts, params) computed once."""

    def __init__(self, gen):
        self.gen = Generator(gen.runner, gen.tokenizer, gen.config, prefix_cache=False)
        self.done = {}

    def generate(self, prompts, params):
        key = (tuple(prompts), params)
        if key not in self.done:
            self.done[key] = self.gen.generate(prompts, params)
        return self.done[key]


@pytest.fixture(scope="module")
def off(smollm2):
    return Reference(smollm2)


def fresh(gen, **kw):
    """A generator on gen's model with an empty prefix pool (a pool belongs to its runner)."""
    gen.runner.prefixes.reset(0)
    return Generator(gen.runner, gen.tokenizer, gen.config, **kw)


@pytest.mark.parametrize("params", [
    GREEDY,
    GenerationParams(greedy=True, out_seq_length=10, repetition_penalty=1.5, stop_sequences=["\n"]),
    GenerationParams(temperature=0.9, top_k=40, seed=7, n=3, out_seq_length=6, ignore_eos=True),
], ids=["greedy", "repetition_penalty+stop", "sampled_n3"])
def test_same_tokens_with_and_without_reuse(smollm2, off, params):
    on = fresh(smollm2).generate(PROMPTS, params)
    ref = off.generate(PROMPTS, params)
    assert tokens(on) == tokens(ref)
    assert on.metrics.prefix_hit_tokens > 0.6 * on.metrics.prompt_tokens and ref.metrics.prefix_hit_tokens == 0
    assert on.metrics.prefill_tokens + on.metrics.prefix_hit_tokens == on.metrics.prompt_tokens


def test_chunked_prefill_and_few_slots(smollm2, off):
    """Segments longer than a prefill step, rows joining and leaving 3 slots."""
    small = fresh(smollm2, max_batch_size=3, max_batch_tokens=64)
    assert tokens(small.generate(PROMPTS, GREEDY)) == tokens(off.generate(PROMPTS, GREEDY))


@pytest.mark.slow
def test_equals_transformers(smollm2, smollm2_hf):
    from test_equivalence import hf_greedy
    res = fresh(smollm2).generate(PROMPTS[:4], GREEDY)
    for p, r in zip(PROMPTS[:4], res):
        assert r.outputs[0].token_ids == hf_greedy(smollm2_hf, smollm2.tokenizer, p, 10, eos_token_id=None), p[-30:]


def test_reuse_across_calls_and_recompute(smollm2, off):
    gen = fresh(smollm2)
    first = gen.generate(PROMPTS[:4], GREEDY)
    later = gen.generate(PROMPTS[4:6], GREEDY)       # one row of each family: found in the pool
    header = len(smollm2.tokenizer(HEADERS[0]).input_ids) // 16 * 16
    assert later.metrics.prefix_hit_tokens >= header and later.metrics.prefill_tokens < 0.3 * later.metrics.prompt_tokens
    assert tokens(first) + tokens(later) == tokens(off.generate(PROMPTS[:6], GREEDY))
    rec = gen.generate(PROMPTS[:4], GREEDY.replace(recompute=True))
    assert rec.metrics.prefix_hit_tokens == 0 and tokens(rec) == tokens(first)


def test_shared_part_is_stored_once(smollm2, off):
    long = [HEADERS[0] * 2 + f"Q: {q} {i}\nA:" for i in range(3) for q in QUERIES]
    on, ref = fresh(smollm2).generate(long, GREEDY), off.generate(long, GREEDY)
    assert tokens(on) == tokens(ref)
    assert on.metrics.kv_bytes_per_row <= ref.metrics.kv_bytes_per_row / 4


def test_budget_evicts_and_never_exceeds(smollm2, off):
    """A pool that holds one family's segment: the next call's family evicts it."""
    per_token = smollm2.config.kv_bytes_per_token(smollm2.dtype)
    budget = 1400 * per_token / 2**30
    gen = fresh(smollm2, kv_cache_gb=budget)
    for h in HEADERS + HEADERS:
        rows = [h + f"Q: {q}\nA:" for q in QUERIES[:3]]
        res = gen.generate(rows, GREEDY)
        assert res.metrics.kv_cache_bytes <= budget * 2**30
        assert tokens(res) == tokens(off.generate(rows, GREEDY))
    assert gen.prefixes.evictions >= 2
    huge = gen.generate(["word " * 1500, PROMPTS[0]], GREEDY)    # a row too large still gets its own error
    assert huge[0].error and "KV cache budget" in huge[0].error and huge[1].ok


@pytest.mark.slow
def test_tp2_with_reuse_equals_tp1(smollm2, off):
    with Generator.from_pretrained(None, tp_size=2, tp_timeout_s=60) as gen:
        two = gen.generate(PROMPTS, GREEDY)
    assert two.metrics.prefix_hit_tokens > 0 and tokens(two) == tokens(off.generate(PROMPTS, GREEDY))
