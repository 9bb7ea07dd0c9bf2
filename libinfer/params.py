"""Generation parameters: every knob of the talk's playground, validated once.

The names follow the talk (Megatron's text-generation server): `out_seq_length`,
`recompute`, `greedy`, `start`, `restart`, ... plus what batch users expect on top
(`n`, `seed`, `ignore_eos`, `min_tokens`), token log-probabilities (`logprobs`) and
structured output: at most one of `guided_json` (a JSON schema, given as a mapping or as
JSON text and kept as canonical JSON text), `guided_regex`, `guided_choice` (see
libinfer/structured.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import structured

MAX_LOGPROBS = 20                     # OpenAI's top_logprobs limit


class ParamError(ValueError):
    """A generation parameter has a bad value; `field` names it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"generation parameter '{field_name}': {message}")
        self.field = field_name


@dataclass(frozen=True)
class GenerationParams:
    temperature: float = 1.0          # 0 means argmax, whatever `greedy` says
    out_seq_length: int = 32          # max generated tokens
    recompute: bool = False           # no KV cache: re-run the whole sequence each step
    greedy: bool = False
    top_p: float = 1.0                # nucleus mass in (0, 1]
    top_k: int = 0                    # 0 = no top-k filter
    repetition_penalty: float = 1.0   # transformers' semantics (divide positive logits)
    stop_sequences: tuple[str, ...] = ()
    start: str = ""                   # injected after the prompt, before generation
    restart: str = ""                 # appended after the completion text
    ignore_eos: bool = False
    min_tokens: int = 0               # EOS and stop sequences are ignored before this
    seed: int | None = None
    n: int = 1                        # candidates per prompt
    logprobs: int | None = None       # None: none; k: each token's log-probability and the k most likely
    guided_json: str | None = None    # a JSON schema every completion validates against
    guided_regex: str | None = None   # a regular expression every completion matches in full
    guided_choice: tuple[str, ...] | None = None   # every completion is one of these strings

    def __post_init__(self):
        # Lists from YAML/JSON become tuples so the object stays hashable and frozen.
        if isinstance(self.stop_sequences, str):
            object.__setattr__(self, "stop_sequences", (self.stop_sequences,))
        else:
            object.__setattr__(self, "stop_sequences", tuple(self.stop_sequences or ()))
        if self.guided_json is not None:
            try:
                object.__setattr__(self, "guided_json", structured.canonical_json(self.guided_json))
            except structured.GuideError as e:
                raise ParamError(e.field, str(e).split(": ", 1)[-1]) from None
        if self.guided_choice is not None and not isinstance(self.guided_choice, str):
            object.__setattr__(self, "guided_choice", tuple(self.guided_choice))
        self.validate()

    def validate(self) -> None:
        def check(name: str, ok: bool, msg: str) -> None:
            if not ok:
                raise ParamError(name, f"{msg} (got {getattr(self, name)!r})")

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        check("temperature", is_num(self.temperature) and self.temperature >= 0, "must be a number >= 0")
        check("out_seq_length", is_int(self.out_seq_length) and self.out_seq_length >= 1, "must be an integer >= 1")
        check("top_p", is_num(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]")
        check("top_k", is_int(self.top_k) and self.top_k >= 0, "must be an integer >= 0 (0 disables it)")
        check("repetition_penalty", is_num(self.repetition_penalty) and self.repetition_penalty > 0,
              "must be a number > 0 (1 disables it)")
        check("n", is_int(self.n) and self.n >= 1, "must be an integer >= 1")
        check("min_tokens", is_int(self.min_tokens) and 0 <= self.min_tokens <= self.out_seq_length,
              "must be an integer in [0, out_seq_length]")
        check("seed", self.seed is None or is_int(self.seed), "must be an integer or None")
        for name in ("recompute", "greedy", "ignore_eos"):
            check(name, isinstance(getattr(self, name), bool), "must be true or false")
        for name in ("start", "restart"):
            check(name, isinstance(getattr(self, name), str), "must be a string")
        check("stop_sequences", all(isinstance(s, str) and s for s in self.stop_sequences),
              "must be a list of non-empty strings")
        check("logprobs", self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
              f"must be null or an integer in [0, {MAX_LOGPROBS}]")
        try:
            guide = structured.guide_of(self.guides)
            if guide is not None:
                structured.grammar(*guide)
        except structured.GuideError as e:
            raise ParamError(e.field, str(e).split(": ", 1)[-1]) from None

    @property
    def guides(self) -> dict[str, Any]:
        """The structured-output fields (at most one is set)."""
        return {k: getattr(self, k) for k in structured.GUIDE_FIELDS}

    @property
    def guide(self) -> tuple[str, Any] | None:
        """(field, value) of the guide set, or None."""
        return structured.guide_of(self.guides)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def replace(self, **changes: Any) -> "GenerationParams":
        return GenerationParams.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stop_sequences"] = list(self.stop_sequences)
        if self.guided_choice is not None:
            d["guided_choice"] = list(self.guided_choice)
        return d

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "GenerationParams":
        """Build from a mapping (Hydra config, JSON body); unknown names are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ParamError(unknown[0], f"unknown parameter; known: {', '.join(sorted(names))}")
        return cls(**dict(values))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GenerationParams":
        if name not in PRESETS:
            raise ParamError("preset", f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[name].replace(**overrides)


# The talk's two parameter sets (DEVIEW 2021, sections 3.6 and 3.7).
TEST1 = GenerationParams(temperature=0.0, top_p=0.8, top_k=0, out_seq_length=16,
                         repetition_penalty=5.0, greedy=True, stop_sequences=("\n",))
TEST2 = GenerationParams(temperature=0.0, top_p=0.8, top_k=0, out_seq_length=50,
                         repetition_penalty=3.0, greedy=True, stop_sequences=("\n",))
PRESETS: dict[str, GenerationParams] = {"default": GenerationParams(), "test1": TEST1, "test2": TEST2}
