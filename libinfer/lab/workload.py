"""One point of the performance lab, measured without Spark or MLflow (the talk, section 3).

- `synthetic_prompts`: token-id prompts of exact lengths (fixed or spread), so input
  length is an axis and not an accident of a tokenizer.
- `Workload` + `measure`: one point of the study, run with `ignore_eos` so the number of
  generated tokens is exactly what was asked (a model that emits EOS early would make
  "latency vs output tokens" meaningless).
"""
from __future__ import annotations

import gc
import itertools
import statistics
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..generator import Generator
from ..params import GenerationParams


def prompt_lengths(n: int, input_tokens: int, spread: float = 0.0, seed: int = 0) -> list[int]:
    """n lengths with mean ~input_tokens: all equal (spread 0) or uniform in
    [L(1-spread), L(1+spread)] - the mixed lengths of a real corpus."""
    if spread <= 0:
        return [input_tokens] * n
    rng = np.random.default_rng(seed)
    lo, hi = max(1, int(input_tokens * (1 - spread))), max(1, int(input_tokens * (1 + spread)))
    return [int(x) for x in rng.integers(lo, hi + 1, size=n)]


def synthetic_prompts(lengths: list[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Random token ids (above the special-token range) of the given lengths."""
    rng = np.random.default_rng(seed + 1)
    low = min(1000, vocab_size // 2)
    return [rng.integers(low, vocab_size, size=n).tolist() for n in lengths]


@dataclass
class Workload:
    input_tokens: int
    output_tokens: int
    batch_size: int
    n_prompts: int | None = None    # None = one batch (batch_size prompts)
    input_spread: float = 0.0
    sorted: bool = False            # order prompts by length before batching
    batching: str = "static"        # static (the talk's fixed batches) | continuous
    max_batch_tokens: int | None = None   # prefill tokens per step; None = the whole batch at once
    # Emulate a padded engine (HF generate, FasterTransformer's static batches): every prompt
    # of a batch is left-padded to the batch's longest, so every row pays for the longest one.
    pad_to_longest: bool = False
    seed: int = 0

    @property
    def prompts_count(self) -> int:
        return self.n_prompts or self.batch_size

    def params(self) -> dict:
        d = asdict(self)
        d["n_prompts"] = self.prompts_count
        return d


def grid(input_tokens, output_tokens, batch_sizes=(1,), sorts=(False,), pads=(False,), **common) -> list[Workload]:
    """Every combination of the axes, one Workload each; `common` is the same for all."""
    return [Workload(i, o, b, sorted=s, pad_to_longest=pad, **common)
            for i, o, b, s, pad in itertools.product(input_tokens, output_tokens, batch_sizes, sorts, pads)]


def pad_batches(prompts: list[list[int]], batch_size: int, filler: int) -> list[list[int]]:
    """Left-pad each consecutive batch's prompts to that batch's longest prompt."""
    out = []
    for a in range(0, len(prompts), batch_size):
        chunk = prompts[a:a + batch_size]
        longest = max(len(p) for p in chunk)
        out += [[filler] * (longest - len(p)) + p for p in chunk]
    return out


def release_cache(gen: Generator) -> None:
    """Drop the engine's KV cache so the next point allocates (and is measured) afresh:
    the cache only grows otherwise, and would inflate later points' peak memory."""
    try:
        gen.runner.cache = None
    except AttributeError:      # the tensor-parallel runner owns its ranks' caches; keep them
        pass
    gc.collect()
    if gen.device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        trim_heap()


def trim_heap() -> None:
    """Give freed heap back to the OS (glibc), so sampled RSS reflects what is live now."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def configure(gen: Generator, wl: Workload, prompt_lens: list[int], kv_cache_gb: float | None = None) -> None:
    gen.max_batch_size = wl.batch_size
    gen.static_batching = wl.batching == "static"
    longest = max(prompt_lens)
    gen.max_batch_tokens = wl.max_batch_tokens or max(wl.batch_size * longest, longest)
    if kv_cache_gb is not None:
        gen.kv_cache_gb = kv_cache_gb
    else:  # never let the engine's cache budget shrink the batch we are measuring
        per_slot = (longest + wl.output_tokens + 64) * gen.config.kv_bytes_per_token(gen.dtype)
        gen.kv_cache_gb = max(gen.kv_cache_gb, 1.01 * wl.batch_size * per_slot / 2**30)


def preallocate(gen: Generator, wl: Workload, longest: int) -> None:
    """Allocate the KV cache the timed run will ask for (the generator's own plan)."""
    if not hasattr(gen.runner, "allocate"):
        return
    n_slots, max_len = gen.plan_cache([longest] * wl.prompts_count, GenerationParams(out_seq_length=wl.output_tokens))
    gen.runner.allocate(max(1, n_slots), max_len)


def _run_once(gen: Generator, prompts, wl: Workload) -> dict[str, float]:
    params = GenerationParams(out_seq_length=wl.output_tokens, greedy=True, ignore_eos=True)
    res = gen.generate(prompts, params)
    m = res.metrics
    bad = [r.error for r in res if not r.ok]
    if bad:
        raise ValueError(f"{len(bad)} prompts rejected: {bad[0]}")
    n = len(prompts)
    return {**latency_metrics(m, n), "max_latency_s": max(m.latencies_s) if m.latencies_s else m.wall_s,
            "exact_lengths": float(m.generated_tokens == n * wl.output_tokens)}


def latency_metrics(m, n_prompts: int) -> dict[str, float]:
    """A generate call's metrics summary plus the lab's per-request latencies."""
    return {**m.summary(),
            "ttft_s": statistics.fmean(m.ttft_s) if m.ttft_s else float("nan"),
            # every decode step emits one token for each running row
            "tpot_s": m.decode_s / m.decode_steps if m.decode_steps else float("nan"),
            "e2e_latency_s": statistics.fmean(m.latencies_s) if m.latencies_s else m.wall_s,
            "requests_per_s": n_prompts / m.wall_s if m.wall_s else 0.0}


def measure(gen: Generator, wl: Workload, repeats: int = 1, warm: bool = True,
            kv_cache_gb: float | None = None) -> dict[str, float]:
    """Run one point; returns flat metrics (of the fastest of `repeats` runs; peak memory
    is the max over them).

    warm: first run the same prompts with 2 output tokens, untimed, so the timed run does
    not pay for the KV-cache allocation of this shape (the talk's warm-up lesson); the
    cost is reported as `point_warmup_s`."""
    lens = prompt_lengths(wl.prompts_count, wl.input_tokens, wl.input_spread, wl.seed)
    prompts = synthetic_prompts(lens, gen.config.vocab_size, wl.seed)
    if wl.sorted:
        prompts.sort(key=len)
    real = sum(lens)
    if wl.pad_to_longest:
        prompts = pad_batches(prompts, wl.batch_size, filler=prompts[0][0])
    configure(gen, wl, [len(p) for p in prompts], kv_cache_gb)
    release_cache(gen)
    extra = {"point_warmup_s": 0.0}
    if warm:
        warm_wl = Workload(**{**asdict(wl), "output_tokens": min(2, wl.output_tokens)})
        extra["point_warmup_s"] = _run_once(gen, prompts, warm_wl)["wall_s"]
        preallocate(gen, wl, max(lens))
    runs = [_run_once(gen, prompts, wl) for _ in range(max(1, repeats))]
    # The fastest repeat: other processes on a shared machine only ever add time.
    out = dict(min(runs, key=lambda r: r["wall_s"]))
    out["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in runs)
    out["repeats"] = len(runs)
    out["wall_s_spread"] = max(r["wall_s"] for r in runs) / out["wall_s"] - 1 if out["wall_s"] else 0.0
    out.update(extra)
    out["prefill_padding"] = 1 - real / sum(len(p) for p in prompts)
    out["mean_prompt_tokens"] = sum(lens) / len(lens)
    out["max_prompt_tokens"] = max(lens)
    return out
