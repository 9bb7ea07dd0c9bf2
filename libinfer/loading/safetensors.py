"""HF safetensors directories: tensors renamed to ours with the family's name map."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from ..models import Family
from ..models.config import ModelLoadError

TOP = {"embed_tokens.weight": "embed", "norm.weight": "norm", "lm_head.weight": "lm_head"}


def tensors(folder: Path, fam: Family) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    from safetensors import safe_open
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has config.json but no *.safetensors files")
    for file in files:
        try:
            f = safe_open(str(file), framework="pt")
        except Exception as e:
            raise ModelLoadError(f"cannot read {file}: {e}") from e
        for key in f.keys():
            k = key.removeprefix("model.")
            if k.endswith("rotary_emb.inv_freq"):       # some exports carry the rope table: we compute it
                continue
            if k in TOP:
                name = TOP[k]
            elif k.startswith("layers."):
                _, i, rest = k.split(".", 2)
                mod, kind = rest.rsplit(".", 1)
                if mod not in fam.hf_names:
                    raise ModelLoadError(f"{file.name}: tensor {key!r} is not known to the {fam.name} family")
                name = f"layers.{i}.{fam.hf_names[mod]}" + ("_bias" if kind == "bias" else "")
            else:
                raise ModelLoadError(f"{file.name}: tensor {key!r} is not known to the {fam.name} family")
            yield name, (lambda f=f, key=key: f.get_tensor(key).float())
