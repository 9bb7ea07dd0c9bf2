"""jobs/_worker.py generate_split: a batch that really runs out of memory (an address-space
limit set with setrlimit in a child process, between what the whole batch and what half of
it allocates) is split and retried, its rows equal the unconstrained outputs; a row that
does not fit even alone becomes that row's error; any other exception falls back to rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import JOB_ROOT

# Runs in a child: RLIMIT_AS is per process and cannot be undone past the hard limit.
# A random model whose K/V are wide for its compute (64 KiB per token, hidden 64), so the
# KV cache is most of what a call allocates: 16 rows x 64 tokens = 64 MiB, half of it 32.
CHILD = textwrap.dedent("""
    import json, random, resource, sys, time
    t0 = time.time()
    import torch
    torch.set_num_threads(2)
    from libinfer import GenerationParams, Generator
    from libinfer.lab.random_model import save_random_model
    from jobs._worker import generate_split, is_oom

    path = save_random_model(sys.argv[1], seed=0, hidden_size=64, n_layers=2, n_heads=64, n_kv_heads=64,
                             head_dim=64, intermediate_size=64)
    gen = Generator.from_pretrained(str(path), dtype="float32", max_batch_size=64, max_batch_tokens=512,
                                    kv_cache_gb=4.0, prefix_cache=False, warmup=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 4000) for _ in range(56)] for _ in range(16)]
    params = GenerationParams(greedy=True, out_seq_length=4, ignore_eos=True)
    ref = gen.generate(prompts, params)              # unconstrained: the reference rows
    kv_full = ref.metrics.kv_cache_bytes

    def vm_size():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))

    def limit(extra):
        gen.runner.cache = None                      # what the next call allocates is all new
        resource.setrlimit(resource.RLIMIT_AS, (vm_size() + extra, resource.RLIM_INFINITY))

    out = {"kv_full": kv_full}
    limit(int(0.75 * kv_full))                       # the whole batch's cache does not fit, half of it does
    try:
        gen.generate(prompts, params)
        out["whole"] = "fit"
    except Exception as e:
        out["whole"] = ("oom: " if is_oom(e) else "other: ") + str(e).splitlines()[0][:200]
    rows, m = generate_split(gen, prompts, params)
    out["errors"] = [r.error for r in rows]
    out["same"] = [r.outputs[0].token_ids if r.outputs else None for r in rows] == [r.outputs[0].token_ids for r in ref]
    out["indexes"] = [r.index for r in rows]
    out["n_prompts"], out["generated"] = m.n_prompts, m.generated_tokens

    limit(2**20)                                 # not even one row's 4 MiB of K/V
    rows, m = generate_split(gen, prompts[:3], params)
    out["alone"] = [r.error for r in rows]
    out["alone_rejected"] = m.n_rejected
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)
    again = gen.generate(prompts[:1], params)        # the generator is still usable afterwards
    out["again"] = again[0].outputs[0].token_ids == ref[0].outputs[0].token_ids
    out["child_s"] = time.time() - t0
    print("RESULT " + json.dumps(out))
""")


def test_out_of_memory_splits_the_batch_under_a_real_memory_limit(tmp_path):
    # Large allocations always by mmap (returned on free), so VmSize is what is really held.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=JOB_ROOT)
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "wide_kv")], cwd=JOB_ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.split("RESULT ", 1)[1])
    assert out["kv_full"] == 16 * 64 * 64 * 1024
    assert out["whole"].startswith("oom: "), out["whole"]          # the limit is real for the whole batch
    assert out["errors"] == [None] * 16 and out["same"], out        # ... and its halves ran, identical
    assert out["indexes"] == list(range(16)) and out["n_prompts"] == 16 and out["generated"] == 16 * 4
    assert all(e and e.startswith("generator error: out of memory even alone") for e in out["alone"]), out["alone"]
    assert out["alone_rejected"] == 3
    assert out["again"]
    assert "out of memory on a batch of 16 rows" in p.stderr and "retrying as two halves" in p.stderr


class _BreaksOn:
    """The real generator, except that a call holding `bad` raises as a bug in one row would."""

    def __init__(self, gen, bad):
        self.gen, self.bad, self.runner = gen, bad, gen.runner

    def generate(self, prompts, params, guides=None):
        if self.bad in prompts:
            raise ValueError("broken row")
        return self.gen.generate(prompts, params, guides=guides)


def test_other_errors_fall_back_to_rows(tiny_model):
    from libinfer import GenerationParams
    from jobs._model import build_generator
    from jobs._worker import generate_split
    gen = build_generator(tiny_model)
    try:
        params = GenerationParams(greedy=True, out_seq_length=3, ignore_eos=True)
        prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
        ref = gen.generate(prompts, params)
        rows, m = generate_split(_BreaksOn(gen, prompts[1]), prompts, params)
        assert [r.error for r in rows] == [None, "generator error: ValueError: broken row", None]
        assert [r.outputs[0].token_ids for r in rows if r.ok] == [ref[0].outputs[0].token_ids, ref[2].outputs[0].token_ids]
        assert m.n_prompts == 3 and m.n_rejected == 1 and m.generated_tokens == 6
        assert generate_split(gen, [], params)[0] == []
    finally:
        gen.close()


def test_is_oom_reads_the_allocators_messages():
    import torch
    from jobs._worker import is_oom
    assert is_oom(MemoryError()) and is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("out of memory"))
    with pytest.raises(RuntimeError) as e:
        torch.empty(2**62, dtype=torch.uint8)     # what a real failed allocation raises
    assert is_oom(e.value), e.value
