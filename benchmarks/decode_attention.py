"""Decode attention kernels side by side: torch's SDPA (what libinfer's decode step calls)
against two matmul + fp32 softmax forms, on slices of a 30-layer slot cache (so K/V come
from memory, not from the cache of the previous call), for a few (rows, keys) shapes.

The question it answers: is the decode step's own-key attention (about half of a 64-row
bf16 step at 164+ keys) cheaper in another eager form? Prints microseconds per call,
median of 3 interleaved rounds, and each form's largest difference from SDPA.

    python benchmarks/decode_attention.py
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from libinfer.layers.attention import decode_mask

LAYERS, HKV, G, D, MAX_LEN = 30, 3, 3, 64, 640       # SmolLM2-135M's heads; a 640-position cache


def per_call_us(f, n=20) -> float:
    for _ in range(2):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e6


def sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def k_times_qt(q, k, v, mask, scale):
    """s^T = K q^T: the cache slice is the plain left operand of the product."""
    s = torch.matmul(k, q.transpose(-1, -2)).float() * scale + mask.transpose(-1, -2)
    return torch.matmul(torch.softmax(s, dim=-2).to(v.dtype).transpose(-1, -2), v)


def q_times_kt(q, k, v, mask, scale):
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale + mask
    return torch.matmul(torch.softmax(s, -1).to(v.dtype), v)


def main() -> None:
    torch.manual_seed(0)
    forms = {"sdpa": sdpa, "K q^T": k_times_qt, "q K^T": q_times_kt}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; us per call, median of 3")
    for dtype in (torch.bfloat16, torch.float32):
        for b, L in ((1, 100), (1, 600), (16, 300), (64, 164), (64, 400)):
            ck = torch.randn(LAYERS, b, HKV, MAX_LEN, D).to(dtype)
            cv = torch.randn(LAYERS, b, HKV, MAX_LEN, D).to(dtype)
            q = torch.randn(b, HKV, G, D).to(dtype)
            pos = torch.randint(L // 2, L, (b,))
            pos[0] = L - 1
            mask = decode_mask(pos, L, None, dtype)
            ref = sdpa(q, ck[0, :, :, :L], cv[0, :, :, :L], mask, D ** -0.5).float()
            diff = {n: (f(q, ck[0, :, :, :L], cv[0, :, :, :L], mask, D ** -0.5).float() - ref).abs().max().item()
                    for n, f in forms.items()}
            layer = [0]

            def call(f):
                layer[0] = (layer[0] + 1) % LAYERS          # another layer's slice each call
                return f(q, ck[layer[0], :, :, :L], cv[layer[0], :, :, :L], mask, D ** -0.5)

            times = {n: [] for n in forms}
            for _ in range(3):
                for n, f in forms.items():
                    times[n].append(per_call_us(lambda: call(f)))
            cols = "  ".join(f"{n} {statistics.median(t):.0f} (diff {diff[n]:.1g})" for n, t in times.items())
            print(f"{str(dtype).removeprefix('torch.'):9} rows {b:3} keys {L:4}: {cols}")


if __name__ == "__main__":
    main()
