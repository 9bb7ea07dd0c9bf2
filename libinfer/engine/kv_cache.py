"""The KV cache: per-slot rows plus a pool of shared prefix segments.

A running row owns one slot, k/v [layers, slots, Hkv, L, D], holding the positions that
are its own. Rows whose prompts begin with the same blocks of tokens (few-shot prompts:
one instruction and the same examples in front of every query) attach to one *segment*
of the pool, k/v [layers, Hkv, pool, D]: those positions are computed once and stored
once, whatever the number of rows (and candidates) reading them. Row storage is thus
"positions < P in the pool at segment offset + pos, positions >= P in the slot at
pos - P" (P = 0 for a row with no segment).

`PrefixCache` finds the segments (chain hashes of 16-token blocks, as vLLM's automatic
prefix caching), allocates them in the pool, counts their readers and keeps unread
segments for later calls until their space is needed (least recently used first).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import BLOCK


class KVCache:
    def __init__(self, n_layers: int, n_slots: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device,
                 pool_tokens: int = 0):
        shape = (n_layers, n_slots, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        pool = (n_layers, n_kv_heads, pool_tokens, head_dim)
        self.pool_k = torch.zeros(pool, dtype=dtype, device=device)
        self.pool_v = torch.zeros(pool, dtype=dtype, device=device)

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def pool_tokens(self) -> int:
        return self.pool_k.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * (self.k.numel() + self.pool_k.numel()) * self.k.element_size()

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


def block_hashes(ids: list[int]) -> list[int]:
    """Chain hash of each whole block: entry k identifies tokens [0, (k + 1) * BLOCK)."""
    out, h = [], 0
    for a in range(0, len(ids) - BLOCK + 1, BLOCK):
        h = hash((h, tuple(ids[a:a + BLOCK])))
        out.append(h)
    return out


@dataclass
class Segment:
    offset: int             # first pool position
    tokens: tuple           # the prefix's token ids (checked on every hit: hashes may collide)
    readers: int = 0        # rows attached now
    last_used: int = 0
    ready: bool = False     # its K/V have been computed

    @property
    def length(self) -> int:
        return len(self.tokens)


class PrefixCache:
    """Segments of one pool of `capacity` tokens, found by the chain hash of their tokens."""

    def __init__(self, capacity: int = 0):
        self.capacity = capacity
        self.index: dict[int, Segment] = {}
        self.free = [(0, capacity)] if capacity else []     # (start, length), sorted
        self.clock = 0
        self.evictions = 0

    def reset(self, capacity: int) -> None:
        self.__init__(capacity)

    @property
    def used(self) -> int:
        return self.capacity - sum(n for _, n in self.free)

    def match(self, ids: list[int], hashes: list[int]) -> Segment | None:
        """The longest cached segment that `ids` begins with."""
        for k in range(len(hashes), 0, -1):
            seg = self.index.get(hashes[k - 1])
            if seg is not None and seg.length == k * BLOCK and seg.tokens == tuple(ids[:k * BLOCK]):
                return seg
        return None

    def add(self, ids: list[int], key: int) -> Segment | None:
        """A new segment for `ids` (a whole number of blocks), evicting unread segments
        least recently used first; None when the pool cannot hold it now."""
        n = len(ids)
        while (start := self._take(n)) is None:
            idle = [(s.last_used, h) for h, s in self.index.items() if s.readers == 0]
            if not idle:
                return None
            _, h = min(idle)
            old = self.index.pop(h)
            self._give(old.offset, old.length)
            self.evictions += 1
        seg = Segment(start, tuple(ids))
        self.index[key] = seg
        return seg

    def attach(self, seg: Segment) -> None:
        self.clock += 1
        seg.readers += 1
        seg.last_used = self.clock

    def detach(self, seg: Segment) -> None:
        seg.readers -= 1

    def _take(self, n: int) -> int | None:
        for i, (a, m) in enumerate(self.free):
            if m >= n:
                self.free[i:i + 1] = [(a + n, m - n)] if m > n else []
                return a
        return None

    def _give(self, a: int, n: int) -> None:
        free = sorted(self.free + [(a, n)])
        merged = [free[0]]
        for b, m in free[1:]:
            pa, pm = merged[-1]
            if pa + pm == b:
                merged[-1] = (pa, pm + m)
            else:
                merged.append((b, m))
        self.free = merged
