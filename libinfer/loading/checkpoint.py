"""Opening a checkpoint on disk: an HF directory (config.json + safetensors), a GGUF file,
or one of the bundled real models. Both sources are mapped by the model's family
(models/) to one internal naming, so the decoder never knows where its weights came
from. Weights are produced one tensor at a time (a tensor-parallel rank applies its
`shard` as each is read and keeps only its own slice).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..models import Family, family, family_for_hf
from ..models.config import ModelConfig, ModelLoadError
from . import gguf, safetensors, weight_cache

def resolve(path: str | os.PathLike | None, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """Return (directory, gguf file or None); `path` may also point at a .gguf file itself,
    or name a bundled model (None, "bundled" or "smollm2_135m"; "gemma3_270m")."""
    from . import bundled
    if path is None or str(path) in bundled.NAMES:
        folder, gguf_file = bundled.locate(str(path) if path else "smollm2_135m")
        return Path(folder), gguf_file
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if not p.is_dir():
        raise ModelLoadError(f"model path {str(p)!r} does not exist or is not a directory")
    if gguf_file is None and not (p / "config.json").exists():
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        if len(ggufs) == 1:
            gguf_file = ggufs[0]
        else:
            raise ModelLoadError(f"{p} has no config.json and {'no' if not ggufs else 'several'} .gguf files;"
                                 " pass gguf_file=")
    if gguf_file is not None and not (p / gguf_file).is_file():
        raise ModelLoadError(f"GGUF file {gguf_file!r} not found in {p}")
    return p, gguf_file


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
        if self.gguf_file:
            return [self.folder / self.gguf_file]
        return sorted(self.folder.glob("*.safetensors")) + [self.folder / "config.json"]

    def fingerprint(self) -> str:
        """Cheap identity (paths, sizes, mtimes) for caches; see `content_hash` for registries."""
        h = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

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
