"""Engine throughput: libinfer vs transformers `generate` on a mixed-length batch job.

Workload: 64 prompts of ~20-500 tokens in random order (fixed seed), greedy, 32 new
tokens with EOS ignored, the bundled SmolLM2-135M GGUF on both sides; both sides get
the same token ids. Baseline: `AutoModelForCausalLM.generate`, fp32, arrival-order
batches of 16, left-padded (what a predict_batch_udf user gets). Ours: (a) arrival
order in static batches of 16, (b) sorted by length, static, (c) continuous batching;
fp32 and bf16. Each configuration runs --repeats times in this one process (medians
reported), interleaved so machine noise hits every side alike. Results go to MLflow
(experiment 'throughput') and to benchmarks/RESULTS.md, section '## Throughput engine'.

    python benchmarks/throughput.py [--repeats 3] [--prompts 64] [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, write_section  # noqa: E402

from libinfer import Generator, GenerationParams, bundled_model  # noqa: E402

SECTION = "## Throughput engine"
WORDS = ("search query suggest cheap flights tokyo hotel weather recipe pasta running shoes best laptop "
         "student budget review near me open now how to fix bike tire translate korean english news "
         "football score movie times coffee beans").split()


def workload(tokenizer, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """n prompts of few-shot-like text cut to uniformly random token lengths in [lo, hi]."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        target = rng.randint(lo, hi)
        lines = []
        while len(lines) * 8 < target * 1.5:
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
            lines.append(f"Q: {q}\nA: {q} {rng.choice(WORDS)}")
        prompts.append(tokenizer("\n".join(lines)).input_ids[:target])
    return prompts


def padding_waste(lengths: list[int], batch: int, new: int) -> float:
    real = padded = 0
    for i in range(0, len(lengths), batch):
        b = lengths[i:i + batch]
        real += sum(x + new for x in b)
        padded += len(b) * (max(b) + new)
    return 1 - real / padded


