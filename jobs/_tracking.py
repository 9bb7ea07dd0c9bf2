"""MLflow glue shared by all jobs: one run per job run, the resolved config as flattened
params and as an artifact, metrics as flat numbers; and the lab's run layout, written by
jobs.benchmark and read by jobs.report."""
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


# --------------------------------------------------------------- the lab's runs
# jobs.benchmark logs one parent run per sweep (tags lab.role=sweep, lab.sweep=<key>) and
# one nested run per point (lab.role=point, lab.mode=<mode>); jobs.report reads them back.

def lab_parent(experiment: str, key: str, name: str) -> str:
    """The sweep's parent run: found by its lab.sweep tag, created by the sweep's first job."""
    import mlflow
    exp = mlflow.set_experiment(experiment)
    found = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`lab.sweep` = '{key}' and "
                               "tags.`lab.role` = 'sweep'", output_format="list", max_results=1)
    if found:
        return found[0].info.run_id
    run = mlflow.MlflowClient().create_run(exp.experiment_id, run_name=name,
                                           tags={"lab.sweep": key, "lab.role": "sweep", "job": "benchmark"})
    return run.info.run_id


def find_lab_parent(client, exp_id: str, sweep: str) -> str:
    """A parent run by id, by run name or by its lab.sweep tag."""
    from jobs._config import ConfigError
    try:
        return client.get_run(sweep).info.run_id
    except Exception:
        pass
    for f in (f"attributes.run_name = '{sweep}'", f"tags.`lab.sweep` = '{sweep}'"):
        runs = client.search_runs([exp_id], f"{f} and tags.`lab.role` = 'sweep'", max_results=1)
        if runs:
            return runs[0].info.run_id
    raise ConfigError("sweep", f"no lab sweep with run id, name or tag {sweep!r} in this experiment")


def log_lab_point(parent: str, name: str, params: dict, metrics: dict, tags: dict) -> str:
    """One point as a run nested under the sweep's parent; `tags` become lab.<key>."""
    import mlflow
    with mlflow.start_run(run_id=parent):
        with mlflow.start_run(run_name=name, nested=True, tags={
                "job": "benchmark", "lab.role": "point", "lab.mode": params["mode"],
                **{f"lab.{k}": v for k, v in tags.items()}}) as run:
            mlflow.log_params({k: str(v) for k, v in params.items()})
            log_metrics(metrics)
            return run.info.run_id


def lab_points(client, exp_id: str, parent: str | None = None, mode: str | None = None) -> list:
    """Every point run of the experiment, or of one sweep, or of one mode of it."""
    flt = "tags.`lab.role` = 'point'" + (f" and tags.mlflow.parentRunId = '{parent}'" if parent else "") + \
        (f" and tags.`lab.mode` = '{mode}'" if mode else "")
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], flt, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs
