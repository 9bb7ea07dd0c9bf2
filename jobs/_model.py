"""Build a libinfer Generator from the `model` config group (shared by all jobs)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:     # imported in build_generator: a driver that only writes a random model needs no torch
    from libinfer import Generator


def ensure_model(model_cfg) -> None:
    """Write a random-init model to `path` on first use when the config asks for one."""
    init = model_cfg.get("random_init") if hasattr(model_cfg, "get") else None
    if init and model_cfg.path and not (Path(model_cfg.path) / "config.json").exists():
        from libinfer.lab.random_model import save_random_model
        init = dict(init)
        save_random_model(model_cfg.path, **init)


def build_generator(model_cfg, warmup: bool = True, **overrides) -> Generator:
    ensure_model(model_cfg)
    engine = dict(max_batch_size=model_cfg.max_batch_size, max_batch_tokens=model_cfg.max_batch_tokens,
                  kv_cache_gb=model_cfg.kv_cache_gb, prefix_cache=model_cfg.get("prefix_cache", True))
    engine.update(overrides)
    from libinfer import Generator
    return Generator.from_pretrained(model_cfg.path, gguf_file=model_cfg.gguf_file, dtype=model_cfg.dtype,
                                     quantization=model_cfg.get("quantization", "none"), device=model_cfg.device,
                                     tp_size=model_cfg.tp_size, warmup=warmup, **engine)
