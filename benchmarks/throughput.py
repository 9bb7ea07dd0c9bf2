"""Engine throughput: libinfer vs transformers `generate` on a mixed-length batch job.

Workload: 64 prompts of ~20-500 tokens in random order (fixed seed), greedy, 32 new
tokens with EOS ignored, the bundled SmolLM2-135M GGUF on every side; every side gets
the same token ids. Baseline: `AutoModelForCausalLM.generate`, fp32, arrival-order
batches of 16, left-padded (what a predict_batch_udf user gets). Ours: (a) arrival
order in static batches of 16, (b) sorted by length, static, (c) continuous batching
over --slots KV slots; fp32 and bf16. Peer: llama.cpp (llama-cpp-python's low-level
API, benchmarks/peer_llama_cpp.py) batching --slots sequences per llama_decode call, on
the bundled GGUF as stored and in the other --peer-formats its quantizer makes, when it
is installed and runs on this CPU (`./run bench` builds it).
Each configuration runs --repeats times in this one process (medians reported),
interleaved so machine noise hits every side alike.

The same run measures this machine's limits: a large matmul's FLOP/s per dtype and a
large copy's bandwidth, against which it reports our prefill's achieved FLOP/s and
our batch-1 decode's achieved weight bandwidth.

Results go to MLflow (experiment 'throughput') and to benchmarks/RESULTS.md, section
'## Throughput engine'.

    python benchmarks/throughput.py [--repeats 3] [--prompts 64] [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_kind, machine, write_section  # noqa: E402
import peer_llama_cpp  # noqa: E402

from libinfer import Generator, GenerationParams, bundled_model  # noqa: E402

SECTION = f"## Throughput engine on {cpu_kind()}"   # one table per CPU kind
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


def _median_time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops(dtype: torch.dtype, n: int = 2048) -> float:
    """FLOP/s of one large [n, n] @ [n, n] product: this machine's matmul ceiling."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / _median_time(lambda: a @ b)


