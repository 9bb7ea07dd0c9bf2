"""Quality metrics of generated text (no Spark, no MLflow): exact match, chrF and BLEU
(sacrebleu's), reference perplexity, stop-sequence hit rate, average generated length and
repetition rate.

Per-row functions return numbers; `summarize` turns rows into the corpus-level figures
that jobs.evaluate logs. chrF is `sacrebleu.metrics.CHRF` with its defaults (character
n-grams 1..6, whitespace removed, beta=2, precision and recall averaged over the orders
both sides have); the corpus figure pools the sentences' statistics, as `corpus_score`
does. BLEU is sacrebleu's corpus BLEU (13a tokenizer); a row's BLEU uses effective order,
as sacrebleu recommends for sentences.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

CHRF_ORDER = 6
CHRF_BETA = 2.0


def normalize(text: str) -> str:
    """Exact match compares texts with runs of whitespace collapsed and ends trimmed."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


@functools.lru_cache(maxsize=8)
def _chrf(order: int = CHRF_ORDER, beta: float = CHRF_BETA):
    from sacrebleu.metrics import CHRF
    return CHRF(char_order=order, word_order=0, beta=beta)


@functools.lru_cache(maxsize=2)
def _bleu(sentence: bool):
    from sacrebleu.metrics import BLEU
    return BLEU(effective_order=sentence)


def chrf_stats(hypothesis: str, reference: str, order: int = CHRF_ORDER) -> list[int]:
    """sacrebleu's chrF statistics of one pair: [hyp n-grams, ref n-grams, matches] for
    n = 1..order, flattened (3 * order ints); sum them over rows for the corpus figure."""
    return list(_chrf(order)._extract_corpus_statistics([hypothesis], [[reference]])[0])


def chrf_from_stats(stats: list[int], beta: float = CHRF_BETA) -> float:
    """chrF in 0..100 from (summed) statistics."""
    return float(_chrf(len(stats) // 3, beta)._compute_score_from_stats(list(stats)).score)


def chrf(hypothesis: str, reference: str, beta: float = CHRF_BETA) -> float:
    """Sentence-level chrF (0..100)."""
    return float(_chrf(CHRF_ORDER, beta).sentence_score(hypothesis, [reference]).score)


def bleu(hypothesis: str, reference: str) -> float:
    """Sentence-level BLEU (0..100, effective order)."""
    return float(_bleu(True).sentence_score(hypothesis, [reference]).score)


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (0..100) of aligned hypotheses and references."""
    return float(_bleu(False).corpus_score(list(hypotheses), [list(references)]).score)


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
                       chrf=chrf(self.prediction, self.reference), bleu=bleu(self.prediction, self.reference))
            if self.reference_logprobs:
                out.update(reference_tokens=len(self.reference_logprobs),
                           reference_nll=-sum(self.reference_logprobs),
                           reference_perplexity=perplexity(self.reference_logprobs))
        return out


def summarize(rows: list[RowQuality]) -> dict:
    """Corpus-level metrics: rates are shares of rows; chrF, BLEU and perplexity are pooled
    over all rows with references (summed n-gram statistics, token-weighted NLL)."""
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
        out["bleu"] = corpus_bleu([r.prediction for r in with_ref], [r.reference for r in with_ref])
        scored = [lp for r in with_ref for lp in r.reference_logprobs]
        if scored:
            out["reference_tokens"] = len(scored)
            out["reference_perplexity"] = perplexity(scored)
    return out
