"""The model's own HF tokenizer. A GGUF's tokenizer is converted once and cached.

Every full load also leaves a fast entry (`<fingerprint>.fast.json`: the Rust tokenizer
exactly as the loaded HF tokenizer holds it, and the model's context length), from which
`fast_tokenizer` builds the same encoder without importing torch or transformers: ~0.2 s
instead of ~4-5 s in each fresh Spark worker that only tokenizes (jobs.preprocess)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .paths import fingerprint, resolve


def cache_dir() -> Path:
    return Path(os.environ.get("LIBINFER_CACHE", Path.home() / ".cache" / "libinfer"))


def _fast_entry(folder: Path, gguf_file: str | None) -> Path:
    """The fast entry's file, keyed by the files the tokenizer is read from: the GGUF, or
    every file of an HF directory but its weights (an edited tokenizer.json is a new key)."""
    files = [folder / gguf_file] if gguf_file else \
        sorted(f for f in folder.iterdir() if f.is_file() and f.suffix not in (".safetensors", ".bin", ".pt"))
    return cache_dir() / "tokenizers" / f"{fingerprint(files)}.fast.json"


def load_tokenizer(ckpt):
    from transformers import AutoTokenizer
    if not ckpt.gguf_file:
        tok = AutoTokenizer.from_pretrained(str(ckpt.folder))
    else:
        tok = None
        cached = cache_dir() / "tokenizers" / ckpt.fingerprint()
        if (cached / "tokenizer_config.json").exists():
            try:
                tok = AutoTokenizer.from_pretrained(str(cached))
            except Exception:
                pass  # a half-written cache entry: rebuild it below
        if tok is None:
            tok = AutoTokenizer.from_pretrained(str(ckpt.folder), gguf_file=ckpt.gguf_file)
            _write_atomic(cached, lambda tmp: tok.save_pretrained(str(tmp)))
    backend = getattr(tok, "backend_tokenizer", None)
    entry = _fast_entry(ckpt.folder, ckpt.gguf_file)
    if backend is not None and not entry.exists():
        body = json.dumps({"context": ckpt.config.max_position, "tokenizer": backend.to_str()})
        _write_atomic(entry, lambda tmp: tmp.write_text(body))
    return tok


def _write_atomic(target: Path, write) -> None:
    """write(tmp) then rename it to target, unless another process got there first."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            write(tmp)
            os.replace(tmp, target)
    except OSError:
        pass  # caching is an optimisation only


class FastTokenizer:
    """The Rust tokenizer of a fast entry, as `backend_tokenizer`: what the tokenize-only
    callers use of the HF tokenizer (batch encoding with the model's special tokens). No
    chat template: callers that render one load the full tokenizer."""

    def __init__(self, backend):
        self.backend_tokenizer = backend


def fast_tokenizer(path, gguf_file: str | None = None):
    """(FastTokenizer, context length) of the checkpoint from its fast entry, or None when
    no full load on this machine has written one yet (or it cannot be read). Imports
    neither torch nor transformers."""
    try:
        entry = json.loads(_fast_entry(*resolve(path, gguf_file)).read_text())
        from tokenizers import Tokenizer
        return FastTokenizer(Tokenizer.from_str(entry["tokenizer"])), int(entry["context"])
    except Exception:      # noqa: BLE001 - any unreadable entry means: take the full load
        return None
