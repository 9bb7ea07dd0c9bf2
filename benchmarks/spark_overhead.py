"""What Spark costs around the engine: the same rows through `python -m jobs.pipeline` and
through libinfer in one process, both timed as whole processes, with identical completions.

1. Whole process, `--rows` short prompts (default 5,000): `jobs.pipeline` (Spark start,
   preprocess, generate, MLflow) against a process that loads the generator and calls
   `generate()` on the token ids the pipeline produced (`clustered/`), 256 rows per call, as
   the job's tasks do, with all cores
   (target: pipeline within 1.5x).
2. The generate stage alone, `--stage-rows` rows (default 20,000; the issue asks 100,000):
   `jobs.generate` on a `jobs.preprocess` output; its stage wall (the waves: model loads,
   generating, the tasks' writes, the driver's commit) against the engine's `generate()`
   on the same token ids (target: within 15%).

Model `tiny_random` (the random-init Llama of conf/model/tiny_random.yaml), generation=test1
(greedy, 16 new tokens), `spark=local2` (two Python workers, one torch thread each); the
engine process gets both cores (one replica, two threads). Prints each job's own time
breakdown next to the figures and writes section "Spark overhead" of benchmarks/RESULTS.md.

    python benchmarks/spark_overhead.py [--rows 5000] [--stage-rows 20000]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Spark overhead"
WORDS = ("query search best cheap near review how to buy shoes bread coffee tea camera tents bikes boots desks "
         "kettles maps plants open today price size").split()
OVERRIDES = ["model=tiny_random", "generation=test1", "spark=local2"]
CHUNK = 256          # rows per generate() call in the engine process: the jobs' chunk_rows default


def corpus(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "prompt": " ".join(rng.choice(WORDS)
                                                                  for _ in range(rng.randint(3, 12)))}) + "\n")


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{' '.join(cmd[:4])} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return wall, p.stdout


def breakdown(stdout: str) -> dict[str, float]:
    """The job's printed `time: <phase> <s>s <share>%` lines."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^time: (\S+)\s+([0-9.]+)s", stdout, re.M)}


def engine_process(clustered: str, out_json: str) -> None:
    """The one-process baseline (run as its own process): load, generate() on the token ids."""
    t_start = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    import pyarrow.parquet as pq
    import torch
    from omegaconf import OmegaConf
    from jobs._model import build_generator
    from libinfer import GenerationParams
    torch.set_num_threads(os.cpu_count() or 1)
    files = sorted(f for f in os.listdir(clustered) if not f.startswith(("_", ".")))
    t = pq.read_table([os.path.join(clustered, f) for f in files], columns=["id", "token_ids"]) \
        if len(files) > 1 else pq.read_table(os.path.join(clustered, files[0]), columns=["id", "token_ids"])
    ids, prompts = t.column("id").to_pylist(), t.column("token_ids").to_pylist()
    t0 = time.perf_counter()
    gen = build_generator(OmegaConf.load(ROOT / "conf/model/tiny_random.yaml"))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # In calls of CHUNK rows, as the job's tasks do (chunk_rows). One call with all rows is
    # no longer slower: 4,096 of these prompts in one call 47.0 s, in calls of 256 45.3 s
    # (2-core AMD EPYC, AVX-512 BF16, 2026-12-03; an earlier engine took > 8 min for 5,000).
    res = [r for i in range(0, len(prompts), CHUNK)
           for r in gen.generate(prompts[i:i + CHUNK], GenerationParams.preset("test1"))]
    generate_s = time.perf_counter() - t0
    with open(out_json, "w") as f:
        json.dump({"load_s": load_s, "generate_s": generate_s, "in_process_s": time.perf_counter() - t_start,
                   "completions": {i: [o.text for o in r.outputs] for i, r in zip(ids, res)},
                   "errors": sum(r.error is not None for r in res)}, f)


def run_engine(clustered: str, tmp: Path, env: dict) -> tuple[float, dict]:
    out = tmp / f"engine-{os.path.basename(os.path.dirname(clustered))}.json"
    wall, _ = timed([sys.executable, __file__, "--engine", clustered, str(out)], env)
    return wall, json.load(open(out))


def same_completions(out_dir: str, engine: dict) -> tuple[int, int]:
    import pandas as pd
    res = pd.read_parquet(os.path.join(out_dir, "results"))
    got = dict(zip(res["id"], res["completions"].map(list)))
    want = engine["completions"]
    return sum(got.get(i) == c for i, c in want.items()), len(want)


