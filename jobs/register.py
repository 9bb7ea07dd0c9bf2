"""jobs.register: checkpoint automation (the talk, 2.4). Watch a folder (or take a list) of
checkpoints; register each new one in the MLflow model registry, evaluate it, benchmark
it, tag the version with the results and compare it with the others.

    python -m jobs.register register.watch=/data/checkpoints                 # poll forever
    python -m jobs.register register.watch=/data/checkpoints register.once=true
    python -m jobs.register 'register.paths=[/ckpt/a.gguf,/ckpt/b]' register.once=true

A checkpoint is a `.gguf` file, or a directory holding config.json + *.safetensors (an HF
export) or exactly one .gguf. An entry is picked up once nothing in it changed for
`register.settle_s` (a copy still in progress is left for the next poll).

For each one:
1. its content hash (sha256 of the weight files and config) is looked up: a registered
   model version with the same `content_hash` tag means skip; so does an earlier failed
   registration of the same bytes (it is not reported again every poll);
2. it is loaded with libinfer (this is the validation); a failure (truncated, corrupt,
   unsupported) ends the run as FAILED with the reason in the tag `register.error` and
   no model version is created; the watcher goes on with the next checkpoint;
3. a model version of `register.model_name` is created. Its artifact is small: the
   model config and `checkpoint.json`, a pointer to the checkpoint's path with file
   names, sizes and hash. Weights are NOT copied into the MLflow artifact store (GBs per
   checkpoint); the path must stay readable. Version tags: content_hash, format, path,
   size_bytes, n_params, dtype (storage types of the tensors), config;
4. a short benchmark on the loaded model (batch-1 latency and batch throughput, greedy,
   EOS ignored, after warm-up) and jobs.evaluate on the evaluation set (on Spark);
   the metrics go to the registration run and, as `eval.*` / `bench.*`, onto the version;
5. jobs.compare writes the side-by-side table of all versions (normalised to
   `register.baseline_version`) as Markdown and PNG into a `compare` run.
"""
from __future__ import annotations

if not __package__:  # run as a file (spark-submit jobs/register.py): import as jobs.*
    import os as _os
    import sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import gc
import json
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from jobs._config import ConfigError
from jobs._spark import JobError, entry_point, progress
from jobs.evaluate import evaluate_schema

TAG_METRICS = ("exact_match", "chrf", "bleu", "reference_perplexity", "stop_hit_rate", "avg_generated_tokens",
               "repetition_rate")


@dataclass
class BenchConf:
    prompt_tokens: int = 64
    out_tokens: int = 16
    batch_size: int = 8


@dataclass
class RegisterConf:
    watch: Optional[str] = None          # folder to watch for checkpoints
    paths: List[str] = field(default_factory=list)   # or these checkpoints
    once: bool = False                   # one scan, then exit
    poll_s: float = 30.0
    max_polls: int = 0                   # 0 = forever (unless once)
    settle_s: float = 5.0                # an entry must be unchanged this long before it is picked up
    model_name: str = "checkpoints"      # the registered model that gets one version per checkpoint
    evaluate: bool = True
    benchmark: bool = True
    compare: bool = True
    baseline_version: int = 1
    bench: BenchConf = field(default_factory=BenchConf)


def register_schema():
    schema = evaluate_schema()
    schema.register = OmegaConf.structured(RegisterConf)
    return schema


ConfigStore.instance().store(name="register_schema", node=register_schema())


# ------------------------------------------------------------------ discovery

def checkpoint_entries(folder: str) -> list[Path]:
    """The checkpoints directly under `folder`: .gguf files and directories that hold a
    config.json or .gguf files. Hidden and temporary names (.x, x.tmp, x.part) are skipped."""
    out = []
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith((".", "_")) or p.suffix in (".tmp", ".part"):
            continue
        if p.is_file() and p.suffix == ".gguf":
            out.append(p)
        elif p.is_dir() and ((p / "config.json").exists() or any(p.glob("*.gguf"))):
            out.append(p)
    return out


def last_change(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()] or [path]
    return max(f.stat().st_mtime for f in files)


def files_of(path: Path) -> list[Path]:
    """The files that make the checkpoint (without opening it: also for broken ones)."""
    if path.is_file():
        return [path]
    if (path / "config.json").exists():
        return sorted(path.glob("*.safetensors")) + [path / "config.json"]
    return sorted(path.glob("*.gguf"))


