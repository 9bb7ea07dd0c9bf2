"""Preprocessing at scale: `python -m jobs.preprocess` on synthetic corpora of 20-300-word
prompts (scripts/make_scale_corpus.py) with the bundled SmolLM2 tokenizer, each size run once
as a whole process on `local[2]` with `compare_single_process=true` (one process without
Spark on a sample of `data.single_process_sample` rows, scaled to the corpus), then the same
corpus on a standalone cluster (master + one 2-core worker on loopback, like
tests/test_spark_cluster.py) with one and with two executors of one core each.

Reports rows/s (whole job wall, from the job's own metrics in MLflow), the single-process
figure, the job's phase breakdown, the driver's peak RSS (Python driver and Spark driver
JVM; in local mode the JVM also runs the task threads) and the whole process' wall, then
writes the section "Preprocessing at scale" of benchmarks/RESULTS.md.

    python benchmarks/preprocess_scale.py                       # 3,000 / 200,000 / 1,000,000 rows + standalone
    python benchmarks/preprocess_scale.py --sizes 3000,20000 --standalone-rows 20000
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Preprocessing at scale"
EXPERIMENT = "preprocess-scale"


def corpus(workdir: Path, n: int) -> Path:
    path = workdir / f"scale_{n}.jsonl"
    if not path.exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_scale_corpus.py"), "--n", str(n),
                        "--out", str(path)], check=True)
    return path


def run_job(args: list[str], workdir: Path, name: str, env: dict) -> dict:
    """One `python -m jobs.preprocess` process (its output kept in WORKDIR/NAME.log)."""
    cmd = [sys.executable, "-m", "jobs.preprocess", "data=jsonl", f"out={workdir / ('out_' + name)}",
           f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}", f"mlflow.experiment={EXPERIMENT}",
           f"mlflow.run_name={name}", *args]
    print("+", " ".join(cmd[1:]), flush=True)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (workdir / f"{name}.log").write_text(p.stdout + f"\nprocess wall {wall:.1f}s\nload {load0:.1f} {os.getloadavg()[0]:.1f}\n")
    if p.returncode:
        raise SystemExit(f"{name} failed ({p.returncode}): {p.stderr[-2000:]}")
    m = fetch(workdir, name)
    print("\n".join(m["lines"][-3:]), flush=True)
    return m


def fetch(workdir: Path, name: str) -> dict | None:
    """The metrics of run NAME from MLflow (None if it never finished), plus its printed phases."""
    import mlflow
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = exp and client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{name}'",
                                      order_by=["attributes.start_time DESC"])
    if not runs or "rows_per_s" not in runs[0].data.metrics:
        return None
    m = dict(runs[0].data.metrics)
    log = workdir / f"{name}.log"
    m["lines"] = [l for l in log.read_text().splitlines() if "preprocess:" in l] if log.exists() else []
    loads = [l.split()[1:] for l in (log.read_text().splitlines() if log.exists() else []) if l.startswith("load ")]
    m["loads"] = [float(x) for x in loads[0]] if loads else []
    m["breakdown"] = next((l.split("phases ", 1)[1].split("; driver")[0] for l in m["lines"] if "phases " in l), "")
    return m


def tokenizer_ceiling(path: Path, rows: int = 20_000) -> dict:
    """rows/s of the bundled tokenizer's batch encoder alone on one core (the first `rows`
    prompts, uncleaned, no parse): the bound on what one task slot can preprocess."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from libinfer import Checkpoint, bundled_model
    tok = Checkpoint.open(*bundled_model()).load_tokenizer()
    with open(path) as f:
        texts = [json.loads(line)["prompt"] for _, line in zip(range(rows), f)]
    t0 = time.perf_counter()
    enc = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=True)
    ids = [e.ids for e in enc]
    s = time.perf_counter() - t0
    return {"rows": len(texts), "rows_per_s": len(texts) / s, "tokens_per_row": sum(map(len, ids)) / len(ids)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def standalone(workdir: Path, env: dict):
    """(master URL, processes) of a master + one 2-core worker on loopback."""
    import pyspark
    home = os.path.dirname(pyspark.__file__)
    env = dict(env, SPARK_HOME=home, SPARK_LOCAL_IP="127.0.0.1", SPARK_WORKER_DIR=str(workdir / "work"),
               SPARK_LOG_DIR=str(workdir / "logs"))
    pm, pui, pw = free_port(), free_port(), free_port()
    cls = os.path.join(home, "bin", "spark-class")
    procs = [subprocess.Popen([cls, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port",
                               str(pm), "--webui-port", str(pui)], env=env, stdout=open(workdir / "master.log", "w"),
                              stderr=subprocess.STDOUT),
             subprocess.Popen([cls, "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{pm}", "--host",
                               "127.0.0.1", "--cores", "2", "--memory", "4g", "--webui-port", str(pw)], env=env,
                              stdout=open(workdir / "worker.log", "w"), stderr=subprocess.STDOUT)]
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            st = json.load(urllib.request.urlopen(f"http://127.0.0.1:{pui}/json", timeout=5))
            if any(w["state"] == "ALIVE" for w in st["workers"]):
                return f"spark://127.0.0.1:{pm}", procs
        except OSError:
            pass
        time.sleep(1)
    for p in procs:
        p.terminate()
    raise SystemExit("the standalone worker did not come up")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="3000,200000,1000000")
    ap.add_argument("--standalone-rows", type=int, default=200_000, help="0 = skip the standalone run")
    ap.add_argument("--workdir", default="/tmp/preprocess_scale")
    ap.add_argument("--note", default="", help="said beside the figures (e.g. the machine's load)")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: write the section from the runs already in WORKDIR's MLflow store")
    a = ap.parse_args()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HYDRA_RUN_ROOT=str(workdir / "hydra"), PYSPARK_PYTHON=sys.executable)
    local = {}
    sizes = [int(s) for s in a.sizes.split(",") if s]
    # First, on a machine nothing of ours loads yet (the standalone JVMs take a while to exit).
    ceiling = tokenizer_ceiling(corpus(workdir, (sizes or [a.standalone_rows])[0])) if not a.report_only else None
    for n in sizes:
        local[n] = fetch(workdir, f"local2_{n}") if a.report_only else run_job(
            [f"data.path={corpus(workdir, n)}", "spark=local2", "compare_single_process=true"],
            workdir, f"local2_{n}", env)
    local = {n: m for n, m in local.items() if m}
    execs = {}
    if a.report_only:
        execs = {k: fetch(workdir, f"standalone_{k}x1_{a.standalone_rows}") for k in (1, 2)}
        execs = execs if all(execs.values()) else {}
    elif a.standalone_rows:
        path = corpus(workdir, a.standalone_rows)
        master, procs = standalone(workdir, env)
        try:
            for k in (1, 2):
                execs[k] = run_job([f"data.path={path}", "spark=standalone", f"spark.master={master}",
                                    "spark.executor_cores=1", "spark.task_cpus=1", "spark.executor_memory=1500m",
                                    f"++spark.conf={{spark.cores.max: '{k}'}}"], workdir,
                                   f"standalone_{k}x1_{a.standalone_rows}", env)
        finally:
            for p in procs:
                p.terminate()

    cmd = f"python benchmarks/preprocess_scale.py --sizes {a.sizes} --standalone-rows {a.standalone_rows}"
    missing = [f"{n:,}" for n in sizes if n not in local]
    mib = lambda b: f"{b / 2**20:.0f}"   # noqa: E731
    rows = ["| rows | Spark local[2] rows/s | job wall s | one process rows/s (sample rows) | Spark / one process "
            "| driver peak RSS MiB: Python / JVM | phases |", "|---:|---:|---:|---:|---:|---:|---|"]
    for n, m in local.items():
        single = m.get("single_process_s", 0)
        rows.append(f"| {n:,} | **{m['rows_per_s']:,.0f}** | {m['wall_s']:.1f} | "
                    f"{n / single if single else 0:,.0f} ({m.get('single_process_rows', 0):,.0f}) | "
                    f"{m.get('speedup_vs_single_process', 0):.2f}x | {mib(m.get('driver_peak_rss_bytes', 0))} / "
                    f"{mib(m.get('driver_jvm_peak_rss_bytes', 0))} | {m['breakdown']} |")
    starts = [m["loads"][0] for m in [*local.values(), *execs.values()] if m["loads"]]
    text = [SECTION, "", f"`{cmd}` on {machine()}.", "",
            f"1-min load average at the runs' starts: {min(starts or [0]):.1f}-{max(starts or [0]):.1f} (2 cores; a "
            f"job's own load at its end is ~2); one run per size, no median of 3. " + a.note, "", *rows, ""]
    if ceiling:
        c = ceiling
        text += [f"The tokenizer alone (the bundled SmolLM2 tokenizer's Rust batch encoder, `encode_batch` + ids, "
                 f"one core, on the first {c['rows']:,} prompts, {c['tokens_per_row']:.0f} tokens a row): "
                 f"**{c['rows_per_s']:,.0f} rows/s**, so 2 task slots cannot tokenize more than "
                 f"{2 * c['rows_per_s']:,.0f} rows/s before parsing, hashing, caching, sorting and writing.", ""]
    if missing:
        text += [f"Not measured in this run: {', '.join(missing)} rows on local[2]"
                 + ("" if execs or not a.standalone_rows else ", the standalone executors") + ".", ""]
    if execs:
        r1, r2 = execs[1]["rows_per_s"], execs[2]["rows_per_s"]
        text += [f"Standalone cluster (master + one worker on loopback), {a.standalone_rows:,} rows, executors of "
                 f"one core: 1 executor {r1:,.0f} rows/s, 2 executors {r2:,.0f} rows/s = **{r2 / r1:.2f}x** "
                 f"(phases, 1: {execs[1]['breakdown']}; 2: {execs[2]['breakdown']}).", ""]
    text += ["One process = the same parse, clean, tokenize, dedupe, family pick, sort and Parquet write "
             "without Spark on the first `data.single_process_sample` rows (20,000), its time scaled to the corpus "
             "(exact at 3,000 rows); its tokenizer load counted once.", ""]
    write_section(SECTION, "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
