"""jobs.benchmark: the performance lab (the talk, section 3) as Hydra runs logged to MLflow.

    python -m jobs.benchmark mode=single size=llama_35m                 # batch-1 latency grid
    python -m jobs.benchmark -m mode=single size=llama_35m,llama_70m    # a model-size sweep
    python -m jobs.benchmark mode=multi workload.batch_size=[1,4,16] workload.sorted=[false,true]
    python -m jobs.benchmark mode=oom oom.budget_gb=2                   # largest batch that fits
    python -m jobs.benchmark mode=replay generation=test1               # the real corpus

Every point is one MLflow run, nested under one parent run per sweep (a Hydra run or
multirun directory, or `sweep=NAME` to collect several commands under one parent).
Model load and warm-up are timed separately and never enter a point's timings.
`jobs.report` turns the runs into the talk's figures, tables and a fitted predictor.
"""
from __future__ import annotations

if not __package__:  # run as a file (python jobs/benchmark.py): import as jobs.*
    import os as _os
    import sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import itertools
import re
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra

from jobs._spark import entry_point
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from jobs._config import ConfigError, GenerationConf, MlflowConf, ModelConf, RandomInitConf

log = logging.getLogger("jobs.benchmark")

MODES = ("single", "multi", "oom", "replay")


# ----------------------------------------------------------------------- config

@dataclass
class WorkloadConf:
    """The grid of one job: every combination is one point (one MLflow run)."""
    input_tokens: List[int] = field(default_factory=lambda: [32, 128])
    output_tokens: List[int] = field(default_factory=lambda: [16, 64])
    batch_size: List[int] = field(default_factory=lambda: [1])
    sorted: List[bool] = field(default_factory=lambda: [False])
    n_prompts: Optional[int] = None        # null = one batch per point
    input_spread: float = 0.0              # prompt lengths uniform in L(1 +- spread); 0 = all equal
    batching: str = "static"               # static (the talk's fixed batches) | continuous
    max_batch_tokens: Optional[int] = None  # prefill tokens per step; null = the whole batch at once
    pad_to_longest: List[bool] = field(default_factory=lambda: [False])   # emulate a padded engine (HF, FT)
    repeats: int = 1                       # timed repeats per point; the fastest is logged
    warm_each_point: bool = True           # untimed run of the point's shape first
    seed: int = 0


@dataclass
class OomConf:
    budget_gb: Optional[float] = None      # CPU: required; GPU: null = the device's real memory
    metric: str = "peak_memory_bytes"      # what the budget bounds: peak_memory_bytes | kv_cache_bytes
    input_tokens: List[int] = field(default_factory=lambda: [128])
    output_tokens: List[int] = field(default_factory=lambda: [8])
    max_batch: int = 1024


@dataclass
class ReplayConf:
    corpus: str = "data/demo_prompts.jsonl"
    text_column: str = "prompt"
    limit: int = 0                         # 0 = every row
    batch_size: List[int] = field(default_factory=lambda: [16])
    sorted: List[bool] = field(default_factory=lambda: [False, True])
    via: str = "pipeline"                  # pipeline (jobs.pipeline: Spark preprocess+generate) | libinfer
    pipeline_overrides: List[str] = field(default_factory=list)   # extra key=value for jobs.pipeline


@dataclass
class BenchmarkConf:
    model: ModelConf = MISSING
    mlflow: MlflowConf = MISSING
    generation: GenerationConf = MISSING   # replay only; the synthetic modes use greedy + ignore_eos
    mode: str = "single"
    size: Optional[str] = None             # a libinfer.lab.SIZES name; replaces `model`
    sweep: Optional[str] = None            # parent run name; null = one per Hydra run/multirun dir
    threads: int = 2                       # torch threads
    workload: WorkloadConf = field(default_factory=WorkloadConf)
    oom: OomConf = field(default_factory=OomConf)
    replay: ReplayConf = field(default_factory=ReplayConf)


ConfigStore.instance().store(name="benchmark_schema", node=BenchmarkConf)