def lines_of(phases: dict) -> str:
    return "\n".join(f"    {k:<28} {v:8.2f}s" for k, v in phases.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--stage-rows", type=int, default=20000, help="0: skip the generate-stage comparison")
    ap.add_argument("--engine", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        return engine_process(*args.engine)
    tmp = Path(tempfile.mkdtemp(prefix="spark_overhead-"))
    env = dict(os.environ, HYDRA_RUN_ROOT=str(tmp / "hydra"), PYTHONUNBUFFERED="1")
    mlflow = [f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "mlflow.experiment=spark-overhead"]
    py = [sys.executable, "-m"]

    # 1. Whole processes.
    load0 = os.getloadavg()[0]
    corpus(tmp / "a.jsonl", args.rows, seed=1)
    pipe_wall, pipe_out = timed(py + ["jobs.pipeline", f"data.path={tmp / 'a.jsonl'}", f"out={tmp / 'a'}",
                                      *OVERRIDES, *mlflow], env)
    eng_wall, eng = run_engine(str(tmp / "a" / "clustered"), tmp, env)
    same_a, n_a = same_completions(str(tmp / "a"), eng)
    pipe_t = breakdown(pipe_out)
    print(f"whole process, {args.rows} rows: pipeline {pipe_wall:.1f}s, engine {eng_wall:.1f}s "
          f"(load {eng['load_s']:.1f}s, generate() {eng['generate_s']:.1f}s) = {pipe_wall / eng_wall:.2f}x; "
          f"identical completions {same_a}/{n_a}\n{lines_of(pipe_t)}", flush=True)

    cmd = f"python benchmarks/spark_overhead.py --rows {args.rows} --stage-rows {args.stage_rows}"
    head = (f"{SECTION}\n\n`{cmd}` ({machine()}; model=tiny_random, generation=test1, spark=local2 (2 workers x 1 "
            f"thread) against one process with {os.cpu_count()} threads; wall clocks of whole processes; one run "
            f"each, no median of 3; 1-min load average at the start {load0:.1f}).\n\n| what | Spark path | libinfer in one process | ratio | target |\n|---|---|---|---|---|\n"
            f"| whole process, {args.rows} short prompts | `jobs.pipeline` {pipe_wall:.1f} s | load + `generate()` "
            f"{eng_wall:.1f} s (load {eng['load_s']:.1f} s, generate {eng['generate_s']:.1f} s) | "
            f"{pipe_wall / eng_wall:.2f}x | <= 1.5x |\n")
    pipe_block = f"`jobs.pipeline`'s own breakdown (seconds, as it printed it):\n\n```\n{lines_of(pipe_t)}\n```\n"
    if not args.stage_rows:
        text = head + f"\nIdentical completions: {same_a}/{n_a} rows. The generate stage alone was not run " \
                      f"(--stage-rows 0).\n\n" + pipe_block
        print(f"wrote {write_section(SECTION, text)}")
        return

    # 2. The generate stage alone.
    corpus(tmp / "b.jsonl", args.stage_rows, seed=2)
    timed(py + ["jobs.preprocess", f"data.path={tmp / 'b.jsonl'}", f"out={tmp / 'b-pre'}", *OVERRIDES,
                "mlflow.enabled=false"], env)
    gen_wall, gen_out = timed(py + ["jobs.generate", f"in={tmp / 'b-pre'}", f"out={tmp / 'b'}", *OVERRIDES,
                                    *mlflow], env)
    eng2_wall, eng2 = run_engine(str(tmp / "b-pre" / "clustered"), tmp, env)
    same_b, n_b = same_completions(str(tmp / "b"), eng2)
    gen_t = breakdown(gen_out)
    stage = sum(gen_t.get(k, 0.0) for k in ("model_load", "generate", "write", "commit"))
    print(f"generate stage, {args.stage_rows} rows: stage {stage:.1f}s (model load {gen_t.get('model_load', 0):.1f}s) "
          f"against the engine's generate() {eng2['generate_s']:.1f}s = {stage / eng2['generate_s']:.2f}x "
          f"(whole processes {gen_wall:.1f}s vs {eng2_wall:.1f}s); identical completions {same_b}/{n_b}\n"
          f"{lines_of(gen_t)}", flush=True)

    text = head + (f"| generate stage, {args.stage_rows} rows | `jobs.generate` stage {stage:.1f} s (whole process "
                   f"{gen_wall:.1f} s) | `generate()` {eng2['generate_s']:.1f} s (whole process {eng2_wall:.1f} s) | "
                   f"{stage / eng2['generate_s']:.2f}x | <= 1.15x |\n\nIdentical completions: {same_a}/{n_a} and "
                   f"{same_b}/{n_b} rows.\n\n") + pipe_block + \
        f"\n`jobs.generate`'s own breakdown:\n\n```\n{lines_of(gen_t)}\n```\n"
    print(f"wrote {write_section(SECTION, text)}")


if __name__ == "__main__":
    main()
