"""Where a checkpoint's files are and their cheap identity, without torch: a Spark worker
that only tokenizes (`tokenizer.fast_tokenizer`) finds its cache entry with these."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..models.config import ModelLoadError


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


def checkpoint_files(folder: Path, gguf_file: str | None) -> list[Path]:
    """The files that hold a checkpoint's weights and config."""
    if gguf_file:
        return [folder / gguf_file]
    return sorted(folder.glob("*.safetensors")) + [folder / "config.json"]


def fingerprint(files: list[Path]) -> str:
    """Cheap identity of files (paths, sizes, mtimes) for caches."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
