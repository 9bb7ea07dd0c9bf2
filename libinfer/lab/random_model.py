"""Random-initialised Llama-family checkpoints, written as real HF directories
(config.json + model.safetensors + the bundled model's tokenizer).

Used for tests (shapes the bundled model does not have) and for the model-size axis of
the performance lab: any width/depth, without downloading anything.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..loading import Checkpoint


def llama_config(hidden_size: int = 256, n_layers: int = 4, n_heads: int = 8, n_kv_heads: int | None = None,
                 intermediate_size: int | None = None, head_dim: int | None = None, vocab_size: int = 49152,
                 tie_embeddings: bool = True, max_position: int = 2048, rope_theta: float = 10000.0) -> dict:
    n_kv_heads = n_kv_heads or n_heads
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden_size, "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads, "head_dim": head_dim or hidden_size // n_heads,
        "intermediate_size": intermediate_size or 4 * hidden_size, "vocab_size": vocab_size,
        "tie_word_embeddings": tie_embeddings, "max_position_embeddings": max_position,
        "rope_theta": rope_theta, "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32",
    }


def save_random_model(out_dir, seed: int = 0, dtype=torch.float32, **config) -> Path:
    """Write a random model to `out_dir` (HF layout); returns the directory."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(**config)
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm():  # not all ones, so a wrong norm weight would show
        return (1.0 + 0.1 * torch.randn(h, generator=g)).to(dtype)

    t = {"model.embed_tokens.weight": rnd(cfg["vocab_size"], h), "model.norm.weight": norm()}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t.update({p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                  p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
                  p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
                  p + "mlp.down_proj.weight": rnd(h, i),
                  p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm()})
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = rnd(cfg["vocab_size"], h)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    Checkpoint.open(None).load_tokenizer().save_pretrained(str(out))   # the bundled model's tokenizer
    return out
