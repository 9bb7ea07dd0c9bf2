"""The lab's model-size axis: a ladder of random-initialised Llama-family shapes, each
about 2x the parameters of the one before (~35M to ~1.1B), plus real shapes for the
predictor to extrapolate to; and the shape numbers of a loaded model that the report
and the predictor take as inputs."""
from __future__ import annotations

from pathlib import Path

import torch

from ..generator import Generator
from ..loading import ModelConfig, cache_dir
from .random_model import llama_config

# Width/depth ladder: every step ~2x parameters (tied 49,152-token embedding included).
# Head dim 64 and grouped KV heads as in SmolLM2/Llama-3.
SIZES: dict[str, dict] = {
    "llama_35m": dict(hidden_size=384, n_layers=10, n_heads=6, n_kv_heads=2, intermediate_size=1024),
    "llama_70m": dict(hidden_size=512, n_layers=15, n_heads=8, n_kv_heads=4, intermediate_size=1408),
    "llama_140m": dict(hidden_size=640, n_layers=23, n_heads=10, n_kv_heads=5, intermediate_size=1792),
    "llama_280m": dict(hidden_size=896, n_layers=26, n_heads=14, n_kv_heads=7, intermediate_size=2432),
    "llama_560m": dict(hidden_size=1280, n_layers=29, n_heads=20, n_kv_heads=5, intermediate_size=3456),
    "llama_1b": dict(hidden_size=1792, n_layers=30, n_heads=28, n_kv_heads=7, intermediate_size=4864),
    # Real shapes (not built by default): named targets for the predictor.
    "smollm2_360m": dict(hidden_size=960, n_layers=32, n_heads=15, n_kv_heads=5, intermediate_size=2560),
    "smollm2_1.7b": dict(hidden_size=2048, n_layers=24, n_heads=32, n_kv_heads=32, intermediate_size=8192),
    "llama_3b": dict(hidden_size=2560, n_layers=36, n_heads=40, n_kv_heads=8, intermediate_size=6912),
}


def size_config(name: str) -> ModelConfig:
    """The ModelConfig a ladder name stands for (no weights needed)."""
    if name not in SIZES:
        raise KeyError(f"unknown lab size {name!r}; known: {', '.join(SIZES)}")
    return ModelConfig.from_hf(llama_config(**SIZES[name]))


def size_model_dir(name: str) -> Path:
    """Where the random model of ladder size `name` is written on first use."""
    return cache_dir() / "models" / f"lab_{name}"


def shape_facts(c: ModelConfig, elem: int) -> dict[str, float]:
    """Shape numbers the report and the predictor use as inputs, for weights and KV cache
    of `elem` bytes per value."""
    return {"n_params": c.n_params, "n_layers": c.n_layers, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
            "kv_bytes_per_token": c.kv_values_per_token * elem,
            "weight_bytes": c.n_params * elem, "dtype_bytes": elem}


def model_facts(gen: Generator) -> dict[str, float]:
    """shape_facts of a loaded model, in the dtype it runs in."""
    return shape_facts(gen.config, torch.empty((), dtype=gen.dtype).element_size())
