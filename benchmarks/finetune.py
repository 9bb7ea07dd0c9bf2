"""Fine-tuning SmolLM2-135M on the bundled query-suggestion pairs (data/finetune_pairs.jsonl,
scripts/make_finetune_pairs.py) with jobs.finetune, each run a whole `python -m jobs.finetune`
process on Spark local[2]:

1. quality: one LoRA run (--steps, 2 processes, registration on): the held-out loss before
   and after training, and the hand-off's evaluation of base and fine-tuned on the held-out
   split with the talk's test1 (exact match, chrF, BLEU, reference perplexity; exact match per
   task), plus the registration benchmark's tokens/s;
2. speed: training tokens/s (after the first step) with 1 process x 1 thread, 1 process x
   2 threads and 2 processes x 1 thread (DDP over gloo), the same 16 examples per step
   (batch 8 x accumulation 2, or batch 8 x 1 on each of 2 processes), --speed-steps steps,
   runs alternating, median of --repeats.

Writes the sections '## Fine-tuning: base vs fine-tuned' and '## Fine-tuning: 1 vs 2 processes' of
benchmarks/RESULTS.md (each only when its part ran).

    python benchmarks/finetune.py [--steps 200] [--speed-steps 12] [--repeats 3] [--skip-quality] [--skip-speed]
"""
from __future__ import annotations

import argparse
import json
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
SECTIONS = {"quality": "## Fine-tuning: base vs fine-tuned", "speed": "## Fine-tuning: 1 vs 2 processes"}
DATA = ROOT / "data" / "finetune_pairs.jsonl"


def finetune(out: str, uri: str, *overrides: str) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "jobs.finetune", f"data.path={DATA}", f"out={out}", "model=smollm2_135m",
           f"mlflow.tracking_uri={uri}", "spark=local2", *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    lines = [line for line in p.stdout.splitlines() if "finetune:" in line or "register:" in line]
    print("\n".join(lines[-6:]), flush=True)
    return wall, p.stdout


def last_run(uri: str):
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("spark-llm-batch")
    run = client.search_runs([exp.experiment_id], "tags.job = 'finetune'", order_by=["attributes.start_time DESC"],
                             max_results=1)[0]
    return client, run


def exact_by_task(results: str) -> tuple[dict[str, float], dict[str, int]]:
    """Exact match per task of one evaluation (its results/ Parquet)."""
    import pandas as pd
    from libinfer.quality import exact_match
    task = {r["id"]: (r["task"], r["completion"]) for r in map(json.loads, open(DATA))}
    res = pd.read_parquet(results)
    hits: dict[str, list[bool]] = {}
    for rid, comps in zip(res["id"], res["completions"]):
        t, ref = task[rid]
        hits.setdefault(t, []).append(exact_match(comps[0] if len(comps) else "", ref))
    return {t: sum(h) / len(h) for t, h in sorted(hits.items())}, {t: len(h) for t, h in sorted(hits.items())}


def evaluate_rp1(out: str, uri: str, path: str, version: int) -> tuple[dict, dict]:
    """jobs.evaluate of one checkpoint on the held-out split with test1 but repetition_penalty 1
    (test1's 5 also penalises the prompt's words, which these completions repeat)."""
    import mlflow
    cmd = [sys.executable, "-m", "jobs.evaluate", f"model.path={path}", f"data.path={out}/splits/eval.jsonl",
           "data.text_column=prompt", "eval.reference_column=completion", "generation=test1",
           "generation.repetition_penalty=1.0", f"out={out}/evaluate_rp1/v{version}", f"mlflow.tracking_uri={uri}",
           "spark=local2"]
    print("$", " ".join(cmd[1:]), flush=True)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("spark-llm-batch")
    run = client.search_runs([exp.experiment_id], "tags.job = 'evaluate'", order_by=["attributes.start_time DESC"],
                             max_results=1)[0]
    return run.data.metrics, exact_by_task(f"{out}/evaluate_rp1/v{version}/results")[0]


