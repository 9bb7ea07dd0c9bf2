"""Qwen3: the Llama block with an RMSNorm on each q and k head before rope, and a head_dim
that need not be hidden_size / heads."""
from __future__ import annotations

from . import Family
from .config import ModelConfig
from .llama import HF_NAMES, Llama, parse_hf
from .qwen2 import qwen_windows


def _parse(cfg: dict) -> ModelConfig:
    window, types = qwen_windows(cfg)
    return parse_hf(cfg, arch="qwen3", qk_norm=True, sliding_window=window, layer_types=types)


FAMILY = Family("qwen3", Llama, ("qwen3",), _parse, HF_NAMES)
