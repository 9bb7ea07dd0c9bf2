"""Whole job with and without shared-prefix reuse: `jobs.pipeline` on the few-shot demo
corpus (four tasks, each with a fixed 4-16-example header), `model.prefix_cache=true`
against `=false`, each timed as a whole process (Spark start, preprocess with prefix
clustering, model loads, generate, writes), runs alternating, median of --repeats.
Writes the '## Pipeline with shared prefixes' section of benchmarks/RESULTS.md.

    python benchmarks/pipeline_prefix.py [--limit 96] [--repeats 3] [--spark local2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Pipeline with shared prefixes"


def run(out: str, on: bool, args, mlflow_uri: str) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "jobs.pipeline", f"out={out}", f"data.limit={args.limit}", f"spark={args.spark}",
           f"model.prefix_cache={str(on).lower()}", f"model.dtype={args.dtype}", f"mlflow.tracking_uri={mlflow_uri}",
           "overwrite=true"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    lines = [l for l in p.stdout.splitlines() if l.startswith(("generate:", "prefix", "cache", "preprocess:"))]
    return wall, "\n".join(lines)


def completions(out: str) -> dict:
    import pyarrow.parquet as pq
    t = pq.read_table(os.path.join(out, "results")).to_pydict()
    return dict(zip(t["id"], map(tuple, t["completions"])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spark", default="local2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    times, summary, outs = {True: [], False: []}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        for rep in range(args.repeats):
            for on in (True, False):
                out = os.path.join(tmp, f"out_{on}")
                wall, summary[on] = run(out, on, args, uri)
                times[on].append(wall)
                outs[on] = completions(out)
                print(f"[{rep}] prefix_cache={on}: {wall:.1f}s", flush=True)
        same = sum(outs[True][k] == outs[False].get(k) for k in outs[True])
    on, off = statistics.median(times[True]), statistics.median(times[False])
    text = "\n".join([
        SECTION, "",
        f"Command: `python benchmarks/pipeline_prefix.py --limit {args.limit} --repeats {args.repeats} "
        f"--spark {args.spark} --dtype {args.dtype}`  ",
        f"Machine: {machine()}  ",
        f"Workload: the first {args.limit} rows of `data/demo_prompts.jsonl` (four few-shot tasks), `generation=test1` "
        f"(greedy, 16 new tokens, repetition penalty 5, stop at a newline), bundled SmolLM2 in {args.dtype}, "
        f"`spark={args.spark}`, `data.cluster_by=prefix`; whole processes, alternating, median of {args.repeats}.", "",
        "| job | wall s | speed-up |", "|---|---:|---:|",
        f"| `jobs.pipeline model.prefix_cache=false` | {off:.1f} | 1.00x |",
        f"| `jobs.pipeline model.prefix_cache=true` (default) | {on:.1f} | **{off / on:.2f}x** |", "",
        f"Same completions: {same}/{len(outs[True])} rows. The job's own summary with reuse:", "", "```",
        summary[True], "```", "", "Without:", "", "```", summary[False], "```"])
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