def validate(cfg) -> None:
    from libinfer.lab import SIZES
    from jobs._config import validate as validate_common
    validate_common(cfg)

    def check(key, ok, msg):
        if not ok:
            raise ConfigError(key, msg)
    check("mode", cfg.mode in MODES, f"must be one of {', '.join(MODES)} (got {cfg.mode!r})")
    check("size", cfg.size is None or cfg.size in SIZES, f"must be one of {', '.join(SIZES)} (got {cfg.size!r})")
    w = cfg.workload
    for k in ("input_tokens", "output_tokens", "batch_size"):
        check(f"workload.{k}", len(w[k]) > 0 and all(v >= 1 for v in w[k]), f"must be a non-empty list of ints >= 1")
    check("workload.batching", w.batching in ("static", "continuous"), f"must be static or continuous")
    check("workload.input_spread", 0 <= w.input_spread < 1, "must be in [0, 1)")
    check("oom.metric", cfg.oom.metric in ("peak_memory_bytes", "kv_cache_bytes"),
          "must be peak_memory_bytes or kv_cache_bytes")
    if cfg.mode == "oom" and not cfg.model.device.startswith("cuda"):
        check("oom.budget_gb", cfg.oom.budget_gb is not None and cfg.oom.budget_gb > 0,
              "the CPU search needs a memory budget (e.g. oom.budget_gb=2)")
        if cfg.oom.metric == "peak_memory_bytes":
            import psutil
            avail = psutil.virtual_memory().available / 2**30
            # the doubling phase can overshoot the budget up to ~2x before it stops
            check("oom.budget_gb", 2.2 * cfg.oom.budget_gb < avail,
                  f"{cfg.oom.budget_gb} GiB is too close to this machine's {avail:.1f} GiB available")
    check("replay.via", cfg.replay.via in ("libinfer", "pipeline"), "must be libinfer or pipeline")


def resolve_model(cfg) -> None:
    """`size=NAME`: the model group becomes a random Llama of that ladder size, built on first use."""
    if cfg.size:
        from libinfer.lab import SIZES, cache_dir
        if cfg.size not in SIZES:
            raise ConfigError("size", f"must be one of {', '.join(SIZES)} (got {cfg.size!r})")
        cfg.model.name = cfg.size
        cfg.model.path = str(cache_dir() / "models" / f"lab_{cfg.size}")
        cfg.model.gguf_file = None
        cfg.model.random_init = RandomInitConf(**SIZES[cfg.size], seed=0)


# ---------------------------------------------------------------- MLflow parent

def sweep_key(cfg) -> str:
    if cfg.sweep:
        return cfg.sweep
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        hc = HydraConfig.get()
        return hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.run.dir
    except Exception:       # composed without @hydra.main (tests, notebooks)
        return f"lab-{time.strftime('%Y%m%d-%H%M%S')}"


def parent_run_id(cfg) -> str:
    """The sweep's parent run: found by tag, created by the sweep's first job."""
    import mlflow
    key = sweep_key(cfg)
    exp = mlflow.set_experiment(cfg.mlflow.experiment)
    found = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`lab.sweep` = '{key}' and "
                               "tags.`lab.role` = 'sweep'", output_format="list", max_results=1)
    if found:
        return found[0].info.run_id
    name = cfg.sweep or f"lab {cfg.mode} {Path(key).name}"
    run = mlflow.MlflowClient().create_run(exp.experiment_id, run_name=name,
                                           tags={"lab.sweep": key, "lab.role": "sweep", "job": "benchmark"})
    return run.info.run_id


# ------------------------------------------------------------------ generator

_CACHE: dict = {}   # one generator kept across the jobs of an in-process multirun


def get_generator(cfg):
    from jobs._model import build_generator
    m = cfg.model
    key = (m.name, m.path, m.gguf_file, m.dtype, m.device, m.tp_size)
    if _CACHE.get("key") != key:
        old = _CACHE.pop("gen", None)
        if old is not None:
            old.close()
            del old
        _CACHE.pop("key", None)
        import gc
        from libinfer.lab import trim_heap
        gc.collect()
        trim_heap()
        print(f"loading {m.name} ({m.dtype}, {m.device}, tp={m.tp_size}) ...", flush=True)
        _CACHE.update(key=key, gen=build_generator(m), fresh=True)
        if not _CACHE.get("atexit"):   # stop tensor-parallel ranks cleanly when the process ends
            import atexit
            atexit.register(lambda: _CACHE["gen"].close() if _CACHE.get("gen") is not None else None)
            _CACHE["atexit"] = True
    else:
        _CACHE["fresh"] = False
    return _CACHE["gen"]


