"""Batch-1 decode: libinfer vs transformers vs llama.cpp, one prompt, tokens/s per decode step.

The issue's target is "batch-1 decode >= llama.cpp's tokens/s in the same run". One
64-token prompt (throughput.py's kind of word prompt, seed 0), greedy, 128 new tokens,
EOS ignored, the bundled SmolLM2-135M GGUF on every side, the same token ids in.

- transformers `generate`, fp32 weights dequantized from the GGUF. Its decode time per
  step is (wall of 128 new tokens - wall of 1) / 127: generate does not split phases.
- libinfer: (float32, none), (bfloat16, none), (bfloat16, int8), (bfloat16, int4) as
  dtype and weight quantization; decode tok/s = decode steps / decode seconds of the
  engine's own metrics. A configuration that does not load yet (TypeError/ValueError,
  e.g. before `quantization=` lands) is reported as not available and skipped.
- llama.cpp (llama-cpp-python's low-level API, benchmarks/peer_llama_cpp.py) for each
  --peer-formats weight format: "stored" is the GGUF as shipped (Q4_1), the others are
  made by llama.cpp's quantizer from it.

Every row also gives end-to-end tok/s (128 / wall, prefill included) and how many
leading tokens equal ours fp32 greedy tokens. Medians of --repeats runs, interleaved.
Results go to benchmarks/RESULTS.md, section '## Batch-1 decode' (unless --no-write).

    python benchmarks/decode_batch1.py [--repeats 3] [--threads 2] [--peer-formats stored,q4_0,q8_0]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_llama_cpp as peer  # noqa: E402
from _results import cpu_kind, header, write_section  # noqa: E402
from throughput import workload  # noqa: E402

from libinfer import Checkpoint, Generator, GenerationParams, bundled_model  # noqa: E402

SECTION = f"## Batch-1 decode on {cpu_kind()}"
OURS = (("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8"), ("bfloat16", "int4"))


def load_ours(dtype: str, quant: str):
    """A Generator, or the error text when this configuration cannot load yet."""
    kw = {} if quant == "none" else {"quantization": quant}
    try:
        return Generator.from_pretrained(None, dtype=dtype, **kw)
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


def run_ours(g: Generator, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    """(seconds per decode step, wall seconds, tokens)."""
    g.static_batching = False
    res = g.generate([prompt], GenerationParams(greedy=True, out_seq_length=new, ignore_eos=True))
    m = res.metrics
    return m.decode_s / m.decode_steps, m.wall_s, list(res[0].outputs[0].token_ids)


def run_hf(model, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    """(seconds per decode step, wall seconds, tokens); the step from two generate calls."""
    ids = torch.tensor([prompt])

    def gen(n: int):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=0)
        return time.perf_counter() - t0, out[0, len(prompt):].tolist()

    first, _ = gen(1)
    wall, toks = gen(new)
    return (wall - first) / (new - 1), wall, toks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer-formats", default="stored,q4_0,q8_0",
                    help="llama.cpp weight formats, comma-separated (see peer_llama_cpp.weights)")
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    new = args.new_tokens

    runners, labels, skipped = {}, {}, []
    for dtype, quant in OURS:
        print(f"loading libinfer ({dtype}, {quant}) ...", flush=True)
        g = load_ours(dtype, quant)
        if isinstance(g, str):
            print(f"  not available: {g}", flush=True)
            skipped.append(f"libinfer {dtype}, {quant}: not available ({g})")
            continue
        key = f"ours {dtype} {quant}"
        runners[key] = lambda p, g=g: run_ours(g, p, new)
        labels[key] = ("libinfer", dtype + ("" if quant == "none" else f", {quant} weights"))
    prompt = workload(Checkpoint.open(None).load_tokenizer(), 1, args.prompt_tokens, args.prompt_tokens, seed=0)[0]
    if not args.no_baseline:
        from transformers import AutoModelForCausalLM
        folder, gguf = bundled_model()
        print("loading transformers (fp32) ...", flush=True)
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
        runners["hf"] = lambda p: run_hf(hf, p, new)
        labels["hf"] = ("transformers generate", "fp32 (dequantized GGUF)")
    if peer.available():
        import llama_cpp
        for fmt in args.peer_formats.split(","):
            ctx = peer.load(peer.weights(fmt), args.threads, len(prompt) + new + 1, 1, len(prompt))
            runners[f"llama.cpp {fmt}"] = lambda p, ctx=ctx: peer.decode_batch1(ctx, p, new)
            labels[f"llama.cpp {fmt}"] = (f"llama.cpp {llama_cpp.__version__}",
                                          "Q4_1 as stored" if fmt == "stored" else fmt.upper())
    else:
        skipped.append(f"llama.cpp: not available ({peer.unavailable_reason()})")

    for run in runners.values():       # warm-up: allocations and kernel selection
        run(prompt[:16])
    steps: dict = {k: [] for k in runners}
    walls: dict = {k: [] for k in runners}
    tokens = {}
    for rep in range(args.repeats):
        for key, run in runners.items():
            step, wall, tokens[key] = run(prompt)
            steps[key].append(step)
            walls[key].append(wall)
            print(f"[{rep + 1}/{args.repeats}] {key}: {1 / step:.1f} decode tok/s ({1e3 * step:.2f} ms/step), "
                  f"{new / wall:.1f} tok/s end to end", flush=True)

    ref = tokens.get("ours float32 none")
    step = {k: statistics.median(v) for k, v in steps.items()}
    wall = {k: statistics.median(v) for k, v in walls.items()}
    peers = [k for k in step if k.startswith("llama.cpp")]
    best = min(peers, key=step.get) if peers else None
    rows = ["| engine | weights | decode tok/s | ms / step | vs best llama.cpp | end-to-end tok/s | wall s | "
            f"leading tokens = ours fp32 (of {new}) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key in step:
        lead = peer.leading_equal(tokens[key], ref) if ref else 0
        vs = f"{step[best] / step[key]:.2f}x" if best else "-"
        rows.append(f"| {labels[key][0]} | {labels[key][1]} | {1 / step[key]:.1f} | {1e3 * step[key]:.2f} | {vs} | "
                    f"{new / wall[key]:.1f} | {wall[key]:.2f} | {lead}{' (all)' if lead == new else ''} |")
    table = "\n".join(rows + [""] + [f"- {s}" for s in skipped])
    print(table)
    if args.no_write:
        return
    text = (f"{SECTION}\n\n{header(sys.argv)}"
            f"Workload: one {len(prompt)}-token prompt (throughput.py's word prompts, seed 0), greedy, {new} new "
            f"tokens, EOS ignored, bundled SmolLM2-135M GGUF, {args.threads} threads; median of {args.repeats} runs, "
            "interleaved in one process. Decode tok/s = 1 / seconds per decode step (prefill excluded; "
            f"transformers: (wall of {new} new - wall of 1) / {new - 1}); end-to-end tok/s = new tokens / wall. llama.cpp "
            "formats other than the stored one are requantized by llama.cpp from the stored Q4_1 blocks.\n\n"
            f"{table}\n")
    print("wrote", write_section(SECTION, text))


if __name__ == "__main__":
    main()
