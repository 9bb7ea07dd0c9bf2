"""Mistral: the Llama block with sliding-window attention in every layer when the config
sets `sliding_window` (a layer attends to the last `sliding_window` positions)."""
from __future__ import annotations

from . import Family
from .config import SLIDING, ModelConfig, Refuse
from .llama import HF_NAMES, Llama, parse_hf


def _parse(cfg: dict) -> ModelConfig:
    # transformers' Mistral ignores layer_types (it says to use Ministral): refuse rather than guess.
    Refuse(cfg, "mistral config").absent_or_null("layer_types")
    window = cfg.get("sliding_window")
    return parse_hf(cfg, arch="mistral", sliding_window=window,
                    layer_types=(SLIDING,) * cfg["num_hidden_layers"] if window else ())


FAMILY = Family("mistral", Llama, ("mistral",), _parse, HF_NAMES)
