"""jobs.evaluate: quality of one checkpoint on an evaluation set, logged to MLflow.

    python -m jobs.evaluate model.path=CKPT data.path=data/eval_small.jsonl generation=test1
    python -m jobs.evaluate eval.mode=determinism model.path=CKPT data.path=...

`model.path` is an HF safetensors directory, a .gguf file or a directory holding one.
The evaluation set is JSON lines or Parquet with an id, a prompt and, optionally, a
reference (`eval.reference_column`). Generation is jobs.pipeline's: preprocess and
generate run on Spark over length-clustered partitions (same functions, same output
layout under `out`). Then, on Spark again, each worker's cached generator scores the
references (teacher-forced log-probabilities after prompt + `generation.start`), and
the driver computes libinfer.quality's metrics over the (small) collected table.

Logged: quality metrics (exact_match, chrf, bleu, reference_perplexity, stop_hit_rate,
avg_generated_tokens, repetition_rate, ...), the generate speed metrics (`generate.*`),
and the outputs table (`eval_outputs.json` via mlflow.log_table: the UI's artifact view
shows prompt / reference / prediction side by side).

eval.mode=determinism runs libinfer.lab.determinism on the driver instead (no Spark): the
share of prompts whose greedy output is identical across batch sizes, tp_size 1/2 and
dtypes, logged as `determinism.*` metrics.
"""
from __future__ import annotations

if not __package__:  # run as a file (spark-submit jobs/evaluate.py): import as jobs.*
    import os as _os
    import sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import json
import time
from dataclasses import dataclass, field
from typing import List

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from jobs import _config
from jobs._config import ConfigError
from jobs._spark import Output, entry_point, prepare_output, progress


