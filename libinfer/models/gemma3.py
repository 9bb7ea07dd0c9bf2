"""Gemma 3 (text): embeddings scaled by sqrt(hidden), (1 + w) RMSNorms, four norms per
block (before and after attention and MLP), per-head q/k norms, a tanh-GELU gated MLP,
scores scaled by query_pre_attn_scalar, and a pattern of sliding-window layers (their own
rope base) between global layers (the global base, optionally scaled)."""
from __future__ import annotations

import numpy as np
from torch import nn

from ..layers import Attention, GatedMLP, RMSNorm
from . import Family
from .config import FULL, SLIDING, ModelConfig, ModelLoadError, eos_ids, parse_rope, refuse_common
from .decoder import Decoder


class Gemma3Block(nn.Module):
    """h += post_norm(attn(norm(h))); h += post_norm(mlp(norm(h))): a norm sits between
    each output projection and its residual sum, so the sum is not fused."""

    def __init__(self, cfg: ModelConfig, layer: int, unit_offset_norms: bool = True):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_eps, unit_offset=True)  # noqa: E731
        self.attn_norm, self.post_attn_norm, self.mlp_norm, self.post_mlp_norm = norm(), norm(), norm(), norm()
        self.attn = Attention(cfg, layer, unit_offset_norms=True)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.activation)
        self.parts = {**{n: f"{n}.weight" for n in ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm")},
                      **self.attn.parts, "down": "mlp.w2.weight"}

    def prepare(self, quantization: str | None = None) -> None:
        self.attn.prepare(quantization)
        self.mlp.prepare(quantization)

    def forward(self, h, step, kv):
        h = h + self.post_attn_norm(self.attn(self.attn_norm(h), step, kv))
        return h + self.post_mlp_norm(self.mlp(self.mlp_norm(h), None, step.all_reduce))


class Gemma3(Decoder):
    block = Gemma3Block
    unit_offset_norms = True


HF_NAMES = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
            "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm",
            "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
            "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attn_norm",
            "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "post_mlp_norm"}

GGUF_NAMES = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "attn_q_norm": "q_norm",
              "attn_k_norm": "k_norm", "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down",
              "attn_norm": "attn_norm", "post_attention_norm": "post_attn_norm", "ffn_norm": "mlp_norm",
              "post_ffw_norm": "post_mlp_norm"}

GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def _layer_types(types, pattern: int, n_layers: int) -> tuple[str, ...]:
    types = tuple(types or (SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)))
    bad = [t for t in types if t not in (FULL, SLIDING)]
    if bad:
        raise ModelLoadError(f"gemma3 config: layer_types entry {bad[0]!r} is not supported")
    return types


def _parse(cfg: dict) -> ModelConfig:
    what = f"{cfg.get('model_type')} config"
    if cfg.get("model_type") == "gemma3":
        raise ModelLoadError("gemma3 config: the multimodal Gemma 3 (vision_config/text_config) is not supported; "
                             "use a text-only checkpoint (model_type gemma3_text)")
    refuse_common(cfg, what, hidden_acts=GELU_TANH)
    n_heads, n_layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    max_pos = cfg.get("max_position_embeddings", 131072)
    params = cfg.get("rope_parameters") or {}
    if FULL in params or SLIDING in params:        # transformers 5: one rope per layer type
        rope = parse_rope(params.get(FULL), 1e6, max_pos, what)
        local = parse_rope(params.get(SLIDING), 1e4, max_pos, what)
    else:                                         # older: rope_theta + rope_scaling, rope_local_base_freq
        rope = parse_rope(cfg.get("rope_scaling"), cfg.get("rope_theta", 1e6), max_pos, what)
        local = parse_rope(None, cfg.get("rope_local_base_freq", 1e4), max_pos, what)
    hidden = cfg["hidden_size"]
    return ModelConfig(
        vocab_size=cfg["vocab_size"], hidden_size=hidden, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, head_dim=cfg.get("head_dim") or hidden // n_heads,
        intermediate_size=cfg["intermediate_size"], rope=rope, rope_local=local,
        rms_eps=cfg.get("rms_norm_eps", 1e-6), max_position=max_pos,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)), attention_bias=bool(cfg.get("attention_bias")),
        o_bias=bool(cfg.get("attention_bias")), bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg.get("eos_token_id")), arch="gemma3", sliding_window=cfg.get("sliding_window", 4096),
        layer_types=_layer_types(cfg.get("layer_types"), cfg.get("sliding_window_pattern", 6), n_layers),
        qk_norm=True, query_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5, activation="gelu_tanh",
        embed_scale=hidden ** 0.5,
    )


def _parse_gguf(meta, tensor_names: set[str]) -> ModelConfig:
    g = lambda k, d=None: meta(f"gemma3.{k}", d)  # noqa: E731
    if g("rope.scaling.type") not in (None, "none"):
        raise ModelLoadError(f"GGUF gemma3: gemma3.rope.scaling.type={g('rope.scaling.type')!r} is not supported")
    n_heads, hidden, n_layers = g("attention.head_count"), g("embedding_length"), g("block_count")
    head_dim = g("attention.key_length", 256)
    cfg = {"model_type": "gemma3_text", "vocab_size": g("vocab_size") or meta("tokenizer.ggml.tokens.count"),
           "hidden_size": hidden, "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
           "num_key_value_heads": g("attention.head_count_kv", n_heads), "head_dim": head_dim,
           "intermediate_size": g("feed_forward_length"), "max_position_embeddings": g("context_length", 131072),
           "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
           "rope_theta": float(g("rope.freq_base", 1e6)), "sliding_window": g("attention.sliding_window", 4096),
           # GGUF does not store these; llama.cpp and transformers' GGUF loader use the Gemma 3 values:
           # scores scaled by head_dim ** -0.5 (query_pre_attn_scalar = head_dim), local base 10000, 5:1 pattern.
           "query_pre_attn_scalar": head_dim, "rope_local_base_freq": 10000.0, "sliding_window_pattern": 6,
           "tie_word_embeddings": "output.weight" not in tensor_names,
           "bos_token_id": meta("tokenizer.ggml.bos_token_id"), "eos_token_id": meta("tokenizer.ggml.eos_token_id")}
    return _parse(cfg)


def _gguf_fix(name: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    # llama.cpp's converter stores Gemma's norm weights as 1 + w (it multiplies by w).
    return w - 1.0 if name == "norm" or name.endswith("norm") else w


FAMILY = Family("gemma3", Gemma3, ("gemma3_text", "gemma3"), _parse, HF_NAMES, gguf_archs=("gemma3",),
                parse_gguf=_parse_gguf, gguf_names=GGUF_NAMES, gguf_fix=_gguf_fix)
