"""Quality metrics of generated text (no Spark, no MLflow): exact match, chrF, reference
perplexity, stop-sequence hit rate, average generated length and repetition rate.

Per-row functions return numbers; `summarize` turns rows into the corpus-level figures
that jobs.evaluate logs. chrF follows sacrebleu's definition (character n-grams 1..6,
whitespace removed, beta=2, precision and recall averaged over the n-gram orders both
sides have, then F-beta) and is computed at corpus level from summed statistics, as
`sacrebleu.corpus_chrf` does.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

CHRF_ORDER = 6
CHRF_BETA = 2.0


def normalize(text: str) -> str:
    """Exact match compares texts with runs of whitespace collapsed and ends trimmed."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def _char_ngrams(text: str, n: int) -> Counter:
    s = "".join(text.split())
    return Counter(s[i:i + n] for i in range(len(s) - n + 1))


def chrf_stats(hypothesis: str, reference: str, order: int = CHRF_ORDER) -> list[int]:
    """[hyp n-grams, ref n-grams, matches] for n = 1..order, flattened (3 * order ints)."""
    stats = []
    for n in range(1, order + 1):
        h, r = _char_ngrams(hypothesis, n), _char_ngrams(reference, n)
        stats += [sum(h.values()), sum(r.values()), sum((h & r).values())]
    return stats


def chrf_from_stats(stats: list[int], beta: float = CHRF_BETA) -> float:
    """chrF in 0..100 from (summed) statistics."""
    order = len(stats) // 3
    prec = rec = 0.0
    effective = 0
    for i in range(order):
        n_hyp, n_ref, n_match = stats[3 * i:3 * i + 3]
        if n_hyp > 0 and n_ref > 0:
            prec += n_match / n_hyp
            rec += n_match / n_ref
            effective += 1
    if effective == 0:
        return 0.0
    prec, rec = prec / effective, rec / effective
    if prec + rec == 0:
        return 0.0
    b2 = beta ** 2
    return 100.0 * (1 + b2) * prec * rec / (b2 * prec + rec)


def chrf(hypothesis: str, reference: str, beta: float = CHRF_BETA) -> float:
    """Sentence-level chrF (0..100)."""
    return chrf_from_stats(chrf_stats(hypothesis, reference), beta)


def repetition(text: str, n: int = 2) -> tuple[int, int]:
    """(repeated, total) word n-grams of `text`: an n-gram counts as repeated from its
    second occurrence on (the talk tuned repetition_penalty against such repeats)."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


def perplexity(logprobs: list[float]) -> float:
    """exp of the mean negative log-likelihood per token (inf for no tokens)."""
    return math.exp(-sum(logprobs) / len(logprobs)) if logprobs else math.inf


@dataclass
class RowQuality:
    """One evaluated row: the first completion is the one scored against the reference."""
    id: str
    prediction: str
    finish_reason: str
    n_generated_tokens: int
    reference: str | None = None
    reference_logprobs: list[float] = field(default_factory=list)
    repetition_n: int = 2

    def metrics(self) -> dict:
        rep, grams = repetition(self.prediction, self.repetition_n)
        out = {"stop_hit": self.finish_reason == "stop", "n_generated_tokens": self.n_generated_tokens,
               "repeated_ngrams": rep, "ngrams": grams,
               "repetition_rate": rep / grams if grams else 0.0}
        if self.reference is not None:
            out.update(exact_match=exact_match(self.prediction, self.reference),
                       chrf=chrf(self.prediction, self.reference))
            if self.reference_logprobs:
                out.update(reference_tokens=len(self.reference_logprobs),
                           reference_nll=-sum(self.reference_logprobs),
                           reference_perplexity=perplexity(self.reference_logprobs))
        return out


def summarize(rows: list[RowQuality]) -> dict:
    """Corpus-level metrics: rates are shares of rows; chrF and perplexity are pooled over
    all rows with references (summed n-gram statistics, token-weighted NLL)."""
    n = len(rows)
    if n == 0:
        return {"rows": 0}
    per = [r.metrics() for r in rows]
    out = {
        "rows": n,
        "stop_hit_rate": sum(m["stop_hit"] for m in per) / n,
        "avg_generated_tokens": sum(m["n_generated_tokens"] for m in per) / n,
        "avg_generated_chars": sum(len(r.prediction) for r in rows) / n,
        "repetition_rate": (sum(m["repeated_ngrams"] for m in per) / total
                            if (total := sum(m["ngrams"] for m in per)) else 0.0),
    }
    with_ref = [r for r in rows if r.reference is not None]
    out["rows_with_reference"] = len(with_ref)
    if with_ref:
        stats = [sum(col) for col in zip(*(chrf_stats(r.prediction, r.reference) for r in with_ref))]
        out["exact_match"] = sum(exact_match(r.prediction, r.reference) for r in with_ref) / len(with_ref)
        out["chrf"] = chrf_from_stats(stats)
        out["chrf_sentence_mean"] = sum(chrf(r.prediction, r.reference) for r in with_ref) / len(with_ref)
        scored = [lp for r in with_ref for lp in r.reference_logprobs]
        if scored:
            out["reference_tokens"] = len(scored)
            out["reference_perplexity"] = perplexity(scored)
    return out
