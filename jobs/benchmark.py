"""jobs.benchmark: the performance lab (the talk, section 3) as Hydra runs logged to MLflow.

    python -m jobs.benchmark mode=single size=llama_35m                 # batch-1 latency grid
    python -m jobs.benchmark -m mode=single size=llama_35m,llama_70m    # a model-size sweep
    python -m jobs.benchmark mode=multi workload.batch_size=[1,4,16] workload.sorted=[false,true]
    python -m jobs.benchmark mode=oom oom.budget_gb=2                   # largest batch that fits
    python -m jobs.benchmark mode=replay generation=test1               # the real corpus

Every point is one MLflow run, nested under one parent run per sweep (a Hydra run or
multirun directory, or `sweep=NAME` to collect several commands under one parent).
Model load and warm-up are timed separately and never enter a point's timings.
The measuring is `libinfer.lab.sweep`; this file is its config, MLflow runs and the
`replay.via=pipeline` mode (which runs jobs.pipeline). `jobs.report` turns the runs into
the talk's figures, tables and a fitted predictor.
"""
from __future__ import annotations

if not __package__:  # run as a file (python jobs/benchmark.py): import as jobs.*
    import os as _os
    import sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import logging
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from jobs._config import ConfigError, GenerationConf, MlflowConf, ModelConf, RandomInitConf
from jobs._spark import entry_point

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
    size: Optional[str] = None             # a libinfer.lab.sizes.SIZES name; replaces `model`
    sweep: Optional[str] = None            # parent run name; null = one per Hydra run/multirun dir
    threads: int = 2                       # torch threads
    workload: WorkloadConf = field(default_factory=WorkloadConf)
    oom: OomConf = field(default_factory=OomConf)
    replay: ReplayConf = field(default_factory=ReplayConf)


ConfigStore.instance().store(name="benchmark_schema", node=BenchmarkConf)


def validate(cfg) -> None:
    from libinfer.lab.sizes import SIZES
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
        from libinfer.lab.sizes import SIZES, size_model_dir
        if cfg.size not in SIZES:
            raise ConfigError("size", f"must be one of {', '.join(SIZES)} (got {cfg.size!r})")
        cfg.model.name = cfg.size
        cfg.model.path = str(size_model_dir(cfg.size))
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
    from jobs._tracking import lab_parent
    key = sweep_key(cfg)
    return lab_parent(cfg.mlflow.experiment, key, cfg.sweep or f"lab {cfg.mode} {Path(key).name}")


# ------------------------------------------------------------------ generator

_CACHE: dict = {}   # one generator kept across the jobs of an in-process multirun


def get_generator(cfg):
    from jobs._model import build_generator
    m = cfg.model
    key = (m.name, m.path, m.gguf_file, m.dtype, m.get("quantization", "none"), m.device, m.tp_size)
    if _CACHE.get("key") != key:
        old = _CACHE.pop("gen", None)
        if old is not None:
            old.close()
            del old
        _CACHE.pop("key", None)
        import gc
        from libinfer.lab.workload import trim_heap
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


# ------------------------------------------------------------------- the points

def refresh_oom_table(parent: str) -> str:
    """Rebuild the sweep's OOM table from all its probe runs and attach it to the parent."""
    import mlflow
    from jobs._tracking import lab_points
    from libinfer.lab.oom import oom_tables
    runs = lab_points(mlflow.MlflowClient(), mlflow.get_run(parent).info.experiment_id, parent, mode="oom")
    cols, tables = oom_tables([{**r.data.params, **r.data.metrics} for r in runs])
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=parent):
        for name, text in tables.items():
            Path(tmp, name).write_text(text)
            mlflow.log_artifact(str(Path(tmp, name)), artifact_path="lab")
        for col, bd in cols.items():
            mlflow.set_tag(re.sub(r"[^\w\-. :/]", "_", f"lab.max_batch {col}")[:250], str(bd.max_batch))
    return tables["oom_table.md"]


def corpus_path(cfg) -> str:
    """The corpus as given, or relative to the repository (the default ships with it)."""
    p = Path(cfg.replay.corpus)
    if not p.exists() and not p.is_absolute() and (Path(__file__).parent.parent / p).exists():
        p = Path(__file__).parent.parent / p
    if not p.exists():
        raise ConfigError("replay.corpus", f"{cfg.replay.corpus} does not exist")
    return str(p.resolve())


def run_sweep(cfg, gen, parent: str, base: dict) -> list[dict]:
    """The synthetic modes and the libinfer replay: measured by libinfer.lab.sweep."""
    from jobs._tracking import log_lab_point
    from libinfer.lab.sweep import Sweep, read_corpus
    from libinfer.lab.workload import grid
    m, w, one = cfg.model, cfg.workload, cfg.mode == "single"
    sweep = Sweep(gen, {"mode": cfg.mode, "model": m.name, "size": cfg.size or "", "dtype": m.dtype,
                        "device": m.device, "tp_size": m.tp_size, "threads": cfg.threads},
                  record=lambda *point: log_lab_point(parent, *point), metrics=base)
    if cfg.mode == "oom":
        o = cfg.oom
        return sweep.oom(o.input_tokens, o.output_tokens, o.budget_gb, o.metric, o.max_batch, w.seed)
    if cfg.mode == "replay":
        from jobs._config import generation_params
        r = cfg.replay
        texts = read_corpus(corpus_path(cfg), r.text_column, r.limit)
        if not texts:
            raise ConfigError("replay.corpus", f"no rows with a '{r.text_column}' text in {r.corpus}")
        return sweep.replay(texts, generation_params(cfg.generation), r.batch_size, r.sorted, w.batching,
                            w.max_batch_tokens, corpus=r.corpus)
    workloads = grid(w.input_tokens, w.output_tokens, [1] if one else w.batch_size, [False] if one else w.sorted,
                     [False] if one else w.pad_to_longest, n_prompts=w.n_prompts, input_spread=w.input_spread,
                     batching=w.batching, max_batch_tokens=w.max_batch_tokens, seed=w.seed)
    return sweep.points(workloads, repeats=w.repeats, warm=w.warm_each_point)


# --------------------------------------------------------- replay via jobs.pipeline

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
             f"data.limit={cfg.replay.limit}", f"data.cluster_by={'length' if sort else 'none'}", f"out={outdir}",
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
    from jobs._tracking import log_lab_point
    from libinfer.lab.sweep import Progress
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
        log_lab_point(parent, name, p, metrics, {})
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
    if gen is None:
        records = run_replay_pipeline(cfg, parent, base)
    else:
        records = run_sweep(cfg, gen, parent, base)
    if cfg.mode == "oom":
        print(refresh_oom_table(parent), flush=True)
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
