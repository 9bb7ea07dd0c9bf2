"""The scheduler and the memory budget: never more rows than KV slots, never more prompt
tokens per prefill step than max_batch_tokens, never a cache over kv_cache_gb, and a
row that cannot fit is rejected alone with a reason instead of hanging the call."""
from __future__ import annotations

import random

import pytest

from libinfer import Generator, GenerationParams
from libinfer.engine.scheduler import Request, Scheduler, Sequence


@pytest.mark.parametrize("static", [False, True])
def test_scheduler_never_exceeds_its_slots_or_token_budget(static):
    rng = random.Random(7)
    n_slots, budget = 5, 256
    requests = [Request(i, [1] * rng.randint(1, 400), rng.randint(1, 3)) for i in range(60)]
    sched = Scheduler(n_slots, budget, static=static)
    sched.add(requests)
    admitted_order, steps = [], 0
    while sched.has_work():
        steps += 1
        assert steps < 10_000, "scheduler made no progress"
        batch = sched.admit()
        tokens = sum(len(r.prompt_ids) for r in batch)
        # Over the token budget only as a lone prompt (the generator prefills it in chunks).
        assert tokens <= budget or len(batch) == 1 or static
        for r in batch:
            admitted_order.append(r)
            for j in range(r.n):
                sched.place(Sequence(r.index, j, r.prompt_ids))
        assert len(sched.running) <= n_slots
        assert [s.slot for s in sched.running] == list(range(len(sched.running)))
        if not batch:        # a decode step: some rows finish
            for s in sched.running:
                s.tokens.append(0)
                if rng.random() < 0.3:
                    s.finish_reason = "length"
            done, moves = sched.retire_finished()
            assert all(dst < len(sched.running) <= src for src, dst, _ in moves)
            assert [s.slot for s in sched.running] == list(range(len(sched.running)))
    assert sorted(r.index for r in admitted_order) == list(range(60))
    lengths = [len(r.prompt_ids) for r in admitted_order]
    if static:
        assert [r.index for r in admitted_order] == list(range(60))     # given order kept
    else:
        assert lengths == sorted(lengths)                               # shortest prompt first


@pytest.fixture(scope="module")
def spied():
    """A fresh fp32 generator whose runner records every call's size."""
    gen = Generator.from_pretrained(None, dtype="float32", max_batch_tokens=96, warmup=False)
    calls = {"prefill": [], "decode": [], "allocate": []}
    runner = gen.runner
    for name in calls:
        real = getattr(runner, name)

        def spy(*args, _real=real, _name=name):
            out = _real(*args)
            calls[_name].append(out.nbytes if _name == "allocate" else len(args[0]))
            return out
        setattr(runner, name, spy)
    yield gen, calls
    gen.close()


def test_generator_stays_in_its_kv_budget_and_rejects_what_cannot_fit(spied):
    gen, calls = spied
    per_token = gen.config.kv_bytes_per_token(gen.dtype)
    gen.kv_cache_gb = 3 * 160 * per_token / 2**30          # room for 3 rows of 160 tokens
    gen.max_batch_size = 8
    rng = random.Random(1)
    prompts = [[rng.randint(100, 20000) for _ in range(rng.randint(10, 140))] for _ in range(9)]
    prompts.insert(4, [7] * 600)                            # cannot fit even alone
    params = GenerationParams(greedy=True, out_seq_length=8, ignore_eos=True)
    res = gen.generate(prompts, params)

    bad = res[4]
    assert not bad.ok and "KV cache budget" in bad.error and "608" in bad.error and not bad.outputs
    assert all(r.ok and len(r.outputs[0].token_ids) == 8 for i, r in enumerate(res) if i != 4)
    assert res.metrics.n_rejected == 1
    budget = gen.kv_cache_gb * 2**30
    assert calls["allocate"] and max(calls["allocate"]) <= budget
    assert res.metrics.batch_slots <= 3 and max(calls["decode"]) <= res.metrics.batch_slots
    assert max(calls["prefill"]) <= gen.max_batch_tokens

    # The budget changed how rows were grouped, not what they generate.
    gen.kv_cache_gb, gen.max_batch_size = 4.0, 32
    again = gen.generate([p for i, p in enumerate(prompts) if i != 4], params)
    assert [r.outputs[0].token_ids for r in again] == [r.outputs[0].token_ids for i, r in enumerate(res) if i != 4]


def test_a_budget_too_small_for_any_row_rejects_every_row_at_once(spied):
    gen, _ = spied
    gen.kv_cache_gb = 1e-6
    res = gen.generate(["hello there", "a second prompt"], GenerationParams(greedy=True, out_seq_length=4))
    assert all(not r.ok and "KV cache budget" in r.error for r in res)
    assert res.metrics.n_rejected == 2 and res.metrics.generated_tokens == 0
