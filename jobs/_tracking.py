"""MLflow glue shared by all jobs: one run per job run, the resolved config as flattened
params and as an artifact, metrics as flat numbers."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile

log = logging.getLogger(__name__)


def flatten(d, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (list, tuple)):
        out[prefix[:-1]] = repr(list(d))
    else:
        out[prefix[:-1]] = d
    return out


def _as_dict(cfg) -> dict:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg


@contextlib.contextmanager
def mlflow_run(cfg, job: str, nested: bool = False, tags: dict | None = None):
    """Start an MLflow run for `job` (or yield None when cfg.mlflow.enabled is false)."""
    m = cfg.mlflow
    if not m.enabled:
        yield None
        return
    import mlflow
    mlflow.set_tracking_uri(m.tracking_uri)
    mlflow.set_experiment(m.experiment)
    with mlflow.start_run(run_name=m.get("run_name") or job, nested=nested, tags={"job": job, **(tags or {})}) as run:
        resolved = _as_dict(cfg)
        params = {k: str(v)[:5000] for k, v in flatten(resolved).items()}
        items = list(params.items())
        for i in range(0, len(items), 100):          # MLflow takes at most 100 params a call
            mlflow.log_params(dict(items[i:i + 100]))
        log_config(cfg)
        yield run


def log_config(cfg, name: str = "config.yaml") -> None:
    import mlflow
    from omegaconf import OmegaConf
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "w") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True) if not isinstance(cfg, dict) else str(cfg))
        mlflow.log_artifact(path)


def log_metrics(metrics: dict, step: int | None = None, prefix: str = "") -> None:
    """Log the finite numeric values of `metrics` to the active run (if any)."""
    import mlflow
    if mlflow.active_run() is None:
        return
    clean = {f"{prefix}{k}": float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if clean:
        mlflow.log_metrics(clean, step=step)


def run_url(run) -> str:
    """Where to look at a run: the tracking URI, experiment and run ids, and the UI command."""
    import mlflow
    uri = mlflow.get_tracking_uri()
    ui = f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else uri
    return f"MLflow run {run.info.run_id} (experiment {run.info.experiment_id}) in {uri}; look at it with: {ui}"
