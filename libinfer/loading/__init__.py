"""Loading checkpoints from disk (HF safetensors directories, GGUF files, bundled models)."""
from ..models.config import ModelConfig, ModelLoadError
from .bundled import bundled_model
from .checkpoint import Checkpoint, resolve
from .tokenizer import cache_dir, load_tokenizer

__all__ = ["Checkpoint", "ModelConfig", "ModelLoadError", "bundled_model", "cache_dir", "load_tokenizer", "resolve"]
