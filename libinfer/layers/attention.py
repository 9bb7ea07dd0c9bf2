"""Attention over the slot KV cache, for prefill (packed prompts) and decode (one token
per row), with grouped-query heads, optional per-head q/k norms and sliding windows.

Shapes: T = packed prompt tokens of several sequences, B = decoding rows, Hq/Hkv = local
query/KV heads, G = Hq // Hkv, D = head_dim, L = keys read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models.config import ModelConfig
from .linear import dense, project_out
from .norm import HeadNorm
from .rotary import Rotary


@dataclass
class Step:
    """What every layer of one forward pass shares, computed once per pass.

    Storage of a sequence (see engine/kv_cache.py): positions < P live in the prefix pool
    at seg + pos, positions >= P in its slot at pos - P.
    Prefill: `spans` (offset, length, start) per piece and `locs` (slot, seg, P); a piece
    that computes a segment itself has slot -1 and start + length <= P.
    Decode: row b in slot b at position pos[b], its own keys `pos - P + 1`; `groups`
    (first row, end row, own keys read) blocks of rows; `masks[window]` the additive
    [B, 1, 1, L] masks of the rows' own keys; `segments` the `SegmentBatch`es of the
    prefix segments that rows of this step read."""
    cos_sin: dict                           # rope key -> (cos, sin) of this pass's positions
    all_reduce: object = None
    spans: list | None = None
    locs: list | None = None
    pos: torch.Tensor | None = None
    own_pos: torch.Tensor | None = None     # pos - P: where each row's new token goes in its slot
    groups: list | None = None
    masks: dict = field(default_factory=dict)
    segments: list = field(default_factory=list)


@dataclass
class SegmentBatch:
    """S prefix segments read together by one decode step's rows, padded to R rows and
    Pmax keys each (padding repeats a segment's first row and last key and is masked or never
    read back). Built once per step (`segment_batches`), shared by every layer."""
    keys: torch.Tensor | slice   # [S, Pmax] pool positions; a slice when S == 1
    rows: torch.Tensor           # [S, R] decode rows
    back: torch.Tensor           # [n] flat index (s * R + i) of each row of `of`
    of: torch.Tensor | None      # [n] the rows this batch serves; None: all B rows in order
    masks: dict                  # window -> additive fp32 [S, R * G, Pmax] or None


def segment_batches(segments, pos: torch.Tensor, windows, g: int, waste: float = 1.25) -> list[SegmentBatch]:
    """segments: (pool offset, P, row list) per segment read this step; pos: [B] the rows'
    positions; g: query heads per KV head. Segments go into one batch while its padded
    work (S x R x Pmax) stays within `waste` times their real work (sum of rows x P),
    longest first: one batch when lengths and row counts are alike."""
    b, device = pos.shape[0], pos.device
    batches, cur = [], []
    for seg in sorted(segments, key=lambda s: (-s[1], -len(s[2]))):
        cand = cur + [seg]
        padded = len(cand) * cand[0][1] * max(len(r) for _, _, r in cand)
        if cur and padded > waste * sum(P * len(r) for _, P, r in cand):
            batches.append(cur)
            cand = [seg]
        cur = cand
    if cur:
        batches.append(cur)
    out = []
    for segs in batches:
        S, R, Pmax = len(segs), max(len(r) for _, _, r in segs), segs[0][1]
        rows = [r + [r[0]] * (R - len(r)) for _, _, r in segs]
        served = [row for _, _, r in segs for row in r]
        back = [s * R + i for s, (_, _, r) in enumerate(segs) for i in range(len(r))]
        lengths = torch.tensor([P for _, P, _ in segs], device=device)
        j = torch.arange(Pmax, device=device)
        if S == 1:
            keys = slice(segs[0][0], segs[0][0] + Pmax)
        else:                                # padded keys repeat the segment's last
            offsets = torch.tensor([off for off, _, _ in segs], device=device)
            keys = offsets[:, None] + torch.minimum(j[None, :], lengths[:, None] - 1)
        rows_t = torch.tensor(rows, dtype=torch.long, device=device)
        masks = {}
        for w in windows:
            if w is None and all(P == Pmax for _, P, _ in segs):
                masks[w] = None
                continue
            invalid = (j[None, None, :] >= lengths[:, None, None]).expand(S, R, Pmax)      # padded keys
            if w is not None:                 # prefix key j is in row b's window when j > pos[b] - window
                invalid = invalid | (j[None, None, :] <= pos[rows_t][:, :, None] - w)
            m = torch.zeros((S, R, Pmax), dtype=torch.float32, device=device).masked_fill_(invalid, float("-inf"))
            masks[w] = m.repeat_interleave(g, dim=1)
        ordered = served == list(range(b))
        out.append(SegmentBatch(keys, rows_t, torch.tensor(back, dtype=torch.long, device=device),
                                None if ordered else torch.tensor(served, dtype=torch.long, device=device), masks))
    return out


def decode_mask(pos: torch.Tensor, length: int, window: int | None, dtype) -> torch.Tensor:
    """Additive mask [B, 1, 1, L]: row b sees keys j <= pos[b] (and j > pos[b] - window)."""
    j = torch.arange(length, device=pos.device)[None, :]
    valid = j <= pos[:, None]
    if window is not None:
        valid &= j > pos[:, None] - window
    mask = torch.zeros(valid.shape, dtype=dtype, device=pos.device)
    mask.masked_fill_(~valid, float("-inf"))
    return mask[:, None, None, :]


def _attend(q, k, v, mask, scale):
    """softmax(q k^T * scale + mask) v and its log-sum-exp, scores in fp32: the parts of
    one softmax over several key sets are merged by `_merge`."""
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if mask is not None:
        s = s + mask
    m = s.amax(-1, keepdim=True).clamp_min(-1e30)          # a fully masked row stays finite
    p = torch.exp(s - m)
    total = p.sum(-1, keepdim=True)
    o = torch.matmul(p.to(v.dtype), v).float() / total.clamp_min(1e-30)
    return o, m + torch.log(total)


def _merge(o1, lse1, o2, lse2):
    lse = torch.logaddexp(lse1, lse2)
    return o1 * torch.exp(lse1 - lse) + o2 * torch.exp(lse2 - lse)


def attention_groups(lengths: list[int], rows: int = 16) -> list[tuple[int, int, int]]:
    """Split decode attention into blocks of `rows` neighbouring slots, each reading only
    up to its own longest row: with length-bucketed admission, short rows then skip the
    long rows' masked cache positions. One block when blocks would save under 1/8."""
    n, longest = len(lengths), max(lengths)
    groups = [(a, min(a + rows, n), max(lengths[a:a + rows])) for a in range(0, n, rows)]
    if all(8 * L >= 7 * longest for _, _, L in groups):
        return [(0, n, longest)]
    return groups


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, unit_offset_norms: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window, self.rope = cfg.window(layer), cfg.rope_of(layer)
        self.scale = cfg.query_scale
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.attention_bias)   # fused q, k, v
        self.wo = nn.Linear(q, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = (HeadNorm(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rms_eps, unit_offset_norms)
                        if cfg.qk_norm else None)
        self.qkv = self.o = None
        # our part name -> parameter, for load_weights (q, k, v are fused: see decoder.FUSED)
        self.parts = {"o": "attn.wo.weight", **({"o_bias": "attn.wo.bias"} if cfg.o_bias else {}),
                      **({"q_norm": "attn.qk_norm.q", "k_norm": "attn.qk_norm.k"} if cfg.qk_norm else {})}

    def prepare(self, quantization: str | None = None) -> None:
        """Dense products for the hot path; a weight that was repacked or quantised is released."""
        self.qkv = dense(self.wqkv.weight, self.wqkv.bias, quantization)
        self.o = dense(self.wo.weight, self.wo.bias, quantization)
        for mod, d in ((self.wqkv, self.qkv), (self.wo, self.o)):
            if d.owns_weight:
                mod.weight = nn.Parameter(mod.weight.new_empty(0), requires_grad=False)
        if self.qk_norm is not None:
            self.qk_norm.prepare()

    def _qkv(self, x: torch.Tensor, step: Step):
        """q [N, Hq, D] and k [N, Hkv, D] normed and rotated together in one pass, v [N, Hkv, D]."""
        n, d = x.shape[0], self.head_dim
        qkv = self.qkv(x)
        n_qk = (self.n_heads + self.n_kv_heads) * d
        qk = qkv[:, :n_qk].view(n, self.n_heads + self.n_kv_heads, d)
        if self.qk_norm is not None:
            qk = self.qk_norm(qk)
        qk = Rotary.apply(qk, step.cos_sin[self.rope])
        return qk[:, :self.n_heads], qk[:, self.n_heads:], qkv[:, n_qk:].view(n, self.n_kv_heads, d)

    def forward(self, x, step: Step, kv, residual=None):
        """x: normed input; kv: this layer's (slot k, slot v, pool k, pool v); writes this
        pass's K/V to the cache; returns [residual +] the projected attention output."""
        out = self._prefill(x, step, *kv) if step.pos is None else self._decode(x, step, *kv)
        return project_out(self.o, out, residual, step.all_reduce)

    def _prefill(self, x, step, cache_k, cache_v, pool_k, pool_v):
        """x: [T, H] packed; returns [T, Hq * D]."""
        q, k, v = self._qkv(x, step)
        out = q.new_empty(q.shape)                                    # [T, Hq, D], filled per piece
        for (off, n, start), (slot, seg, P) in zip(step.spans, step.locs):
            end = start + n
            ks, vs = k[off:off + n].transpose(0, 1), v[off:off + n].transpose(0, 1)   # [Hkv, n, D]
            if start < P:                  # a segment being computed: its K/V go to the pool
                pool_k[:, seg + start:seg + end] = ks
                pool_v[:, seg + start:seg + end] = vs
            else:
                cache_k[slot, :, start - P:end - P] = ks
                cache_v[slot, :, start - P:end - P] = vs
            # keys before first are outside every query's window
            first = 0 if self.window is None else max(0, start - self.window + 1)
            ks, vs = self._keys(first, end, slot, seg, P, cache_k, pool_k), self._keys(first, end, slot, seg, P,
                                                                                        cache_v, pool_v)
            qs = q[off:off + n].transpose(0, 1)[None]                 # [1, Hq, n, D]
            if start == 0 and (self.window is None or n <= self.window):
                o = F.scaled_dot_product_attention(qs, ks[None], vs[None], is_causal=True, enable_gqa=True,
                                                   scale=self.scale)
            else:  # a later chunk, a suffix after a segment, or a window: query i sees keys (start+i-window, start+i]
                qpos = torch.arange(start, end, device=x.device)[:, None]
                kpos = torch.arange(first, end, device=x.device)[None, :]
                mask = kpos <= qpos
                if self.window is not None:
                    mask &= kpos > qpos - self.window
                o = F.scaled_dot_product_attention(qs, ks[None], vs[None], attn_mask=mask, enable_gqa=True,
                                                   scale=self.scale)
            out[off:off + n] = o[0].transpose(0, 1)
        return out.view(out.shape[0], -1)

    @staticmethod
    def _keys(first, end, slot, seg, P, cache, pool):
        """Keys (or values) of positions [first, end) of one sequence, [Hkv, end - first, D]."""
        if end <= P:
            return pool[:, seg + first:seg + end]
        own = cache[slot, :, max(first, P) - P:end - P]
        return own if first >= P else torch.cat([pool[:, seg + first:seg + P], own], dim=1)

    def _decode(self, x, step, cache_k, cache_v, pool_k, pool_v):
        """x: [B, H], one token per row; returns [B, Hq * D]."""
        b, d = x.shape[0], self.head_dim
        q, k, v = self._qkv(x, step)
        rows = torch.arange(b, device=x.device)
        cache_k[rows, :, step.own_pos] = k
        cache_v[rows, :, step.own_pos] = v
        g = self.n_heads // self.n_kv_heads
        # The G query heads of a KV group become G query rows of that group: no repeat of k/v.
        qg = q.view(b, self.n_kv_heads, g, d)
        mask = step.masks[self.window]
        if step.segments:
            return self._decode_with_segments(qg, step, cache_k, cache_v, pool_k, pool_v, mask)
        if len(step.groups) == 1:
            L = step.groups[0][2]
            o = F.scaled_dot_product_attention(qg, cache_k[:b, :, :L], cache_v[:b, :, :L], attn_mask=mask,
                                               scale=self.scale)
        else:
            o = qg.new_empty(qg.shape)
            for a, e, L in step.groups:
                o[a:e] = F.scaled_dot_product_attention(qg[a:e], cache_k[a:e, :, :L], cache_v[a:e, :, :L],
                                                        attn_mask=mask[a:e, :, :, :L], scale=self.scale)
        return o.reshape(b, self.n_heads * d)

    def _decode_with_segments(self, qg, step, cache_k, cache_v, pool_k, pool_v, mask):
        """Attention over each row's own keys (per block of slots) and over its prefix
        segment, merged by log-sum-exp. The segments of a `SegmentBatch` are read in one
        product, [Hkv, S, R x G, Pmax], their rows' queries gathered once: the segment is
        never copied per row, and the op count does not grow with the number of segments."""
        b, hkv, g, d = qg.shape
        scale = self.scale if self.scale is not None else d ** -0.5
        if len(step.groups) == 1:
            L = step.groups[0][2]
            o, lse = _attend(qg, cache_k[:b, :, :L], cache_v[:b, :, :L], mask, scale)
        else:
            o = torch.empty(qg.shape, dtype=torch.float32, device=qg.device)
            lse = torch.empty((b, hkv, g, 1), dtype=torch.float32, device=qg.device)
            for a, e, L in step.groups:
                o[a:e], lse[a:e] = _attend(qg[a:e], cache_k[a:e, :, :L], cache_v[a:e, :, :L], mask[a:e, :, :, :L],
                                           scale)
        by_head = qg.transpose(0, 1)                                                # [Hkv, B, G, D] view
        for sb in step.segments:
            S, R = sb.rows.shape
            qs = by_head.index_select(1, sb.rows.view(-1)).view(hkv, S, R * g, d)
            if isinstance(sb.keys, slice):                 # one segment: its keys in place
                ks, vs = pool_k[:, None, sb.keys], pool_v[:, None, sb.keys]
            else:
                P = sb.keys.shape[1]
                ks = pool_k.index_select(1, sb.keys.view(-1)).view(hkv, S, P, d)
                vs = pool_v.index_select(1, sb.keys.view(-1)).view(hkv, S, P, d)
            po, plse = _attend(qs, ks, vs, sb.masks.get(self.window), scale)       # [Hkv, S, R*G, D | 1]
            po = po.view(hkv, S * R, g, d).index_select(1, sb.back).transpose(0, 1)
            plse = plse.view(hkv, S * R, g, 1).index_select(1, sb.back).transpose(0, 1)
            if sb.of is None:                              # the batch holds every row, in order
                o = _merge(o, lse, po, plse)
            else:
                o[sb.of] = _merge(o[sb.of], lse[sb.of], po, plse)
        return o.to(qg.dtype).reshape(b, self.n_heads * d)
