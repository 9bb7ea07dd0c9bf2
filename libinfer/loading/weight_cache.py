"""A cache of a GGUF checkpoint's dequantised weights: one safetensors file per
checkpoint (keyed by its fingerprint: path, size, mtime), written once, then memory-mapped
by every process that loads the model, with the parsed ModelConfig in its metadata.

Why: dequantising a GGUF costs every loader seconds (Gemma 3 270M: ~14 s to parse the
file, then every tensor), and a Spark job loads the model once per worker, a
tensor-parallel group once per rank. From the cache a load is a page-cache read, shared
by all processes on the machine. Set LIBINFER_WEIGHT_CACHE=0 to turn it off; the cache
lives under $LIBINFER_CACHE (default ~/.cache/libinfer)/weights and can be deleted at any
time.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..models.config import ModelConfig, Rope
from .tokenizer import cache_dir

log = logging.getLogger("libinfer")
VERSION = "1"                 # bump when what is stored (names, dtype, config fields) changes


def enabled() -> bool:
    return os.environ.get("LIBINFER_WEIGHT_CACHE", "1") not in ("0", "false", "no", "")


def path_for(fingerprint: str) -> Path:
    return cache_dir() / "weights" / f"{fingerprint}-v{VERSION}.safetensors"


def config_to_json(cfg: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg))


def config_from_json(text: str) -> ModelConfig:
    d = json.loads(text)
    d["rope"] = Rope(**d["rope"])
    if d.get("rope_local") is not None:
        d["rope_local"] = Rope(**d["rope_local"])
    for k in ("eos_token_ids", "layer_types"):
        d[k] = tuple(d[k])
    return ModelConfig(**d)


def read_config(file: Path) -> ModelConfig | None:
    """The config stored with a cache entry, or None when there is no usable entry."""
    if not file.is_file():
        return None
    try:
        from safetensors import safe_open
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        return config_from_json(meta["config"])
    except Exception as e:                    # a damaged entry: it is rebuilt
        log.warning("weight cache entry %s is unreadable (%s): rebuilding it", file, e)
        return None


def write(file: Path, cfg: ModelConfig, tensors: Iterator[tuple[str, Callable[[], torch.Tensor]]]) -> None:
    """Dequantise every tensor once and store them (atomically: a reader never sees half a file)."""
    from safetensors.torch import save_file
    t0 = time.perf_counter()
    weights = {name: get().contiguous() for name, get in tensors}
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.name}.tmp{os.getpid()}")
    try:
        save_file(weights, str(tmp), metadata={"config": config_to_json(cfg)})
        os.replace(tmp, file)
    except OSError as e:                      # a full or read-only disk: loading still works
        log.warning("cannot write the weight cache %s: %s", file, e)
        tmp.unlink(missing_ok=True)
        return
    log.info("weight cache: %d tensors (%.0f MB) written to %s in %.1f s", len(weights),
             sum(w.nbytes for w in weights.values()) / 2**20, file, time.perf_counter() - t0)


def tensors(file: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    from safetensors import safe_open
    f = safe_open(str(file), framework="pt")
    for key in f.keys():
        yield key, (lambda key=key: f.get_tensor(key))
