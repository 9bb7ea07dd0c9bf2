"""Who runs next: continuous batching over a fixed set of KV-cache slots.

A request is admitted when its `n` candidates fit in free slots and its prompt fits the
per-step prefill token budget; a row leaves as soon as it finishes and the next prompt
takes its slot. Running rows always occupy slots 0..B-1 (the decode step attends over a
contiguous block), so a finished row's slot is refilled by moving the last row into it.
`static=True` is the classic fixed batch (admit only when the batch is empty), kept for
comparisons.
"""
from __future__ import annotations

from collections import deque

from .sequence import Request, Sequence


class Scheduler:
    def __init__(self, n_slots: int, max_batch_tokens: int, static: bool = False):
        self.n_slots, self.max_batch_tokens, self.static = n_slots, max_batch_tokens, static
        self.waiting: deque[Request] = deque()
        self.running: list[Sequence] = []

    def add(self, requests: list[Request]) -> None:
        """Queue requests. Continuous batching admits them shortest prompt first (length
        bucketing): rows in neighbouring slots then have similar lengths, so the decode
        step, which attends per block of slots, reads few masked cache positions. A
        static batch keeps the given order (that is what it is kept for)."""
        for r in requests:
            if r.n > self.n_slots:
                raise ValueError(f"n={r.n} candidates need more KV slots than the {self.n_slots} available")
        self.waiting.extend(requests)
        if not self.static:
            self.waiting = deque(sorted(self.waiting, key=lambda r: len(r.prompt_ids)))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[Request]:
        """Next prompts to prefill. A prompt over the token budget is admitted alone
        (the model prefills it in chunks). A static batch fills all slots at once."""
        if self.static and self.running:
            return []
        batch, free, tokens = [], self.n_slots - len(self.running), 0
        while self.waiting:
            r = self.waiting[0]
            over_budget = not self.static and batch and tokens + len(r.prompt_ids) > self.max_batch_tokens
            if r.n > free or over_budget:
                break
            batch.append(self.waiting.popleft())
            free -= r.n
            tokens += len(r.prompt_ids)
        return batch

    def place(self, seq: Sequence) -> int:
        seq.slot = len(self.running)
        self.running.append(seq)
        return seq.slot

    def retire_finished(self) -> tuple[list[Sequence], list[tuple[int, int, int]]]:
        """Drop finished rows; returns them and the slot moves (src, dst, length) that
        keep the running rows contiguous."""
        done = [s for s in self.running if s.finish_reason]
        if not done:
            return [], []
        moves = []
        keep = [s for s in self.running if not s.finish_reason]
        holes = sorted(s.slot for s in done if s.slot < len(keep))
        movers = [s for s in keep if s.slot >= len(keep)]
        for seq, dst in zip(movers, holes):
            moves.append((seq.slot, dst, seq.own_length))
            seq.slot = dst
        self.running = sorted(keep, key=lambda s: s.slot)
        return done, moves