@dataclass
class DeterminismConf:
    batch_sizes: List[int] = field(default_factory=lambda: [1, 8, 32])
    tp_sizes: List[int] = field(default_factory=lambda: [1, 2])
    dtypes: List[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    out_seq_length: int = 16
    limit: int = 32                     # prompts used (0 = all)


@dataclass
class EvalConf:
    mode: str = "quality"               # quality | determinism
    reference_column: str = "reference"
    perplexity: bool = True             # score references (one extra forward pass per row)
    target_delimiter: str = " "         # put between prompt and reference when scoring (as lm-eval does)
    repetition_n: int = 2               # n of the word n-grams in repetition_rate
    table_rows: int = 1000              # rows of the outputs table logged to MLflow
    determinism: DeterminismConf = field(default_factory=DeterminismConf)


def evaluate_schema():
    schema = _config.root_schema()
    schema.eval = OmegaConf.structured(EvalConf)
    return schema


ConfigStore.instance().store(name="evaluate_schema", node=evaluate_schema())


def validate(cfg) -> None:
    _config.validate(cfg)
    e = cfg.eval
    if e.mode not in ("quality", "determinism"):
        raise ConfigError("eval.mode", f"must be quality or determinism (got {e.mode!r})")
    if e.repetition_n < 1:
        raise ConfigError("eval.repetition_n", f"must be >= 1 (got {e.repetition_n})")
    if not cfg.data.path:
        raise ConfigError("data.path", "is not set: pass data.path=EVAL_SET (JSON lines or Parquet)")


# ------------------------------------------------------------------ references

REF_SCHEMA = "id string, reference string"
SCORE_SCHEMA = "id string, reference_logprobs array<double>"


def _references_fn(data: dict, ref_col: str):
    def refs(batches):
        import pandas as pd
        from jobs.preprocess import parse_record
        for pdf in batches:
            rows = []
            for value, row in zip(pdf["value"], pdf["row"]):
                rid, _, reason, line = parse_record(value, int(row), data)
                if reason is None and line is not None:
                    ref = json.loads(line).get(ref_col)
                    rows.append((rid, ref if isinstance(ref, str) else None))
            yield pd.DataFrame(rows, columns=["id", "reference"])
    return refs


def scored_reference(reference: str, delimiter: str) -> str:
    """The text scored after the prompt: "A:" + "Paris" is scored as "A:" + " Paris", the way
    the model would write it (a reference that starts with whitespace is kept as is)."""
    return reference if not delimiter or reference[:1].isspace() else delimiter + reference


def _score_fn(model: dict, start: str, delimiter: str, threads: int):
    """mapInPandas: log-probabilities of each reference after its prompt (this worker's
    cached generator, as jobs.generate uses it)."""
    def score(batches):
        import pandas as pd
        from jobs._spark import worker_generator
        gen = None
        delim = "" if start[-1:].isspace() else delimiter   # "" when the prompt already ends with it
        for pdf in batches:
            out = []
            for rid, ids, ref in zip(pdf["id"], pdf["token_ids"], pdf["reference"]):
                if ref is None or not ref:
                    out.append((rid, None))
                    continue
                if gen is None:
                    gen, _ = worker_generator(model, threads)
                prompt = [int(t) for t in ids]
                if start:
                    prompt += gen.tokenizer(start, add_special_tokens=False).input_ids
                cont = gen.tokenizer(scored_reference(ref, delim), add_special_tokens=False).input_ids
                try:
                    out.append((rid, gen.score(prompt, cont)))
                except (ValueError, NotImplementedError):
                    out.append((rid, None))     # too long for the context, or a TP model: no perplexity
            yield pd.DataFrame(out, columns=["id", "reference_logprobs"])
    return score


# ----------------------------------------------------------------------- quality

def run_evaluate(spark, cfg) -> tuple[dict, "object"]:
    """Generate over the evaluation set into cfg.out and compute its quality metrics;
    returns (metrics, outputs table as pandas)."""
    import pandas as pd
    from pyspark.sql import functions as F
    from jobs.generate import run_generate
    from jobs.preprocess import read_corpus, run_preprocess
    from libinfer import quality
    t0 = time.perf_counter()
    out = Output(spark, cfg.out)
    prepare_output(out, ["clustered", "quarantine", "results"], resume=False, overwrite=True)
    pre = run_preprocess(spark, cfg, out)
    gen = run_generate(spark, cfg, cfg.out, out, resume=False)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    refs = read_corpus(spark, data).mapInPandas(_references_fn(data, cfg.eval.reference_column), REF_SCHEMA)
    results = out.read("results")
    table = results.join(refs, "id", "left")
    if cfg.eval.perplexity:
        model = OmegaConf.to_container(cfg.model, resolve=True)
        clustered = spark.read.parquet(out.path("clustered")).select("id", "token_ids")
        scored = clustered.join(refs.filter(F.col("reference").isNotNull()), "id").mapInPandas(
            _score_fn(model, cfg.generation.start, cfg.eval.target_delimiter, cfg.spark.task_cpus), SCORE_SCHEMA)
        table = table.join(scored, "id", "left")
    pdf = table.toPandas().sort_values("id", kind="stable").reset_index(drop=True)
    rows = []
    for r in pdf.itertuples():
        lps = getattr(r, "reference_logprobs", None)
        ref = r.reference if isinstance(r.reference, str) else None
        rows.append(quality.RowQuality(
            str(r.id), r.completions[0] if len(r.completions) else "", r.finish_reasons[0] if len(r.finish_reasons)
            else "", int(r.n_generated_tokens) // max(len(r.completions), 1), reference=ref,
            reference_logprobs=[float(x) for x in lps] if lps is not None else [],
            repetition_n=cfg.eval.repetition_n))
    metrics = quality.summarize(rows)
    quarantine = out.read("quarantine")
    metrics["rows_quarantined"] = quarantine.count() if quarantine is not None else 0
    metrics["eval_wall_s"] = time.perf_counter() - t0
    per_row = [r.metrics() for r in rows]
    outputs = pd.DataFrame({
        "id": [r.id for r in rows],
        "prompt": list(pdf["prompt"]),
        "reference": [r.reference for r in rows],
        "prediction": [r.prediction for r in rows],
        "finish_reason": [r.finish_reason for r in rows],
        "n_generated_tokens": [r.n_generated_tokens for r in rows],
        "exact_match": [m.get("exact_match") for m in per_row],
        "chrf": [m.get("chrf") for m in per_row],
        "bleu": [m.get("bleu") for m in per_row],
        "reference_perplexity": [m.get("reference_perplexity") for m in per_row],
        "repetition_rate": [m["repetition_rate"] for m in per_row],
    })
    metrics["_generate"] = gen
    metrics["_preprocess"] = pre
    return metrics, outputs


def log_evaluate(metrics: dict, outputs, table_rows: int = 1000) -> None:
    import mlflow
    from jobs._tracking import log_metrics
    from jobs.generate import log_generate
    log_metrics({k: v for k, v in metrics.items() if not k.startswith("_")})
    log_generate(metrics["_generate"], prefix="generate.")
    if mlflow.active_run() is not None:
        mlflow.log_table(outputs.head(table_rows), artifact_file="eval_outputs.json")


def quality_line(m: dict) -> str:
    parts = [f"{m.get('rows', 0)} rows"]
    for k, fmt in (("exact_match", "{:.3f}"), ("chrf", "{:.2f}"), ("bleu", "{:.2f}"), ("reference_perplexity", "{:.2f}"),
                   ("stop_hit_rate", "{:.3f}"), ("avg_generated_tokens", "{:.1f}"), ("repetition_rate", "{:.3f}")):
        if k in m:
            parts.append(f"{k} {fmt.format(m[k])}")
    return "evaluate: " + ", ".join(parts)


# -------------------------------------------------------------------- determinism

def read_prompts(cfg, limit: int) -> list[str]:
    """The evaluation set's prompts on the driver (determinism mode needs no Spark)."""
    import pandas as pd
    d = cfg.data
    df = pd.read_parquet(d.path) if d.format == "parquet" else pd.read_json(d.path, lines=True)
    prompts = [p for p in df[d.text_column] if isinstance(p, str) and p.strip()]
    if d.template:
        prompts = [d.template.format(text=p) for p in prompts]
    return prompts[:limit] if limit else prompts


def run_determinism(cfg) -> dict:
    from libinfer.lab.determinism import determinism_report
    det = cfg.eval.determinism
    prompts = read_prompts(cfg, det.limit)
    from jobs._model import ensure_model
    ensure_model(cfg.model)
    report = determinism_report(cfg.model.path, cfg.model.gguf_file, prompts, batch_sizes=list(det.batch_sizes),
                                tp_sizes=list(det.tp_sizes), dtypes=list(det.dtypes),
                                out_seq_length=det.out_seq_length, device=cfg.model.device,
                                log=progress)
    return report


@hydra.main(config_path="../conf", config_name="evaluate", version_base=None)
@entry_point
def main(cfg) -> None:
    from jobs._tracking import log_metrics, mlflow_run, run_url
    validate(cfg)
    from jobs.preprocess import check_local_path
    check_local_path("data.path", cfg.data.path)
    if cfg.eval.mode == "determinism":
        with mlflow_run(cfg, "determinism") as run:
            report = run_determinism(cfg)
            log_metrics(report, prefix="determinism.")
            for k, v in report.items():
                progress(f"determinism: {k} = {v:.3f}")
            if run is not None:
                progress(run_url(run))
        return
    from jobs._spark import session
    spark = session(cfg, " evaluate")
    with mlflow_run(cfg, "evaluate") as run:
        metrics, outputs = run_evaluate(spark, cfg)
        if run is not None:
            log_evaluate(metrics, outputs, cfg.eval.table_rows)
        progress(quality_line(metrics))
        if run is not None:
            progress(run_url(run))
    spark.stop()


if __name__ == "__main__":
    main()
