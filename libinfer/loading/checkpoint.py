"""Opening a checkpoint on disk: an HF directory (config.json + safetensors), a GGUF file,
or one of the bundled real models. Both sources are mapped by the model's family
(models/) to one internal naming, so the decoder never knows where its weights came
from. Weights are produced one tensor at a time (a tensor-parallel rank applies its
`shard` as each is read and keeps only its own slice).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..models import Family, family, family_for_hf
from ..models.config import ModelConfig, ModelLoadError
from . import gguf, safetensors, weight_cache
from .paths import checkpoint_files, fingerprint, resolve

@dataclass
class Checkpoint:
    """An opened checkpoint: its config, its family and a lazy stream of (name, tensor getter).
    A GGUF's dequantised weights come from the weight cache (weight_cache.py) once built."""
    folder: Path
    gguf_file: str | None
    config: ModelConfig
    _reader: object = None
    _cached: Path | None = None           # the weight-cache file when it holds this GGUF

    @property
    def family(self) -> Family:
        return family(self.config.arch)

    @classmethod
    def open(cls, path, gguf_file: str | None = None) -> "Checkpoint":
        folder, gguf_file = resolve(path, gguf_file)
        if gguf_file:
            ckpt = cls(folder, gguf_file, None)
            if weight_cache.enabled():
                cached = weight_cache.path_for(ckpt.fingerprint())
                config = weight_cache.read_config(cached)
                if config is not None:
                    return cls(folder, gguf_file, config, None, cached)
            reader = gguf.reader(folder / gguf_file)
            _, config = gguf.open_gguf(reader)
            return cls(folder, gguf_file, config, reader)
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read {folder / 'config.json'}: {e}") from e
        return cls(folder, None, family_for_hf(cfg).parse_hf(cfg))

    @property
    def reader(self):
        """The GGUF reader (opened on first use when the config came from the weight cache)."""
        if self._reader is None:
            self._reader = gguf.reader(self.folder / self.gguf_file)
        return self._reader

    def tensors(self) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
        if not self.gguf_file:
            return safetensors.tensors(self.folder, self.family)
        if self._cached is None and weight_cache.enabled():
            cached = weight_cache.path_for(self.fingerprint())
            weight_cache.write(cached, self.config, gguf.tensors(self.reader, self.family, self.config))
            if cached.is_file():
                self._cached = cached
        if self._cached is not None:
            return weight_cache.tensors(self._cached)
        return gguf.tensors(self.reader, self.family, self.config)

    @property
    def files(self) -> list[Path]:
        return checkpoint_files(self.folder, self.gguf_file)

    def fingerprint(self) -> str:
        """Cheap identity (paths, sizes, mtimes) for caches; see `content_hash` for registries."""
        return fingerprint(self.files)

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()

    def load_tokenizer(self):
        from .tokenizer import load_tokenizer
        return load_tokenizer(self)
