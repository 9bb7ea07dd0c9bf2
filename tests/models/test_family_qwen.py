"""Qwen2 (biases on q/k/v; sliding layers from use_sliding_window/max_window_layers) and
Qwen3 (per-head q/k RMSNorm, head_dim independent of hidden size); token-exact in fp32."""
from __future__ import annotations

from families import assert_token_exact, config_of, save_model


def test_qwen2_token_exact(tmp_path):
    path = save_model(config_of("qwen2"), tmp_path / "qwen2", seed=5)
    gen = assert_token_exact(path)
    assert gen.config.attention_bias and not gen.config.o_bias


def test_qwen2_sliding_layers_token_exact(tmp_path):
    cfg = config_of("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    gen = assert_token_exact(save_model(cfg, tmp_path / "qwen2_window", seed=6))
    assert gen.config.layer_types == ("full_attention", "sliding_attention", "sliding_attention")


def test_qwen3_token_exact(tmp_path):
    path = save_model(config_of("qwen3", head_dim=32), tmp_path / "qwen3", seed=7)   # 4 heads x 32 != 64
    gen = assert_token_exact(path)
    assert gen.config.qk_norm and gen.config.head_dim == 32


def test_n_params_counts_every_weight(tmp_path):
    """ModelConfig.n_params (the lab's size axis) equals the parameters of the checkpoint."""
    from transformers import AutoModelForCausalLM
    from libinfer import Checkpoint
    from test_family_gemma3 import gemma_config
    for name, cfg in {"qwen2": config_of("qwen2"), "qwen3": config_of("qwen3", head_dim=32),
                      "llama": config_of("llama", attention_bias=True, tie_word_embeddings=False),
                      "gemma3": gemma_config()}.items():
        path = save_model(cfg, tmp_path / name)
        ref = AutoModelForCausalLM.from_pretrained(str(path)).num_parameters()
        assert Checkpoint.open(str(path)).config.n_params == ref, name
