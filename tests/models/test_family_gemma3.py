"""Gemma 3 text: random config token-exact against transformers (scaled embeddings,
(1 + w) norms, four norms per block, q/k norms, tanh-GELU, query_pre_attn_scalar, sliding
and global layers with two rope bases), and the real Gemma 3 270M GGUF against
transformers' GGUF loader."""
from __future__ import annotations

import pytest
import torch

from families import assert_token_exact, config_of, save_model
from libinfer import Generator, GenerationParams

TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


def gemma_config(**kw):
    return config_of("gemma3_text", num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=16,
                     layer_types=TYPES, hidden_activation="gelu_pytorch_tanh",
                     rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}, **kw)


def test_gemma3_token_exact(tmp_path):
    gen = assert_token_exact(save_model(gemma_config(), tmp_path / "gemma3", seed=8))
    c = gen.config
    assert c.layer_types == tuple(TYPES) and c.rope.theta == 1e6 and c.rope_local.theta == 1e4
    assert c.query_scale == 24 ** -0.5 and c.embed_scale == 64 ** 0.5


def test_gemma3_linear_rope_on_global_layers_token_exact(tmp_path):
    cfg = gemma_config()
    cfg.rope_parameters["full_attention"] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    gen = assert_token_exact(save_model(cfg, tmp_path / "gemma3_linear", seed=9))
    assert gen.config.rope.type == "linear" and gen.config.rope_local.type == "default"


PROMPTS_270M = ["The capital of France is", "Write a haiku about autumn leaves.\n",
                "Q: suggest three search queries for 'cheap flights to Tokyo'\nA:",
                "Once upon a time, in a small village by the sea, " * 60]   # > the 512-token window


@pytest.fixture(scope="module")
def gemma3_270m():
    gen = Generator.from_pretrained("gemma3_270m", dtype="float32")
    yield gen
    gen.close()


@pytest.mark.slow
def test_gemma3_270m_gguf_equals_transformers(gemma3_270m):
    from transformers import AutoModelForCausalLM
    folder, name = str(gemma3_270m.checkpoint.folder), gemma3_270m.checkpoint.gguf_file
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = gemma3_270m.tokenizer
    assert len(tok(PROMPTS_270M[-1]).input_ids) > 512
    ours = gemma3_270m.generate(PROMPTS_270M, GenerationParams(greedy=True, out_seq_length=16, ignore_eos=True))
    for p, res in zip(PROMPTS_270M, ours):
        ids = tok(p, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                               min_new_tokens=16, eos_token_id=None, pad_token_id=0)
        assert res.outputs[0].token_ids == out[0, ids.shape[1]:].tolist(), p[:40]


@pytest.mark.slow
def test_gemma3_270m_tp2_equals_tp1(gemma3_270m):
    """One KV head on two ranks: each holds a copy and two of the four query heads."""
    params = GenerationParams(greedy=True, out_seq_length=8, ignore_eos=True)
    prompts = PROMPTS_270M[:3]          # loading dominates; the window is crossed by the random-config TP test
    one = gemma3_270m.generate(prompts, params)
    with Generator.from_pretrained("gemma3_270m", tp_size=2, tp_timeout_s=120, warmup=False) as gen:
        assert gen.runner.rank_weight_bytes[0] < gemma3_270m.runner.weight_bytes()
        two = gen.generate(prompts, params)
    assert [r.outputs[0].token_ids for r in two] == [r.outputs[0].token_ids for r in one]
