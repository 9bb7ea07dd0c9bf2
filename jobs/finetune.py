"""jobs.finetune: fine-tune a checkpoint on (prompt, completion) pairs on Spark, then
register, evaluate and compare it with its base (the talk, 4.3.1-4.3.5: a fine-tuned
smaller model can beat a larger one; automate the tuning and its measurement).

    python -m jobs.finetune data.path=PAIRS.jsonl data.prompt_column=prompt data.completion_column=completion \\
        out=DIR model=smollm2_135m finetune.method=lora finetune.max_steps=200 finetune.num_processes=2
    spark-submit jobs/finetune.py data.path=PAIRS.jsonl out=DIR spark=standalone spark.master=spark://HOST:7077

1. The pairs are read on Spark: each prompt goes through jobs.preprocess's own cleaning,
   `data.template` / `data.chat_template` and tokenizer call (the ids generation will see);
   rows with a missing, null or non-string id, prompt or completion, an empty completion, a
   repeated id, or a pair longer than `finetune.max_seq_len` go to DIR/quarantine/ with the
   reason. A seeded hash of the id holds out `finetune.eval_fraction` of the rest
   (DIR/splits/train.jsonl, DIR/splits/eval.jsonl).
2. TorchDistributor runs libinfer.tuning.train in `finetune.num_processes` processes, one
   per Spark task slot (barrier tasks on the executors; `finetune.local_mode=true`: torchrun
   on the driver), DDP over gloo (CPU) or NCCL (CUDA). DIR must be a path every executor can
   write (local with local[N]; a shared file system on a cluster): rank 0 writes the merged
   checkpoint there.
3. DIR/checkpoint/ is an HF directory (config.json, model.safetensors with the LoRA weights
   merged, tokenizer files). The MLflow run holds the config, `train_loss` / `eval_loss` / `lr`
   by step (eval_loss step 0 = before training), loss_curves.png, tokens/s, peak memory and
   the checkpoint's content hash.
4. With `finetune.register=true`, jobs.register registers, benchmarks and evaluates the base
   and the fine-tuned checkpoint on the held-out split (with `generation`, the talk's test1 by
   default), as runs nested under this one, and jobs.compare puts them side by side.
"""
from __future__ import annotations

if not __package__:  # run as a file (spark-submit jobs/finetune.py): import as jobs.*
    import os as _os
    import sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from jobs._config import ConfigError, DataConf, field_names
from jobs._spark import JobError, Output, entry_point, prepare_output, progress
from jobs.evaluate import evaluate_schema
from libinfer.tuning import TrainConfig, TuneConfigError

PAIR_KEYS = ("prompt_column", "completion_column")
PAIRS_SCHEMA = ("row long, id string, prompt string, completion string, input_ids array<int>, n_prompt int, "
                "reason string, raw string")
QUARANTINE_COLUMNS = ["id", "row", "stage", "reason", "raw"]      # jobs.preprocess's layout
QUARANTINE_SCHEMA = "id string, row long, stage string, reason string, raw string"


@dataclass
class PairsDataConf(DataConf):
    """conf/data/pairs.yaml: DataConf (the prompt is cleaned and templated as preprocess does)
    plus the two columns of a pair; `text_column` is not used."""
    prompt_column: str = "prompt"
    completion_column: str = "completion"


@dataclass
class FinetuneConf(TrainConfig):
    """conf/finetune.yaml `finetune:`: libinfer.tuning.TrainConfig and the job's own keys."""
    num_processes: int = 1              # training processes = Spark task slots (or torchrun ranks with local_mode)
    local_mode: bool = False            # true: torchrun on the driver instead of barrier tasks on the executors
    threads: int = 0                    # torch threads per process; 0 = spark.task_cpus (local_mode: cores / processes)
    eval_fraction: float = 0.1          # held out (seeded hash of the id), evaluated during training and at hand-off
    max_seq_len: int = 512              # longer pairs (prompt + completion + EOS tokens) are quarantined
    append_eos: bool = True             # teach the model to stop after the completion
    register: bool = True               # hand base and fine-tuned checkpoint to jobs.register, then jobs.compare
    register_model: Optional[str] = None   # registered model name; null = ft-<data file>-<held-out set hash>


