"""Matrix products of the hot path, with their elementwise neighbours fused where the
backend can.

`Dense` is one weight matrix made ready for inference. On CPU in bf16 the weight is
reordered once into oneDNN's blocked layout: for decode-sized inputs (a few to a few
dozen rows) that halves the time of the product, and oneDNN applies the activation
(SiLU or tanh-GELU), the gate product and the residual sum as post-ops of the same call,
so those tensors are never written and read back. Everywhere else (fp32, which stays
the token-exact mode, and CUDA) it is `F.linear` followed by the same operations, in the
same order as the reference implementation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ONEDNN_DTYPES = (torch.bfloat16,)
_ONEDNN_UNARY = {None: ("none", ""), "silu": ("swish", ""), "gelu_tanh": ("gelu", "tanh")}


def packable(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in _ONEDNN_DTYPES and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Dense:
    """y = x W^T + b, then optionally one of: silu(y), gelu_tanh(y), y * other, y + other."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.bias = bias
        if packable(weight):
            # The hint is the expected row count; the layout serves every row count.
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 64)
            self.weight = None
        else:
            self.packed, self.weight = None, weight

    def __call__(self, x: torch.Tensor, post: str | None = None, other: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is not None:
            if post in ("mul", "add"):
                return torch.ops.mkldnn._linear_pointwise.binary(x, other.contiguous(), self.packed, self.bias, post)
            attr, algo = _ONEDNN_UNARY[post]
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, attr, [], algo)
        y = F.linear(x, self.weight, self.bias)
        if post == "silu":
            return F.silu(y)
        if post == "gelu_tanh":
            return F.gelu(y, approximate="tanh")
        if post == "mul":
            return y * other
        if post == "add":
            return other + y
        return y



def project_out(dense: Dense, x: torch.Tensor, residual: torch.Tensor | None, all_reduce) -> torch.Tensor:
    """[residual +] x W^T for a row-parallel projection. The sum is fused into the product
    unless the partial products of the ranks must be all-reduced first; without a
    residual it is the all-reduced product alone (a norm comes before the sum)."""
    if all_reduce is None:
        return dense(x) if residual is None else dense(x, "add", residual)
    out = dense(x)
    all_reduce(out)
    return out if residual is None else residual + out
