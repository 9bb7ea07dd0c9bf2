"""RMSNorm in the reference implementations' two forms.

Llama/Qwen: weight * normed.to(dtype). Gemma: (normed * (1 + weight)) in fp32, then cast
(its weights are stored as offsets from 1). Statistics are fp32 in both, whatever the
compute dtype, in the reference's order of operations (fp32 is token-exact)."""
from __future__ import annotations

import torch
from torch import nn


def _normed(x: torch.Tensor, eps: float) -> torch.Tensor:
    # x * x is x.pow(2) bit for bit and was faster at prefill sizes on CPU; F.rms_norm was
    # no faster here and in bf16 rounds differently from the reference.
    xf = x.float()
    return xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps)


def _scale(xf: torch.Tensor, weight: torch.Tensor, unit_offset: bool, dtype: torch.dtype) -> torch.Tensor:
    if unit_offset:
        return (xf * (1.0 + weight.float())).to(dtype)
    return weight * xf.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _scale(_normed(x, self.eps), self.weight, self.unit_offset, x.dtype)


class HeadNorm(nn.Module):
    """The per-head RMSNorms of q and k (Qwen3, Gemma 3), applied to the rows of q and k
    heads together in one pass: x [N, Hq + Hkv, D], the q weight on the first Hq heads."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.eps, self.unit_offset = n_heads, n_kv_heads, eps, unit_offset
        self.q = nn.Parameter(torch.ones(head_dim), requires_grad=False)
        self.k = nn.Parameter(torch.ones(head_dim), requires_grad=False)
        self.both = None

    def prepare(self) -> None:
        self.both = torch.cat([self.q[None].expand(self.n_heads, -1), self.k[None].expand(self.n_kv_heads, -1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _scale(_normed(x, self.eps), self.both, self.unit_offset, x.dtype)
