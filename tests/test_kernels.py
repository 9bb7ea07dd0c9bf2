"""kernels.Dense: the packed bf16 path computes what the plain path computes (to bf16
rounding), each post-op included, and the fp32 path is F.linear to the bit. On a CPU
without oneDNN's bf16 kernels (AVX2 only, e.g. AMD EPYC Zen 3) nothing is packed: the
`no_onednn` fixture makes this CPU behave like one, so that path is tested everywhere."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from libinfer import Generator, GenerationParams
from libinfer.layers import Dense, linear, packable


@pytest.fixture(params=["onednn", "no_onednn"])
def onednn(request, monkeypatch):
    if request.param == "no_onednn":
        monkeypatch.setattr(linear, "_onednn_bf16", lambda: False)
    return request.param


def _ref(x, w, b, post, other):
    y = F.linear(x.float(), w.float(), None if b is None else b.float())
    return {None: y, "silu": F.silu(y), "mul": y * other.float() if other is not None else y,
            "add": y + other.float() if other is not None else y}[post]


@pytest.mark.parametrize("post", [None, "silu", "mul", "add"])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_bf16_dense_matches_fp32_reference(post, rows, onednn):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(96, 64, generator=g) * 0.1).bfloat16()
    b = (torch.randn(96, generator=g) * 0.1).bfloat16()
    x = torch.randn(rows, 64, generator=g).bfloat16()
    other = torch.randn(rows, 96, generator=g).bfloat16() if post in ("mul", "add") else None
    d = Dense(w, b)
    assert (d.packed is not None) == packable(w)
    if onednn == "no_onednn":
        assert d.packed is None and d.weight is w
    out = d(x, post, other)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
    torch.testing.assert_close(out.float(), _ref(x, w, b, post, other), atol=0.05, rtol=0.02)


def test_fp32_dense_is_f_linear_bit_for_bit():
    w, x, r = torch.randn(48, 32), torch.randn(5, 32), torch.randn(5, 48)
    d = Dense(w)
    assert d.packed is None
    assert torch.equal(d(x), F.linear(x, w))
    assert torch.equal(d(x, "add", r), r + F.linear(x, w))
    assert torch.equal(d(x, "silu"), F.silu(F.linear(x, w)))


def test_bf16_model_holds_its_weights_once(onednn):
    gen = Generator.from_pretrained(None, dtype="bfloat16", warmup=False)
    model = gen.runner.model
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    if packable(model.embed.weight):   # packed copies replace the plain ones
        assert held < 0.5 * model.weight_nbytes
    if onednn == "no_onednn":
        assert not packable(model.embed.weight) and held <= model.weight_nbytes
    assert gen.runner.weight_bytes() == model.weight_nbytes > 200 * 2**20   # SmolLM2 bf16: ~270 MB
    res = gen.generate(["The capital of France is"], GenerationParams(greedy=True, out_seq_length=4, ignore_eos=True))
    assert res[0].ok and len(res[0].outputs[0].token_ids) == 4
