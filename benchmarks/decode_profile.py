"""Where a decode step's time goes: torch.profiler over the decode steps only.

For each configuration (dtype, quantization, rows decoded together) the bundled SmolLM2
generates greedily from 64-token prompts; the profiler starts once every row has its
first token (the prefill is over) and stops at the end, so the table holds decode steps
alone: the per-op self CPU time per step and its share, grouped into the matrix products
(weight streaming), attention, and the rest (norms, rope, cache writes, sampling), and the
time outside any op (Python and scheduling between kernels). Optionally (--compile) it times the decode step
compiled by torch.compile (inductor's C++ backend, the batch size fixed).

Writes the '## Decode step profile' section of benchmarks/RESULTS.md (--no-write: print only).
With --prefill N it profiles instead one prefill of the first N prompts of throughput.py's
mixed-length workload (one new token each) and only prints the same breakdown.

    python benchmarks/decode_profile.py [--rows 1,64] [--steps 32] [--configs bfloat16:none] [--compile]
    python benchmarks/decode_profile.py --prefill 24 --configs bfloat16:none,float32:none
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_kind, header, write_section  # noqa: E402
from throughput import workload  # noqa: E402

from libinfer import Generator, GenerationParams  # noqa: E402

SECTION = f"## Decode step profile on {cpu_kind()}"
GROUPS = {"matrix products": ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::_weight_int8pack_mm",
                              "aten::_weight_int4pack_mm_for_cpu", "aten::linear"),
          "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::bmm", "aten::matmul",
                        "aten::_softmax", "aten::baddbmm")}
CONFIGS = "bfloat16:none,bfloat16:int8,bfloat16:int4,float32:none"


def prompts_of(g: Generator, rows: int) -> list[list[int]]:
    words = "search query suggest cheap flights tokyo hotel weather recipe pasta running shoes".split()
    out = []
    for r in range(rows):
        text = " ".join(words[(r + i) % len(words)] for i in range(80))
        out.append(g.tokenizer(text).input_ids[:64])
    return out


def profile_decode(g: Generator, rows: int, steps: int):
    """(ms per decode step unprofiled, profiler key averages of the decode steps of a
    second call, their count)."""
    prompts = prompts_of(g, rows)
    params = GenerationParams(greedy=True, out_seq_length=steps + 1, ignore_eos=True)
    g.generate(prompts, params)                                    # warm: shapes, allocations
    m = g.generate(prompts, params).metrics
    step_ms = 1e3 * m.decode_s / m.decode_steps
    prof = profile(activities=[ProfilerActivity.CPU])
    seen = [0]

    def on_token(ev):
        seen[0] += 1
        if seen[0] == rows:              # every row has its first token: decode steps from here
            prof.start()
    res = g.generate(prompts, params, on_token=on_token)
    prof.stop()
    return step_ms, prof.key_averages(), res.metrics.decode_steps


def profile_prefill(g: Generator, n: int):
    """(prefill ms unprofiled, profiler key averages of a second prefill, prompt tokens) for
    the first n prompts of throughput.py's workload, one new token each."""
    prompts = workload(g.tokenizer, 64, 20, 500, seed=0)[:n]
    params = GenerationParams(greedy=True, out_seq_length=1, ignore_eos=True)
    g.generate(prompts[:4], params)                                # warm
    m = g.generate(prompts, params).metrics
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        g.generate(prompts, params)
    return 1e3 * m.prefill_s, prof.key_averages(), sum(map(len, prompts))


def breakdown(avgs, steps: int, step_ms: float, top: int = 8):
    """Per step: ms and share of each group, the time outside any op (Python, the
    scheduler, sampling's host work), and the top ops."""
    total = sum(e.self_cpu_time_total for e in avgs)
    groups = {name: 0.0 for name in GROUPS} | {"other ops": 0.0}
    for e in avgs:
        g = next((k for k, names in GROUPS.items() if e.key in names), "other ops")
        groups[g] += e.self_cpu_time_total
    ops = sorted(avgs, key=lambda e: -e.self_cpu_time_total)[:top]
    per_step = lambda us: us / 1e3 / steps  # noqa: E731
    groups = {k: (per_step(v), per_step(v) / step_ms) for k, v in groups.items()}
    outside = step_ms - per_step(total)
    groups["outside ops"] = (outside, outside / step_ms)
    return (groups,
            [(e.key, per_step(e.self_cpu_time_total), e.self_cpu_time_total / total, e.count / steps) for e in ops])