def device_name(gen) -> str:
    import platform
    import torch
    if gen.device.type == "cuda":
        return torch.cuda.get_device_name(gen.device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def point_params(cfg, gen, extra: dict) -> dict:
    from libinfer.lab import model_facts
    return {"mode": cfg.mode, "model": cfg.model.name, "size": cfg.size or "", "dtype": cfg.model.dtype,
            "device": cfg.model.device, "device_name": device_name(gen), "tp_size": cfg.model.tp_size,
            "threads": cfg.threads, **model_facts(gen), **extra}


# ------------------------------------------------------------------ the modes

def grid(cfg) -> list:
    from libinfer.lab import Workload
    w = cfg.workload
    batches = [1] if cfg.mode == "single" else list(w.batch_size)
    sorts = [False] if cfg.mode == "single" else list(w.sorted)
    pads = [False] if cfg.mode == "single" else list(w.pad_to_longest)
    return [Workload(i, o, b, n_prompts=w.n_prompts, input_spread=w.input_spread, sorted=s, batching=w.batching,
                     max_batch_tokens=w.max_batch_tokens, pad_to_longest=pad, seed=w.seed)
            for i, o, b, s, pad in itertools.product(w.input_tokens, w.output_tokens, batches, sorts, pads)]


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


def log_point(parent: str, name: str, params: dict, metrics: dict, tags: dict | None = None) -> str:
    import mlflow
    from jobs._tracking import log_metrics
    with mlflow.start_run(run_id=parent):
        with mlflow.start_run(run_name=name, nested=True, tags={"job": "benchmark", "lab.role": "point",
                                                                "lab.mode": params["mode"], **(tags or {})}) as run:
            mlflow.log_params({k: str(v) for k, v in params.items()})
            log_metrics(metrics)
            return run.info.run_id


def run_synthetic(cfg, gen, parent: str, base: dict) -> list[dict]:
    from libinfer.lab import measure
    points = grid(cfg)
    prog = Progress(len(points), f"{cfg.model.name} {cfg.mode}")
    out = []
    for wl in points:
        m = measure(gen, wl, repeats=cfg.workload.repeats, warm=cfg.workload.warm_each_point)
        params = point_params(cfg, gen, wl.params())
        name = f"{cfg.model.name} in{wl.input_tokens} out{wl.output_tokens} b{wl.batch_size}" + \
            (" sorted" if wl.sorted else "") + (" padded" if wl.pad_to_longest else "")
        log_point(parent, name, params, {**m, **base})
        prog.step(f"{name}: {fmt_point(m)}")
        out.append({**params, **m})
    return out


def oom_column(cfg, i: int, o: int) -> str:
    m = cfg.model
    # the budget is the "device memory" of a CPU column (the talk's columns were GPU types)
    budget = f" {cfg.oom.budget_gb:.3g}GiB" if cfg.oom.budget_gb else ""
    return f"{m.name} {m.device} {m.dtype} tp{m.tp_size} in{i} out{o}{budget}"


def run_oom(cfg, gen, parent: str, base: dict) -> list[dict]:
    from libinfer.lab import Workload, measure, release_cache
    from libinfer.oom import memory_probe, search_max_batch
    budget = cfg.oom.budget_gb * 2**30 if cfg.oom.budget_gb else None
    out = []
    for i, o in itertools.product(cfg.oom.input_tokens, cfg.oom.output_tokens):
        col = oom_column(cfg, i, o)
        prog = Progress(int(2 * max(1, cfg.oom.max_batch).bit_length()), f"oom {col}")

        def measure_b(b: int) -> dict:
            wl = Workload(i, o, b, seed=cfg.workload.seed, batching="static")
            try:
                # no warm run: memory is what we ask about, and the warm run would double the cost
                return measure(gen, wl, warm=False, kv_cache_gb=2 * (budget or 0) / 2**30 or None)
            finally:
                release_cache(gen)

        def logged(p):
            params = point_params(cfg, gen, {**Workload(i, o, p.batch_size).params(), "oom_column": col,
                                             "oom_budget_gb": cfg.oom.budget_gb, "oom_metric": cfg.oom.metric})
            metrics = {**p.metrics, **base, "fits": float(p.fits)}
            log_point(parent, f"oom {col} b{p.batch_size}", params, metrics, tags={"lab.oom_reason": p.reason})
            prog.step(f"batch {p.batch_size}: " + ("fits, " + fmt_point(p.metrics) if p.fits else f"OOM ({p.reason})"))
            out.append({**params, **metrics})

        bd = search_max_batch(memory_probe(measure_b, budget, cfg.oom.metric), limit=cfg.oom.max_batch, on_probe=logged)
        print(f"==> {col}: max batch {bd.max_batch}{' (search capped)' if bd.capped else ''} "
              f"with {len(bd.probes)} probes", flush=True)
    return out


def refresh_oom_table(parent: str) -> str:
    """Rebuild the sweep's OOM table from all its probe runs and attach it to the parent."""
    import mlflow
    from libinfer.oom import boundaries_from_records, oom_table_csv, oom_table_markdown
    run = mlflow.get_run(parent)
    runs = mlflow.search_runs([run.info.experiment_id], output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.`lab.mode` = 'oom'")
    records = [{**r.data.params, **r.data.metrics} for r in runs]
    cols = boundaries_from_records(records)
    md = oom_table_markdown(cols, title="OOM boundary (batch size x model/device config)")
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=parent):
        for name, text in (("oom_table.csv", oom_table_csv(cols)), ("oom_table.md", md)):
            Path(tmp, name).write_text(text)
            mlflow.log_artifact(str(Path(tmp, name)), artifact_path="lab")
        for col, bd in cols.items():
            mlflow.set_tag(re.sub(r"[^\w\-. :/]", "_", f"lab.max_batch {col}")[:250], str(bd.max_batch))
    return md


# --------------------------------------------------------------------- replay

def corpus_path(cfg) -> str:
    """The corpus as given, or relative to the repository (the default ships with it)."""
    p = Path(cfg.replay.corpus)
    if not p.exists() and not p.is_absolute() and (Path(__file__).parent.parent / p).exists():
        p = Path(__file__).parent.parent / p
    if not p.exists():
        raise ConfigError("replay.corpus", f"{cfg.replay.corpus} does not exist")
    return str(p.resolve())


def read_corpus(path: str, column: str, limit: int) -> list[str]:
    import json
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


def run_replay(cfg, gen, parent: str, base: dict) -> list[dict]:
    """The real corpus with a real preset (e.g. generation=test1): unsorted arrival order
    vs sorted by token length, per batch size. `via=pipeline` runs jobs.pipeline instead."""
    if cfg.replay.via == "pipeline":
        return run_replay_pipeline(cfg, parent, base)
    import statistics
    from jobs._config import generation_params
    params = generation_params(cfg.generation)
    texts = read_corpus(corpus_path(cfg), cfg.replay.text_column, cfg.replay.limit)
    if not texts:
        raise ConfigError("replay.corpus", f"no rows with a '{cfg.replay.text_column}' text in {cfg.replay.corpus}")
    ids = [gen.encode(t, params) for t in texts]
    lens = [len(x) for x in ids]
    points = list(itertools.product(cfg.replay.batch_size, cfg.replay.sorted))
    prog = Progress(len(points), f"{cfg.model.name} replay")
    out = []
    for b, srt in points:
        prompts = sorted(ids, key=len) if srt else list(ids)
        gen.max_batch_size, gen.static_batching = b, cfg.workload.batching == "static"
        gen.max_batch_tokens = cfg.workload.max_batch_tokens or max(b * max(lens), 1)
        res = gen.generate(prompts, params)
        m = res.metrics
        metrics = {**m.summary(), **base,
                   "ttft_s": statistics.fmean(m.ttft_s) if m.ttft_s else float("nan"),
                   "tpot_s": m.decode_s / m.decode_steps if m.decode_steps else float("nan"),
                   "e2e_latency_s": statistics.fmean(m.latencies_s) if m.latencies_s else m.wall_s,
                   "requests_per_s": len(prompts) / m.wall_s}
        p = point_params(cfg, gen, {"batch_size": b, "sorted": srt, "n_prompts": len(prompts),
                                    "input_tokens": round(statistics.fmean(lens)), "max_prompt_tokens": max(lens),
                                    "output_tokens": params.out_seq_length, "corpus": cfg.replay.corpus,
                                    "batching": cfg.workload.batching, "replay_via": "libinfer"})
        name = f"{cfg.model.name} replay b{b}" + (" sorted" if srt else " unsorted")
        log_point(parent, name, p, metrics)
        prog.step(f"{name}: {fmt_point(metrics)}")
        out.append({**p, **metrics})
    return out


def pipeline_overrides(cfg, sort: bool, outdir: str, run_name: str) -> list[str]:
    """The jobs.pipeline command line of a replay point: our model and generation choices
    (and their dotted overrides), the corpus, the sort switch and our MLflow store."""
    choices, task = {}, []
    try:
        from hydra.core.hydra_config import HydraConfig
        hc = HydraConfig.get()
        choices, task = dict(hc.runtime.choices), list(hc.overrides.task)
    except Exception:   # composed without @hydra.main
        pass
    args = [f"generation={choices.get('generation', 'test1')}"]
    if cfg.size:
        args += [f"model=tiny_random", f"model.name={cfg.model.name}", f"model.path={cfg.model.path}"]
    else:
        args += [f"model={choices.get('model', cfg.model.name)}"]
    args += [o for o in task if o.split("=", 1)[0].lstrip("+~").startswith(("generation.", "model.", "spark"))]
    args += [f"data.path={corpus_path(cfg)}", f"data.text_column={cfg.replay.text_column}",
             f"data.limit={cfg.replay.limit}", f"data.sort_by_length={str(sort).lower()}", f"out={outdir}",
             "overwrite=true", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
             f"mlflow.experiment={cfg.mlflow.experiment}", f"mlflow.run_name={run_name}",
             *cfg.replay.pipeline_overrides]
    return args


def run_replay_pipeline(cfg, parent: str, base: dict) -> list[dict]:
    """Run `python -m jobs.pipeline` (Spark preprocess + generate) per sort setting, timed as
    a whole process, and copy its MLflow metrics into a point run."""
    import subprocess
    import mlflow
    from jobs._model import ensure_model
    ensure_model(cfg.model)          # a ladder size is written here, not by the pipeline's tiny default
    out = []
    prog = Progress(len(cfg.replay.sorted), f"{cfg.model.name} replay via jobs.pipeline")
    for srt in cfg.replay.sorted:
        tag = f"lab-replay-{time.time_ns()}"
        with tempfile.TemporaryDirectory(prefix="lab_replay_") as outdir:
            cmd = [sys.executable, "-m", "jobs.pipeline", *pipeline_overrides(cfg, srt, outdir, tag)]
            print("  " + " ".join(cmd), flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, text=True, capture_output=True)
            wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"jobs.pipeline failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
        runs = mlflow.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{tag}'",
                                  output_format="list")
        if not runs:
            raise RuntimeError(f"jobs.pipeline finished but logged no MLflow run named {tag}")
        pm = runs[0].data.metrics
        metrics = {**pm, **base, "process_wall_s": wall,
                   # the common names the report reads
                   "wall_s": pm.get("generate.wall_s", wall), "tokens_per_s": pm.get("generate.tokens_per_s", 0.0),
                   "padding_waste": pm.get("generate.padding_waste", 0.0)}
        rows = pm.get("generate.rows") or 0
        p = {"mode": "replay", "model": cfg.model.name, "sorted": srt, "corpus": cfg.replay.corpus,
             "replay_via": "pipeline", "pipeline_run_id": runs[0].info.run_id, "device": cfg.model.device,
             "dtype": cfg.model.dtype, "tp_size": cfg.model.tp_size, "batch_size": cfg.model.max_batch_size,
             "n_prompts": int(rows),
             "input_tokens": round(pm.get("generate.prompt_tokens", 0) / rows) if rows else 0}
        name = f"{cfg.model.name} replay pipeline" + (" sorted" if srt else " unsorted")
        log_point(parent, name, p, metrics)
        prog.step(f"{name}: process {wall:.1f}s, generate {metrics['wall_s']:.1f}s, "
                  f"{metrics['tokens_per_s']:.1f} tok/s, padding {100 * metrics['padding_waste']:.1f}%")
        out.append({**p, **metrics})
    return out


