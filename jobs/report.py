"""jobs.report: the talk's figures and tables from the lab's MLflow runs.

    python -m jobs.report                         # every lab point of the experiment
    python -m jobs.report sweep=<parent run id or name> out=reports/lab baseline="llama_140m cpu float32 tp1"

Reads the point runs jobs.benchmark logged, has `libinfer.lab.report.build_report` write
PNG figures and Markdown/CSV tables to `out` (the list is in that module) and logs them
(and the headline numbers as metrics) to one `report` run, nested under the sweep's
parent when a sweep is given.
"""
from __future__ import annotations

if not __package__:  # run as a file (python jobs/report.py): import as jobs.*
    import os as _os
    import sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from jobs._config import ConfigError, MlflowConf
from jobs._spark import entry_point


@dataclass
class PredictorConf:
    enabled: bool = True
    predict_sizes: List[str] = field(default_factory=lambda: ["smollm2_360m", "smollm2_1.7b", "llama_3b"])
    workloads: List[str] = field(default_factory=lambda: ["128,32,1", "128,32,8", "512,64,16"])  # input,output,batch


@dataclass
class ReportConf:
    mlflow: MlflowConf = MISSING
    sweep: Optional[str] = None          # parent run id, run name or lab.sweep tag; null = the whole experiment
    out: str = "reports/lab"
    baseline: Optional[str] = None       # config label for the speed-up tables, e.g. "llama_140m cpu float32 tp1"
    speedup_metric: str = "wall_s"
    predictor: PredictorConf = field(default_factory=PredictorConf)


ConfigStore.instance().store(name="report_schema", node=ReportConf)


def load_points(tracking_uri: str, experiment: str, sweep: str | None) -> tuple[list[dict], str | None]:
    """Every lab point run (params coerced to numbers, metrics as floats)."""
    import mlflow
    from jobs._tracking import find_lab_parent, lab_points
    from libinfer.lab.report import as_point
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError("mlflow.experiment", f"no experiment {experiment!r} in {tracking_uri}")
    parent = find_lab_parent(client, exp.experiment_id, sweep) if sweep else None
    runs = lab_points(client, exp.experiment_id, parent)
    return [as_point(r.data.params, r.data.metrics, run_id=r.info.run_id) for r in runs], parent


def run(cfg) -> dict:
    import mlflow
    from jobs._tracking import log_metrics
    from libinfer.lab.report import ReportError, build_report
    points, parent = load_points(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.sweep)
    if not points:
        raise ConfigError("sweep", f"no lab point runs in experiment {cfg.mlflow.experiment!r}"
                                   + (f" under {cfg.sweep!r}" if cfg.sweep else "") + "; run jobs.benchmark first")
    out = Path(cfg.out)
    try:
        metrics = build_report(points, out, cfg.baseline, cfg.speedup_metric, cfg.predictor.enabled,
                               cfg.predictor.predict_sizes, cfg.predictor.workloads)
    except ReportError as e:
        raise ConfigError({"predict_sizes": "predictor.predict_sizes"}.get(e.option, e.option), str(e)) from None
    mlflow.set_experiment(cfg.mlflow.experiment)
    with mlflow.start_run(run_id=parent) if parent else contextlib.nullcontext():
        with mlflow.start_run(run_name="report", nested=bool(parent),
                              tags={"job": "report", "lab.role": "report", "lab.source": cfg.sweep or "experiment"}) as run:
            mlflow.log_params({"sweep": cfg.sweep, "baseline": cfg.baseline, "points": len(points)})
            log_metrics(metrics)
            mlflow.log_artifacts(str(out), artifact_path="report")
    print((out / "report.md").read_text())
    print(f"report: {out.resolve()} (and MLflow run {run.info.run_id})", flush=True)
    return metrics


@hydra.main(config_path="../conf", config_name="report", version_base=None)
@entry_point
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
