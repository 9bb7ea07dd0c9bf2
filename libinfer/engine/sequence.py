"""One candidate of one prompt while it runs: its tokens, where its K/V live, its RNG,
and the rules that end it (EOS, stop sequences, length)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..params import GenerationParams
from .. import sampling


class StopRules:
    """What ends a sequence under one call's parameters (shared by all its sequences)."""

    def __init__(self, params: GenerationParams, eos_ids, decode):
        self.params, self.eos_ids, self.decode = params, set(eos_ids), decode
        self.max_stop = max((len(s) for s in params.stop_sequences), default=0)


@dataclass
class Request:
    index: int
    prompt_ids: list[int]
    n: int
    guide: object = None              # structured.Guide: the grammar its completions follow, if any


@dataclass
class Sequence:
    request: int
    candidate: int
    prompt_ids: list[int]
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    rng: torch.Generator | None = None
    segment: object = None            # the shared prefix segment it reads (kv_cache.Segment), if any
    matcher: object = None            # its llguidance matcher when guided (structured.py)
    logprobs: list = field(default_factory=list)     # TokenLogprob per token, when asked for

    @classmethod
    def start(cls, request: Request, candidate: int, params: GenerationParams, base_seed: int, device,
              segment=None) -> "Sequence":
        """A sequence with its own RNG when sampling: seeded per (prompt, candidate), so its
        tokens do not depend on the batch it runs in (a retried Spark task regenerates them)."""
        seq = cls(request.index, candidate, request.prompt_ids, segment=segment)
        if not params.is_greedy:
            seq.rng = torch.Generator(device=device)
            seq.rng.manual_seed(sampling.row_seed(base_seed, request.prompt_ids, candidate))
        return seq

    @property
    def length(self) -> int:          # tokens whose K/V are (or will be) in the cache
        return len(self.prompt_ids) + len(self.tokens)

    @property
    def prefix(self) -> int:          # positions held by its segment, not by its slot
        return 0 if self.segment is None else self.segment.length

    @property
    def own_length(self) -> int:      # positions held by its slot
        return self.length - self.prefix

    def append(self, token: int, rules: StopRules) -> None:
        """Add a generated token and decide whether the sequence is finished."""
        self.tokens.append(token)
        p, n_gen = rules.params, len(self.tokens)
        if self.matcher is not None and (not self.matcher.consume_token(token) or self.matcher.is_stopped()):
            # The grammar ended: complete and nothing more allowed, or EOS taken (also under ignore_eos).
            self.finish_reason = "eos" if token in rules.eos_ids else "stop"
            self.text = rules.decode(self.tokens)
            return
        if token in rules.eos_ids and not p.ignore_eos and n_gen > p.min_tokens:
            self.finish_reason = "eos"
            return
        if p.stop_sequences and n_gen >= p.min_tokens:
            prev = len(self.text)
            self.text = rules.decode(self.tokens)
            scan = max(0, prev - rules.max_stop)        # a stop sequence may span the last tokens
            hits = [i for i in (self.text.find(s, scan) for s in p.stop_sequences) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.finish_reason = "stop"
                return
        if n_gen >= p.out_seq_length:
            self.finish_reason = "length"

    def completion_text(self, rules: StopRules) -> str:
        text = self.text if self.finish_reason == "stop" else rules.decode(self.tokens)
        return text + rules.params.restart


class RepetitionMask:
    """Which vocabulary ids each slot's row has seen (prompt and generated), for
    repetition_penalty: one [slots, V] tensor, so a step gathers its rows at once."""

    def __init__(self, n_slots: int, vocab: int, device):
        self.seen = torch.zeros(n_slots, vocab, dtype=torch.bool, device=device)

    def reset(self, slot: int, prompt_ids: list[int]) -> None:
        self.seen[slot] = False
        self.seen[slot, torch.tensor(prompt_ids, device=self.seen.device)] = True

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        return self.seen[slots]

    def mark(self, slots: torch.Tensor, tokens: list[int]) -> None:
        self.seen[slots, torch.tensor(tokens, device=self.seen.device)] = True

    def move(self, src: int, dst: int) -> None:
        self.seen[dst] = self.seen[src]
