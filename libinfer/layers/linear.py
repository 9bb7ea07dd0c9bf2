"""Matrix products of the hot path, with their elementwise neighbours fused where the
backend can.

`Dense` is one weight matrix made ready for inference. On CPU in bf16 the weight is
reordered once into oneDNN's blocked layout: for decode-sized inputs (a few to a few
dozen rows) that halves the time of the product, and oneDNN applies the activation
(SiLU or tanh-GELU), the gate product and the residual sum as post-ops of the same call,
so those tensors are never written and read back. Everywhere else (fp32, which stays
the token-exact mode, and CUDA) it is `F.linear` followed by the same operations, in the
same order as the reference implementation.

`QuantizedDense` holds the weight as int8 (one scale per output row) or int4 (groups of
32 inputs, a scale and a zero each; llama.cpp's Q4_1 layout), quantised once at load, and
multiplies with torch's weight-only kernels, which read the small integers and never
materialise the whole matrix in bf16. Those kernels are fast for a few rows (batch-1
decode streams 2-4x fewer bytes) and slow for many; from DEQUANT_ROWS rows on (prefill,
wide decode steps) the weight is expanded to bf16 for that one product instead.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..models.config import QUANTIZATIONS, check_quantization  # noqa: F401 - the layers' names for them

_ONEDNN_DTYPES = (torch.bfloat16,)
INT4_GROUP = 32
_ONEDNN_UNARY = {None: ("none", ""), "silu": ("swish", ""), "gelu_tanh": ("gelu", "tanh")}


@functools.cache
def _onednn_bf16() -> bool:
    """oneDNN's bf16 kernels need AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; on an AVX2-only CPU
    (e.g. AMD EPYC Zen 3) the weight reorder refuses bf16, so products stay `F.linear`."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packable(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in _ONEDNN_DTYPES and _onednn_bf16()


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
        return _post(F.linear(x, self.weight, self.bias), post, other)

    @property
    def owns_weight(self) -> bool:
        """True when the source weight is no longer read (the caller may release it)."""
        return self.packed is not None


def _post(y: torch.Tensor, post: str | None, other: torch.Tensor | None) -> torch.Tensor:
    if post == "silu":
        return F.silu(y)
    if post == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if post == "mul":
        return y * other
    if post == "add":
        return other + y
    return y


class QuantizedDense:
    """y = x W^T + b with W stored as int8 or int4 (see the module docstring); the same
    post-ops as Dense, applied after the product."""

    DEQUANT_ROWS = 48      # from this many rows on, expanding W to bf16 is cheaper than the int kernels

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int):
        self.bias, self.bits, self.dtype = bias, bits, weight.dtype
        self.out_features, self.in_features = weight.shape
        w = weight.float()
        if bits == 8:
            self.scales = (w.abs().amax(1) / 127).clamp_min(1e-12)                              # [N]
            self.q = torch.round(w / self.scales[:, None]).clamp_(-127, 127).to(torch.int8)     # [N, K]
            self.scales = self.scales.to(weight.dtype)
            return
        n, k = w.shape
        if k % INT4_GROUP:
            raise ValueError(f"model.quantization=int4 needs input sizes divisible by {INT4_GROUP}; a {n}x{k} "
                             "weight is not (use int8)")
        g = w.reshape(n, k // INT4_GROUP, INT4_GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-12)                                            # [N, K/g]
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32).reshape(n, k)
        # torch's int4 layout: w = (q - 8) * scale + zero
        self.scales = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().to(weight.dtype)
        self.q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # The many-row path's copy, a byte per value (q - 8), and its scales and zeros [N, K/g, 1]:
        # two bf16 passes expand it; int4's memory is then 1.5 bytes per weight, not 0.5.
        self.wide = (q - 8).to(torch.int8).view(n, k // INT4_GROUP, INT4_GROUP)
        self.wide_scale, self.wide_zero = (t.T[..., None].contiguous() for t in self.scales.unbind(-1))

    owns_weight = True

    def dequantized(self) -> torch.Tensor:
        """W in the compute dtype, expanded for one product."""
        if self.bits == 8:
            return self.q.to(self.dtype) * self.scales[:, None]
        w = torch.addcmul(self.wide_zero, self.wide.to(self.dtype), self.wide_scale)
        return w.view(self.out_features, self.in_features)

    def __call__(self, x: torch.Tensor, post: str | None = None, other: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows >= self.DEQUANT_ROWS:
            return _post(F.linear(x, self.dequantized(), self.bias), post, other)
        flat = x.reshape(rows, self.in_features).contiguous()
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.q, INT4_GROUP, self.scales)
        y = y.view(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return _post(y, post, other)


def dense(weight: torch.Tensor, bias: torch.Tensor | None = None, quantization: str | None = None):
    """The product for one weight: QuantizedDense for int8/int4, else Dense."""
    if quantization in ("int8", "int4"):
        return QuantizedDense(weight, bias, 8 if quantization == "int8" else 4)
    return Dense(weight, bias)



def project_out(dense: Dense, x: torch.Tensor, residual: torch.Tensor | None, all_reduce) -> torch.Tensor:
    """[residual +] x W^T for a row-parallel projection. The sum is fused into the product
    unless the partial products of the ranks must be all-reduced first; without a
    residual it is the all-reduced product alone (a norm comes before the sum)."""
    if all_reduce is None:
        return dense(x) if residual is None else dense(x, "add", residual)
    out = dense(x)
    all_reduce(out)
    return out if residual is None else residual + out
