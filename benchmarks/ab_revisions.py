"""The same engine workload on two git revisions, side by side: does a change cost time?

Each revision is checked out in a temporary git worktree; every run is a fresh process
that imports libinfer from that worktree, loads the bundled SmolLM2 GGUF and times one
`generate` after warm-up on the mixed-length workload of benchmarks/throughput.py (64
prompts of 26-489 tokens that share nothing, greedy, 32 new tokens, EOS ignored,
continuous batching). Runs alternate between the revisions, --repeats times; medians.
Writes the '## Revisions A/B' section of benchmarks/RESULTS.md.

    python benchmarks/ab_revisions.py BASE_REV [NEW_REV (default: the working tree)] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

WORKER = """
import json, sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[2]]
torch.set_num_threads(2)
from libinfer import Generator, GenerationParams
from throughput import workload
gen = Generator.from_pretrained(None, dtype=sys.argv[3])
prompts = workload(gen.tokenizer, 64, 26, 489, 0)
res = gen.generate(prompts, GenerationParams(greedy=True, out_seq_length=32, ignore_eos=True))
print(json.dumps({"wall_s": res.metrics.wall_s, "tokens": [r.outputs[0].token_ids for r in res]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("new", nargs="?", default=None, help="a revision; default: the working tree")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from _results import machine, write_section
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for name, rev in (("base", args.base), ("new", args.new)):
            if rev is None:
                trees[name] = (str(ROOT), "working tree")
                continue
            path = os.path.join(tmp, name)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", path, rev], check=True,
                           capture_output=True)
            trees[name] = (path, subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], check=True,
                                                capture_output=True, text=True).stdout.strip())
        try:
            times, toks = {}, {}
            for dt in args.dtypes.split(","):
                for rep in range(args.repeats):
                    for name, (path, label) in trees.items():
                        out = subprocess.run([sys.executable, "-c", WORKER, path, str(HERE), dt], check=True,
                                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
                        r = json.loads(out)
                        times.setdefault((dt, name), []).append(r["wall_s"])
                        toks[(dt, name)] = r["tokens"]
                        print(f"[{rep}] {dt} {label}: {r['wall_s']:.2f}s", flush=True)
        finally:
            for name, (path, _) in trees.items():
                if path != str(ROOT):
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", path], check=False)
    lines = ["## Revisions A/B", "",
             f"Command: `python benchmarks/ab_revisions.py {args.base}{' ' + args.new if args.new else ''} "
             f"--repeats {args.repeats}`  ", f"Machine: {machine()}  ",
             "Workload: benchmarks/throughput.py's 64 mixed-length prompts (26-489 tokens, nothing shared), greedy, "
             "32 new tokens, EOS ignored, continuous batching, bundled SmolLM2; one fresh process per run, runs "
             f"alternating between the revisions, median of {args.repeats}.", "",
             "| dtype | base " + trees["base"][1] + " s | new " + trees["new"][1] + " s | new / base | same tokens | "
             "runs base / new s |", "|---|---:|---:|---:|---:|---|"]
    for dt in args.dtypes.split(","):
        b, n = statistics.median(times[(dt, "base")]), statistics.median(times[(dt, "new")])
        same = sum(x == y for x, y in zip(toks[(dt, "base")], toks[(dt, "new")]))
        runs = " / ".join(", ".join(f"{t:.1f}" for t in times[(dt, k)]) for k in ("base", "new"))
        lines.append(f"| {dt} | {b:.2f} | {n:.2f} | {n / b:.3f} | {same}/64 | {runs} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("## Revisions A/B", text)


if __name__ == "__main__":
    main()
