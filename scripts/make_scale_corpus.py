"""Write a synthetic corpus for the preprocessing scale runs (benchmarks/preprocess_scale.py):
N JSON lines {"id", "prompt"} of 20-300 words (uniform), drawn from a vocabulary of about
2,000 English-like words (common stems x inflections), so that tokens per word and bytes per
row look like real prompts (~1.3 tokens a word with the bundled tokenizer). Deterministic for
a given --seed.

    python scripts/make_scale_corpus.py --n 200000 --out /tmp/scale_200k.jsonl
"""
from __future__ import annotations

import argparse
import json

import numpy as np

STEMS = """time person year way day thing man world life hand part child eye woman place work week case
point government company number group problem fact be have do say get make go know take see come think
look want give use find tell ask seem feel try leave call good new first last long great little own other
old right big high different small large next early young important few public bad same able search
query price review shoe bread coffee tea camera tent bike boot desk kettle map plant city hotel flight
train ticket recipe garden phone laptop battery screen charge water river mountain beach weather rain
snow summer winter music song movie book author story school student teacher class lesson test answer
question market store shop order delivery payment card bank account loan rate house rent room kitchen
table chair light door window road car engine repair service doctor health sleep food diet sport game
team player match score news report paper letter email message friend family party gift color size
style brand model design plan project task meeting office job career skill course language travel
museum park street bridge island country state history science nature animal bird fish tree flower
paint photo video chart data model system network server code program file cloud energy power""".split()
SUFFIXES = ["", "s", "ing", "ed", "er", "ly", "ness", "ful", "less", "able"]


def vocabulary() -> np.ndarray:
    return np.array(sorted({s + x for s in STEMS for x in SUFFIXES}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--out", required=True)
    ap.add_argument("--min-words", type=int, default=20)
    ap.add_argument("--max-words", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    vocab = vocabulary()
    with open(a.out, "w") as f:
        for start in range(0, a.n, 10_000):
            m = min(10_000, a.n - start)
            lengths = rng.integers(a.min_words, a.max_words + 1, size=m)
            words = vocab[rng.integers(0, len(vocab), size=int(lengths.sum()))]
            ends = np.cumsum(lengths)
            lines = [json.dumps({"id": f"s{start + i:07d}", "prompt": " ".join(words[e - k:e])})
                     for i, (e, k) in enumerate(zip(ends, lengths))]
            f.write("\n".join(lines) + "\n")
    print(f"{a.n} rows -> {a.out}")


if __name__ == "__main__":
    main()
