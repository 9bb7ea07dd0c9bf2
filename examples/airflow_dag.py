"""Airflow DAG: jobs.pipeline once a day over that day's prompts (docs/scheduling.md).

Copy (or symlink) this file into Airflow's dags folder. Each run submits

    spark-submit jobs/pipeline.py run_date={{ ds }} "data.path='$LLM_BATCH_INPUT/dt={{ ds }}'" \
        out=$LLM_BATCH_OUT resume=true ...

(a Hydra value holding `=` must be quoted for Hydra, hence the inner '...').

so the day's results land in $LLM_BATCH_OUT/dt=YYYY-MM-DD/ (results/, quarantine/, clustered/).
`resume=true` makes Airflow's retries (and a cleared task) finish the date instead of starting
over: rows already generated are kept, every row ends up once. The job exits 0 when done,
2 on an error a retry cannot fix (a wrong path or config value: one line saying which), 1
on any other failure (e.g. tasks that failed past spark.task_max_failures).

Settings from the environment of the Airflow worker (defaults in brackets):
  LLM_BATCH_REPO        the checkout of this repository [/opt/spark-llm-batch]
  LLM_BATCH_SUBMIT      the spark-submit to call [$LLM_BATCH_REPO/.venv/bin/spark-submit]
  LLM_BATCH_INPUT       folder of the daily inputs, one dt=YYYY-MM-DD/ each [/data/prompts]
  LLM_BATCH_OUT         output root [/data/suggestions]
  LLM_BATCH_OVERRIDES   extra Hydra overrides, e.g. "spark=standalone spark.master=spark://HOST:7077
                        mlflow=server mlflow.tracking_uri=http://HOST:5000 generation=test1"
"""
from __future__ import annotations

import datetime as dt
import os

try:                                        # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.sdk import DAG
except ImportError:                         # Airflow 2
    from airflow import DAG
    from airflow.operators.bash import BashOperator

REPO = os.environ.get("LLM_BATCH_REPO", "/opt/spark-llm-batch")
SUBMIT = os.environ.get("LLM_BATCH_SUBMIT", f"{REPO}/.venv/bin/spark-submit")
INPUT = os.environ.get("LLM_BATCH_INPUT", "/data/prompts")
OUT = os.environ.get("LLM_BATCH_OUT", "/data/suggestions")
OVERRIDES = os.environ.get("LLM_BATCH_OVERRIDES", "spark=local mlflow=local")

with DAG(
    dag_id="llm_batch_daily",
    description="Query-suggestion candidates for each day's prompts (jobs.pipeline, run_date={{ ds }})",
    schedule="@daily",
    start_date=dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,                      # one date at a time: each run holds the cluster
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=10)},
    tags=["spark-llm-batch"],
) as dag:
    BashOperator(
        task_id="pipeline",
        cwd=REPO,
        bash_command=(f"{SUBMIT} jobs/pipeline.py run_date={{{{ ds }}}} \"data.path='{INPUT}/dt={{{{ ds }}}}'\" "
                      f"out={OUT} resume=true {OVERRIDES}"),
    )
