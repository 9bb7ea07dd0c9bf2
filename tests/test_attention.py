"""Decode attention over shared prefix segments (layers/attention.py) against a direct
per-row softmax over the row's whole key list, for segment mixes that take every path of
`segment_batches`: one segment in place, several batched with padded rows and keys,
several batches, rows without a segment, sliding windows."""
from __future__ import annotations

import pytest
import torch

from libinfer.layers.attention import Attention, Step, attention_groups, decode_mask, segment_batches
from libinfer.models.config import ModelConfig

HKV, G, D = 2, 3, 16


def layer(window):
    cfg = ModelConfig(vocab_size=32, hidden_size=HKV * G * D, n_layers=1, n_heads=HKV * G, n_kv_heads=HKV,
                      head_dim=D, intermediate_size=8, sliding_window=window,
                      layer_types=("sliding_attention",) if window else ())
    return Attention(cfg, 0)


def reference(q, own_k, own_v, pool_k, pool_v, rows, window):
    """rows: (segment offset or None, P, own key count) per row; fp64 softmax per row."""
    out = []
    for b, (off, P, n) in enumerate(rows):
        k = own_k[b, :, :n]
        v = own_v[b, :, :n]
        if off is not None:
            k = torch.cat([pool_k[:, off:off + P], k], dim=1)
            v = torch.cat([pool_v[:, off:off + P], v], dim=1)
        pos = P + n - 1                                        # the row's position: its last key
        s = torch.einsum("hgd,hld->hgl", q[b].double(), k.double()) * D ** -0.5
        if window is not None:
            s[:, :, :max(0, pos - window + 1)] = float("-inf")
        out.append(torch.einsum("hgl,hld->hgd", s.softmax(-1), v.double()))
    return torch.stack(out).reshape(len(rows), -1)


# (offset, P, row count) per segment, then rows without a segment
MIXES = {
    "one segment": ([(0, 48, 5)], 0),
    "alike segments, one batch": ([(0, 48, 6), (48, 48, 5), (96, 48, 5)], 0),
    "unlike segments, several batches": ([(0, 200, 3), (200, 160, 4), (360, 32, 2), (392, 16, 1)], 0),
    "rows without a segment": ([(0, 64, 3), (64, 48, 2)], 3),
}


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("mix", list(MIXES))
def test_segment_attention_equals_per_row_softmax(mix, window):
    torch.manual_seed(0)
    segs, plain = MIXES[mix]
    rows = [(off, P, 1 + (3 * b) % 9) for off, P, r in segs for b in range(r)]
    rows += [(None, 0, 5 + 7 * b) for b in range(plain)]
    perm = torch.randperm(len(rows)).tolist()                  # a segment's rows are not neighbours
    rows = [rows[i] for i in perm]
    B, L = len(rows), max(n for _, _, n in rows)
    pool_tokens = max(off + P for off, P, _ in segs)
    own_k, own_v = torch.randn(B, HKV, L, D), torch.randn(B, HKV, L, D)
    pool_k, pool_v = torch.randn(HKV, pool_tokens, D), torch.randn(HKV, pool_tokens, D)
    q = torch.randn(B, HKV, G, D)

    lengths = [n for _, _, n in rows]
    pos = torch.tensor([P + n - 1 for _, P, n in rows])
    own = torch.tensor([n - 1 for n in lengths])
    by_seg = {}
    for b, (off, P, _) in enumerate(rows):
        if off is not None:
            by_seg.setdefault(off, (off, P, []))[2].append(b)
    batches = segment_batches(list(by_seg.values()), pos, [window], G)
    if mix == "one segment":
        assert isinstance(batches[0].keys, slice)
    if mix == "unlike segments, several batches":
        assert len(batches) > 1
    if mix == "alike segments, one batch":
        assert len(batches) == 1 and batches[0].rows.shape == (3, 6)
    step = Step({}, pos=pos, own_pos=own, groups=attention_groups(lengths, rows=4),
                masks={window: decode_mask(own, L, window, torch.float32)}, segments=batches)
    attn = layer(window)
    got = attn._decode_with_segments(q, step, own_k, own_v, pool_k, pool_v, step.masks[window])
    want = reference(q, own_k, own_v, pool_k, pool_v, rows, window)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
