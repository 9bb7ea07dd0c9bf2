"""The model registry: one short file per family, each assembled from `layers/`.

A family owns its config parsing (HF config.json and GGUF metadata, refusing every field
that would change the computation and that we do not implement), its weight-name maps
and its block. Looked up by HF `model_type` (checked against `architectures`) or by GGUF
`general.architecture`, as vLLM's registry is keyed by architecture.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .config import ModelConfig, ModelLoadError


@dataclass(frozen=True)
class Family:
    name: str
    model: type                                      # a models.decoder.Decoder subclass
    model_types: tuple[str, ...]                     # HF config.json model_type values
    parse_hf: Callable[[dict], ModelConfig]
    hf_names: dict[str, str]                         # HF module inside a layer -> our part
    gguf_archs: tuple[str, ...] = ()
    parse_gguf: Callable | None = None               # (meta, tensor names) -> ModelConfig
    gguf_names: dict[str, str] = field(default_factory=dict)   # GGUF tensor part -> our part
    gguf_fix: Callable | None = None                 # (our name, array, cfg) -> array as HF holds it


def families() -> list[Family]:
    # Imported here, not at module top: layers/ import models.config, and the families import layers/.
    from . import gemma3, llama, mistral, qwen2, qwen3
    return [llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY, gemma3.FAMILY]


def family(name: str) -> Family:
    for f in families():
        if f.name == name:
            return f
    raise ModelLoadError(f"unknown model family {name!r}")


def family_for_hf(cfg: dict) -> Family:
    model_type = cfg.get("model_type", "llama")
    for f in families():
        if model_type in f.model_types:
            return f
    known = sorted(t for f in families() for t in f.model_types)
    raise ModelLoadError(f"model_type {model_type!r} is not supported (supported: {', '.join(known)})")


def family_for_gguf(arch: str) -> Family:
    for f in families():
        if arch in f.gguf_archs:
            return f
    known = sorted(a for f in families() for a in f.gguf_archs)
    raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(known)})")


def build(cfg: ModelConfig, dtype, device, quantization: str = "none"):
    """An empty model of cfg's family, ready for `load_weights` (which quantises the
    projections when quantization is int8 or int4)."""
    return family(cfg.arch).model.empty(cfg, dtype, device, quantization)


__all__ = ["Family", "ModelConfig", "ModelLoadError", "build", "families", "family", "family_for_gguf",
           "family_for_hf"]
