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
from .linear import Dense, packable, project_out
from .norm import HeadNorm
from .rotary import Rotary


@dataclass
class Step:
    """What every layer of one forward pass shares, computed once per pass.

    Prefill: `spans` (offset, length, start) per sequence and their cache `slots`.
    Decode: row b in slot b at position pos[b]; `groups` (first row, end row, keys read)
    blocks (see attention_groups); `masks[window]` the additive [B, 1, 1, L] masks."""
    cos_sin: dict                           # rope key -> (cos, sin) of this pass's positions
    all_reduce: object = None
    spans: list | None = None
    slots: list | None = None
    pos: torch.Tensor | None = None
    groups: list | None = None
    masks: dict = field(default_factory=dict)


def decode_mask(pos: torch.Tensor, length: int, window: int | None, dtype) -> torch.Tensor:
    """Additive mask [B, 1, 1, L]: row b sees keys j <= pos[b] (and j > pos[b] - window)."""
    j = torch.arange(length, device=pos.device)[None, :]
    valid = j <= pos[:, None]
    if window is not None:
        valid &= j > pos[:, None] - window
    mask = torch.zeros(valid.shape, dtype=dtype, device=pos.device)
    mask.masked_fill_(~valid, float("-inf"))
    return mask[:, None, None, :]


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

    def prepare(self) -> None:
        """Dense products for the hot path; a weight that was repacked is released."""
        self.qkv, self.o = Dense(self.wqkv.weight, self.wqkv.bias), Dense(self.wo.weight, self.wo.bias)
        for mod in (self.wqkv, self.wo):
            if packable(mod.weight):
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

    def forward(self, x, step: Step, cache_k, cache_v, residual=None):
        """x: normed input; writes this pass's K/V to the cache; returns [residual +] the
        projected attention output."""
        out = self._prefill(x, step, cache_k, cache_v) if step.pos is None else self._decode(x, step, cache_k, cache_v)
        return project_out(self.o, out, residual, step.all_reduce)

    def _prefill(self, x, step, cache_k, cache_v):
        """x: [T, H] packed; returns [T, Hq * D]."""
        q, k, v = self._qkv(x, step)
        out = q.new_empty(q.shape)                                    # [T, Hq, D], filled per sequence
        for (off, n, start), slot in zip(step.spans, step.slots):
            end = start + n
            cache_k[slot, :, start:end] = k[off:off + n].transpose(0, 1)
            cache_v[slot, :, start:end] = v[off:off + n].transpose(0, 1)
            # keys before first are outside every query's window
            first = 0 if self.window is None else max(0, start - self.window + 1)
            qs = q[off:off + n].transpose(0, 1)[None]                 # [1, Hq, n, D]
            ks, vs = cache_k[slot, :, first:end][None], cache_v[slot, :, first:end][None]
            if start == 0 and (self.window is None or n <= self.window):
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True, scale=self.scale)
            else:  # a later chunk of a long prompt, or a window: query i sees keys (start+i-window, start+i]
                qpos = torch.arange(start, end, device=x.device)[:, None]
                kpos = torch.arange(first, end, device=x.device)[None, :]
                mask = kpos <= qpos
                if self.window is not None:
                    mask &= kpos > qpos - self.window
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True, scale=self.scale)
            out[off:off + n] = o[0].transpose(0, 1)
        return out.view(out.shape[0], -1)

    def _decode(self, x, step, cache_k, cache_v):
        """x: [B, H], one token per row; returns [B, Hq * D]."""
        b, d = x.shape[0], self.head_dim
        q, k, v = self._qkv(x, step)
        rows = torch.arange(b, device=x.device)
        cache_k[rows, :, step.pos] = k
        cache_v[rows, :, step.pos] = v
        g = self.n_heads // self.n_kv_heads
        # The G query heads of a KV group become G query rows of that group: no repeat of k/v.
        qg = q.view(b, self.n_kv_heads, g, d)
        mask = step.masks[self.window]
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
