"""Qwen2: the Llama block with biases on q, k and v; sliding windows on the layers
`layer_types` names (transformers derives them from use_sliding_window/max_window_layers)."""
from __future__ import annotations

from . import Family
from .config import FULL, SLIDING, ModelConfig, ModelLoadError
from .llama import HF_NAMES, Llama, parse_hf


def qwen_windows(cfg: dict) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) as transformers' Qwen2/Qwen3 configs define them."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    types = cfg.get("layer_types") or [SLIDING if window is not None and i >= cfg.get("max_window_layers", 28)
                                       else FULL for i in range(cfg["num_hidden_layers"])]
    bad = [t for t in types if t not in (FULL, SLIDING)]
    if bad:
        raise ModelLoadError(f"{cfg.get('model_type')} config: layer_types entry {bad[0]!r} is not supported")
    if SLIDING in types and window is None:
        raise ModelLoadError(f"{cfg.get('model_type')} config: layer_types has sliding layers but sliding_window "
                             "is off (use_sliding_window/sliding_window)")
    return window, tuple(types) if SLIDING in types else ()


def _parse(cfg: dict) -> ModelConfig:
    window, types = qwen_windows(cfg)
    return parse_hf(cfg, arch="qwen2", qkv_bias=True, sliding_window=window, layer_types=types)


FAMILY = Family("qwen2", Llama, ("qwen2",), _parse, HF_NAMES)