_HASHES: dict[tuple, str] = {}   # (path, size, mtime) of every file -> content hash, in this process


def content_hash(path: Path) -> str:
    """sha256 over the checkpoint's files in order (= libinfer Checkpoint.content_hash for
    a loadable checkpoint); memoised on sizes and mtimes so a poll does not re-read GBs."""
    import hashlib
    files = files_of(path)
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _HASHES:
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


# ---------------------------------------------------------------------- describe

def storage_dtypes(ckpt) -> str:
    """The tensors' storage types, e.g. 'Q4_1:210,F32:61,Q8_0:1' or 'F32:30'."""
    c: Counter = Counter()
    if ckpt.gguf_file:
        for t in ckpt.reader.tensors:
            c[t.tensor_type.name] += 1
    else:
        from safetensors import safe_open
        for f in sorted(ckpt.folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    c[str(st.get_slice(k).get_dtype())] += 1
    return ",".join(f"{k}:{v}" for k, v in c.most_common())


def describe(path: Path, ckpt, digest: str) -> dict:
    files = files_of(path)
    return {
        "path": os.path.abspath(path), "format": "gguf" if ckpt.gguf_file else "safetensors",
        "files": [{"name": f.name, "bytes": f.stat().st_size} for f in files],
        "size_bytes": sum(f.stat().st_size for f in files), "content_hash": digest,
        "n_params": ckpt.config.n_params, "dtype": storage_dtypes(ckpt), "config": ckpt.config.to_dict(),
    }


# --------------------------------------------------------------------- benchmark

def benchmark(gen, prompt_tokens: int, out_tokens: int, batch_size: int) -> dict:
    """Batch-1 latency and batch throughput of greedy generation with EOS ignored, so every
    row makes exactly out_tokens (the talk: latency follows generated tokens)."""
    from libinfer import GenerationParams
    import random
    rng = random.Random(0)
    vocab = gen.config.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(prompt_tokens)] for _ in range(batch_size)]
    params = GenerationParams(greedy=True, out_seq_length=out_tokens, ignore_eos=True)
    gen.generate(prompts[:1], params)                 # warm the shapes
    lat = float("inf")
    for _ in range(3):                                # fastest of 3: the least disturbed run
        t0 = time.perf_counter()
        gen.generate(prompts[:1], params)
        lat = min(lat, time.perf_counter() - t0)
    t0 = time.perf_counter()
    res = gen.generate(prompts, params)
    wall = time.perf_counter() - t0
    return {"latency_s": lat, "latency_per_token_ms": 1000 * lat / out_tokens,
            "tokens_per_s": res.metrics.generated_tokens / wall, "batch_wall_s": wall,
            "batch_size": batch_size, "prompt_tokens": prompt_tokens, "out_tokens": out_tokens,
            "load_s": gen.load_s}


# ----------------------------------------------------------------------- registry

def find_version(client, name: str, digest: str):
    from mlflow.exceptions import MlflowException
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get("content_hash") == digest), None)


def find_failure(client, experiment_id: str, digest: str):
    runs = client.search_runs([experiment_id], f"tags.content_hash = '{digest}' and tags.`register.status` = 'failed'",
                              max_results=1)
    return runs[0] if runs else None