def run_hf(model, prompts, new: int, batch: int, pad_id: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            b = prompts[i:i + batch]
            width = max(map(len, b))
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in b])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in b])
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                 min_new_tokens=new, pad_token_id=pad_id)
            outs += out[:, width:].tolist()
    return time.perf_counter() - t0, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=20)
    ap.add_argument("--max-len", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16, help="rows per batch: the baseline's and ours in static modes")
    ap.add_argument("--slots", type=int, default=64, help="KV-cache slots of our continuous-batching mode")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers (quick engine check)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch RESULTS.md or MLflow")
    ap.add_argument("--mlflow-uri", default="sqlite:///mlflow.db")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    new = args.new_tokens

    ours = {}
    for dtype in ("float32", "bfloat16"):
        print(f"loading libinfer ({dtype}) ...", flush=True)
        g = Generator.from_pretrained(None, dtype=dtype, max_batch_size=args.batch, max_batch_tokens=1024)
        ours[dtype] = g
    tok = ours["float32"].tokenizer
    prompts = workload(tok, args.prompts, args.min_len, args.max_len, seed=0)
    lengths = list(map(len, prompts))
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    sorted_prompts = [prompts[i] for i in order]
    params = GenerationParams(greedy=True, out_seq_length=new, ignore_eos=True)
    total_new = len(prompts) * new

    def ours_run(dtype: str, mode: str):
        g = ours[dtype]
        g.static_batching = mode != "continuous"
        g.max_batch_size = args.slots if mode == "continuous" else args.batch
        batch = sorted_prompts if mode == "sorted" else prompts
        res = g.generate(batch, params)
        toks = [r.outputs[0].token_ids for r in res]
        if mode == "sorted":   # back to arrival order for the agreement check
            unsorted = [None] * len(toks)
            for pos, i in enumerate(order):
                unsorted[i] = toks[pos]
            toks = unsorted
        return res.metrics.wall_s, toks, res.metrics.padding_waste

    configs = [(d, m) for d in ("float32", "bfloat16") for m in ("arrival", "sorted", "continuous")]
    hf = None
    if not args.no_baseline:
        from transformers import AutoModelForCausalLM
        folder, gguf = bundled_model()
        print("loading transformers baseline (fp32) ...", flush=True)
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
        run_hf(hf, prompts[:2], 2, 2, tok.eos_token_id)          # warm up, as ours does

    times = {c: [] for c in configs}
    times["hf"] = []
    tokens, waste = {}, {}
    for rep in range(args.repeats):
        if hf is not None:
            wall, tokens["hf"] = run_hf(hf, prompts, new, args.batch, tok.eos_token_id)
            times["hf"].append(wall)
            print(f"[{rep + 1}/{args.repeats}] transformers fp32 batches of {args.batch}: {wall:.1f}s "
                  f"({total_new / wall:.1f} tok/s)", flush=True)
        for c in configs:
            wall, tokens[c], waste[c] = ours_run(*c)
            times[c].append(wall)
            print(f"[{rep + 1}/{args.repeats}] libinfer {c[0]} {c[1]}: {wall:.1f}s ({total_new / wall:.1f} tok/s)",
                  flush=True)

    med = {k: statistics.median(v) for k, v in times.items() if v}
    ref = tokens["float32", "continuous"]

    def agree(toks) -> float:
        return sum(a == b for a, b in zip(toks, ref)) / len(ref)

    base = med.get("hf")
    rows = ["| engine | dtype | schedule | wall s (median) | gen tok/s | vs baseline | padding waste | "
            "greedy = ours fp32 |", "|---|---|---|---|---|---|---|---|"]
    if base:
        rows.append(f"| transformers generate | fp32 | arrival, batches of {args.batch}, left-padded | {base:.1f} | "
                    f"{total_new / base:.1f} | 1.00x | {100 * padding_waste(lengths, args.batch, new):.1f}% | "
                    f"{100 * agree(tokens['hf']):.0f}% |")
    for c in configs:
        ratio = f"{base / med[c]:.2f}x" if base else "-"
        rows.append(f"| libinfer | {c[0]} | {c[1]} | {med[c]:.1f} | {total_new / med[c]:.1f} | {ratio} | "
                    f"{100 * waste[c]:.1f}% | {100 * agree(tokens[c]):.0f}% |")
    table = "\n".join(rows)
    print(table)
    if args.no_write:
        return
    cmd = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    text = (f"{SECTION}\n\nCommand: `{cmd.strip()}`  \nMachine: {machine()}  \n"
            f"Workload: {len(prompts)} prompts, {min(lengths)}-{max(lengths)} tokens (random order, seed 0), "
            f"greedy, {new} new tokens, EOS ignored; bundled SmolLM2-135M GGUF; median of {args.repeats} runs, "
            "interleaved in one process.\n"
            "Padding waste: share of padded positions in the baseline's [batch, longest+new] matrices; for "
            "libinfer (packed prefill, no pad tokens) the share of masked attention keys in decode steps.\n\n"
            f"{table}\n")
    print("wrote", write_section(SECTION, text))
    import mlflow
    mlflow.set_tracking_uri(args.mlflow_uri)
    mlflow.set_experiment("throughput")
    with mlflow.start_run(run_name="throughput"):
        mlflow.log_params({"prompts": len(prompts), "new_tokens": new, "batch": args.batch, "repeats": args.repeats})
        for k, v in med.items():
            name = "hf_fp32" if k == "hf" else f"{k[0]}_{k[1]}"
            mlflow.log_metric(f"{name}_wall_s", v)
            mlflow.log_metric(f"{name}_tokens_per_s", total_new / v)
            if base and k != "hf":
                mlflow.log_metric(f"{name}_speedup", base / v)
        mlflow.log_text(text, "throughput.md")


if __name__ == "__main__":
    main()
