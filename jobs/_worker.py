"""Executor-side generate calls that survive what one batch can do to a task: a batch that
runs out of memory is split in halves and each half retried (down to single rows), a batch
that raises anything else is retried row by row, so only the row that cannot run ends in
quarantine and the Spark task never fails for it (see docs/faults.md)."""
from __future__ import annotations

import gc
import logging

log = logging.getLogger("jobs.worker")

# What the allocators say when memory runs out: torch's CPU allocator ("DefaultCPUAllocator:
# not enough memory" / "can't allocate memory"), CUDA's ("CUDA out of memory"), and errno 12
# ("Cannot allocate memory") from a failed mmap under an address-space limit.
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def is_oom(e: BaseException) -> bool:
    import torch
    if isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _OOM_TEXT)


def _release(gen) -> None:
    """Give back what a failed call may still hold: the runner's KV cache (a later call
    allocates the size it needs; the prefix pool's segments are recomputed when read) and
    the allocator's cached blocks."""
    import torch
    if getattr(gen.runner, "cache", None) is not None:
        gen.runner.cache = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate_split(gen, prompts, params, guides=None):
    """gen.generate(prompts, params, guides=guides) that never raises for its rows.

    Returns (list[RequestOutput] in prompt order, the merged GenerationMetrics of the calls
    that ran). On an out-of-memory error the batch is split in halves and each half retried
    (recursively, down to one row); a single row that still runs out of memory becomes that
    row's error. Any other exception falls back to one call per row, so the row that breaks
    the call gets the error and the others run. Error rows are counted in the metrics'
    n_prompts and n_rejected, as rows the generator rejects itself are."""
    from libinfer import GenerationMetrics, RequestOutput
    state = {"metrics": GenerationMetrics(), "splits": 0}

    def call(idx):
        res = gen.generate([prompts[i] for i in idx], params, guides=None if guides is None else [guides[i] for i in idx])
        state["metrics"] = state["metrics"].merge(res.metrics)
        return [RequestOutput(i, r.prompt, r.prompt_token_ids, r.outputs, r.error) for i, r in zip(idx, res)]

    def failed(i, reason):
        m = state["metrics"]
        m.n_prompts += 1
        m.n_rejected += 1
        return RequestOutput(i, None, prompts[i], error=f"generator error: {reason}")

    def one_by_one(idx):
        outs = []
        for i in idx:
            try:
                outs += call([i])
                continue
            except Exception as e:  # noqa: BLE001 - the row's error, not the task's
                oom, why = is_oom(e), f"{type(e).__name__}: {e}"
            if oom:
                _release(gen)
                why = "out of memory even alone: " + why.splitlines()[0][:300]
            outs.append(failed(i, why))
        return outs

    def run(idx):
        try:
            return call(idx)
        except Exception as e:  # noqa: BLE001 - handled below, per kind
            oom, why = is_oom(e), f"{type(e).__name__}: {e}"
        # Out of the except clause: the traceback (and the failed call's tensors in its
        # frames) is gone before the retries allocate again.
        if not oom:
            return one_by_one(idx) if len(idx) > 1 else [failed(idx[0], why)]
        _release(gen)
        why = why.splitlines()[0][:300]
        if len(idx) == 1:
            return [failed(idx[0], f"out of memory even alone: {why}")]
        state["splits"] += 1
        log.warning("generate: out of memory on a batch of %d rows (%s), retrying as two halves", len(idx), why)
        half = len(idx) // 2
        return run(idx[:half]) + run(idx[half:])

    outs = run(list(range(len(prompts)))) if len(prompts) else []
    if state["splits"]:
        log.warning("generate: %d rows done after %d out-of-memory splits", len(prompts), state["splits"])
    return outs, state["metrics"]
