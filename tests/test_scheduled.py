"""Scheduled runs: `run_date` dates the jobs' paths (out/dt=YYYY-MM-DD, and generate's in), a
rerun of the same date gives the same rows once, and the exit codes a scheduler reads
(0 done, 2 a user error, 1 a failure) come out of a real job process. A bad path -> 2 is
tests/test_bad_input.py's."""
from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import pytest

from conftest import JOB_ROOT, assert_exactly_once, job_cfg, mixed_corpus, read_out, write_jsonl

DATE = "2026-11-30"


def test_run_date_dates_out_and_in():
    from jobs._config import ConfigError
    cfg = job_cfg(f"run_date={DATE}", "out=/data/gen/", "in=/data/pre")
    assert (cfg.out, cfg["in"], cfg.run_date) == (f"/data/gen/dt={DATE}", f"/data/pre/dt={DATE}", DATE)
    from jobs import _config
    _config.validate(cfg)                                   # validating again changes nothing
    assert (cfg.out, cfg["in"]) == (f"/data/gen/dt={DATE}", f"/data/pre/dt={DATE}")
    # an `in` that names its date is kept (e.g. yesterday's preprocess output)
    assert job_cfg(f"run_date={DATE}", "in='/data/pre/dt=2026-11-29'")["in"] == "/data/pre/dt=2026-11-29"
    assert job_cfg("run_date=today", "out=/o").out == f"/o/dt={dt.datetime.now(dt.timezone.utc).date()}"
    assert job_cfg("out=/o").out == "/o" and job_cfg("out=/o").run_date is None    # off by default
    for bad in ("2026-02-30", "30.11.2026", "yesterday", "20261130"):
        with pytest.raises(ConfigError, match="config 'run_date': must be a date YYYY-MM-DD"):
            job_cfg(f"run_date={bad}")
    with pytest.raises(ConfigError, match="config 'out': already ends in dt=2026-11-29"):
        job_cfg(f"run_date={DATE}", "out='/o/dt=2026-11-29'")


def _run(args, env):
    return subprocess.run([sys.executable, "-m", "jobs.pipeline", *args], cwd=JOB_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _rows(out_dir):
    res, _ = read_out(out_dir)
    return sorted((r.id, tuple(r.completions)) for r in res.itertuples())


@pytest.mark.slow
def test_scheduled_pipeline_exit_codes_and_rerun_of_a_date(job_env, tiny_model, tmp_path):
    """What a scheduler sees: a failure beyond the task retries exits 1; its retry (resume=true,
    as the example DAG passes) exits 0 with every row once under out/dt=DATE; the date run again
    the same way exits 0 with the same rows, once; a wrong date exits 2
    naming run_date. (A rerun with overwrite=true regenerates the same rows: seeded per row,
    what tests/test_pipeline.py's retried tasks check.)"""
    rows = mixed_corpus(12)
    corpus = write_jsonl(tmp_path / "in.jsonl", rows)
    root = tmp_path / "out"
    base = ["model=tiny_random", "spark=local2", f"data.path={corpus}", f"out={root}", f"run_date={DATE}",
            "generation.out_seq_length=4", "data.num_partitions=2", "mlflow.enabled=false"]
    env = job_env["env"]

    failed = _run([*base, "fault.stage=preprocess", "fault.fail_partition=0", "fault.attempts=4"], env)
    assert failed.returncode == 1, failed.stderr[-3000:]
    # the one-line reason (Spark's own log lines may still follow it on stderr)
    assert any(line.startswith("error: ") and " failed: " in line for line in failed.stderr.splitlines())
    assert "injected fault: preprocess partition 0" in failed.stderr

    retry = _run([*base, "resume=true"], env)
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert os.listdir(root) == [f"dt={DATE}"]
    day = root / f"dt={DATE}"
    assert_exactly_once(day, [r["id"] for r in rows])
    first = _rows(day)

    again = _run([*base, "resume=true"], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert os.listdir(root) == [f"dt={DATE}"]
    assert_exactly_once(day, [r["id"] for r in rows])
    assert _rows(day) == first

    bad = _run([*base, "run_date=2026-11-31"], env)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: config 'run_date'")
    assert "Traceback" not in bad.stderr


def _overrides(command: str, date: str) -> list[str]:
    """The Hydra overrides of a `spark-submit jobs/pipeline.py ...` command line."""
    import shlex
    words = shlex.split(command.replace("$D", date))
    words = words[words.index("jobs/pipeline.py") + 1:]
    return words[:words.index(">>")] if ">>" in words else words


def test_cron_example_is_a_valid_pipeline_command():
    line = next(x for x in open(os.path.join(JOB_ROOT, "examples", "crontab.example"))
                if x.strip() and not x.startswith("#")).replace("\\%", "%")
    cfg = job_cfg(*_overrides(line, DATE))
    assert cfg.run_date == DATE and cfg.out == f"/data/suggestions/dt={DATE}" and cfg.resume
    assert cfg.data.path == f"/data/prompts/dt={DATE}"


def test_airflow_dag_loads_in_a_dagbag():
    pytest.importorskip("airflow", reason="apache-airflow is not in the test environment: installing it would "
                        "downgrade fastapi 0.165 -> 0.136 (airflow-core pins fastapi<0.137; the playground serves "
                        "on fastapi) and took 4 min; `pip install apache-airflow==3.3.2` runs this test")
    import jinja2
    try:
        from airflow.dag_processing.dagbag import DagBag        # Airflow 3
    except ImportError:
        from airflow.models.dagbag import DagBag                # Airflow 2
    bag = DagBag(dag_folder=os.path.join(JOB_ROOT, "examples"))
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags["llm_batch_daily"]
    (task,) = dag.tasks
    command = jinja2.Template(task.bash_command).render(ds=DATE)
    assert command.split()[1] == "jobs/pipeline.py"
    cfg = job_cfg(*_overrides(command, DATE))              # every override is a key of the jobs' config
    assert cfg.run_date == DATE and cfg.resume and cfg.data.path == f"/data/prompts/dt={DATE}"
