"""GGUF checkpoints: metadata through the family's parser, tensors dequantised with the
`gguf` package (F32/F16/BF16, Q8_0, Q4_0/Q4_1, the K-quants) and renamed to ours."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..models import Family, family_for_gguf
from ..models.config import ModelConfig, ModelLoadError


def reader(file: Path):
    from gguf import GGUFReader
    try:
        return GGUFReader(str(file))
    except Exception as e:  # truncated or corrupt files fail in many ways inside gguf
        raise ModelLoadError(f"cannot read GGUF {file}: {type(e).__name__}: {e}") from e


def _meta(r) -> Callable:
    def get(key, default=None):
        if key.endswith(".count"):             # the length of an array field (the vocabulary)
            f = r.fields.get(key.removesuffix(".count"))
            return default if f is None else len(f.data)
        f = r.fields.get(key)
        return default if f is None else f.contents()
    return get


def open_gguf(r) -> tuple[Family, ModelConfig]:
    meta = _meta(r)
    fam = family_for_gguf(meta("general.architecture"))
    return fam, fam.parse_gguf(meta, {t.name for t in r.tensors})


def tensors(r, fam: Family, cfg: ModelConfig) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(our name, getter) for every tensor the model uses; the getter dequantises on call."""
    from gguf.quants import dequantize

    def load(t, name):
        def get():
            w = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
            if fam.gguf_fix is not None:
                w = fam.gguf_fix(name, w, cfg)
            w = np.ascontiguousarray(w, dtype=np.float32)
            return torch.from_numpy(w if w.flags.writeable else w.copy())
        return get

    top = {"token_embd.weight": "embed", "output_norm.weight": "norm", "output.weight": "lm_head"}
    for t in r.tensors:
        if t.name in top:
            yield top[t.name], load(t, top[t.name])
        elif t.name.startswith("blk."):
            _, i, part, kind = t.name.split(".")
            if part not in fam.gguf_names:
                raise ModelLoadError(f"GGUF tensor {t.name!r} is not known to the {fam.name} family")
            name = f"layers.{i}.{fam.gguf_names[part]}" + ("_bias" if kind == "bias" else "")
            yield name, load(t, name)
        elif t.name != "rope_freqs.weight":       # refused by the parser when present
            raise ModelLoadError(f"GGUF tensor {t.name!r} is not known to the {fam.name} family")