def copy_bandwidth(mib: int = 512) -> float:
    """Bytes/s of a large tensor copy, read plus write (STREAM's convention)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _median_time(lambda: dst.copy_(src))


def block_params(cfg) -> int:
    """Weights every prompt token is multiplied through: the decoder blocks' projections
    (the embedding is a lookup, the LM head runs on one row per prompt)."""
    d, q, kv = cfg.hidden_size, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return cfg.n_layers * (d * (q + 2 * kv) + q * d + 3 * d * cfg.intermediate_size)


def decode_bandwidth(g: Generator, prompt: list[int], steps: int = 64) -> tuple[float, float]:
    """Batch-1 decode: (achieved weight bytes/s, seconds per step). Each step reads every
    block weight and the LM head once."""
    cfg = g.config
    weight_bytes = (block_params(cfg) + cfg.vocab_size * cfg.hidden_size) * torch.empty((), dtype=g.dtype).element_size()
    g.static_batching = False
    m = g.generate([prompt], GenerationParams(greedy=True, out_seq_length=steps + 1, ignore_eos=True)).metrics
    step = m.decode_s / m.decode_steps
    return weight_bytes / step, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=20)
    ap.add_argument("--max-len", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16, help="rows per batch: the baseline's and ours in static modes")
    ap.add_argument("--slots", type=int, default=64, help="KV-cache slots of our continuous-batching mode")
    ap.add_argument("--prefill-tokens", type=int, default=2048, help="our prompt tokens per prefill step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers (quick engine check)")
    ap.add_argument("--no-peer", action="store_true", help="skip llama.cpp even if it is installed")
    ap.add_argument("--peer-formats", default="stored,q4_0,q8_0",
                    help="llama.cpp weight formats (stored = the GGUF as shipped; others made by its quantizer)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch RESULTS.md or MLflow")
    ap.add_argument("--mlflow-uri", default="sqlite:///mlflow.db")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    new = args.new_tokens
    dtypes = ("float32", "bfloat16")

    ours = {}
    for dtype in dtypes:
        print(f"loading libinfer ({dtype}) ...", flush=True)
        ours[dtype] = Generator.from_pretrained(None, dtype=dtype, max_batch_size=args.batch,
                                                max_batch_tokens=args.prefill_tokens)
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
        return res.metrics, toks

    configs = [(d, m) for d in dtypes for m in ("arrival", "sorted", "continuous")]
    hf = None
    if not args.no_baseline:
        from transformers import AutoModelForCausalLM
        folder, gguf = bundled_model()
        print("loading transformers baseline (fp32) ...", flush=True)
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
        run_hf(hf, prompts[:2], 2, 2, tok.eos_token_id)          # warm up, as ours does
    peer_reason = "--no-peer" if args.no_peer else peer_llama_cpp.unavailable_reason()
    if peer_reason:
        print(f"llama.cpp peer: none ({peer_reason})", flush=True)

    times: dict = {c: [] for c in configs}
    phases: dict = {c: [] for c in configs}
    tokens, waste = {}, {}
    for rep in range(args.repeats):
        tag = f"[{rep + 1}/{args.repeats}]"
        if hf is not None:
            wall, tokens["hf"] = run_hf(hf, prompts, new, args.batch, tok.eos_token_id)
            times.setdefault("hf", []).append(wall)
            print(f"{tag} transformers fp32 batches of {args.batch}: {wall:.1f}s ({total_new / wall:.1f} tok/s)",
                  flush=True)
        for c in configs:
            m, tokens[c] = ours_run(*c)
            times[c].append(m.wall_s)
            phases[c].append((m.prefill_s, m.decode_s))
            waste[c] = m.padding_waste
            print(f"{tag} libinfer {c[0]} {c[1]}: {m.wall_s:.1f}s ({total_new / m.wall_s:.1f} tok/s; prefill "
                  f"{m.prefill_s:.1f}s, decode {m.decode_s:.1f}s)", flush=True)

    peer = {}
    if not peer_reason:   # its own repeats, interleaved across formats (its contexts are loaded once)
        formats = tuple(f for f in args.peer_formats.split(",") if f)
        print(f"llama.cpp batched, {args.slots} sequences per llama_decode, formats {', '.join(formats)} ...",
              flush=True)
        peer = peer_llama_cpp.rows_for(prompts, new, args.threads, args.slots, args.prefill_tokens, formats,
                                       args.repeats)
        for f, (wall, toks) in peer.items():
            times[f"llama.cpp {f}"], tokens[f"llama.cpp {f}"] = [wall], toks
            print(f"llama.cpp {f} batched: {wall:.1f}s ({total_new / wall:.1f} tok/s)", flush=True)

    print("measuring this machine's limits ...", flush=True)
    cfg = ours["float32"].config
    copy_bw = copy_bandwidth()
    limits = []
    for dtype in dtypes:
        c = (dtype, "continuous")
        peak = matmul_flops(getattr(torch, dtype))
        prefill_s = statistics.median(p for p, _ in phases[c])
        achieved = 2 * block_params(cfg) * sum(lengths) / prefill_s
        bw, step = decode_bandwidth(ours[dtype], prompts[0][:64])
        limits.append((dtype, achieved, peak, bw, step))

    med = {k: statistics.median(v) for k, v in times.items() if v}
    ref = tokens["float32", "continuous"]

    def agree(toks) -> str:
        return f"{100 * sum(a == b for a, b in zip(toks, ref)) / len(ref):.0f}%"

    base = med.get("hf")

    def ratio(k) -> str:
        return f"**{base / med[k]:.2f}x**" if base else "-"

    rows = ["| engine | dtype | schedule | wall s | gen tok/s | vs baseline | prefill s | decode s | padding waste | "
            "greedy = ours fp32 |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    if base:
        rows.append(f"| transformers generate | fp32 | arrival, batches of {args.batch}, left-padded | {base:.1f} | "
                    f"{total_new / base:.1f} | 1.00x | - | - | {100 * padding_waste(lengths, args.batch, new):.1f}% | "
                    f"{agree(tokens['hf'])} |")
    for c in configs:
        sched = {"arrival": f"arrival, static batches of {args.batch}", "sorted": f"sorted, static batches of {args.batch}",
                 "continuous": f"continuous, {args.slots} slots"}[c[1]]
        pre, dec = (statistics.median(x) for x in zip(*phases[c]))
        rows.append(f"| libinfer | {c[0]} | {sched} | {med[c]:.1f} | {total_new / med[c]:.1f} | {ratio(c)} | "
                    f"{pre:.1f} | {dec:.1f} | {100 * waste[c]:.1f}% | {agree(tokens[c])} |")
    if peer:
        import llama_cpp
        for f in peer:
            k = f"llama.cpp {f}"
            what = "Q4_1 blocks as stored (Q8_0 embeddings)" if f == "stored" else f"{f} (its quantizer, from the stored)"
            rows.append(f"| llama.cpp {llama_cpp.__version__} (peer) | {what} | batched, {args.slots} sequences per "
                        f"llama_decode | {med[k]:.1f} | {total_new / med[k]:.1f} | {ratio(k)} | - | - | - | "
                        f"{agree(tokens[k])} |")
    lim = ["| dtype | prefill achieved | large matmul (2048^3) | prefill share (target >= 60%) | "
           "batch-1 decode step | achieved weight bandwidth | copy bandwidth | decode share (target >= 50%) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for dtype, achieved, peak, bw, step in limits:
        lim.append(f"| {dtype} | {achieved / 1e9:.0f} GFLOP/s | {peak / 1e9:.0f} GFLOP/s | {100 * achieved / peak:.0f}% | "
                   f"{1e3 * step:.1f} ms | {bw / 1e9:.1f} GB/s | {copy_bw / 1e9:.1f} GB/s | {100 * bw / copy_bw:.0f}% |")
    table, limits_table = "\n".join(rows), "\n".join(lim)
    print(table, limits_table, sep="\n\n")
    if args.no_write:
        return
    cmd = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    load = os.getloadavg()[0]
    text = (f"{SECTION}\n\nCommand: `{cmd.strip()}` (or `./run bench`, which also installs the llama.cpp peer)  \n"
            f"Machine: {machine()}; load average at the end {load:.1f}  \n"
            f"Workload: {len(prompts)} prompts, {min(lengths)}-{max(lengths)} tokens ({sum(lengths)} in all; random "
            f"order, seed 0), greedy, {new} new tokens, EOS ignored; bundled SmolLM2-135M GGUF; median of "
            f"{args.repeats} runs, interleaved in one process; our prefill steps take up to {args.prefill_tokens} "
            "prompt tokens.  \n"
            "Padding waste: share of padded positions in the baseline's [batch, longest+new] matrices; for "
            "libinfer (packed prefill, no pad tokens) the share of masked attention keys in decode steps.\n\n"
            f"{table}\n\n"
            "Limits, measured in the same run. Prefill achieved = 2 x block parameters "
            f"({block_params(cfg) / 1e6:.0f}M) x prompt tokens / prefill seconds of the continuous run (attention "
            "FLOPs not counted). Batch-1 decode: one 64-token prompt, 64 steps; weight bandwidth = block weights + "
            "LM head bytes / step time.\n\n"
            f"{limits_table}\n")
    print("wrote", write_section(SECTION, text))
    import mlflow
    mlflow.set_tracking_uri(args.mlflow_uri)
    mlflow.set_experiment("throughput")
    with mlflow.start_run(run_name="throughput"):
        mlflow.log_params({"prompts": len(prompts), "new_tokens": new, "batch": args.batch, "slots": args.slots,
                           "repeats": args.repeats, "prefill_tokens": args.prefill_tokens})
        for k, v in med.items():
            name = ("hf_fp32" if k == "hf" else k.replace("llama.cpp ", "llama_cpp_") if isinstance(k, str)
                    else f"{k[0]}_{k[1]}")
            mlflow.log_metric(f"{name}_wall_s", v)
            mlflow.log_metric(f"{name}_tokens_per_s", total_new / v)
            if base and k != "hf":
                mlflow.log_metric(f"{name}_speedup", base / v)
        for dtype, achieved, peak, bw, step in limits:
            mlflow.log_metrics({f"{dtype}_prefill_flops_share": achieved / peak, f"{dtype}_decode_bw_share": bw / copy_bw,
                                f"{dtype}_matmul_gflops": peak / 1e9, f"{dtype}_decode_step_ms": 1e3 * step})
        mlflow.log_metric("copy_gb_s", copy_bw / 1e9)
        mlflow.log_text(text, "throughput.md")


if __name__ == "__main__":
    main()
