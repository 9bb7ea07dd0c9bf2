"""Shared few-shot prefixes: ours with prefix reuse, ours without, transformers.generate.

Workload (the talk's service prompts): four tasks, each an instruction plus 4, 8, 12 or
16 fixed examples (~250-1,100 tokens), followed by one short query; 64 prompts in
arrival order (shuffled, seed 0), greedy, 16 new tokens, EOS ignored, the bundled
SmolLM2-135M GGUF, the same token ids on every side. Baseline: transformers `generate`
fp32 in arrival-order batches of 16 (left-padded). Each side runs --repeats times in this
process, interleaved; medians reported. Also the talk's out-of-memory question: how many
16-shot rows the engine decodes together within a fixed kv_cache_gb, with and without
reuse (the engine's own cache plan, then one real run of that batch with reuse).

Writes the '## Shared few-shot prefixes' section of benchmarks/RESULTS.md.

    python benchmarks/prefix_cache.py [--repeats 3] [--no-baseline]
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
from throughput import run_hf  # noqa: E402

from libinfer import Generator, GenerationParams, bundled_model  # noqa: E402

SECTION = "## Shared few-shot prefixes"
TOPICS = ["flights", "hotels", "laptops", "recipes", "running shoes", "coffee", "bikes", "phones", "museums",
          "concerts", "insurance", "gardening", "yoga", "camping", "cameras", "pizza"]


def header(task: int, shots: int) -> str:
    """An instruction and `shots` fixed examples in the query-suggestion style."""
    rng = random.Random(task)
    lines = [f"Task {task}: for each query, suggest five related search queries a user may type next, "
             "separated by commas. Keep them short, specific and in the user's language.\n"]
    for i in range(shots):
        t = TOPICS[(task * 5 + i) % len(TOPICS)]
        extra = ", ".join(f"{rng.choice(['best', 'cheap', 'used', 'top', 'local'])} {t} {w}"
                          for w in ("near me", "reviews", "deals", "2026", "for beginners", "online", "with free shipping",
                                    "comparison", "on sale", "for families"))
        lines.append(f"Q: {t} {rng.choice(['ideas', 'prices', 'guide', 'tips'])}\nA: {extra}\n")
    return "".join(lines)


def workload(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    heads = [header(t, shots) for t, shots in enumerate((4, 8, 12, 16))]
    rows = [heads[i % 4] + f"Q: {rng.choice(TOPICS)} {rng.choice(['for kids', 'in seoul', 'under 100'])}\nA:"
            for i in range(n)]
    rng.shuffle(rows)
    return [tokenizer(r).input_ids for r in rows]


def attention_choice(rows: int = 64, prefix: int = 768, own: int = 24, hkv: int = 3, g: int = 3, d: int = 64,
                     repeats: int = 20) -> tuple[float, float]:
    """One decode step's attention of one layer (SmolLM2's heads), rows sharing a prefix:
    (a) a block table gathered per step (prefix + own keys copied into one [rows, Hkv, L, D]
    tensor, then SDPA) against (b) what the engine does: the segment read once for all
    rows plus each row's own keys, merged by log-sum-exp. Returns ms per step for each."""
    import torch.nn.functional as F
    from libinfer.layers.attention import _attend, _merge
    pool_k, pool_v = torch.randn(hkv, prefix + own * rows, d), torch.randn(hkv, prefix + own * rows, d)
    table = torch.stack([torch.cat([torch.arange(prefix), prefix + own * r + torch.arange(own)]) for r in range(rows)])
    slot_k, slot_v = torch.randn(rows, hkv, own, d), torch.randn(rows, hkv, own, d)
    q = torch.randn(rows, hkv, g, d)

    def gathered():
        k = pool_k[:, table].permute(1, 0, 2, 3)          # [rows, Hkv, L, D]: copies prefix per row
        v = pool_v[:, table].permute(1, 0, 2, 3)
        return F.scaled_dot_product_attention(q, k, v)

    def cascade():
        o, lse = _attend(q, slot_k, slot_v, None, d ** -0.5)
        qs = q.permute(1, 0, 2, 3).reshape(hkv, rows * g, d)
        po, plse = _attend(qs, pool_k[:, :prefix], pool_v[:, :prefix], None, d ** -0.5)
        return _merge(o, lse, po.view(hkv, rows, g, d).permute(1, 0, 2, 3), plse.view(hkv, rows, g, 1).permute(1, 0, 2, 3))

    out = []
    for fn in (gathered, cascade):
        fn()
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        out.append(1e3 * statistics.median(t))
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers (the slowest side)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    new = args.new_tokens
    gens = {dt: Generator.from_pretrained(None, dtype=dt) for dt in ("float32", "bfloat16")}
    prompts = workload(gens["float32"].tokenizer, args.prompts)
    lengths = [len(p) for p in prompts]
    params = GenerationParams(greedy=True, out_seq_length=new, ignore_eos=True)
    sides = {f"ours {dt} reuse {'on' if on else 'off'}": (dt, on) for dt in ("float32", "bfloat16") for on in (True, False)}
    hf = None
    if not args.no_baseline:
        from transformers import AutoModelForCausalLM
        folder, file = bundled_model()
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    times, toks, metrics = {k: [] for k in [*sides, "transformers"]}, {}, {}
    for rep in range(args.repeats):
        for name, (dt, on) in sides.items():
            g = gens[dt]
            g.runner.prefixes.reset(0)        # every repeat starts with an empty pool: no help from the last one
            gen = Generator(g.runner, g.tokenizer, g.config, prefix_cache=on)
            res = gen.generate(prompts, params)
            times[name].append(res.metrics.wall_s)
            toks[name], metrics[name] = [r.outputs[0].token_ids for r in res], res.metrics
            print(f"[{rep}] {name}: {res.metrics.wall_s:.1f}s, hit {res.metrics.prefix_hit_tokens}", flush=True)
        if hf is not None:
            s, out = run_hf(hf, prompts, new, 16, 0)
            times["transformers"].append(s)
            toks["transformers"] = out
            print(f"[{rep}] transformers: {s:.1f}s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    base = med.get("transformers")
    ref = toks["ours float32 reuse off"]

    def same(k):
        return f"{sum(a == b for a, b in zip(toks[k], ref))}/{len(ref)}"

    rows = ["| side | wall s | vs transformers | vs ours same dtype without reuse | prompt tokens computed | "
            "prompt tokens reused | KV bytes per row | greedy = ours fp32 without reuse |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    if base:
        rows.append(f"| transformers generate fp32, arrival batches of 16 | {base:.1f} | 1.00x | - | {sum(lengths)} | 0 "
                    f"| - | {same('transformers')} |")
    for name, (dt, on) in sides.items():
        m = metrics[name]
        off = med[f"ours {dt} reuse off"]
        rows.append(f"| {name} | {med[name]:.1f} | {f'**{base / med[name]:.2f}x**' if base else '-'} | "
                    f"{off / med[name]:.2f}x | {m.prefill_tokens} | {m.prefix_hit_tokens} | "
                    f"{m.kv_bytes_per_row / 2**10:.0f} KiB | {same(name)} |")

    # The out-of-memory question at a fixed budget: 16-shot rows decoded together.
    g = gens["float32"]
    sixteen = [p for p in prompts if len(p) == max(lengths)] or prompts
    family = [sixteen[0][:-4] + p[-4:] for p in prompts]            # 64 rows of the 16-shot header
    budget = 8 * (len(family[0]) + new) * g.config.kv_bytes_per_token(g.dtype) / 2**30   # holds 8 rows unshared
    oom = []
    for on in (False, True):
        g.runner.prefixes.reset(0)
        gen = Generator(g.runner, g.tokenizer, g.config, kv_cache_gb=budget, max_batch_size=256, prefix_cache=on)
        reqs = [type("R", (), {"index": i, "prompt_ids": p, "n": 1})() for i, p in enumerate(family)]
        plan = gen._plan_prefixes(reqs, params)
        own = [len(p) - (plan[i].length if i in plan else 0) for i, p in enumerate(family)]
        slots, _ = gen.plan_cache(own, params, gen.prefixes.capacity if plan else 0)
        for seg in {id(s): s for s in plan.values()}.values():
            gen.prefixes.detach(seg)
        oom.append(slots)
    g.runner.prefixes.reset(0)
    check = Generator(g.runner, g.tokenizer, g.config, kv_cache_gb=budget, max_batch_size=256).generate(
        family, params.replace(out_seq_length=2))
    gather_ms, cascade_ms = attention_choice()
    text = "\n".join([
        SECTION, "",
        f"Command: `python benchmarks/prefix_cache.py --repeats {args.repeats}`  ",
        f"Machine: {machine()}  ",
        f"Workload: {len(prompts)} few-shot prompts of 4 tasks (instruction + 4/8/12/16 fixed examples, "
        f"{min(lengths)}-{max(lengths)} tokens, {sum(lengths)} in all; arrival order shuffled), greedy, {new} new "
        f"tokens, EOS ignored; bundled SmolLM2-135M GGUF; median of {args.repeats} runs interleaved in one process; "
        "every run of ours starts with an empty prefix pool.", "", *rows, "",
        f"Out-of-memory table at kv_cache_gb={budget:.3f} (holds 8 unshared rows of the {len(family[0])}-token "
        f"16-shot prompt + {new} new tokens): rows decoded together without reuse **{oom[0]}**, with reuse "
        f"**{oom[1]}** ({oom[1] / max(1, oom[0]):.1f}x; capped by the 64 rows offered). The run with reuse at that "
        f"budget: {check.metrics.batch_slots} slots, KV cache {check.metrics.kv_cache_bytes / 2**20:.1f} MiB of "
        f"{budget * 2**10:.1f} MiB, {sum(r.ok for r in check)}/{len(check)} rows done.", "",
        "Why a shared segment merged by log-sum-exp and not a block table (CPU has no paged-attention kernel): one "
        "decode step's attention of one layer, 64 rows sharing a 768-token prefix with 24 own tokens each "
        f"(SmolLM2's 3 KV heads x 3 query heads x 64): gathering the block table into per-row K/V then SDPA "
        f"{gather_ms:.2f} ms, the segment read once for all rows + own keys + merge {cascade_ms:.2f} ms "
        f"({gather_ms / cascade_ms:.1f}x). The gather copies the prefix once per row every step (and needs the "
        "copy's memory); the segment is read once and never copied.",
    ])
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
