"""Weight-only int8 / int4 (model.quantization): the products equal x @ W_q^T for the
quantised W_q on both paths (few rows: torch's integer kernels; many rows: W_q expanded
to bf16), W_q is close to W, the model's outputs stay close to bf16's, and what cannot
run is refused naming the key."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from libinfer import Generator, GenerationParams
from libinfer.layers import QuantizedDense, check_quantization, dense


def _weights(n=96, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    b = (torch.randn(n, generator=g) * 0.05).bfloat16()
    return w, b, g


@pytest.mark.parametrize("bits,tol", [(8, 0.01), (4, 0.12)])
def test_quantised_weight_is_close_to_the_float_weight(bits, tol):
    w, _, _ = _weights()
    d = QuantizedDense(w, None, bits)
    wq = d.dequantized().float()
    rel = ((wq - w.float()).norm() / w.float().norm()).item()
    assert 0 < rel < tol          # a weight that did not change was not quantised
    if bits == 4:                 # 16 levels per group of 32 inputs
        groups = wq.view(96, -1, 32)
        assert all(len(torch.unique(grp)) <= 16 for grp in groups.reshape(-1, 32)[:50])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, QuantizedDense.DEQUANT_ROWS + 5])
@pytest.mark.parametrize("post", [None, "silu", "mul", "add"])
def test_both_paths_compute_x_times_the_quantised_weight(bits, rows, post):
    w, b, g = _weights(seed=rows)
    x = torch.randn(rows, 128, generator=g).bfloat16()
    other = torch.randn(rows, 96, generator=g).bfloat16() if post in ("mul", "add") else None
    d = dense(w, b, f"int{bits}")
    out = d(x, post, other)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
    y = F.linear(x.float(), d.dequantized().float(), b.float())
    ref = {None: y, "silu": F.silu(y), "mul": y * (other.float() if other is not None else 1),
           "add": y + (other.float() if other is not None else 0)}[post]
    torch.testing.assert_close(out.float(), ref, atol=0.03, rtol=0.02)


def test_a_batch_of_3d_rows_keeps_its_shape():
    w, _, g = _weights()
    x = torch.randn(2, 5, 128, generator=g).bfloat16()
    assert dense(w, None, "int8")(x).shape == (2, 5, 96)


@pytest.mark.parametrize("quantization,min_cos", [("int8", 0.999), ("int4", 0.97)])
def test_quantised_model_logits_stay_close_to_bf16(random_models, quantization, min_cos):
    path = str(random_models["gqa_untied"])
    ids = torch.arange(3, 40)
    ref = Generator.from_pretrained(path, dtype="bfloat16", warmup=False)
    q = Generator.from_pretrained(path, dtype="bfloat16", quantization=quantization, warmup=False)
    a, b = ref.runner.model.forward_logits(ids), q.runner.model.forward_logits(ids)
    cos = F.cosine_similarity(a, b, dim=-1)
    assert cos.min().item() > min_cos
    assert not torch.equal(a, b)
    assert q.runner.weight_bytes() < ref.runner.weight_bytes()
    # decode (the integer kernels: one row per step) and prefill agree with the same model's scoring
    p = GenerationParams(greedy=True, out_seq_length=6, ignore_eos=True)
    res = q.generate([ids.tolist()], p)
    toks = res[0].outputs[0].token_ids
    full = q.runner.model.forward_logits(torch.tensor(ids.tolist() + toks[:-1]))
    assert full[len(ids) - 1:].argmax(-1).tolist() == toks


def test_int8_smollm2_keeps_the_bf16_greedy_answer():
    prompt = "The capital of France is"
    p = GenerationParams(greedy=True, out_seq_length=4, ignore_eos=True)
    bf16 = Generator.from_pretrained(None, dtype="bfloat16", warmup=False)
    int8 = Generator.from_pretrained(None, dtype="bfloat16", quantization="int8", warmup=False)
    a, b = bf16.generate([prompt], p)[0].outputs[0], int8.generate([prompt], p)[0].outputs[0]
    assert "Paris" in a.text and "Paris" in b.text
    assert int8.runner.weight_bytes() < 0.75 * bf16.runner.weight_bytes()


@pytest.mark.parametrize("quantization,dtype,device,needle", [
    ("int8", torch.float32, "cpu", "needs model.dtype=bfloat16"),
    ("int4", torch.bfloat16, "cuda", "runs on CPU only"),
    ("int3", torch.bfloat16, "cpu", "must be one of none, int8, int4"),
])
def test_what_cannot_run_is_refused_naming_the_key(quantization, dtype, device, needle):
    with pytest.raises(ValueError, match="model.quantization") as e:
        check_quantization(quantization, dtype, device)
    assert needle in str(e.value)
    assert check_quantization(None, torch.float32, "cpu") == "none"


def test_int4_refuses_input_sizes_not_divisible_by_the_group(random_models):
    # tied_headdim has intermediate_size 200: the down projection's inputs are not groups of 32
    with pytest.raises(ValueError, match="int4 needs input sizes divisible by 32"):
        Generator.from_pretrained(str(random_models["tied_headdim"]), dtype="bfloat16", quantization="int4",
                                  warmup=False)
    gen = Generator.from_pretrained(str(random_models["tied_headdim"]), dtype="bfloat16", quantization="int8",
                                    warmup=False)
    assert gen.generate([[5, 6, 7]], GenerationParams(greedy=True, out_seq_length=3))[0].ok


def test_the_jobs_config_key_is_checked_and_passed_on(tmp_path):
    from jobs._config import ConfigError
    from jobs._model import build_generator
    from conftest import job_cfg
    with pytest.raises(ConfigError, match="config 'model.quantization': .*needs model.dtype=bfloat16"):
        job_cfg("model=tiny_random", "model.quantization=int8")
    with pytest.raises(ConfigError, match="model.quantization"):
        job_cfg("model=tiny_random", "model.quantization=int2", "model.dtype=bfloat16")
    cfg = job_cfg("model=tiny_random", "model.quantization=int8", "model.dtype=bfloat16",
                  f"model.path={tmp_path / 'tiny'}")
    gen = build_generator(cfg.model, warmup=False)
    assert gen.quantization == "int8"
    assert isinstance(gen.runner.model.head, QuantizedDense)