# ----------------------------------------------------------------------- main

def run(cfg) -> list[dict]:
    """The job body (tests call it with a composed config)."""
    import mlflow
    import torch
    from jobs._tracking import log_config
    resolve_model(cfg)
    validate(cfg)
    torch.set_num_threads(cfg.threads)
    if not cfg.mlflow.enabled:
        raise ConfigError("mlflow.enabled", "the lab records every point in MLflow; enable it")
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    parent = parent_run_id(cfg)
    gen = None if (cfg.mode == "replay" and cfg.replay.via == "pipeline") else get_generator(cfg)
    base = {}
    if gen is not None and _CACHE.get("fresh"):
        # paid once per model and reported apart: never inside a point's timings
        base = {"model_load_s": gen.load_s, "model_warmup_s": gen.warmup_s}
    with mlflow.start_run(run_id=parent):
        log_config(cfg, name=f"config_{cfg.mode}_{cfg.model.name}_{time.strftime('%H%M%S')}.yaml")
    t0 = time.perf_counter()
    if cfg.mode == "oom":
        records = run_oom(cfg, gen, parent, base)
        print(refresh_oom_table(parent), flush=True)
    elif cfg.mode == "replay":
        records = run_replay(cfg, gen, parent, base)
    else:
        records = run_synthetic(cfg, gen, parent, base)
    print(f"{len(records)} points in {time.perf_counter() - t0:.0f}s under parent run {parent} "
          f"(experiment {cfg.mlflow.experiment!r}, {cfg.mlflow.tracking_uri}); "
          f"figures: python -m jobs.report sweep={parent}", flush=True)
    return records


@hydra.main(config_path="../conf", config_name="benchmark", version_base=None)
@entry_point
def main(cfg) -> None:
    logging.basicConfig(level=logging.WARNING)
    run(cfg)


if __name__ == "__main__":
    main()
