"""Write data/demo_prompts.jsonl: few-shot query-suggestion prompts as a service sends them
(the talk's use case, 3.4.14-3.5): a few tasks, each with its own fixed header (an
instruction plus 4 to 16 fixed examples) in front of every query of that task, many short
queries per task, the tasks interleaved in arrival order. Rows of one task share their
header token for token, which is what the prefix cache and `data.cluster_by=prefix` use.
Deterministic.

    python scripts/make_demo_corpus.py [--n 240] [--seed 2021] [--out data/demo_prompts.jsonl]

Columns: id (q00000...), prompt, task.
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
QUESTIONS = ["what is the best way to pick {t}", "i need {t} that do not break after a month",
             "can you tell me where people buy {t} in seoul", "which {t} should a beginner get first",
             "is it a good idea to buy {t} second hand", "how much should i spend on {t}"]

# The tasks: (name, instruction, number of fixed examples, share of the rows).
TASKS = [
    ("related", "You suggest search queries for a web search engine. Given the query a user typed, write "
     "four related queries that the same user is likely to search next: other intents about the same "
     "thing, each with one useful detail. Keep each suggestion short, in lower case, without punctuation "
     "at the end, never repeat the query itself, and separate the suggestions with commas.", 16, 0.2),
    ("refine", "You help shoppers narrow their search in an online store. Given a shopping query, write "
     "four narrower queries that add one useful detail each: a price range, a place, a use, a season or "
     "a condition. Keep the words of the original query in the same order, add the detail at the end, "
     "and separate the suggestions with commas.", 8, 0.3),
    ("autocomplete", "You are the autocomplete box of a search engine. Given the beginning of a query, "
     "possibly cut in the middle of a word, write four likely complete queries that start with exactly "
     "those characters, the most popular first, in lower case and separated by commas.", 12, 0.2),
    ("rewrite", "Rewrite the question a user asked in plain words as four short keyword queries for a "
     "search engine. Drop filler words, keep the important nouns and the intent (buying, comparing, "
     "learning), write in lower case and separate the queries with commas.", 4, 0.3),
]


def example(task: str, t: str, rng: random.Random) -> tuple[str, str]:
    """One (query, answer) pair of `task` about topic `t`, in the task's style."""
    q = rng.choice(INTENTS).format(t=t)
    if task == "related":
        return q, ", ".join(i.format(t=t) + " " + r for i, r in zip(rng.sample(INTENTS, 4), rng.sample(REFINE, 4)))
    if task == "refine":
        return q, ", ".join(f"{q} {r}" for r in rng.sample(REFINE, 4))
    if task == "autocomplete":
        return q[:max(3, len(q) * 2 // 3)], ", ".join([q] + [f"{q} {r}" for r in rng.sample(REFINE, 3)])
    return rng.choice(QUESTIONS).format(t=t), ", ".join([q] + [f"{t} {r}" for r in rng.sample(REFINE, 3)])


def header(task: str, instruction: str, n_shots: int, seed: int) -> str:
    """The fixed header of a task: the instruction and its examples (distinct topics), the
    same in every row of the task."""
    rng = random.Random(f"{seed}:{task}")
    shots = "".join("Q: {}\nA: {}\n\n".format(*example(task, t, rng)) for t in rng.sample(TOPICS, n_shots))
    return f"{instruction}\n\n{shots}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--seed", type=int, default=2021)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "demo_prompts.jsonl"))
    a = ap.parse_args()
    rng = random.Random(a.seed)
    headers = {name: header(name, instr, shots, a.seed) for name, instr, shots, _ in TASKS}
    counts = [round(a.n * share) for *_, share in TASKS]
    counts[0] += a.n - sum(counts)
    rows = [name for (name, *_), c in zip(TASKS, counts) for _ in range(c)]
    rng.shuffle(rows)                           # the tasks arrive interleaved, as in a log
    with open(a.out, "w") as f:
        for i, task in enumerate(rows):
            q, _ = example(task, rng.choice(TOPICS), rng)   # a fresh query; the model writes the answer
            rec = {"id": f"q{i:05d}", "prompt": f"{headers[task]}Q: {q}\nA:", "task": task}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"wrote {a.n} prompts to {a.out}: " + ", ".join(
        f"{name} ({shots} examples, {len(headers[name])} characters of header) x {c}"
        for (name, _, shots, _), c in zip(TASKS, counts)))


if __name__ == "__main__":
    main()
