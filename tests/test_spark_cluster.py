"""Real components: `spark-submit jobs/pipeline.py` on a Spark standalone cluster (a master
and one worker started here on 127.0.0.1 by spark-class, once for the module), tracked by a
real `mlflow server`; and the faults of docs/faults.md, dealt by SIGKILL to the real
processes: the driver after wave 2 of 4, then, in the resumed run, the executor JVM and a
Python worker in the middle of generate tasks. Two spark-submit runs in all (CI time)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from conftest import JOB_ROOT, assert_exactly_once, mixed_corpus, read_out, write_jsonl

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = 120.0, poll: float = 1.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            v = check()
            if v:
                return v
        except (OSError, ValueError):   # not up yet; a starting master's UI may answer /json with its HTML page
            pass
        time.sleep(poll)
    raise TimeoutError(f"{what} did not come up in {timeout:.0f}s")


def http_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def cluster(job_env, tiny_model, tmp_path_factory):
    import pyspark
    tmp_path = tmp_path_factory.mktemp("cluster")
    spark_home = os.path.dirname(pyspark.__file__)
    env = dict(job_env["env"], SPARK_HOME=spark_home, PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1",
               SPARK_WORKER_DIR=str(tmp_path / "work"), SPARK_LOG_DIR=str(tmp_path / "logs"),
               # an overloaded machine can miss the worker's heartbeats for a minute: that must
               # not make the master drop the worker and its executor (no fault of ours)
               SPARK_MASTER_OPTS="-Dspark.worker.timeout=600")
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
        yield {"master": f"spark://127.0.0.1:{p_master}", "mlflow": f"http://127.0.0.1:{p_mlflow}", "env": env,
               "worker_pid": procs[1].pid, "tmp": tmp_path}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


class Submit:
    """`spark-submit jobs/pipeline.py ...` in its own process group (the driver: the submit
    JVM and the Python program it runs), its output read line by line as it comes."""

    def __init__(self, cluster, *overrides: str):
        submit = os.path.join(cluster["env"]["SPARK_HOME"], "bin", "spark-submit")
        self.proc = subprocess.Popen(
            [submit, "jobs/pipeline.py", "spark=standalone", f"spark.master={cluster['master']}",
             "spark.executor_memory=1g", "model=tiny_random", "mlflow=server",
             f"mlflow.tracking_uri={cluster['mlflow']}", "mlflow.experiment=cluster-test", *overrides],
            cwd=JOB_ROOT, env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_line(self, pattern: str, timeout: float = 900):
        t0 = time.time()
        while time.time() - t0 < timeout:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"the job ended without printing {pattern!r}:\n{self.output[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"no {pattern!r} in {timeout:.0f}s")

    def kill_driver(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def wait(self, timeout: float = 900) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc


def attempt_markers(out) -> int:
    """Generate task attempts started so far in out's current wave staging dirs."""
    import glob
    return len(glob.glob(os.path.join(str(out), "_staging", "generate-*", "_attempts", "*")))