def finetune_schema():
    schema = evaluate_schema()
    schema.data = OmegaConf.structured(PairsDataConf)
    schema.finetune = OmegaConf.structured(FinetuneConf)
    return schema


ConfigStore.instance().store(name="finetune_schema", node=finetune_schema())


def train_config(f) -> TrainConfig:
    d = OmegaConf.to_container(f, resolve=True) if not isinstance(f, dict) else dict(f)
    try:
        return TrainConfig.from_dict({k: d[k] for k in field_names(TrainConfig)})
    except TuneConfigError as e:
        raise ConfigError(f"finetune.{e.key}", e.message) from None


def shared_view(cfg):
    """cfg without the pair columns: the checks every job shares know DataConf's keys only."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for k in PAIR_KEYS:
        c["data"].pop(k, None)
    return OmegaConf.create(c)


def local_slots(master: str) -> int | None:
    """Task slots of a local master (None for a cluster: its scheduler checks)."""
    import re
    if master == "local":
        return 1
    m = re.fullmatch(r"local\[(\d+|\*)(?:,\d+)?\]", master)
    if not m:
        return None
    return (os.cpu_count() or 1) if m.group(1) == "*" else int(m.group(1))


def validate(cfg) -> None:
    from jobs.evaluate import validate as validate_eval
    validate_eval(shared_view(cfg))
    extra = sorted(set(cfg.data) - set(field_names(PairsDataConf)))
    if extra:
        raise ConfigError(f"data.{extra[0]}", f"unknown key; known: {', '.join(field_names(PairsDataConf))}")
    if cfg.data.format not in ("jsonl", "parquet"):
        raise ConfigError("data.format", f"must be jsonl or parquet for pairs (got {cfg.data.format!r})")
    f = cfg.finetune
    train_config(f)
    if f.num_processes < 1:
        raise ConfigError("finetune.num_processes", f"must be >= 1 (got {f.num_processes})")
    if f.threads < 0:
        raise ConfigError("finetune.threads", f"must be >= 0 (got {f.threads})")
    if not 0 <= f.eval_fraction < 1:
        raise ConfigError("finetune.eval_fraction", f"must be in [0, 1) (got {f.eval_fraction})")
    if f.max_seq_len < 2:
        raise ConfigError("finetune.max_seq_len", f"must be >= 2 (got {f.max_seq_len})")
    slots = local_slots(cfg.spark.master)
    if not f.local_mode and slots is not None and f.num_processes > slots // cfg.spark.task_cpus:
        raise ConfigError("finetune.num_processes", f"{f.num_processes} processes need as many task slots; "
                          f"{cfg.spark.master} with spark.task_cpus={cfg.spark.task_cpus} has {slots // cfg.spark.task_cpus}")
    if f.register:
        from jobs.register import check_registry
        check_registry(cfg.mlflow)
        if f.eval_fraction <= 0:
            raise ConfigError("finetune.eval_fraction", "must be > 0 with finetune.register=true (the hand-off "
                              "evaluates on the held-out split)")


# ------------------------------------------------------------------------ pairs

def _pairs_fn(data: dict, model: dict, max_tokens: int, append_eos: bool):
    """mapInPandas: jobs.preprocess's prompt preparation (parse, clean, template, tokenize,
    context check) on the prompt column, then the completion and the pair's checks."""
    prompt_data = {**data, "text_column": data["prompt_column"]}

    def pairs(batches):
        import pandas as pd
        from jobs._spark import worker_tokenizer
        from jobs.preprocess import _prepare_fn
        from libinfer.tuning import make_example
        prepare = _prepare_fn(prompt_data, model, {})
        tok, _ = worker_tokenizer(model)
        eos = tok.eos_token_id if append_eos else None
        for pdf in batches:
            prep = next(prepare(iter([pdf])))
            out = []
            for value, p in zip(pdf["value"].tolist(), prep.itertuples(index=False)):
                prompt = completion = ids = n_prompt = None
                reason = None if pd.isna(p.reason) else p.reason       # pandas may hold None as NaN
                raw = None if reason is None or pd.isna(p.raw) else p.raw
                if reason is None:
                    line = bytes(value).decode("utf-8")
                    rec = json.loads(line)
                    prompt, completion = rec[data["prompt_column"]], rec.get(data["completion_column"])
                    ex, reason = make_example(p.id, p.token_ids, completion, tok, max_tokens, eos)
                    if reason is None:
                        ids, n_prompt = list(ex.input_ids), ex.n_prompt
                    else:
                        reason = reason.replace(f"> {max_tokens}", f"> finetune.max_seq_len={max_tokens}")
                        raw, prompt, completion = line, None, None
                out.append((p.row, p.id, prompt, completion if isinstance(completion, str) else None, ids,
                            n_prompt, reason, raw))
            yield pd.DataFrame(out, columns=["row", "id", "prompt", "completion", "input_ids", "n_prompt",
                                             "reason", "raw"])
    return pairs


