"""Llama (1, 2, 3.x; SmolLM2): pre-norm blocks, SwiGLU, grouped-query attention, rope with
default, linear or llama3 scaling, tied or untied embeddings. Mistral, Qwen2 and Qwen3
reuse this block and these name maps with their own config parsing."""
from __future__ import annotations

import numpy as np
from torch import nn

from ..layers import Attention, GatedMLP, RMSNorm
from . import Family
from .config import ModelConfig, ModelLoadError, Refuse, eos_ids, parse_rope, refuse_common
from .decoder import Decoder


class LlamaBlock(nn.Module):
    """h += attn(norm(h)); h += mlp(norm(h)); both sums fused into the output projections."""

    def __init__(self, cfg: ModelConfig, layer: int, unit_offset_norms: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.activation)
        # our part name -> parameter (parts of fused projections: see decoder.FUSED)
        self.parts = {"attn_norm": "attn_norm.weight", "mlp_norm": "mlp_norm.weight", **self.attn.parts,
                      "down": "mlp.w2.weight"}

    def prepare(self, quantization: str | None = None) -> None:
        self.attn.prepare(quantization)
        self.mlp.prepare(quantization)

    def forward(self, h, step, kv):
        h = self.attn(self.attn_norm(h), step, kv, residual=h)
        return self.mlp(self.mlp_norm(h), h, step.all_reduce)


class Llama(Decoder):
    block = LlamaBlock


HF_NAMES = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
            "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm",
            "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
            "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}

GGUF_NAMES = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate",
              "ffn_up": "up", "ffn_down": "down", "attn_norm": "attn_norm", "ffn_norm": "mlp_norm",
              "attn_q_norm": "q_norm", "attn_k_norm": "k_norm"}


def parse_hf(cfg: dict, *, arch: str = "llama", qk_norm: bool = False, qkv_bias: bool | None = None,
             sliding_window: int | None = None, layer_types: tuple[str, ...] = ()) -> ModelConfig:
    """The config fields every Llama-like family shares; the families pass what differs."""
    what = f"{cfg.get('model_type', arch)} config"
    refuse_common(cfg, what)
    n_heads = cfg["num_attention_heads"]
    max_pos = cfg.get("max_position_embeddings", 2048)
    rope = parse_rope(cfg.get("rope_parameters") or cfg.get("rope_scaling"), cfg.get("rope_theta"), max_pos, what)
    return ModelConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        intermediate_size=cfg["intermediate_size"], rope=rope, rms_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position=max_pos, tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        # transformers: attention_bias puts biases on q, k, v and o (Qwen2: q, k, v always, o never)
        attention_bias=bool(cfg.get("attention_bias", False)) if qkv_bias is None else qkv_bias,
        o_bias=bool(cfg.get("attention_bias", False)) if qkv_bias is None else False,
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids(cfg.get("eos_token_id")), arch=arch,
        qk_norm=qk_norm, sliding_window=sliding_window, layer_types=layer_types,
    )


def _parse_llama(cfg: dict) -> ModelConfig:
    # Llama has no sliding window; a config that asks for one is not a Llama we can run.
    Refuse(cfg, "llama config").absent_or_null("sliding_window", "layer_types")
    return parse_hf(cfg)


def parse_gguf(meta, tensor_names: set[str]) -> ModelConfig:
    g = lambda k, d=None: meta(f"llama.{k}", d)  # noqa: E731
    if "rope_freqs.weight" in tensor_names or g("rope.scaling.type") not in (None, "none"):
        raise ModelLoadError("GGUF llama: rope scaling (rope_freqs.weight / llama.rope.scaling.type) is not "
                             "supported from GGUF metadata; load the HF safetensors directory instead")
    if g("attention.sliding_window") or g("expert_count"):
        raise ModelLoadError("GGUF llama: sliding window / experts are not supported from GGUF")
    n_heads, hidden = g("attention.head_count"), g("embedding_length")
    eos = meta("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=g("vocab_size") or meta("tokenizer.ggml.tokens.count"), hidden_size=hidden,
        n_layers=g("block_count"), n_heads=n_heads, n_kv_heads=g("attention.head_count_kv", n_heads),
        head_dim=g("attention.key_length", hidden // n_heads), intermediate_size=g("feed_forward_length"),
        rope=parse_rope(None, float(g("rope.freq_base", 10000.0)), 0, "GGUF llama"),
        rms_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)), max_position=g("context_length", 2048),
        tie_embeddings="output.weight" not in tensor_names, attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=meta("tokenizer.ggml.bos_token_id"), eos_token_ids=eos_ids(eos), arch="llama",
    )


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter interleaves the rotary halves of q/k rows for the llama
    # architecture; undo it so the weights match HF's rotate-half layout (ours).
    head = w.shape[0] // n_heads
    return w.reshape(n_heads, head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_fix(name: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    part = name.rsplit(".", 1)[-1]
    if part in ("q", "q_bias"):
        return unpermute_rope(w, cfg.n_heads)
    if part in ("k", "k_bias"):
        return unpermute_rope(w, cfg.n_kv_heads)
    return w


FAMILY = Family("llama", Llama, ("llama",), _parse_llama, HF_NAMES, gguf_archs=("llama",), parse_gguf=parse_gguf,
                gguf_names=GGUF_NAMES, gguf_fix=gguf_fix)