def quality(args, tmp: str) -> str:
    out, uri = os.path.join(tmp, "quality"), f"sqlite:///{tmp}/quality.db"
    wall, _ = finetune(out, uri, "finetune.method=lora", f"finetune.max_steps={args.steps}", "finetune.num_processes=2",
                       "finetune.eval_fraction=0.15", "finetune.register_model=bench_ft")
    client, run = last_run(uri)
    evals = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval_loss")}
    m, tags = run.data.metrics, run.data.tags
    vb, vf = int(tags["finetune.base_version"]), int(tags["finetune.version"])
    vt = {int(v.version): v.tags for v in client.search_model_versions("name = 'bench_ft'")}
    per_task = {v: exact_by_task(os.path.join(out, "register", f"v{v}", "results")) for v in (vb, vf)}
    rp1 = {v: evaluate_rp1(out, uri, vt[v]["path"], v) for v in (vb, vf)}
    steps = sorted(evals)

    def row(label, v):
        t = vt[v]
        f = lambda k, fmt: fmt.format(float(t[k])) if k in t else "-"  # noqa: E731
        tasks = ", ".join(f"{k} {x:.2f}" for k, x in per_task[v][0].items())
        return (f"| {label} | {f('eval.exact_match', '{:.3f}')} ({tasks}) | {f('eval.chrf', '{:.1f}')} | "
                f"{f('eval.bleu', '{:.1f}')} | {f('eval.reference_perplexity', '{:.2f}')} | "
                f"{f('eval.avg_generated_tokens', '{:.1f}')} | {f('bench.tokens_per_s', '{:.1f}')} |")
    counts = per_task[vb][1]
    return "\n".join([
        f"LoRA (r 16, alpha 32, all 7 linear projections of each layer, 4.9M of 139M parameters), {args.steps} "
        f"steps of {int(m['global_batch'])} examples (2 processes x batch 8), lr 2e-4 cosine, 10 warm-up steps, "
        f"fp32; {int(m['rows_train'])} train / {int(m['rows_eval'])} held-out pairs "
        f"({', '.join(f'{k} {n}' for k, n in counts.items())}). Whole job {wall / 60:.1f} min "
        f"(training {m['train_s'] / 60:.1f} min at {m['tokens_per_s']:.0f} tokens/s, "
        f"peak RSS per process {m['peak_rss_bytes'] / 2**30:.2f} GiB).",
        "",
        "Held-out loss per completion token (nats), `eval_loss` by step: "
        + ", ".join(f"step {s}: {evals[s]:.3f}" for s in steps) + ".",
        "",
        f"Hand-off evaluation on the {int(m['rows_eval'])} held-out pairs with `generation=test1` (greedy, "
        "repetition_penalty 5, 16 tokens, stop at newline); registration benchmark: batch 8, 64 prompt + "
        "16 generated tokens:",
        "",
        "| model | exact match (per task) | chrF | BLEU | ref. perplexity | avg gen. tokens | tokens/s (ours, 1 run, under the load above) |",
        "|---|---|---|---|---|---|---|",
        row(f"SmolLM2-135M-Instruct Q4_1 GGUF (base, v{vb})", vb),
        row(f"fine-tuned, LoRA merged, fp32 safetensors (v{vf})", vf),
        "",
        "The same with `generation.repetition_penalty=1.0` (jobs.evaluate; test1's penalty of 5 also "
        "applies to the prompt's tokens, and these completions repeat the query's words):",
        "",
        "| model | exact match (per task) | chrF | BLEU | ref. perplexity | stop hit rate | avg gen. tokens |",
        "|---|---|---|---|---|---|---|",
        *[f"| {label} | {m['exact_match']:.3f} ({', '.join(f'{k} {x:.2f}' for k, x in tasks.items())}) | "
          f"{m['chrf']:.1f} | {m['bleu']:.1f} | {m['reference_perplexity']:.2f} | {m['stop_hit_rate']:.3f} | "
          f"{m['avg_generated_tokens']:.1f} |" for label, (m, tasks) in (("base", rp1[vb]), ("fine-tuned", rp1[vf]))],
    ])


def speed(args, tmp: str) -> str:
    setups = {"1 process x 1 thread": ["finetune.num_processes=1", "finetune.threads=1", "finetune.grad_accum=2"],
              "1 process x 2 threads": ["finetune.num_processes=1", "finetune.threads=2", "finetune.grad_accum=2"],
              "2 processes x 1 thread": ["finetune.num_processes=2", "finetune.threads=1", "finetune.grad_accum=1"]}
    tps: dict[str, list[float]] = {k: [] for k in setups}
    rss: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    loads: dict[str, list[float]] = {k: [] for k in setups}     # other users of the machine show here
    uri = f"sqlite:///{tmp}/speed.db"
    for rep in range(args.repeats):
        for name, ov in setups.items():
            finetune(os.path.join(tmp, "speed"), uri, *ov, f"finetune.max_steps={args.speed_steps}",
                     "finetune.register=false", "finetune.eval_every=0", "finetune.log_every=4",
                     "finetune.eval_fraction=0.05")
            client, run = last_run(uri)
            tps[name].append(run.data.metrics["tokens_per_s"])
            loads[name].append(os.getloadavg()[0])
            curves.setdefault(name, [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"),
                                                             key=lambda m: m.step)])
            rss[name] = run.data.metrics["peak_rss_bytes"]
            print(f"{name}: {tps[name][-1]:.0f} tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in tps.items()}
    single, one, two = med["1 process x 1 thread"], med["1 process x 2 threads"], med["2 processes x 1 thread"]
    lines = [f"Training tokens/s (prompt + completion tokens through forward and backward, steps 2-{args.speed_steps}; "
             f"the first step pays for allocation), LoRA as above, the same 16 examples per step in all three; median of "
             f"{args.repeats} runs each, alternating:", "",
             "| setup | tokens/s (median) | runs (1-min load average after each) | vs 1 x 1 | peak RSS per process |",
             "|---|---|---|---|---|"]
    for name in setups:
        lines.append(f"| {name} | {med[name]:.0f} | {', '.join(f'{x:.0f} ({l:.1f})' for x, l in zip(tps[name], loads[name]))} | "
                     f"{med[name] / single:.2f}x | {rss[name] / 2**30:.2f} GiB |")
    a, b = curves["1 process x 2 threads"], curves["2 processes x 1 thread"]
    diff = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    lines += ["", f"2 processes / 1 process on the same 2 cores: {two / one:.2f}x; data-parallel efficiency "
              f"(2 processes x 1 thread against 1 x 1, ideal 2.00x): {two / single:.2f}x. 1 x 2 and 2 x 1 see the same "
              f"micro-batches and normalise the loss alike; their train_loss curves (first run of each) differ by at "
              f"most {diff:.1e} (relative) over {len(a)} steps, the LoRA dropout masks being drawn differently."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--speed-steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    cmd = "python benchmarks/finetune.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        for part, fn in (("quality", quality), ("speed", speed)):
            if getattr(args, f"skip_{part}"):
                continue
            t0 = time.time()
            text = fn(args, tmp)
            load = os.getloadavg()[0]
            body = "\n\n".join([SECTIONS[part], f"`{cmd.strip()}` on {machine()} (no AMX), Spark local[2]; "
                                 f"{(time.time() - t0) / 60:.0f} min, 1-min load average at the end {load:.1f}.", text])
            print(body, flush=True)
            if not args.no_write:
                print(f"wrote {write_section(SECTIONS[part], body)}")


if __name__ == "__main__":
    main()
