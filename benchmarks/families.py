"""Per model family: fp32 greedy tokens vs transformers (token-exact?), and how often bf16
keeps the fp32 tokens (ours, and transformers' own bf16 as the yardstick).

Random-weight configs written by transformers (sharp attention, windows shorter than the
prompts; see tests/models/families.py) for every family, and the two bundled real models.
Writes the 'Model families' section of benchmarks/RESULTS.md.

    python benchmarks/families.py            # ~5 min on 2 cores
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "models"), str(ROOT / "benchmarks")]

from _results import machine, write_section  # noqa: E402
from families import config_of, save_model  # noqa: E402
from test_equivalence import PROMPTS as EQ_PROMPTS  # noqa: E402

from libinfer import Generator, GenerationParams  # noqa: E402

# The equivalence test's mixed-length prompts, less SmolLM2's chat-template turn (its
# special tokens mean nothing to the other families' tokenizers).
PROMPTS = [p for p in EQ_PROMPTS if "<|im_start|>" not in p]
NEW = 32


def random_cases():
    from test_family_gemma3 import gemma_config
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    return {
        "Llama (random, llama3 rope, tied)": config_of("llama", rope_parameters=llama3, tie_word_embeddings=True),
        "Mistral (random, window 16)": config_of("mistral", sliding_window=16),
        "Qwen2 (random, q/k/v bias)": config_of("qwen2"),
        "Qwen3 (random, q/k norm, head_dim 32)": config_of("qwen3", head_dim=32),
        "Gemma 3 (random, window 16, 2 rope bases)": gemma_config(),
    }


def hf_tokens(model, tok, prompts) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.inference_mode():
            g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                               min_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
        out.append(g[0, ids.shape[1]:].tolist())
    return out


def ours(gen, prompts) -> list[list[int]]:
    res = gen.generate(prompts, GenerationParams(greedy=True, out_seq_length=NEW, ignore_eos=True))
    return [r.outputs[0].token_ids for r in res]


def agree(a: list[list[int]], b: list[list[int]]) -> tuple[int, float]:
    """(prompts with identical tokens, mean share of tokens before the first difference)."""
    same = sum(x == y for x, y in zip(a, b))
    prefix = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x)) / len(x) for x, y in zip(a, b)]
    return same, sum(prefix) / len(prefix)


def measure(name, path, gguf_file=None) -> dict:
    from transformers import AutoModelForCausalLM
    t0 = time.perf_counter()
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    fp32 = Generator.from_pretrained(path, gguf_file=gguf_file, dtype="float32")
    bf16 = Generator.from_pretrained(path, gguf_file=gguf_file, dtype="bfloat16")
    ref32 = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()
    tok = fp32.tokenizer
    o32, o16, h32 = ours(fp32, PROMPTS), ours(bf16, PROMPTS), hf_tokens(ref32, tok, PROMPTS)
    h16 = hf_tokens(ref32.to(torch.bfloat16), tok, PROMPTS)
    row = {"name": name, "exact": agree(o32, h32)[0], "ours_bf16": agree(o16, o32), "hf_bf16": agree(h16, h32),
           "s": time.perf_counter() - t0}
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cfg) in enumerate(random_cases().items()):
            rows.append(measure(name, save_model(cfg, Path(tmp) / str(i), seed=i)))
    from libinfer.loading.bundled import bundled_model, gemma3_270m
    for name, (folder, file) in (("SmolLM2-135M-Instruct (Llama, GGUF Q4_1)", bundled_model()),
                                 ("Gemma 3 270M (GGUF Q4_K_M)", gemma3_270m())):
        rows.append(measure(name, folder, file))
    n = len(PROMPTS)
    lines = ["## Model families", "",
             "Command: `python benchmarks/families.py`  ",
             f"Machine: {machine()}  ",
             f"Workload: {n} prompts of 1-370 tokens, greedy, {NEW} new tokens, EOS ignored. fp32 column: prompts "
             "whose tokens equal `transformers.generate` in fp32 token by token. bf16 columns: prompts whose bf16 "
             "tokens equal the same engine's fp32 tokens, and the mean share of tokens before the first difference "
             "(bf16 changes greedy choices at near-ties in any engine: transformers' own bf16 is the yardstick).",
             "", "| model | fp32 = transformers | ours bf16 = ours fp32 | transformers bf16 = transformers fp32 |",
             "|---|---:|---:|---:|"]
    for r in rows:
        (a, ap_), (b, bp) = r["ours_bf16"], r["hf_bf16"]
        lines.append(f"| {r['name']} | {r['exact']}/{n} | {a}/{n} ({ap_:.0%} of tokens) | {b}/{n} ({bp:.0%}) |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("## Model families", text)


if __name__ == "__main__":
    main()