def executor_jvms(worker_pid: int) -> list:
    import psutil
    found = []
    for p in psutil.Process(worker_pid).children(recursive=True):
        try:
            if any("CoarseGrainedExecutorBackend" in a for a in p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def executor_jvm(worker_pid: int, other_than: int | None = None, timeout: float = 120.0):
    """The executor JVM the standalone worker started (a new one after `other_than` died)."""
    return wait_for(lambda: next((p for p in executor_jvms(worker_pid) if p.pid != other_than), None),
                    "an executor JVM", timeout, poll=0.2)


def python_worker(jvm, timeout: float = 120.0):
    """The first Python worker of an executor that is in a generate task: a child of its
    pyspark.daemon (forked when a task needs one) that has torch loaded, which only the
    generate function imports; it appears when that executor's first generate task starts."""
    import psutil

    def torch_loaded(p) -> bool:
        try:
            return "libtorch" in open(f"/proc/{p.pid}/maps").read()
        except OSError:
            return False

    def find():
        try:
            daemons = jvm.children()
        except psutil.NoSuchProcess:
            return None
        for daemon in daemons:
            try:
                workers = daemon.children()
            except psutil.NoSuchProcess:
                continue
            for w in workers:
                if torch_loaded(w):
                    return w
        return None
    return wait_for(find, "a Python worker in a generate task", timeout, poll=0.05)


def test_faults_on_standalone_cluster_with_mlflow_server(cluster):
    """(c) the driver killed after wave 2 of 4, then the resumed run with (a) the executor JVM
    killed in its first generate task and (b) the Python worker of the executor that
    replaced it killed in its first task: the job completes, every id exactly once, only the
    missing rows generated, the retried attempts and the killed run in MLflow."""
    import mlflow
    tmp = cluster["tmp"]
    corpus = mixed_corpus(32, seed=3)
    path = write_jsonl(tmp / "in.jsonl", corpus)
    out = tmp / "out"
    # Every row generates exactly out_seq_length tokens: tasks of a known, non-trivial length.
    common = [f"data.path={path}", f"out={out}", "data.num_partitions=8", "waves=4",
              "generation.out_seq_length=64", "generation.ignore_eos=true", "generation.stop_sequences=[]"]

    # (c) the driver dies (SIGKILL to the submit JVM and the Python program together) right
    # after the second of four waves is committed.
    first = Submit(cluster, *common)
    first.wait_line(r"generate: wave 2/4 committed")
    first.kill_driver()
    # the master ends the dead driver's executors: the next one found belongs to the resumed run
    wait_for(lambda: not executor_jvms(cluster["worker_pid"]), "the killed run's executor to go", 120, poll=0.2)
    res, q = read_out(out)
    done = set(res["id"]) | {i for i in q["id"] if isinstance(i, str)}
    missing = len(corpus) - len(done)
    assert 0 < len(res) and 0 < missing < len(corpus), (len(res), missing)

    second = Submit(cluster, *common, "resume=true")
    second.wait_line(r"generate: .*partitions from .*\(resume")
    # (a) the executor JVM, in the middle of the first generate task of the resumed run: a
    # task writes its attempt marker before it loads the model and generates
    jvm = executor_jvm(cluster["worker_pid"])
    wait_for(lambda: attempt_markers(out) >= 1, "a generate task", 300, poll=0.05)
    jvm.send_signal(signal.SIGKILL)
    # (b) a Python worker of the executor the standalone master starts in its place, in the
    # middle of that executor's first task
    seen = attempt_markers(out)
    worker = python_worker(executor_jvm(cluster["worker_pid"], other_than=jvm.pid))
    wait_for(lambda: attempt_markers(out) > seen, "a generate task on the new executor", 300, poll=0.05)
    worker.send_signal(signal.SIGKILL)
    rc = second.wait()
    assert rc == 0, second.output[-5000:]
    assert f"results:    {out}/results" in second.output and cluster["mlflow"] in second.output
    generated = int(second.wait_line(r"generate: (\d+) rows, \d+ generated tokens").group(1))
    assert generated == missing, (generated, missing)   # only the rows the killed run did not commit
    assert_exactly_once(out, [r["id"] for r in corpus])

    client = mlflow.MlflowClient(tracking_uri=cluster["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("cluster-test").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert [r.data.tags.get("output") for r in runs] == [str(out)] * 2
    killed, run = runs
    assert killed.info.status == "KILLED" and "is gone" in killed.data.tags["killed_reason"], killed.info
    assert run.info.status == "FINISHED"
    assert run.data.params["spark.master"] == cluster["master"]
    m = run.data.metrics
    assert m["generate.rows"] + m["generate.rows_rejected"] == missing and m["generate.tokens_per_s"] > 0
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in arts
    # the killed tasks' attempts are counted: started attempts = partitions + retried ones
    assert m["generate.task_attempts_retried"] >= 1, m
    assert m["generate.task_attempts"] == m["generate.partitions"] + m["generate.task_attempts_retried"], m


def test_stale_runs_of_the_same_output_are_marked_killed(job_env, tmp_path):
    """mlflow_run ends the earlier RUNNING runs of its output whose driver is gone, and only those."""
    import mlflow
    import psutil
    from conftest import job_cfg
    from jobs._tracking import driver_tags, mlflow_run
    out = str(tmp_path / "out")
    client = mlflow.MlflowClient(tracking_uri=job_env["mlflow_uri"])
    exp = client.create_experiment(f"stale-{os.getpid()}-{time.time_ns()}")
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = driver_tags()
    runs = {
        "dead": {"output": out, **me, "driver.pid": str(dead.pid)},
        "reused_pid": {"output": out, **me, "driver.started": f"{psutil.Process().create_time() - 100:.2f}"},
        "other_host": {"output": out, **me, "driver.host": "elsewhere.example"},
        "alive": {"output": out, **me},
        "other_output": {"output": out + "2", **me, "driver.pid": str(dead.pid)},
        "untagged": {"output": out},
    }
    ids = {k: client.create_run(exp, tags=t, run_name=k).info.run_id for k, t in runs.items()}
    cfg = job_cfg(f"mlflow.tracking_uri={job_env['mlflow_uri']}", f"mlflow.experiment={client.get_experiment(exp).name}",
                  f"out={out}")
    with mlflow_run(cfg, "pipeline") as run:
        status = {k: client.get_run(i).info.status for k, i in ids.items()}
        assert run.data.tags["output"] == out and run.data.tags["driver.pid"] == str(os.getpid())
    assert status == {"dead": "KILLED", "reused_pid": "KILLED", "other_host": "KILLED", "alive": "RUNNING",
                      "other_output": "RUNNING", "untagged": "RUNNING"}, status
    assert "superseded" in client.get_run(ids["other_host"]).data.tags["killed_reason"]
