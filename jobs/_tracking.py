"""MLflow glue shared by all jobs: one run per job run, the resolved config as flattened
params and as an artifact, metrics as flat numbers; and the lab's run layout, written by
jobs.benchmark and read by jobs.report."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import tempfile
import threading
import time

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


_warm_up: threading.Thread | None = None


def warm_up(cfg) -> None:
    """Import MLflow and open its store (a new sqlite store creates its tables) in a
    background thread, called while Spark starts: the JVM's start leaves this process
    waiting, and MLflow's import and store cost a small job 2-4 s. `mlflow_run` waits
    for it; an error here is left for `mlflow_run` to report."""
    global _warm_up
    m = cfg.get("mlflow")
    if _warm_up is not None or m is None or not m.enabled:
        return

    def work():
        try:
            import mlflow
            mlflow.MlflowClient(tracking_uri=m.tracking_uri).get_experiment_by_name(m.experiment)
        except Exception:  # noqa: BLE001 - mlflow_run opens the store again and says what failed
            pass

    _warm_up = threading.Thread(target=work, name="mlflow-warm-up", daemon=True)
    _warm_up.start()


@contextlib.contextmanager
def mlflow_run(cfg, job: str, nested: bool = False, tags: dict | None = None):
    """Start an MLflow run for `job` (or yield None when cfg.mlflow.enabled is false).

    The run is tagged with its output directory and its driver (host, pid, process start
    time); earlier runs of the same output that still say RUNNING although their driver is
    gone (killed, its machine lost) are marked KILLED first (see `end_stale_runs`)."""
    m = cfg.mlflow
    if not m.enabled:
        yield None
        return
    if _warm_up is not None:
        _warm_up.join(timeout=60)      # an unreachable server: the calls below report it
    import mlflow
    mlflow.set_tracking_uri(m.tracking_uri)
    exp = mlflow.set_experiment(m.experiment)
    own = {"job": job, **driver_tags(), **(tags or {})}
    output = output_of(cfg)
    if output:
        own["output"] = output
    with mlflow.start_run(run_name=m.get("run_name") or job, nested=nested, tags=own) as run:
        if output:
            end_stale_runs(mlflow.MlflowClient(), exp.experiment_id, output, run.info.run_id)
        resolved = _as_dict(cfg)
        params = {k: str(v)[:5000] for k, v in flatten(resolved).items()}
        items = list(params.items())
        for i in range(0, len(items), 100):          # MLflow takes at most 100 params a call
            mlflow.log_params(dict(items[i:i + 100]))
        log_config(cfg)
        yield run


def output_of(cfg) -> str | None:
    """The job's `out` as one spelling per directory: local paths absolute, URIs as given."""
    out = cfg.get("out") if hasattr(cfg, "get") else None
    if not out:
        return None
    out = str(out).rstrip("/")
    if out.startswith("file:"):
        out = out[len("file:"):].lstrip("/")
        out = "/" + out
    return out if "://" in out else os.path.abspath(out)


def driver_tags() -> dict[str, str]:
    import psutil
    me = psutil.Process()
    return {"driver.host": socket.gethostname(), "driver.pid": str(me.pid), "driver.started": f"{me.create_time():.2f}"}


def driver_gone(tags: dict) -> str | None:
    """Why the driver that tagged a run is gone (None: it may still be running). A driver
    on another host cannot be looked at from here: a new run of the same output supersedes
    it (two live drivers writing one output are not supported anyway)."""
    import psutil
    host, pid, started = tags.get("driver.host"), tags.get("driver.pid"), tags.get("driver.started")
    if host is None or pid is None:
        return None                      # not tagged by mlflow_run: not ours to judge
    if host != socket.gethostname():
        return f"superseded by a new run of the same output (driver was on {host}, pid {pid})"
    try:
        p = psutil.Process(int(pid))
        if started is None or abs(p.create_time() - float(started)) < 1.0:
            return None                  # alive (a nested run's parent, or a concurrent run)
    except psutil.NoSuchProcess:
        pass
    return f"driver pid {pid} on {host} is gone"


def end_stale_runs(client, experiment_id: str, output: str, own_run_id: str) -> list[str]:
    """Mark KILLED the runs of this experiment and output still RUNNING whose driver is
    gone; returns their ids. Never fails the job: tracking trouble is only logged."""
    ended = []
    try:
        runs = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
        for r in runs:
            tags = r.data.tags
            if r.info.run_id == own_run_id or tags.get("output") != output:
                continue
            why = driver_gone(tags)
            if why is None:
                continue
            client.set_tag(r.info.run_id, "killed_reason", why)
            client.set_terminated(r.info.run_id, status="KILLED")
            ended.append(r.info.run_id)
            print(f"[{time.strftime('%H:%M:%S')}] mlflow: run {r.info.run_id} ({tags.get('job')}) of {output} "
                  f"was still RUNNING; marked KILLED: {why}", flush=True)
    except Exception as e:  # noqa: BLE001 - a stale run's status must not stop a new run
        log.warning("mlflow: could not check earlier runs of %s: %s", output, e)
    return ended


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