def read_pairs(spark, cfg):
    """(examples in row order, quarantine rows as pandas, the kept rows as pandas)."""
    import pandas as pd
    from jobs.preprocess import read_corpus
    from libinfer.tuning import Example
    data = OmegaConf.to_container(cfg.data, resolve=True)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    f = cfg.finetune
    pdf = read_corpus(spark, data).mapInPandas(_pairs_fn(data, model, f.max_seq_len, f.append_eos),
                                               PAIRS_SCHEMA).toPandas().sort_values("row", kind="stable")
    bad = pdf[pdf.reason.notna()].copy()
    good = pdf[pdf.reason.isna()].copy()
    first = good.drop_duplicates("id", keep="first").set_index("id")["row"]
    dup = good.id.duplicated(keep="first")
    if dup.any():
        d = good[dup].copy()
        d["reason"] = [f"duplicate id {i!r} (first in row {int(first[i])})" for i in d.id]
        d["raw"] = [json.dumps({data["id_column"]: i, data["prompt_column"]: p, data["completion_column"]: c})
                    for i, p, c in zip(d.id, d.prompt, d.completion)]
        bad = pd.concat([bad, d])
        good = good[~dup]
    bad = bad.assign(stage="finetune")[QUARANTINE_COLUMNS].sort_values("row").reset_index(drop=True)
    examples = [Example(str(i), tuple(int(t) for t in ids), int(n)) for i, ids, n in
                zip(good.id, good.input_ids, good.n_prompt)]
    return examples, bad, good.reset_index(drop=True)


def write_split(path: str, rows, ids: set, data) -> str:
    """The pairs of `ids` as JSON lines in the input's columns (jobs.evaluate reads them)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        for r in rows.itertuples(index=False):
            if r.id in ids:
                fh.write(json.dumps({data.id_column: r.id, data.prompt_column: r.prompt,
                                     data.completion_column: r.completion}, ensure_ascii=False) + "\n")
    return path


def file_hash(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


# ---------------------------------------------------------------------- training

def threads_per_process(cfg) -> int:
    f = cfg.finetune
    if f.threads:
        return f.threads
    return max(1, (os.cpu_count() or 1) // f.num_processes) if f.local_mode else cfg.spark.task_cpus


def distributed_train(cfg, train_set, held_out, ckpt_dir: str) -> dict:
    """libinfer.tuning.train in finetune.num_processes processes through TorchDistributor."""
    from pyspark.ml.torch.distributor import TorchDistributor
    from libinfer.tuning import train
    f, m = cfg.finetune, cfg.model
    source = {"path": m.path, "gguf_file": m.gguf_file}
    distributor = TorchDistributor(num_processes=f.num_processes, local_mode=f.local_mode,
                                   use_gpu=m.device.startswith("cuda"))
    return distributor.run(train, source, train_set, held_out, train_config(f), ckpt_dir,
                           threads_per_process(cfg), m.device)


def plot_curves(curves: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([t["step"] for t in curves["train"]], [t["train_loss"] for t in curves["train"]], label="train", lw=1)
    if curves["eval"]:
        ax.plot([e["step"] for e in curves["eval"]], [e["eval_loss"] for e in curves["eval"]], "o-", label="held out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per completion token (nats)")
    ax.set_title("Fine-tuning loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_training(res: dict, counts: dict, ckpt: dict) -> None:
    """Curves by step, the run's figures, the checkpoint's identity, the plot."""
    import time as _time
    import mlflow
    from mlflow.entities import Metric
    from jobs._tracking import log_metrics
    run = mlflow.active_run()
    if run is None:
        return
    now = int(_time.time() * 1000)
    series = [Metric(k, float(t[k]), now, t["step"]) for t in res["curves"]["train"] for k in ("train_loss", "lr", "step_s")]
    series += [Metric("eval_loss", float(e["eval_loss"]), now, e["step"]) for e in res["curves"]["eval"]]
    client = mlflow.MlflowClient()
    for i in range(0, len(series), 900):            # at most 1000 metrics per log_batch
        client.log_batch(run.info.run_id, metrics=series[i:i + 900])
    evals = res["curves"]["eval"]
    log_metrics({**counts, **{k: res[k] for k in ("tokens_per_s", "tokens_per_s_with_first_step",
                                                   "completion_tokens_per_s", "train_s", "load_s",
                                                   "save_s", "train_tokens", "train_completion_tokens",
                                                   "peak_rss_bytes", "peak_cuda_bytes", "trainable_params",
                                                   "total_params", "world_size", "threads", "global_batch")},
                 "peak_memory_bytes": res["peak_cuda_bytes"] or res["peak_rss_bytes"],
                 **({"eval_loss_before": evals[0]["eval_loss"], "eval_loss_after": evals[-1]["eval_loss"]}
                    if evals else {})})
    mlflow.set_tags({"checkpoint.content_hash": ckpt["content_hash"], "checkpoint.path": ckpt["path"]})
    with tempfile.TemporaryDirectory() as tmp:
        plot_curves(res["curves"], os.path.join(tmp, "loss_curves.png"))
        with open(os.path.join(tmp, "checkpoint.json"), "w") as fh:
            json.dump(ckpt, fh, indent=2)
        with open(os.path.join(tmp, "curves.json"), "w") as fh:
            json.dump(res["curves"], fh)
        mlflow.log_artifacts(tmp)


# --------------------------------------------------------------------- hand-off

def base_checkpoint(model_cfg) -> Path:
    """The base model as jobs.register takes it: a .gguf file or an HF directory."""
    from libinfer.loading import resolve
    folder, gguf_file = resolve(model_cfg.path, model_cfg.gguf_file)
    return folder / gguf_file if gguf_file else folder


def registration_cfg(cfg, eval_path: str, model_name: str):
    """jobs.register's config: this job's model, generation, spark and mlflow groups, the
    held-out split as evaluation set (same template), one scan of two paths, no compare
    (the hand-off compares exactly base and fine-tuned)."""
    from jobs.register import register_schema
    c = OmegaConf.to_container(shared_view(cfg), resolve=True)
    c["data"].update(path=eval_path, text_column=cfg.data.prompt_column, limit=0)
    c["eval"].update(reference_column=cfg.data.completion_column, mode="quality")
    c["out"] = os.path.join(os.path.abspath(cfg.out), "register")
    c["register"] = {"once": True, "settle_s": 0.0, "model_name": model_name, "compare": False}
    c.pop("finetune")
    return OmegaConf.merge(register_schema(), c)


def hand_off(cfg, spark, ckpt_dir: str, eval_path: str, model_name: str) -> dict:
    """Register (benchmark, evaluate) base and fine-tuned; compare them; returns the versions."""
    import mlflow
    from jobs.compare import compare_and_log
    from jobs.register import Registrar
    reg = Registrar(registration_cfg(cfg, eval_path, model_name), spark)
    results = [reg.process(base_checkpoint(cfg.model)), reg.process(Path(ckpt_dir))]
    for r, what in zip(results, ("base", "fine-tuned")):
        progress(f"finetune: {what} {r['path']}: {r['status']}" + (f" as {model_name} v{r['version']}"
                                                                    if r.get("version") else "")
                 + (f" ({r.get('reason') or r.get('error')})" if r.get("reason") or r.get("error") else ""))
    out = {"model_name": model_name, "base_version": results[0].get("version"),
           "version": results[1].get("version"), "results": results}
    if out["base_version"] and out["version"] and out["base_version"] != out["version"]:
        cmp = compare_and_log(reg.client, model_name, [out["base_version"], out["version"]], out["base_version"])
        out["compare_run_id"], out["markdown"] = cmp["run_id"], cmp["markdown"]
        if mlflow.active_run() is not None:
            mlflow.log_text(cmp["markdown"], "compare.md")
    if mlflow.active_run() is not None:
        mlflow.set_tags({f"finetune.{k}": str(v) for k, v in out.items() if k in ("model_name", "base_version",
                                                                                  "version", "compare_run_id")})
    return out


# -------------------------------------------------------------------------- run

def run(cfg, spark) -> dict:
    """Read and split the pairs, train on Spark, write DIR/checkpoint, log, hand off."""
    from jobs._model import ensure_model
    from jobs._tracking import mlflow_run, run_url
    from libinfer import Checkpoint
    from libinfer.tuning import split
    f = cfg.finetune
    root = os.path.abspath(cfg.out)
    ckpt_dir = os.path.join(root, "checkpoint")
    if os.path.exists(ckpt_dir) and not cfg.overwrite:
        raise JobError(f"{ckpt_dir} already exists and overwrite=false")
    ensure_model(cfg.model)
    out = Output(spark, root)
    prepare_output(out, ["quarantine"], resume=False, overwrite=cfg.overwrite)
    with mlflow_run(cfg, "finetune") as run_:
        examples, quarantine, rows = read_pairs(spark, cfg)
        if len(quarantine):
            out.commit(spark.createDataFrame(quarantine.astype({"row": "int64"}), QUARANTINE_SCHEMA), "quarantine")
        out.mark_complete("quarantine")
        train_set, held_out = split(examples, f.eval_fraction, f.seed)
        if not train_set:
            raise JobError(f"no trainable pairs in {cfg.data.path} ({len(quarantine)} quarantined; see "
                           f"{out.path('quarantine')})")
        data = cfg.data
        write_split(os.path.join(root, "splits", "train.jsonl"), rows, {e.id for e in train_set}, data)
        eval_path = write_split(os.path.join(root, "splits", "eval.jsonl"), rows, {e.id for e in held_out}, data)
        counts = {"rows_in": len(rows) + len(quarantine), "rows_train": len(train_set), "rows_eval": len(held_out),
                  "rows_quarantined": len(quarantine)}
        reasons = quarantine.reason.str.split(":").str[0].value_counts().to_dict() if len(quarantine) else {}
        progress(f"finetune: {counts['rows_in']} pairs: {len(train_set)} train, {len(held_out)} held out, "
                 f"{len(quarantine)} quarantined" + (f" ({', '.join(f'{k}: {v}' for k, v in reasons.items())})"
                                                      if reasons else ""))
        res = distributed_train(cfg, train_set, held_out, ckpt_dir)
        ck = Checkpoint.open(ckpt_dir)
        files = ck.files
        ckpt = {"path": ckpt_dir, "content_hash": ck.content_hash(), "files": [
            {"name": p.name, "bytes": p.stat().st_size} for p in files], "base": str(base_checkpoint(cfg.model)),
            "method": f.method}
        evals = res["curves"]["eval"]
        progress(f"finetune: {res['train_tokens']} tokens in {res['train_s']:.1f}s, {res['tokens_per_s']:.0f} tokens/s "
                 f"after the first step, on {res['world_size']} process(es) x {res['threads']} thread(s); "
                 + (f"eval_loss {evals[0]['eval_loss']:.4f} -> {evals[-1]['eval_loss']:.4f}; " if evals else "")
                 + f"checkpoint {ckpt_dir} (sha256 {ckpt['content_hash'][:12]})")
        log_training(res, counts, ckpt)
        result = {"train": res, "checkpoint": ckpt, "counts": counts, "eval_path": eval_path,
                  "run_id": run_.info.run_id if run_ is not None else None}
        if f.register:
            name = f.register_model or f"ft-{Path(str(cfg.data.path)).stem}-{file_hash(eval_path)[:8]}"
            result["registration"] = hand_off(cfg, spark, ckpt_dir, eval_path, name)
        if run_ is not None:
            progress(run_url(run_))
    return result


@hydra.main(config_path="../conf", config_name="finetune", version_base=None)
@entry_point
def main(cfg) -> None:
    from jobs._spark import session
    from jobs.preprocess import check_local_path
    validate(cfg)
    check_local_path("data.path", cfg.data.path)
    spark = session(cfg, " finetune")
    try:
        res = run(cfg, spark)
    finally:
        spark.stop()
    progress(f"finetune: done; checkpoint {res['checkpoint']['path']}"
             + (f"; compare with: python -m jobs.compare compare.model_name={res['registration']['model_name']} "
                f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}" if "registration" in res else ""))


if __name__ == "__main__":
    main()
