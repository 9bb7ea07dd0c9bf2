"""Write data/finetune_pairs.jsonl: (prompt, completion) pairs for jobs.finetune in the demo
corpus' query-suggestion style (same topics, intents and details as
scripts/make_demo_corpus.py), zero-shot: one instruction line, the query, no examples.
Each completion follows from its prompt by a fixed rule, so a held-out pair can be got
exactly right by a model that learned the rules (and the detail that goes with a topic):

- rewrite: a question in plain words -> the keyword query for it (one rule per question form);
- refine: a query -> the query with the one detail that goes with its topic;
- autocomplete: the first characters of a query -> the whole query (unambiguous prefixes only).

Deterministic.

    python scripts/make_finetune_pairs.py [--n 420] [--seed 2021] [--out data/finetune_pairs.jsonl]

Columns: id (p00000...), prompt, completion (with its leading space), task.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_corpus import INTENTS, QUESTIONS, REFINE, TOPICS  # noqa: E402

# question form -> its keyword query
REWRITES = dict(zip(QUESTIONS, ["how to choose {t}", "{t} long lasting", "where to buy {t} in seoul",
                                "{t} for beginners", "{t} second hand", "{t} price"]))
INSTRUCTIONS = {"rewrite": "Rewrite the question as a search query.",
                "refine": "Add the most useful detail to the search query.",
                "autocomplete": "Complete the search query."}
SHARES = {"rewrite": 0.35, "refine": 0.3, "autocomplete": 0.35}


def candidates(seed: int) -> dict[str, list[tuple[str, str]]]:
    """Every (query, completion) of each task."""
    order = list(REFINE)                   # one detail per topic, assigned by the seed
    random.Random(f"{seed}:detail").shuffle(order)
    detail = {t: order[i % len(order)] for i, t in enumerate(TOPICS)}
    rewrite = [(q.format(t=t), r.format(t=t)) for t in TOPICS for q, r in REWRITES.items()]
    refine = [(i.format(t=t), f"{i.format(t=t)} {detail[t]}") for t in TOPICS for i in INTENTS]
    queries = [i.format(t=t) for t in TOPICS for i in INTENTS]
    cut = {q: q[:max(4, len(q) * 3 // 5)] for q in queries}
    by_prefix: dict[str, list[str]] = {}
    for q in queries:
        by_prefix.setdefault(cut[q], []).append(q)
    autocomplete = [(cut[q], q) for q in queries if len(by_prefix[cut[q]]) == 1 and cut[q] != q]
    return {"rewrite": rewrite, "refine": refine, "autocomplete": autocomplete}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=420)
    ap.add_argument("--seed", type=int, default=2021)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "finetune_pairs.jsonl"))
    a = ap.parse_args()
    rng = random.Random(a.seed)
    pools = candidates(a.seed)
    rows = []
    for task, share in SHARES.items():
        k = min(round(a.n * share), len(pools[task]))
        rows += [(task, q, c) for q, c in rng.sample(pools[task], k)]
    rng.shuffle(rows)
    with open(a.out, "w") as f:
        for i, (task, q, c) in enumerate(rows):
            rec = {"id": f"p{i:05d}", "prompt": f"{INSTRUCTIONS[task]}\nQ: {q}\nA:", "completion": f" {c}",
                   "task": task}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} pairs to {a.out}: " + ", ".join(
        f"{t} {sum(r[0] == t for r in rows)} (of {len(pools[t])})" for t in SHARES))


if __name__ == "__main__":
    main()
