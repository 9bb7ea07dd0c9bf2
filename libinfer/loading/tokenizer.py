"""The model's own HF tokenizer. A GGUF's tokenizer is converted once and cached."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("LIBINFER_CACHE", Path.home() / ".cache" / "libinfer"))


def load_tokenizer(ckpt):
    from transformers import AutoTokenizer
    if not ckpt.gguf_file:
        return AutoTokenizer.from_pretrained(str(ckpt.folder))
    cached = cache_dir() / "tokenizers" / ckpt.fingerprint()
    if (cached / "tokenizer_config.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception:
            pass  # a half-written cache entry: rebuild it below
    tok = AutoTokenizer.from_pretrained(str(ckpt.folder), gguf_file=ckpt.gguf_file)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    try:
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cached) if not cached.exists() else None
    except OSError:
        pass  # caching is an optimisation only
    return tok
