"""Rotary position embeddings (HF's rotate-half convention) with the scaling types of
`models.config.Rope`: default, linear (positions / factor) and llama3 (per-frequency
interpolation between the original and the scaled wavelengths)."""
from __future__ import annotations

import math

import torch

from ..models.config import Rope


def inv_freq(rope: Rope, head_dim: int, device=None) -> torch.Tensor:
    """The inverse frequencies [D/2], computed as the reference computes them (fp32)."""
    f = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if rope.type == "linear":
        return f / rope.factor
    if rope.type == "llama3":
        old = rope.original_max_position
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / f
        scaled = torch.where(wavelen > low_wavelen, f / rope.factor, f)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return f


class Rotary:
    """cos/sin tables for all positions, built once.

    rotate_half(x) = cat(-x2, x1) is computed as roll(x) = cat(x2, x1) times a sin table
    whose first half is negated: the same products, bit for bit, in fewer kernels."""

    def __init__(self, rope: Rope, head_dim: int, max_pos: int, dtype: torch.dtype, device):
        freqs = torch.arange(max_pos, device=device, dtype=torch.float32)[:, None] * inv_freq(rope, head_dim, device)[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        half = head_dim // 2
        self.cos = emb.cos().to(dtype)                                               # [P, D]
        self.sin = torch.cat([-emb[:, :half].sin(), emb[:, half:].sin()], -1).to(dtype)

    def at(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for the N tokens at positions pos [N], shaped [N, 1, D]: gathered once
        per forward pass and shared by every layer of this rope."""
        return self.cos[pos][:, None, :], self.sin[pos][:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # x: [N, heads, D]
        cos, sin = cos_sin
        return x * cos + x.roll(x.shape[-1] // 2, -1) * sin
