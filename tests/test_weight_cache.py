"""The dequantised-weight cache of GGUF checkpoints (libinfer/loading/weight_cache.py):
written once, then read instead of the GGUF (config included), bit-identical, rebuilt
when damaged, off when asked."""
from __future__ import annotations

import torch

from libinfer import Checkpoint
from libinfer.loading import gguf


def _all(tensors) -> dict[str, torch.Tensor]:
    return {name: get() for name, get in tensors}


def test_cache_is_written_once_then_read_bit_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("LIBINFER_CACHE", str(tmp_path))
    first = Checkpoint.open(None)
    assert first._cached is None and first._reader is not None          # nothing cached yet: the GGUF
    from_cache = _all(first.tensors())                                   # writes the cache, then reads it
    assert first._cached is not None and first._cached.is_file()
    direct = _all(gguf.tensors(first.reader, first.family, first.config))
    assert from_cache.keys() == direct.keys() and len(direct) > 100
    assert all(torch.equal(from_cache[k], direct[k]) for k in direct)

    again = Checkpoint.open(None)
    assert again._reader is None and again._cached == first._cached      # the GGUF is not parsed again
    assert again.config == first.config
    assert torch.equal(dict(again.tensors())["embed"](), direct["embed"])


def test_damaged_entry_is_rebuilt_and_cache_can_be_off(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LIBINFER_CACHE", str(tmp_path))
    ckpt = Checkpoint.open(None)
    next(iter(ckpt.tensors()))
    ckpt._cached.write_bytes(ckpt._cached.read_bytes()[:1000])         # a truncated file
    damaged = Checkpoint.open(None)
    assert damaged._cached is None and "unreadable" in caplog.text
    name, get = next(iter(damaged.tensors()))                           # rebuilt
    assert damaged._cached.stat().st_size > 100_000_000 and get().numel() > 0

    monkeypatch.setenv("LIBINFER_WEIGHT_CACHE", "0")
    monkeypatch.setenv("LIBINFER_CACHE", str(tmp_path / "off"))
    off = Checkpoint.open(None)
    next(iter(off.tensors()))
    assert off._cached is None and not (tmp_path / "off" / "weights").exists()
