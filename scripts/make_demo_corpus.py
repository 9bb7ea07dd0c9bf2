"""Write data/demo_prompts.jsonl: few-shot query-suggestion prompts (the talk's use case)
with widely mixed lengths, from 0 to 21 examples (~20 to ~700 tokens). Deterministic.

    python scripts/make_demo_corpus.py [--n 240] [--out data/demo_prompts.jsonl]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TOPICS = ["running shoes", "sourdough bread", "electric cars", "home espresso", "indoor plants", "trail maps",
          "budget laptops", "winter jackets", "python tutorials", "guitar chords", "camping tents",
          "vegan recipes", "noise cancelling headphones", "city breaks", "mortgage rates", "yoga mats",
          "board games", "solar panels", "coffee grinders", "language apps", "hiking boots", "kimchi",
          "road bikes", "smart watches", "podcast microphones", "train tickets", "sunscreen", "tea kettles",
          "chess openings", "photo editing", "rain boots", "standing desks", "houseplant soil", "ramen",
          "used cameras", "museum passes", "swimming goggles", "phone plans", "air purifiers", "knitting"]
INTENTS = ["best {t}", "cheap {t}", "{t} near me", "how to choose {t}", "{t} review", "{t} for beginners",
           "{t} vs alternatives", "where to buy {t}", "{t} 2021", "are {t} worth it"]
REFINE = ["for kids", "under 100 dollars", "in seoul", "for small spaces", "with free shipping", "on sale",
          "for travel", "long lasting", "for winter", "top rated", "second hand", "eco friendly"]
HEADER = "Suggest three related search queries.\n\n"


def query(rng: random.Random) -> tuple[str, str]:
    t = rng.choice(TOPICS)
    return t, rng.choice(INTENTS).format(t=t)


def shot(rng: random.Random) -> str:
    t, q = query(rng)
    sugg = [rng.choice(INTENTS).format(t=t) + " " + rng.choice(REFINE) for _ in range(3)]
    return f"Q: {q}\nA: {', '.join(sugg)}\n\n"


def prompt(rng: random.Random, n_shots: int) -> str:
    body = "".join(shot(rng) for _ in range(n_shots))
    return f"{HEADER}{body}Q: {query(rng)[1]}\nA:"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--max-shots", type=int, default=21)
    ap.add_argument("--seed", type=int, default=2021)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "demo_prompts.jsonl"))
    a = ap.parse_args()
    rng = random.Random(a.seed)
    with open(a.out, "w") as f:
        for i in range(a.n):
            # Mostly short prompts with a long tail, in arrival order: what a real log looks like.
            n_shots = min(a.max_shots, int(rng.expovariate(1 / 5))) if rng.random() < 0.8 \
                else rng.randint(10, a.max_shots)
            f.write(json.dumps({"id": f"q{i:05d}", "prompt": prompt(rng, n_shots)}, ensure_ascii=False) + "\n")
    print(f"wrote {a.n} prompts to {a.out}")


if __name__ == "__main__":
    main()
