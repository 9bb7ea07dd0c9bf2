"""Structured output: what a grammar mask costs, and which library computes it.

1. Mask cost per decode step at 64 running rows (the engine's default batch), on the
   bundled SmolLM2 tokenizer (49,152 tokens), for a query-suggestion schema: each row's
   matcher walks the tokens of a valid answer, and every step computes the 64 masks.
   Libraries: llguidance (what libinfer uses), xgrammar and outlines-core when
   importable. Neither of the last two is a project dependency (xgrammar's metadata
   pulls triton and asks for torch); to include them:
       pip install --no-deps --target /tmp/bench_libs xgrammar apache-tvm-ffi outlines-core
       PYTHONPATH=/tmp/bench_libs python benchmarks/structured.py
2. The cost in the engine: SmolLM2 fp32, 64 few-shot prompts, greedy, the same rows
   unguided, with one schema, and with a different schema per row (median of --repeats).

Writes the '## Structured output' section of benchmarks/RESULTS.md.

    python benchmarks/structured.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, write_section  # noqa: E402

from libinfer import Generator, GenerationParams  # noqa: E402

SECTION = "## Structured output"
SCHEMA = {"type": "object", "properties": {
    "query": {"type": "string", "maxLength": 40},
    "suggestions": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 3, "maxItems": 3},
    "intent": {"enum": ["buy", "learn", "go", "fix"]}},
    "required": ["query", "suggestions", "intent"], "additionalProperties": False}
ANSWER = json.dumps({"query": "running shoes", "suggestions": ["running shoes for women", "trail running shoes",
                                                               "best running shoes 2026"], "intent": "buy"},
                    separators=(", ", ": "))
ROWS = 64


def per_row_schemas() -> list[dict]:
    """64 schemas, one per row: SCHEMA with the query's maxLength 20..83 (ANSWER fits each)."""
    return [dict(SCHEMA, properties=dict(SCHEMA["properties"], query={"type": "string", "maxLength": 20 + i}))
            for i in range(ROWS)]


def walk(fill, advance, tokens) -> list[float]:
    """Seconds to compute the 64 masks at each step of the rows' walk through `tokens`."""
    out = []
    for tok in tokens:
        t0 = time.perf_counter()
        fill()
        out.append(time.perf_counter() - t0)
        advance(tok)
    return out


def llguidance_side(tok, vocab, eos):
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt
    from libinfer.structured import JSON_OPTIONS
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=[eos])

    def run(schemas, tokens):
        grammars = {json.dumps(x): llguidance.LLMatcher.grammar_from_json_schema(x, defaults=JSON_OPTIONS)
                    for x in schemas}
        ms = [llguidance.LLMatcher(lltok, grammars[json.dumps(x)]) for x in schemas]
        bm = lt.allocate_token_bitmask(len(ms), vocab)

        def fill():
            for i, m in enumerate(ms):
                lt.fill_next_token_bitmask(m, bm, i)

        def advance(t):
            for m in ms:
                assert m.consume_token(t), m.get_error()
        return walk(fill, advance, tokens)
    return f"llguidance {llguidance.__version__}", run


def xgrammar_side(tok, vocab, eos):
    import xgrammar as xgr
    from importlib.metadata import version
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[eos]))

    def run(schemas, tokens):
        compiled = {json.dumps(x): compiler.compile_json_schema(json.dumps(x), any_whitespace=False,
                                                                separators=(", ", ": ")) for x in schemas}
        ms = [xgr.GrammarMatcher(compiled[json.dumps(x)]) for x in schemas]
        bm = xgr.allocate_token_bitmask(len(ms), vocab)

        def fill():
            for i, m in enumerate(ms):
                m.fill_next_token_bitmask(bm, i)

        def advance(t):
            for m in ms:
                assert m.accept_token(t)
        return walk(fill, advance, tokens)
    return f"xgrammar {version('xgrammar')}", run


