"""jobs.compare: registered checkpoint versions side by side, quality and speed normalised
to a baseline version (the talk reports speed-ups as tables over a baseline).

    python -m jobs.compare compare.model_name=checkpoints                    # all versions, v1 = 1.00
    python -m jobs.compare compare.model_name=checkpoints 'compare.versions=[2,3]' compare.baseline=2

Reads the `eval.*` and `bench.*` tags that jobs.register put on each model version, and
the generate metrics of the version's run (its `run_id` tag) for the cost columns (USD per
1M prompts and per 1M generated tokens, `cost` group: see `run_cost`), and logs one MLflow
run (`compare`) with `compare.md` (a Markdown table: value and ratio to the baseline per
metric) and `compare.png` (ratios as grouped bars).

    python -m jobs.compare compare.model_name=checkpoints cost.usd_per_hour=0.35   # price the runs' executors
"""
from __future__ import annotations

if not __package__:  # run as a file (spark-submit jobs/compare.py): import as jobs.*
    import os as _os
    import sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import os
import tempfile
from dataclasses import dataclass, field
from typing import List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from jobs._config import CostConf, MlflowConf, validate_cost
from jobs._spark import JobError, entry_point, progress

# (tag, label, True when higher is better)
METRICS = [
    ("eval.exact_match", "exact match", True),
    ("eval.chrf", "chrF", True),
    ("eval.bleu", "BLEU", True),
    ("eval.reference_perplexity", "ref. perplexity", False),
    ("eval.stop_hit_rate", "stop hit rate", True),
    ("eval.avg_generated_tokens", "avg gen. tokens", None),
    ("eval.repetition_rate", "repetition", False),
    ("bench.tokens_per_s", "tokens/s", True),
    ("bench.latency_s", "batch-1 latency s", False),
]
# Computed from the version's run (generate wall time x executors x price; see run_cost).
COST_COLUMNS = [
    ("cost.per_1m_prompts_usd", "$ per 1M prompts", False),
    ("cost.per_1m_generated_tokens_usd", "$ per 1M gen. tokens", False),
]
COLUMNS = METRICS + COST_COLUMNS


@dataclass
class CompareConf:
    model_name: str = "checkpoints"
    versions: List[int] = field(default_factory=list)   # empty = all
    baseline: Optional[int] = None                      # null = the first of versions


def compare_schema():
    return OmegaConf.create({"mlflow": OmegaConf.structured(MlflowConf),
                             "compare": OmegaConf.structured(CompareConf),
                             "cost": OmegaConf.structured(CostConf)})


def _param(v: str):
    """An MLflow param (a string) back to None / a number / the string."""
    if v in ("None", "null", ""):
        return None
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def run_cost(metrics: dict, params: dict, cost) -> dict:
    """USD per 1M prompts and per 1M generated tokens of one run, from its generate metrics
    (`generate.wall_s`, `.rows`, `.generated_tokens`, `.workers`, or the same unprefixed).

    A run that logged its cost figures (`cost_*` metrics: jobs.generate / jobs.pipeline) keeps
    them unless this job's `cost.usd_per_hour` or `cost.executors` is set, which reprices
    its executor-hours. Otherwise the executors come from the run's logged `spark.*` /
    `model.*` params when it has them (libinfer.lab.cost.billing), else one local executor
    of this machine's cores (jobs.register's evaluation runs on `spark=local`)."""
    from libinfer.lab import cost as costs
    m = lambda k: metrics.get(f"generate.{k}", metrics.get(k))  # noqa: E731
    nan = float("nan")
    wall, rows, tokens = m("wall_s"), m("rows"), m("generated_tokens")
    if not wall or not rows:
        return {"cost.per_1m_prompts_usd": nan, "cost.per_1m_generated_tokens_usd": nan}
    override = cost.get("usd_per_hour") is not None or cost.get("executors") is not None
    if "cost_per_1m_prompts_usd" in metrics and not override:
        return {"cost.per_1m_prompts_usd": metrics["cost_per_1m_prompts_usd"],
                "cost.per_1m_generated_tokens_usd": metrics.get("cost_per_1m_generated_tokens_usd", nan)}
    group = lambda g: {k.split(".", 1)[1]: _param(v) for k, v in params.items() if k.startswith(g + ".")}  # noqa: E731
    b = costs.billing(cost, group("spark") or None, group("model") or None, m("workers"))
    if "cost_executors" in metrics and cost.get("executors") is None:
        b.executors = int(metrics["cost_executors"])
    if "cost_executor_hours" in metrics:     # the wall time the run billed (jobs.pipeline: the whole job)
        wall = metrics["cost_executor_hours"] / max(int(metrics.get("cost_executors", 1)), 1) * 3600
    f = costs.figures(float(wall), float(rows), float(tokens or 0), b)
    return {"cost.per_1m_prompts_usd": f["cost_per_1m_prompts_usd"],
            "cost.per_1m_generated_tokens_usd": f["cost_per_1m_generated_tokens_usd"]}


ConfigStore.instance().store(name="compare_schema", node=compare_schema())


