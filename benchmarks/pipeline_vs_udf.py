"""Whole-job benchmark: `jobs.pipeline` against the Spark-native way a user writes it today,
`pyspark.ml.functions.predict_batch_udf` wrapping `transformers` `generate` (batches of 16).

Same corpus, same model (the bundled SmolLM2-135M GGUF), same greedy parameters (test1:
16 new tokens, repetition penalty 5, stop at a newline), both on `local[2]` with one torch
thread per task, each timed as a whole process (Spark start, model loads, writes); ours in
fp32 (the baseline's precision) and in bf16. Writes
the ratio to benchmarks/RESULTS.md, section "Pipeline vs predict_batch_udf".

    python benchmarks/pipeline_vs_udf.py [--limit 96] [--data data/demo_prompts.jsonl]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Pipeline vs predict_batch_udf"
BATCH = 16
TEST1 = dict(max_new_tokens=16, repetition_penalty=5.0, stop="\n")


# ------------------------------------------------------------- the baseline job

def udf_job(data: str, out: str, limit: int) -> None:
    """What a user writes today: predict_batch_udf + transformers generate, batches of 16."""
    import numpy as np
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import SparkSession
    from pyspark.sql.types import StringType

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (SparkSession.builder.master("local[2]").appName("predict_batch_udf baseline")
             .config("spark.python.worker.reuse", "true").getOrCreate())
    spark.sparkContext.setLogLevel("WARN")

    def make_predict_fn():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from libinfer import bundled_model
        torch.set_num_threads(1)          # one core per task on local[2], as jobs.pipeline uses
        folder, gguf = bundled_model()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()

        def predict(prompts: np.ndarray) -> np.ndarray:
            enc = tok(list(prompts), return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=TEST1["max_new_tokens"], do_sample=False,
                                     repetition_penalty=TEST1["repetition_penalty"],
                                     stop_strings=[TEST1["stop"]], tokenizer=tok, pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            return np.array([t.split(TEST1["stop"])[0] for t in texts])
        return predict

    generate = predict_batch_udf(make_predict_fn, return_type=StringType(), batch_size=BATCH)
    df = spark.read.json(data)
    if limit:
        df = df.limit(limit)
    df = df.repartition(2)   # a small file is one split: give both task slots work, as a user would
    df.withColumn("completion", generate("prompt")).select("id", "prompt", "completion").write.parquet(out)
    spark.stop()


# --------------------------------------------------------------------- driver

def timed(cmd: list[str], env: dict, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"error: {' '.join(cmd[:4])} ... failed (exit {p.returncode}); see {log}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "data" / "demo_prompts.jsonl"))
    ap.add_argument("--limit", type=int, default=96, help="first N prompts (0 = all)")
    ap.add_argument("--udf-job", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md")
    ap.add_argument("overrides", nargs="*", help="extra jobs.pipeline overrides, e.g. spark.task_cpus=2")
    a = ap.parse_args()
    if a.udf_job:
        return udf_job(a.udf_job[0], a.udf_job[1], a.limit)

    import pandas as pd
    tmp = Path(tempfile.mkdtemp(prefix="pipeline_vs_udf-"))
    corpus = tmp / "corpus.jsonl"
    lines = Path(a.data).read_text().splitlines()
    corpus.write_text("\n".join(lines[:a.limit] if a.limit else lines) + "\n")
    n = len(corpus.read_text().splitlines())
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, HYDRA_RUN_ROOT=str(tmp / "hydra"))

    ours_cmd = [sys.executable, "-m", "jobs.pipeline", f"data.path={corpus}", "generation=test1",
                "model=smollm2_135m", "spark=local2"]
    udf_cmd = [sys.executable, str(Path(__file__).resolve()), "--limit", "0", "--udf-job", str(corpus),
               str(tmp / "udf")]
    print(f"corpus: {n} prompts from {a.data}; logs in {tmp}", flush=True)
    t_udf = timed(udf_cmd, env, tmp / "udf.log")
    print(f"predict_batch_udf + transformers.generate: {t_udf:.1f}s", flush=True)
    udf = pd.read_parquet(tmp / "udf").set_index("id")
    rows = []
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        out = tmp / f"ours_{name}"
        cmd = [*ours_cmd, f"out={out}", f"model.dtype={dtype}",
               f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *a.overrides]
        t = timed(cmd, env, tmp / f"ours_{name}.log")
        ours = pd.read_parquet(out / "results").set_index("id")
        common = ours.index.intersection(udf.index)
        agree = sum(ours.loc[i, "completions"][0].strip() == (udf.loc[i, "completion"] or "").strip()
                    for i in common)
        rows.append((name, t, agree, len(common), int(ours["n_generated_tokens"].sum())))
        print(f"jobs.pipeline {name}: {t:.1f}s = {t_udf / t:.2f}x; same greedy text on {agree}/{len(common)}",
              flush=True)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    table = "".join(f"| `jobs.pipeline` (preprocess + generate), {name} | {t:.1f} | **{t_udf / t:.2f}x** | "
                    f"{agree}/{m} |\n" for name, t, agree, m, _ in rows)
    text = (f"{SECTION}\n\n"
            f"Whole job, each timed as a process (Spark start, model loads, Parquet writes), on `local[2]`, "
            f"{n} few-shot prompts of `{Path(a.data).name}` (the first {n}, arrival order, "
            f"{rows[0][4]} tokens generated), greedy test1 (16 new tokens, repetition penalty 5, stop at "
            f"newline), the bundled SmolLM2-135M GGUF, one torch thread per task. The baseline runs "
            f"transformers in fp32; ours runs in fp32 (same precision) and in bf16 (its fast CPU path).\n\n"
            f"| job | wall s | speed-up | same greedy text as baseline |\n|---|---:|---:|---:|\n"
            f"| `predict_batch_udf` + `transformers.generate` fp32, batches of {BATCH} | {t_udf:.1f} | 1.00x | - |\n"
            f"{table}\n"
            f"- command: `python benchmarks/pipeline_vs_udf.py --limit {a.limit} {' '.join(a.overrides)}`\n"
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
            f"- machine: {cpu}, {os.cpu_count()} cores, no GPU; load average at the end "
            f"{os.getloadavg()[0]:.1f} (a shared machine: other work was running)\n\n")
    print(text)
    if not a.no_write:
        print(f"wrote {write_section(SECTION, text)}")


if __name__ == "__main__":
    main()