def mask_costs() -> tuple[list[str], str]:
    from libinfer.loading import Checkpoint
    ckpt = Checkpoint.open(None)
    tok = ckpt.load_tokenizer()
    vocab = ckpt.config.vocab_size
    tokens = tok(ANSWER, add_special_tokens=False).input_ids
    lines = ["| library | rows' schemas | 64 masks per step: median | p90 | whole answer (set-up + compile + every step) |",
             "|---|---|---:|---:|---:|"]
    notes = []
    for name, side in (("llguidance", llguidance_side), ("xgrammar", xgrammar_side)):
        try:
            label, run = side(tok, vocab, tok.eos_token_id)
        except ImportError as e:
            notes.append(f"{name}: not importable here ({e}); see the docstring to include it")
            continue
        for what, schemas in (("one schema", [SCHEMA] * ROWS), ("a schema per row", per_row_schemas())):
            t0 = time.perf_counter()
            ts = run(schemas, tokens)
            total = time.perf_counter() - t0
            ts = sorted(ts)
            lines.append(f"| {label} | {what} | {statistics.median(ts) * 1e3:.2f} ms | "
                         f"{ts[int(0.9 * len(ts))] * 1e3:.2f} ms | {total:.2f} s |")
    try:
        import outlines_core  # noqa: F401
        notes.append("outlines-core: importable, not measured: its Vocabulary has to be rebuilt from the "
                     "tokenizer's byte-level tokens by hand, and it compiles each schema into a full DFA index "
                     "up front")
    except ImportError:
        notes.append("outlines-core: not importable here")
    return lines, "; ".join(notes)


def engine_cost(repeats: int) -> list[str]:
    gen = Generator.from_pretrained(None, dtype="float32")
    header = ("Suggest search queries as JSON.\n"
              'Query: hiking boots -> {"query": "hiking boots", "suggestions": ["waterproof hiking boots", '
              '"hiking boots for women", "lightweight hiking boots"], "intent": "buy"}\n')
    topics = ["coffee grinder", "flights to rome", "fix a flat tire", "learn piano", "yoga mats", "museum hours",
              "cheap laptops", "pizza dough", "camping tents", "phone repair", "jazz concerts", "garden tools",
              "running shoes", "bike lights", "tax forms", "sushi near me"]
    prompts = [header + f"Query: {topics[i % len(topics)]} #{i} ->" for i in range(ROWS)]
    base = GenerationParams(greedy=True, out_seq_length=64, stop_sequences=("\n",))
    per_row = per_row_schemas()
    sides = {"unguided": (base, None), "one schema (guided_json)": (base.replace(guided_json=SCHEMA), None),
             "a schema per row (guides=)": (base, [{"guided_json": s} for s in per_row])}
    walls = {k: [] for k in sides}
    last = {}
    for _ in range(repeats):
        for name, (p, guides) in sides.items():
            res = gen.generate(prompts, p, guides=guides)
            walls[name].append(res.metrics.wall_s)
            last[name] = res
    base_wall = statistics.median(walls["unguided"])
    lines = ["| rows | wall s (median) | generated tokens | tokens/s | mask time | valid JSON | vs unguided |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, res in last.items():
        wall = statistics.median(walls[name])
        ok = 0
        for r in res:
            try:
                json.loads(r.outputs[0].text)
                ok += 1
            except ValueError:
                pass
        lines.append(f"| {name} | {wall:.2f} | {res.metrics.generated_tokens} | "
                     f"{res.metrics.generated_tokens / wall:.0f} | {res.metrics.guide_s:.2f} s | {ok}/{len(res)} | "
                     f"{wall / base_wall:.2f}x |")
    plain = last["unguided"].metrics
    for name in list(last)[1:]:
        m = last[name].metrics
        lines.append("")
        lines.append(f"- {name}: the mask is {m.guide_s / statistics.median(walls[name]):.1%} of the wall; "
                     f"tokens/s {m.generated_tokens / statistics.median(walls[name]) / (plain.generated_tokens / base_wall):.2f}x"
                     " unguided (guided rows stop when their JSON closes: fewer tokens, so a lower wall)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    mask_lines, notes = mask_costs()
    print("\n".join(mask_lines), "\n", notes)
    eng = engine_cost(args.repeats)
    print("\n".join(eng))
    text = "\n".join([
        SECTION, "",
        f"Machine: {machine()}. Command: `python benchmarks/structured.py --repeats {args.repeats}`.", "",
        f"**Mask cost per decode step, 64 running rows**, a query-suggestion schema (strings with maxLength), "
        "each row walking the tokens of a valid answer; one schema for all rows, or a schema per row (the "
        "query's maxLength differs):", "", *mask_lines, "", notes + ".", "",
        "**In the engine**: SmolLM2-135M fp32, 64 few-shot prompts sharing a header, greedy, up to 64 new "
        "tokens, stop at a newline; unguided rows are free text (most are not JSON).", "", *eng, "",
    ])
    write_section(SECTION, text)


if __name__ == "__main__":
    main()
