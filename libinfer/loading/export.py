"""Our checkpoints in transformers' form: the config.json and the state dict under HF
names (a GGUF dequantised by our loader), a transformers model built from them, and an
HF directory written from tensors. This is the way back from `Checkpoint` to the field's
tools: fine-tuning (libinfer.tuning) trains a transformers model of the checkpoint, tests
and jobs.register export GGUFs as safetensors directories.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..models.config import ModelLoadError
from .checkpoint import Checkpoint

TOP = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}


def hf_config(ckpt: Checkpoint) -> dict:
    """The checkpoint's config.json as transformers reads it: an HF directory's own, or
    one written from a GGUF's metadata (Llama family; GGUFs of other families are refused)."""
    if not ckpt.gguf_file:
        return json.loads((ckpt.folder / "config.json").read_text())
    from ..lab.random_model import llama_config
    c = ckpt.config
    if c.arch != "llama" or c.rope.type != "default":
        raise ModelLoadError(f"exporting a GGUF of the {c.arch} family (rope {c.rope.type}) to transformers is not "
                             "implemented (Llama with default rope only)")
    cfg = llama_config(hidden_size=c.hidden_size, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                       intermediate_size=c.intermediate_size, head_dim=c.head_dim, vocab_size=c.vocab_size,
                       tie_embeddings=c.tie_embeddings, max_position=c.max_position, rope_theta=c.rope.theta)
    cfg.update(rms_norm_eps=c.rms_eps, bos_token_id=c.bos_token_id, attention_bias=c.attention_bias,
               eos_token_id=list(c.eos_token_ids)[0] if c.eos_token_ids else None)
    return cfg


def hf_state_dict(ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every weight under its HF name (the family's own name map, inverted), in `dtype`.
    A GGUF's q/k come un-permuted from the loader already (the family's gguf_fix)."""
    hf_of = {ours: hf for hf, ours in ckpt.family.hf_names.items()}
    out = {}
    for name, get in ckpt.tensors():
        if name in TOP:
            key = TOP[name]
        else:
            _, i, part = name.split(".")
            kind = "bias" if part.endswith("_bias") else "weight"
            key = f"model.layers.{i}.{hf_of[part.removesuffix('_bias')]}.{kind}"
        out[key] = get().to(dtype).contiguous()
    return out


def transformers_model(path, gguf_file: str | None = None, dtype: torch.dtype = torch.float32):
    """transformers' causal LM of our checkpoint (HF directory, GGUF or bundled model name),
    weights through our loader; refuses a checkpoint whose weights do not fill the model."""
    from transformers import AutoConfig, AutoModelForCausalLM
    ckpt = Checkpoint.open(path, gguf_file)
    cfg = hf_config(ckpt)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(hf_state_dict(ckpt, dtype), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ModelLoadError(f"{path}: weights do not match transformers' {type(model).__name__}: missing "
                             f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if tied:
        model.tie_weights()
    return model.eval()


def save_hf(out_dir, tensors: dict[str, torch.Tensor], config: dict, tokenizer) -> str:
    """An HF directory: config.json (its torch_dtype from the tensors), model.safetensors
    and the tokenizer files."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    os.makedirs(out, exist_ok=True)
    dtype = next(iter(tensors.values())).dtype
    config = {**config, "torch_dtype": str(dtype).removeprefix("torch.")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(out))
    return str(out)
