"""Random-weight checkpoints of every family, written by transformers itself
(`save_pretrained`: config.json + safetensors in the form the field's tools write), with
sharp attention: random weights of a small std make attention nearly uniform and hide
positional bugs (rope scaling, windows), so q/k weights are scaled up. Each family is
checked token by token against transformers' own `generate` in fp32."""
from __future__ import annotations

import json

import pytest
import torch

from libinfer import Generator, GenerationParams

# Lengths 3 to ~110 tokens: longer than every test window (16-24), so windows are crossed
# in prefill and again while decoding.
PROMPTS = [
    "The capital of France is",
    "Q: suggest three search queries for 'cheap flights to Tokyo'\nA:",
    " ".join(f"item{i}" for i in range(40)),
    "Once upon a time, in a small village by the sea, " * 6,
]
NEW_TOKENS = 20
SMALL = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def config_of(kind: str, **overrides):
    import transformers as tf
    classes = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config, "gemma3_text": tf.Gemma3TextConfig}
    return classes[kind](**{**SMALL, **overrides})


def save_model(config, path, seed: int = 0, qk_gain: float = 6.0, edit=None):
    """Random model of `config` saved at `path` (tokenizer: the bundled SmolLM2's).
    `edit(dict)` may change config.json afterwards (e.g. to the older rope_scaling form)."""
    from transformers import AutoModelForCausalLM
    from libinfer import Checkpoint
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(qk_gain)
            elif "norm" in name:           # not all ones (Gemma: not all zeros), so a wrong norm shows
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(str(path))
    Checkpoint.open(None).load_tokenizer().save_pretrained(str(path))
    if edit is not None:
        cfg = json.loads((path / "config.json").read_text())
        edit(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
    return path


def hf_greedy(path, tokenizer, prompts, max_new=NEW_TOKENS) -> list[list[int]]:
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt").input_ids
        with torch.inference_mode():
            gen = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                               min_new_tokens=max_new, pad_token_id=2, eos_token_id=None)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def ours_greedy(gen: Generator, prompts, max_new=NEW_TOKENS) -> list[list[int]]:
    res = gen.generate(prompts, GenerationParams(greedy=True, out_seq_length=max_new, ignore_eos=True))
    return [r.outputs[0].token_ids for r in res]


def assert_token_exact(path, prompts=PROMPTS, **engine):
    """Ours (default engine, and chunked prefill of 16 tokens with 2 slots) == transformers."""
    gen = Generator.from_pretrained(str(path), dtype="float32", **engine)
    ref = hf_greedy(path, gen.tokenizer, prompts)
    lengths = [len(gen.tokenizer(p).input_ids) for p in prompts]
    for ours in (ours_greedy(gen, prompts),
                 ours_greedy(Generator(gen.runner, gen.tokenizer, gen.config, max_batch_size=2, max_batch_tokens=16),
                             prompts)):
        for p, n, a, b in zip(prompts, lengths, ours, ref):
            if a != b:
                k = next(i for i in range(len(a)) if a[i] != b[i])
                pytest.fail(f"{path.name}: prompt of {n} tokens {p[:30]!r}: tokens differ at {k}: "
                            f"ours {a[k:k + 4]} vs transformers {b[k:k + 4]}")
    return gen
