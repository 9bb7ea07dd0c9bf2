"""Real components: `spark-submit jobs/pipeline.py` on a Spark standalone cluster (a master
and one worker started here on 127.0.0.1 by spark-class), tracked by a real `mlflow server`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import JOB_ROOT, assert_exactly_once, mixed_corpus, write_jsonl

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = 120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            v = check()
            if v:
                return v
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{what} did not come up in {timeout:.0f}s")


def http_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture
def cluster(job_env, tmp_path):
    import pyspark
    spark_home = os.path.dirname(pyspark.__file__)
    env = dict(job_env["env"], SPARK_HOME=spark_home, PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1",
               SPARK_WORKER_DIR=str(tmp_path / "work"), SPARK_LOG_DIR=str(tmp_path / "logs"))
    p_master, p_ui, p_worker_ui, p_mlflow = free_port(), free_port(), free_port(), free_port()
    procs = []

    def start(args, log):
        procs.append(subprocess.Popen(args, env=env, cwd=tmp_path, stdout=open(tmp_path / log, "w"),
                                      stderr=subprocess.STDOUT))
    cls = os.path.join(spark_home, "bin", "spark-class")
    start([cls, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(p_master),
           "--webui-port", str(p_ui)], "master.log")
    start([cls, "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{p_master}", "--host", "127.0.0.1",
           "--cores", "2", "--memory", "2g", "--webui-port", str(p_worker_ui)], "worker.log")
    start([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(p_mlflow),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"], "mlflow.log")
    try:
        wait_for(lambda: any(w["state"] == "ALIVE" for w in http_json(f"http://127.0.0.1:{p_ui}/json")["workers"]),
                 "the Spark worker")
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{p_mlflow}/health", timeout=5).status == 200,
                 "mlflow server")
        yield {"master": f"spark://127.0.0.1:{p_master}", "mlflow": f"http://127.0.0.1:{p_mlflow}", "env": env}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_spark_submit_on_standalone_cluster_with_mlflow_server(cluster, tmp_path):
    corpus = mixed_corpus(16, seed=3)
    path = write_jsonl(tmp_path / "in.jsonl", corpus)
    out = tmp_path / "out"
    submit = os.path.join(cluster["env"]["SPARK_HOME"], "bin", "spark-submit")
    p = subprocess.run([submit, "jobs/pipeline.py", "spark=standalone", f"spark.master={cluster['master']}",
                        "spark.executor_memory=1g", "model=tiny_random", f"data.path={path}", f"out={out}",
                        "mlflow=server", f"mlflow.tracking_uri={cluster['mlflow']}", "mlflow.experiment=cluster-test"],
                       cwd=JOB_ROOT, env=cluster["env"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"results:    {out}/results" in p.stdout and cluster["mlflow"] in p.stdout
    assert_exactly_once(out, [r["id"] for r in corpus])

    import mlflow
    client = mlflow.MlflowClient(tracking_uri=cluster["mlflow"])
    (run,) = client.search_runs([client.get_experiment_by_name("cluster-test").experiment_id])
    assert run.data.params["spark.master"] == cluster["master"]
    assert run.data.metrics["generate.rows"] == 16 and run.data.metrics["generate.tokens_per_s"] > 0
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
