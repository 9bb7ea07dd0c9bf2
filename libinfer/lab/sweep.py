"""The lab's sweeps, without Spark or MLflow: a grid of workloads, the OOM boundary of
each (input, output) column, and a real corpus in arrival order vs sorted by length.

A `Sweep` holds what every point of one job shares and hands each point, as soon as it is
measured, to `record(name, params, metrics, tags)` (jobs.benchmark logs it as one MLflow
run), and prints it with progress and an ETA.
"""
from __future__ import annotations

import itertools
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..generator import Generator
from ..params import GenerationParams
from .oom import memory_probe, search_max_batch
from .sizes import model_facts
from .workload import Workload, latency_metrics, measure, release_cache

Record = Callable[[str, dict, dict, dict], None]   # (name, params, metrics, tags)


class Progress:
    def __init__(self, total: int, what: str):
        self.total, self.done, self.t0, self.what = total, 0, time.perf_counter(), what

    def step(self, text: str) -> None:
        self.done += 1
        el = time.perf_counter() - self.t0
        eta = el / self.done * (self.total - self.done)
        print(f"[{self.what} {self.done}/{self.total} {el:.0f}s, eta {eta:.0f}s] {text}", flush=True)


def fmt_point(m: dict) -> str:
    return (f"e2e {m['wall_s']:.3f}s ttft {m['ttft_s']:.3f}s tpot {1e3 * m['tpot_s']:.1f}ms "
            f"{m['tokens_per_s']:.1f} tok/s pad {100 * (m['padding_waste'] + m.get('prefill_padding', 0)):.0f}% "
            f"peak {m['peak_memory_bytes'] / 2**20:.0f}MiB")


def device_name(gen: Generator) -> str:
    if gen.device.type == "cuda":
        return torch.cuda.get_device_name(gen.device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def read_corpus(path: str, column: str, limit: int) -> list[str]:
    """The non-empty `column` texts of a JSONL file (bad lines skipped), at most `limit` (0: all)."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                text = json.loads(line).get(column)
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(text, str) and text.strip():
                rows.append(text)
            if limit and len(rows) >= limit:
                break
    return rows


@dataclass
class Sweep:
    """params: what the job says of every point (mode, model, size, dtype, device, tp_size,
    threads); the device's name and the model's shape numbers are added. metrics: added to
    every recorded point (the model's load and warm-up times, paid once per load)."""
    gen: Generator
    params: dict
    record: Record
    metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        self.params = {**self.params, "device_name": device_name(self.gen), **model_facts(self.gen)}

    def _point(self, name: str, params: dict, metrics: dict, tags: dict | None = None) -> dict:
        params, metrics = {**self.params, **params}, {**metrics, **self.metrics}
        self.record(name, params, metrics, tags or {})
        return {**params, **metrics}

    def points(self, workloads: list[Workload], repeats: int = 1, warm: bool = True) -> list[dict]:
        """Measure each workload (the fastest of `repeats`; see workload.measure)."""
        model = self.params["model"]
        prog = Progress(len(workloads), f"{model} {self.params['mode']}")
        out = []
        for wl in workloads:
            m = measure(self.gen, wl, repeats=repeats, warm=warm)
            name = f"{model} in{wl.input_tokens} out{wl.output_tokens} b{wl.batch_size}" + \
                (" sorted" if wl.sorted else "") + (" padded" if wl.pad_to_longest else "")
            out.append(self._point(name, wl.params(), m))
            prog.step(f"{name}: {fmt_point(m)}")
        return out

    def oom(self, input_tokens: list[int], output_tokens: list[int], budget_gb: float | None,
            metric: str = "peak_memory_bytes", max_batch: int = 1024, seed: int = 0) -> list[dict]:
        """The largest batch that fits, per (input, output) column; every probe is a point."""
        gen, p = self.gen, self.params
        budget = budget_gb * 2**30 if budget_gb else None
        out = []
        for i, o in itertools.product(input_tokens, output_tokens):
            # the budget is the "device memory" of a CPU column (the talk's columns were GPU types)
            col = f"{p['model']} {p['device']} {p['dtype']} tp{p['tp_size']} in{i} out{o}" + \
                (f" {budget_gb:.3g}GiB" if budget_gb else "")
            prog = Progress(int(2 * max(1, max_batch).bit_length()), f"oom {col}")

            def measure_b(b: int) -> dict:
                wl = Workload(i, o, b, seed=seed, batching="static")
                try:
                    # no warm run: memory is what we ask about, and the warm run would double the cost
                    return measure(gen, wl, warm=False, kv_cache_gb=2 * (budget or 0) / 2**30 or None)
                finally:
                    release_cache(gen)

            def logged(pr):
                params = {**Workload(i, o, pr.batch_size).params(), "oom_column": col, "oom_budget_gb": budget_gb,
                          "oom_metric": metric}
                out.append(self._point(f"oom {col} b{pr.batch_size}", params, {**pr.metrics, "fits": float(pr.fits)},
                                       tags={"oom_reason": pr.reason}))
                prog.step(f"batch {pr.batch_size}: " + ("fits, " + fmt_point(pr.metrics) if pr.fits
                                                        else f"OOM ({pr.reason})"))

            bd = search_max_batch(memory_probe(measure_b, budget, metric), limit=max_batch, on_probe=logged)
            print(f"==> {col}: max batch {bd.max_batch}{' (search capped)' if bd.capped else ''} "
                  f"with {len(bd.probes)} probes", flush=True)
        return out

    def replay(self, texts: list[str], params: GenerationParams, batch_sizes: list[int], sorts: list[bool],
               batching: str = "static", max_batch_tokens: int | None = None, corpus: str = "") -> list[dict]:
        """Real prompts with a real preset: arrival order vs sorted by token length, per batch size."""
        gen = self.gen
        ids = [gen.encode(t, params) for t in texts]
        lens = [len(x) for x in ids]
        points = list(itertools.product(batch_sizes, sorts))
        prog = Progress(len(points), f"{self.params['model']} replay")
        out = []
        for b, srt in points:
            prompts = sorted(ids, key=len) if srt else list(ids)
            gen.max_batch_size, gen.static_batching = b, batching == "static"
            gen.max_batch_tokens = max_batch_tokens or max(b * max(lens), 1)
            # The replay is the talk's length-sorting study (3.5): shared-prefix reuse would
            # make the rows' cached lengths short and alike whatever their order
            # (benchmarks/prefix_cache.py measures it).
            gen.prefix_cache = False
            m = latency_metrics(gen.generate(prompts, params).metrics, len(prompts))
            name = f"{self.params['model']} replay b{b}" + (" sorted" if srt else " unsorted")
            out.append(self._point(name, {
                "batch_size": b, "sorted": srt, "n_prompts": len(prompts), "input_tokens": round(statistics.fmean(lens)),
                "max_prompt_tokens": max(lens), "output_tokens": params.out_seq_length, "corpus": corpus,
                "batching": batching, "replay_via": "libinfer"}, m))
            prog.step(f"{name}: {fmt_point(m)}")
        return out