def create_version(client, name: str, run, info: dict):
    """A model version whose artifact is the config + a pointer file (no weights copied)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp, "checkpoint")
        d.mkdir()
        (d / "checkpoint.json").write_text(json.dumps(info, indent=2, default=str))
        (d / "config.json").write_text(json.dumps(info["config"], indent=2, default=str))
        mlflow.log_artifacts(str(d), artifact_path="checkpoint")
    try:
        client.create_registered_model(name, description="Checkpoints registered by jobs.register")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    tags = {"content_hash": info["content_hash"], "format": info["format"], "path": info["path"],
            "size_bytes": str(info["size_bytes"]), "n_params": str(info["n_params"]), "dtype": info["dtype"],
            "config": json.dumps(info["config"], default=str)[:4900]}
    return client.create_model_version(name, source=f"{run.info.artifact_uri}/checkpoint", run_id=run.info.run_id,
                                       tags=tags, description=f"{info['path']} (weights stay there; not copied)")


# -------------------------------------------------------------------------- steps

class Registrar:
    """Registers checkpoints one by one; keeps one SparkSession for the evaluations."""

    def __init__(self, cfg, spark=None):
        import mlflow
        self.cfg, self.r = cfg, cfg.register
        mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
        self.client = mlflow.MlflowClient()
        self.experiment = mlflow.set_experiment(cfg.mlflow.experiment)
        self.spark, self.own_spark = spark, spark is None    # a session passed in is the caller's to stop

    def close(self) -> None:
        if self.spark is not None and self.own_spark:
            self.spark.stop()
            self.spark = None

    def eval_cfg(self, path: Path, version: int):
        cfg = OmegaConf.create(OmegaConf.to_container(self.cfg, resolve=True))
        cfg.model.path = str(path)
        cfg.model.gguf_file = None
        cfg.model.random_init = None
        cfg.model.name = f"{self.r.model_name}-v{version}"
        cfg.out = os.path.join(str(self.cfg.out), f"v{version}")
        return cfg

    def process(self, path: Path) -> dict:
        """Register one checkpoint; returns {'status': registered|skipped|failed, ...}."""
        import mlflow
        name = self.r.model_name
        try:
            digest = content_hash(path)
        except OSError as e:
            return {"status": "failed", "path": str(path), "error": f"cannot read: {e}"}
        found = find_version(self.client, name, digest)
        if found is not None:
            return {"status": "skipped", "path": str(path), "version": int(found.version),
                    "reason": f"already registered as {name} v{found.version}"}
        failed = find_failure(self.client, self.experiment.experiment_id, digest)
        if failed is not None:
            return {"status": "skipped", "path": str(path), "reason": f"failed before (run {failed.info.run_id})"}
        tags = {"job": "register", "content_hash": digest, "checkpoint.path": os.path.abspath(path),
                "register.model_name": name}
        # nested under the caller's run when there is one (jobs.finetune's hand-off)
        with mlflow.start_run(run_name=f"register {path.name}", tags=tags, nested=mlflow.active_run() is not None) as run:
            try:
                from libinfer import Checkpoint, Generator
                ckpt = Checkpoint.open(path)
                gen = Generator.from_pretrained(path, dtype=self.cfg.model.dtype, device=self.cfg.model.device,
                                                max_batch_size=self.cfg.model.max_batch_size)
                info = describe(path, ckpt, digest)
            except Exception as e:  # noqa: BLE001 - any load failure is this checkpoint's, not the watcher's
                reason = f"{type(e).__name__}: {e}".strip()[:4000]
                mlflow.set_tags({"register.status": "failed", "register.error": reason})
                mlflow.end_run(status="FAILED")
                return {"status": "failed", "path": str(path), "error": reason, "run_id": run.info.run_id}
            mv = create_version(self.client, name, run, info)
            version = int(mv.version)
            mlflow.set_tags({"register.status": "registered", "register.version": str(version)})
            mlflow.log_params({"checkpoint.format": info["format"], "checkpoint.size_bytes": info["size_bytes"],
                               "checkpoint.n_params": info["n_params"], "checkpoint.dtype": info["dtype"][:500]})
            progress(f"register: {path} -> {name} v{version} ({info['format']}, {info['size_bytes'] / 2**20:.1f} MiB,"
                     f" {info['n_params'] / 1e6:.1f}M params, hash {digest[:12]})")
            result = {"status": "registered", "path": str(path), "version": version, "run_id": run.info.run_id}
            vtags = {"run_id": run.info.run_id}
            try:
                if self.r.benchmark:
                    b = self.r.bench
                    bench = benchmark(gen, b.prompt_tokens, b.out_tokens, b.batch_size)
                    from jobs._tracking import log_metrics
                    log_metrics(bench, prefix="bench.")
                    vtags.update({f"bench.{k}": f"{bench[k]:.6g}" for k in ("tokens_per_s", "latency_s",
                                                                              "latency_per_token_ms")})
                    progress(f"register: v{version} benchmark {bench['tokens_per_s']:.1f} tokens/s at batch "
                             f"{b.batch_size}, batch-1 latency {bench['latency_s']:.2f}s for {b.out_tokens} tokens")
                gen.close()
                del gen
                gc.collect()
                if self.r.evaluate:
                    from jobs.evaluate import log_evaluate, quality_line, run_evaluate
                    if self.spark is None:
                        from jobs._spark import session
                        self.spark = session(self.cfg, " register")
                    ecfg = self.eval_cfg(path, version)
                    metrics, outputs = run_evaluate(self.spark, ecfg)
                    log_evaluate(metrics, outputs, self.cfg.eval.table_rows)
                    vtags.update({f"eval.{k}": f"{metrics[k]:.6g}" for k in TAG_METRICS if k in metrics})
                    vtags["eval.set"] = str(self.cfg.data.path)
                    progress(f"register: v{version} " + quality_line(metrics))
                vtags["register.status"] = "evaluated"
            except Exception as e:  # noqa: BLE001 - the version stays, marked with what went wrong
                reason = f"{type(e).__name__}: {e}".strip()[:4000]
                vtags["register.status"] = "evaluation failed"
                vtags["register.error"] = reason
                mlflow.set_tag("register.error", reason)
                result["error"] = reason
            for k, v in vtags.items():
                self.client.set_model_version_tag(name, str(version), k, v)
        return result

    def scan(self, paths: list[Path]) -> list[dict]:
        out = []
        now = time.time()
        for p in paths:
            if not p.exists():
                out.append({"status": "failed", "path": str(p), "error": "does not exist"})
                continue
            if self.r.watch and now - last_change(p) < self.r.settle_s:
                out.append({"status": "waiting", "path": str(p), "reason": "still changing"})
                continue
            res = self.process(p)
            line = {"registered": f"registered as {self.r.model_name} v{res.get('version')}",
                    "skipped": f"skipped: {res.get('reason')}", "failed": f"FAILED: {res.get('error')}"}
            progress(f"register: {p}: {line[res['status']]}")
            out.append(res)
        if self.r.compare and any(r["status"] == "registered" for r in out):
            from jobs.compare import compare_and_log
            try:
                compare_and_log(self.client, self.r.model_name, None, self.r.baseline_version)
            except JobError as e:
                progress(f"register: compare skipped: {e}")
        return out


def validate(cfg) -> None:
    from jobs.evaluate import validate as validate_eval
    validate_eval(cfg)
    r = cfg.register
    if not r.watch and not r.paths:
        raise ConfigError("register.watch", "set register.watch=FOLDER or register.paths=[...]")
    if r.watch and not os.path.isdir(r.watch):
        raise ConfigError("register.watch", f"{r.watch} is not a directory")
    if r.poll_s <= 0:
        raise ConfigError("register.poll_s", f"must be > 0 (got {r.poll_s})")
    check_registry(cfg.mlflow)


def check_registry(m) -> None:
    """The MLflow model registry needs a database-backed store or a server."""
    if not m.enabled or not str(m.tracking_uri).startswith(("sqlite:", "postgresql", "mysql", "http", "databricks")):
        raise ConfigError("mlflow.tracking_uri", "the model registry needs a database-backed store or a server "
                          f"(sqlite:///..., http://...); got {m.tracking_uri!r}" + ("" if m.enabled else
                                                                                     " with mlflow.enabled=false"))


def run(cfg, spark=None) -> list[dict]:
    """Scan once (register.once or register.paths) or poll register.watch."""
    reg = Registrar(cfg, spark)
    results: list[dict] = []
    try:
        polls = 0
        while True:
            paths = [Path(p) for p in cfg.register.paths] or checkpoint_entries(cfg.register.watch)
            results += reg.scan(paths)
            polls += 1
            if cfg.register.once or not cfg.register.watch or (cfg.register.max_polls and polls >= cfg.register.max_polls):
                break
            time.sleep(cfg.register.poll_s)
    finally:
        reg.close()
    return results


@hydra.main(config_path="../conf", config_name="register", version_base=None)
@entry_point
def main(cfg) -> None:
    validate(cfg)
    if cfg.register.watch:
        progress(f"register: watching {cfg.register.watch} every {cfg.register.poll_s:g}s "
                 f"(model {cfg.register.model_name!r} in {cfg.mlflow.tracking_uri})")
    results = run(cfg)
    n = Counter(r["status"] for r in results)
    progress(f"register: {n.get('registered', 0)} registered, {n.get('skipped', 0)} skipped, "
             f"{n.get('failed', 0)} failed; see them with: mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri} "
             f"(Models -> {cfg.register.model_name})")


if __name__ == "__main__":
    main()
