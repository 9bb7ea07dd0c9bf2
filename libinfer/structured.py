"""Structured output: a JSON schema, a regex or a choice of strings, enforced token by
token as a logits mask (llguidance), so every finished row parses.

A guide is one of GenerationParams' `guided_json` / `guided_regex` / `guided_choice`
(or the same keys in a per-row mapping, see Generator.generate's `guides`). It becomes an
llguidance grammar once per distinct spec; each running candidate has its own matcher,
which says which tokens may come next (the mask) and consumes the token drawn. The mask
is applied before the sampler's filters, so greedy picks the best allowed token and
sampling draws among allowed tokens only; the row ends when the grammar is complete
(EOS is the only token allowed then) or cannot go on.

Why llguidance (measured side by side, benchmarks/structured.py, RESULTS.md "Structured
output", 2-core EPYC): xgrammar fills the masks of 64 rows ~10x faster (0.6 vs 6 ms per
step), but its package metadata requires torch and triton (it would have to be installed
with --no-deps, and triton is useless on CPU), while llguidance has no dependencies and
compiles a schema ~10x faster (1 vs 13 ms: per-row schemas compile per row). In the
engine the mask is a few percent of a decode step at 64 rows (RESULTS.md); if faster
steps make it matter, `Guidance` is the one class to port.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:
    import torch

GUIDE_FIELDS = ("guided_json", "guided_regex", "guided_choice")

# Compact JSON, the separators people write: a model cannot pad the output with endless
# whitespace (flexible whitespace lets it), and a stop sequence of "\n" cannot cut it.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GuideError(ValueError):
    """A guide that cannot be compiled; `field` names which one."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def canonical_json(schema) -> str:
    """A schema (mapping or JSON text) as one canonical JSON text, so equal schemas compare
    and hash equal (GenerationParams stays frozen and hashable)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GuideError("guided_json", f"is not valid JSON: {e}") from None
    if not isinstance(schema, Mapping):
        raise GuideError("guided_json", f"must be a JSON schema object (got {type(schema).__name__})")
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def grammar(field_name: str, value) -> str:
    """The llguidance grammar for one guide; GuideError when it does not compile."""
    import llguidance
    M = llguidance.LLMatcher
    if field_name == "guided_json":
        text = M.grammar_from_json_schema(canonical_json(value), defaults=JSON_OPTIONS)
    elif field_name == "guided_regex":
        if not isinstance(value, str) or not value:
            raise GuideError(field_name, f"must be a non-empty regular expression string (got {value!r})")
        text = M.grammar_from_regex(value)
    elif field_name == "guided_choice":
        choices = [value] if isinstance(value, str) else list(value)
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise GuideError(field_name, f"must be a non-empty list of non-empty strings (got {value!r})")
        text = M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    else:
        raise GuideError(field_name, f"unknown guide; known: {', '.join(GUIDE_FIELDS)}")
    error = M.validate_grammar(text)
    if error and not error.startswith("WARNING"):
        raise GuideError(field_name, f"does not compile: {' '.join(error.split())[:400]}")
    return text


def guide_of(values: Mapping[str, Any] | None) -> tuple[str, Any] | None:
    """(field, value) of the one guide set in a mapping (params or a per-row override)."""
    if not values:
        return None
    unknown = sorted(set(values) - set(GUIDE_FIELDS))
    if unknown:
        raise GuideError(unknown[0], f"unknown guide; known: {', '.join(GUIDE_FIELDS)}")
    given = [(k, v) for k, v in values.items() if v is not None]
    if len(given) > 1:
        raise GuideError(given[1][0], f"only one guide per row ({given[0][0]} is set too)")
    return given[0] if given else None


def from_response_format(response_format: Mapping[str, Any] | None) -> dict[str, Any]:
    """OpenAI's `response_format` as guide fields: {"type": "text"} -> none,
    {"type": "json_object"} -> any JSON object, {"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}}} -> that schema. GuideError names what is wrong."""
    if response_format is None:
        return {}
    if not isinstance(response_format, Mapping):
        raise GuideError("response_format", "must be an object with a 'type'")
    kind = response_format.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"guided_json": {"type": "object"}}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise GuideError("response_format.json_schema", "must be an object with a 'schema' object")
        return {"guided_json": dict(spec["schema"])}
    raise GuideError("response_format.type", f"must be 'text', 'json_object' or 'json_schema' (got {kind!r})")


@dataclass(frozen=True)
class Guide:
    field: str
    grammar: str


class Guidance:
    """One tokenizer's side of guided decoding: the llguidance tokenizer (built once per
    Generator, ~0.5 s), compiled grammars by spec, matchers for new sequences, and the
    mask of a step's rows."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        import llguidance.hf
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos_ids))
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._grammars: dict[tuple[str, str], Guide] = {}

    def compile(self, field_name: str, value) -> Guide:
        key = (field_name, canonical_json(value) if field_name == "guided_json" else json.dumps(value))
        if key not in self._grammars:
            self._grammars[key] = Guide(field_name, grammar(field_name, value))
        return self._grammars[key]

    def matcher(self, guide: Guide):
        import llguidance
        m = llguidance.LLMatcher(self.tokenizer, guide.grammar, log_level=0)
        if m.is_error():
            raise GuideError(guide.field, m.get_error())
        return m

    def mask(self, matchers: list) -> torch.Tensor:
        """[len(matchers), vocab] bool: which tokens each row may draw next."""
        import llguidance.torch as lt
        import torch          # here: validating a guide (params.py) needs no torch
        words = torch.empty(len(matchers), self.words, dtype=torch.int32)
        for i, m in enumerate(matchers):
            lt.fill_next_token_bitmask(m, words, i)
        # Bit j of word k is token 32k + j: little-endian bytes, least significant bit first.
        # numpy's unpackbits does it in one pass (~1 ms for 64 rows; torch's shift-and-mask
        # over [rows, words, 32] took 17 ms on 2 busy cores).
        bits = np.unpackbits(words.numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits[:, :self.vocab_size]).view(torch.bool)
