"""Loading checkpoints from disk (HF safetensors directories, GGUF files, bundled models).

`Checkpoint` (torch) is imported on first use: `paths`, `bundled` and `tokenizer` serve
processes that only tokenize without importing torch."""
from __future__ import annotations

from ..models.config import ModelConfig, ModelLoadError
from .bundled import bundled_model
from .paths import resolve
from .tokenizer import cache_dir, load_tokenizer

__all__ = ["Checkpoint", "ModelConfig", "ModelLoadError", "bundled_model", "cache_dir", "load_tokenizer", "resolve"]


def __getattr__(name: str):
    if name == "Checkpoint":
        from .checkpoint import Checkpoint
        return Checkpoint
    raise AttributeError(f"module 'libinfer.loading' has no attribute {name!r}")