def version_table(client, name: str, versions: list[int] | None, baseline: int | None, cost=None):
    """DataFrame: one row per version (version, path, format, size, metrics, cost) and the
    baseline version used."""
    import pandas as pd
    from mlflow.exceptions import MlflowException
    try:
        found = {int(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
    except MlflowException as e:
        raise JobError(f"registered model {name!r}: {e}") from None
    versions = sorted(versions or found)
    missing = [v for v in versions if v not in found]
    if missing:
        raise JobError(f"{name} has no version {missing[0]} (versions: {sorted(found)})")
    if len(versions) < 2:
        raise JobError(f"{name}: need two or more versions to compare, have {versions}")
    baseline = versions[0] if baseline is None or baseline not in versions else baseline
    rows = []
    for v in versions:
        t = found[v].tags
        row = {"version": v, "path": t.get("path", ""), "format": t.get("format", ""),
               "size_mb": float(t.get("size_bytes", "nan")) / 2**20, "status": t.get("register.status", "")}
        for tag, _, _ in METRICS:
            row[tag] = float(t[tag]) if tag in t else float("nan")
        row.update(version_cost(client, t.get("run_id"), cost))
        rows.append(row)
    return pd.DataFrame(rows), baseline


def version_cost(client, run_id: str | None, cost) -> dict:
    """run_cost of a version's run (nan columns when it has none or it is gone)."""
    if cost is None:
        cost = OmegaConf.structured(CostConf)
    try:
        run = client.get_run(run_id) if run_id else None
    except Exception:  # noqa: BLE001 - a deleted run: no cost columns for that version
        run = None
    return run_cost(run.data.metrics if run else {}, run.data.params if run else {}, cost)


def markdown(df, baseline: int) -> str:
    import math
    base = df[df.version == baseline].iloc[0]
    present = [(t, lab, hib) for t, lab, hib in COLUMNS if df[t].notna().any()]
    arrow = {True: " (higher better)", False: " (lower better)", None: ""}
    head = ["version", "format", "size MiB"] + [f"{lab}{arrow[hib]}" for _, lab, hib in present]
    lines = [f"Versions side by side; each cell is the value and, in brackets, its ratio to v{baseline}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in df.iterrows():
        cells = [f"v{r.version}" + (" (baseline)" if r.version == baseline else ""), r.format, f"{r.size_mb:.1f}"]
        for t, _, _ in present:
            v, b = r[t], base[t]
            if math.isnan(v):
                cells.append("-")
            elif math.isnan(b) or b == 0:
                cells.append(f"{v:.4g}")
            else:
                cells.append(f"{v:.4g} ({v / b:.2f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Paths: " + "; ".join(f"v{r.version} = {r.path}" for _, r in df.iterrows())]
    if any(t in dict((p[0], 1) for p in present) for t, _, _ in COST_COLUMNS):
        lines += ["", "Cost: each version's evaluation run, its generate wall time x executors x one executor's "
                      "price (the `cost` group; docs/scheduling.md#cost)."]
    return "\n".join(lines) + "\n"


def plot(df, baseline: int, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    base = df[df.version == baseline].iloc[0]
    present = [(t, lab) for t, lab, _ in COLUMNS if df[t].notna().any() and base[t] not in (0,) and base[t] == base[t]]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(present)), 4))
    width = 0.8 / len(df)
    x = np.arange(len(present))
    for i, (_, r) in enumerate(df.iterrows()):
        ratios = [r[t] / base[t] for t, _ in present]
        ax.bar(x + i * width, ratios, width, label=f"v{r.version}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(x + width * (len(df) - 1) / 2, [lab for _, lab in present], rotation=30, ha="right")
    ax.set_ylabel(f"ratio to v{baseline}")
    ax.set_title("Checkpoint versions, normalised to the baseline")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare_and_log(client, name: str, versions: list[int] | None, baseline: int | None, cost=None) -> dict:
    """Build the table and log it as a `compare` run; returns {run_id, markdown, baseline}.
    `cost`: the cost group (null = its defaults) pricing the cost columns."""
    import mlflow
    df, baseline = version_table(client, name, versions, baseline, cost)
    md = markdown(df, baseline)
    with mlflow.start_run(run_name=f"compare {name}", tags={"job": "compare", "compare.model_name": name,
                                                              "compare.baseline": str(baseline)},
                          nested=mlflow.active_run() is not None) as run:
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "compare.md"), "w") as f:
                f.write(md)
            plot(df, baseline, os.path.join(tmp, "compare.png"))
            df.to_csv(os.path.join(tmp, "compare.csv"), index=False)
            mlflow.log_artifacts(tmp)
        mlflow.log_param("versions", ",".join(str(v) for v in df.version))
    progress(f"compare: {name} v{', v'.join(str(v) for v in df.version)} against v{baseline}\n{md}")
    return {"run_id": run.info.run_id, "markdown": md, "baseline": baseline, "table": df}


@hydra.main(config_path="../conf", config_name="compare", version_base=None)
@entry_point
def main(cfg) -> None:
    import mlflow
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_experiment(cfg.mlflow.experiment)
    validate_cost(cfg.cost)
    c = cfg.compare
    res = compare_and_log(mlflow.MlflowClient(), c.model_name, list(c.versions), c.baseline, cfg.cost)
    progress(f"compare: run {res['run_id']}; artifacts compare.md, compare.png; "
             f"mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri}")


if __name__ == "__main__":
    main()