def compiled_step(g: Generator, rows: int, steps: int) -> str:
    """The model's decode compiled with the batch fixed: 'ms per step (compile seconds)',
    or why it does not compile."""
    model = g.runner.model
    eager = model.decode
    model.decode = torch.compile(eager, dynamic=False)
    try:
        t0 = time.perf_counter()
        prompts = prompts_of(g, rows)
        params = GenerationParams(greedy=True, out_seq_length=4, ignore_eos=True)
        g.generate(prompts, params)
        compile_s = time.perf_counter() - t0
        m = g.generate(prompts, GenerationParams(greedy=True, out_seq_length=steps + 1, ignore_eos=True)).metrics
        return f"{1e3 * m.decode_s / m.decode_steps:.2f} (compile {compile_s:.0f} s)"
    except Exception as e:       # noqa: BLE001 - the failure is the measurement
        lines = [ln for ln in str(e).splitlines() if "Error" in ln] or [str(e).splitlines()[0]]
        return f"fails: {type(e).__name__}: {lines[0].strip()[:120]}"
    finally:
        model.decode = eager
        torch._dynamo.reset()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,64", help="rows decoded together, comma-separated")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile's decode step (minutes)")
    ap.add_argument("--configs", default=CONFIGS, help="dtype:quantization pairs, comma-separated")
    ap.add_argument("--prefill", type=int, default=0, metavar="N",
                    help="profile one prefill of N mixed-length prompts instead (prints only)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.prefill:
        for dtype, quant in (c.split(":") for c in args.configs.split(",")):
            g = Generator.from_pretrained(None, dtype=dtype, quantization=quant, max_batch_size=64,
                                          max_batch_tokens=2048)
            ms, avgs, tokens = profile_prefill(g, args.prefill)
            groups, ops = breakdown(avgs, 1, ms)
            print(f"{dtype} {quant} prefill of {args.prefill} prompts ({tokens} tokens): {ms:.0f} ms; "
                  + ", ".join(f"{k} {v:.0f} ms ({100 * sh:.0f}%)" for k, (v, sh) in groups.items()))
            print("  top ops: " + "; ".join(f"{k} {v:.0f} ms ({100 * sh:.0f}%, {n:.0f} calls)" for k, v, sh, n in ops),
                  flush=True)
            g.close()
        return
    rows_list = [int(r) for r in args.rows.split(",")]
    summary, details = [], []
    for dtype, quant in (c.split(":") for c in args.configs.split(",")):
        g = Generator.from_pretrained(None, dtype=dtype, quantization=quant, max_batch_size=max(rows_list))
        for rows in rows_list:
            step_ms, avgs, steps = profile_decode(g, rows, args.steps)
            groups, ops = breakdown(avgs, steps, step_ms)
            comp = compiled_step(g, rows, args.steps) if args.compile else None
            print(f"{dtype} {quant} rows={rows}: {step_ms:.2f} ms/step; "
                  + ", ".join(f"{k} {ms:.2f} ms ({100 * sh:.0f}%)" for k, (ms, sh) in groups.items())
                  + (f"; torch.compile: {comp}" if comp else ""), flush=True)
            summary.append(f"| {dtype} | {quant} | {rows} | {step_ms:.2f} | "
                           + " | ".join(f"{ms:.2f} ({100 * sh:.0f}%)" for ms, sh in groups.values())
                           + f" | {comp or '-'} |")
            details.append(f"{dtype}, quantization {quant}, {rows} rows: "
                           + "; ".join(f"`{k}` {ms:.2f} ms ({100 * sh:.0f}%, {n:.0f} calls)" for k, ms, sh, n in ops))
        g.close()
    head = ("| dtype | quantization | rows | step ms | matrix products ms | attention ms | other ops ms | "
            "outside ops ms | torch.compile step ms |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    table = head + "\n" + "\n".join(summary)
    print(table)
    if args.no_write:
        return
    text = (f"{SECTION}\n\n{header(sys.argv)}Bundled SmolLM2-135M, 64-token prompts, greedy, {args.steps} decode steps "
            "profiled (prefill excluded); self CPU time per step of the profiled ops (the step time is the "
            "engine's own timer in an unprofiled call just before; 'outside ops' is that minus the ops' time: "
            "Python, scheduling and host work between kernels).\n\n"
            f"{table}\n\nThe largest ops per step:\n\n" + "\n".join(f"- {d}" for d in details) + "\n")
    print("wrote", write_section(SECTION, text))


if __name__ == "__main__":
    main()
