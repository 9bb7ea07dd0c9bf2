"""Whole-job benchmark: `jobs.pipeline` against the Spark-native way a user writes it today,
`pyspark.ml.functions.predict_batch_udf` wrapping `transformers` `generate` (batches of 16).

Same corpus, same model (the bundled SmolLM2-135M GGUF), same greedy parameters (test1:
16 new tokens, repetition penalty 5, stop at a newline), both on `local[2]` with one torch
thread per task, each timed as a whole process (Spark start, model loads, writes); ours in
fp32 (the baseline's precision) and in bf16. Writes
the ratio to benchmarks/RESULTS.md, section "Pipeline vs predict_batch_udf".

    python benchmarks/pipeline_vs_udf.py [--sizes 32,256,2000] [--dtypes float32,bfloat16] [--data FILE]

Each size gets its own few-shot corpus (scripts/make_demo_corpus.py --n N: the demo's four
tasks, more queries) unless --data names one to take the first N prompts of.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, write_section  # noqa: E402

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


def corpus_of(n: int, data: str | None, tmp: Path) -> Path:
    """The first n prompts of --data, or (no --data) n few-shot prompts written by
    scripts/make_demo_corpus.py (the demo's four tasks, more queries; deterministic)."""
    path = tmp / f"corpus_{n}.jsonl"
    if data:
        lines = Path(data).read_text().splitlines()
        if len(lines) < n:
            sys.exit(f"error: {data} has {len(lines)} prompts, fewer than {n}")
        path.write_text("\n".join(lines[:n]) + "\n")
    else:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_corpus.py"), "--n", str(n),
                        "--out", str(path)], check=True, capture_output=True)
    return path


def run_size(n: int, corpus: Path, tmp: Path, env: dict, dtypes: list[str], overrides: list[str]) -> dict:
    """Baseline and ours (each dtype) on one corpus: walls, agreement, load at the start."""
    import pandas as pd
    load0 = os.getloadavg()[0]
    udf_cmd = [sys.executable, str(Path(__file__).resolve()), "--limit", "0", "--udf-job", str(corpus),
               str(tmp / f"udf_{n}")]
    t_udf = timed(udf_cmd, env, tmp / f"udf_{n}.log")
    print(f"{n} prompts: predict_batch_udf + transformers.generate: {t_udf:.1f}s", flush=True)
    udf = pd.read_parquet(tmp / f"udf_{n}").set_index("id")
    ours = {}
    for dtype in dtypes:
        out = tmp / f"ours_{dtype}_{n}"
        # The same prompt text on both sides: the baseline tokenizes the prompts as they are, so
        # ours does not collapse whitespace (the demo's autocomplete queries end in a space before
        # the newline, "Q: best winter \nA:", which data.clean would remove).
        cmd = [sys.executable, "-m", "jobs.pipeline", f"data.path={corpus}", "generation=test1", "model=smollm2_135m",
               "spark=local2", f"out={out}", f"model.dtype={dtype}", f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
               "data.clean.collapse_whitespace=false", "data.clean.strip=false", *overrides]
        t = timed(cmd, env, tmp / f"ours_{dtype}_{n}.log")
        res = pd.read_parquet(out / "results").set_index("id")
        common = res.index.intersection(udf.index)
        agree = sum(res.loc[i, "completions"][0].strip() == (udf.loc[i, "completion"] or "").strip() for i in common)
        ours[dtype] = {"wall": t, "agree": agree, "rows": len(common)}
        print(f"{n} prompts: jobs.pipeline {dtype}: {t:.1f}s = {t_udf / t:.2f}x; same greedy text on "
              f"{agree}/{len(common)}", flush=True)
    return {"udf": t_udf, "ours": ours, "load": load0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="a JSON-lines corpus (id, prompt) to take the first N prompts of; "
                    "default: scripts/make_demo_corpus.py's few-shot prompts, as many as each size needs")
    ap.add_argument("--sizes", default="32,256,2000", help="corpus sizes, one baseline/ours run each")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)   # the --udf-job child's
    ap.add_argument("--udf-job", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md")
    ap.add_argument("overrides", nargs="*", help="extra jobs.pipeline overrides, e.g. spark.task_cpus=2")
    a = ap.parse_args()
    if a.udf_job:
        return udf_job(a.udf_job[0], a.udf_job[1], a.limit)

    tmp = Path(tempfile.mkdtemp(prefix="pipeline_vs_udf-"))
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, HYDRA_RUN_ROOT=str(tmp / "hydra"))
    sizes = [int(x) for x in a.sizes.split(",") if x]
    dtypes = a.dtypes.split(",")
    print(f"sizes {sizes}; logs in {tmp}", flush=True)
    runs = {n: run_size(n, corpus_of(n, a.data, tmp), tmp, env, dtypes, a.overrides) for n in sizes}

    rows = []
    for n, r in runs.items():
        rows.append(f"| {n:,} | `predict_batch_udf` + `transformers.generate` fp32, batches of {BATCH} | "
                    f"{r['udf']:.1f} | 1.00x | - | {r['load']:.1f} |")
        for dtype, o in r["ours"].items():
            rows.append(f"| {n:,} | `jobs.pipeline` (preprocess + generate), {dtype} | {o['wall']:.1f} | "
                        f"**{r['udf'] / o['wall']:.2f}x** | {o['agree']}/{o['rows']} | |")
    source = f"the first N of `{Path(a.data).name}`" if a.data else "`scripts/make_demo_corpus.py --n N`"
    cmd = f"python benchmarks/pipeline_vs_udf.py --sizes {a.sizes} --dtypes {a.dtypes}" + (
        f" --data {a.data}" if a.data else "") + "".join(f" {o}" for o in a.overrides)
    text = (f"{SECTION}\n\n"
            f"Command: `{cmd}`  \nMachine: {machine()}  \n"
            f"Whole job, each timed as a process (Spark start, model loads, Parquet writes), on `local[2]`; "
            f"few-shot prompts ({source}: four tasks, each with its own header of instruction + examples, "
            f"arrival order interleaved), greedy test1 (16 new tokens, repetition penalty 5, stop at a newline), "
            f"the bundled SmolLM2-135M GGUF, one torch thread per task. The baseline runs transformers in fp32; "
            f"ours runs in fp32 (same precision) and in bf16 (its fast CPU path), with its defaults (prefix "
            f"cache on, `data.cluster_by=prefix`) except that it keeps the prompts' whitespace as the baseline "
            f"does (`data.clean.collapse_whitespace=false data.clean.strip=false`). One run per size and side "
            f"(no median of 3).\n\n"
            f"| prompts | job | wall s | speed-up | same greedy text as baseline | 1-min load at start |\n"
            f"|---:|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")
    print(text)
    if not a.no_write:
        print(f"wrote {write_section(SECTION, text)}")


if __name__ == "__main__":
    main()
