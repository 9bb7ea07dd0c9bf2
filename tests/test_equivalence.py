"""Greedy token ids equal to transformers' generate, token by token (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from libinfer import Generator, GenerationParams

# Mixed lengths, 1 to 300+ tokens; several share no prefix so batch effects would show.
PROMPTS = [
    "The capital of France is",
    "Hi",
    "Q: suggest three search queries for 'cheap flights to Tokyo'\nA:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Translate to French: The weather is nice today, and we are going to the beach.",
    " ".join(f"item{i}" for i in range(120)),
    "Once upon a time, in a small village by the sea, " * 30,
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "List of fruits:\n1. apple\n2. banana\n3.",
]


def hf_greedy(model, tokenizer, prompt: str, max_new: int, **kw) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                             **{"pad_token_id": tokenizer.eos_token_id, **kw})
    return out[0, ids.shape[1]:].tolist()


def assert_same(ours, ref, prompt):
    if ours != ref:
        k = next((i for i in range(min(len(ours), len(ref))) if ours[i] != ref[i]), min(len(ours), len(ref)))
        pytest.fail(f"prompt {prompt[:40]!r}: tokens differ at {k}: ours {ours[k:k + 4]} vs reference {ref[k:k + 4]}")


def test_prompt_lengths_are_mixed(smollm2):
    lengths = [len(smollm2.tokenizer(p).input_ids) for p in PROMPTS]
    assert len(PROMPTS) >= 8 and min(lengths) <= 5 and max(lengths) >= 300, lengths


@pytest.mark.slow
@pytest.mark.parametrize("repetition_penalty", [1.0, 5.0])
def test_gguf_greedy_equals_transformers(smollm2, smollm2_hf, repetition_penalty):
    params = GenerationParams(greedy=True, out_seq_length=32, repetition_penalty=repetition_penalty)
    results = smollm2.generate(PROMPTS, params)
    for prompt, res in zip(PROMPTS, results):
        ref = hf_greedy(smollm2_hf, smollm2.tokenizer, prompt, 32, repetition_penalty=repetition_penalty)
        assert_same(res.outputs[0].token_ids, ref, prompt)
        assert res.outputs[0].finish_reason == ("eos" if ref[-1] == 2 and len(ref) < 32 else "length")


def test_min_tokens_equals_transformers_min_new_tokens(smollm2, smollm2_hf):
    prompt = PROMPTS[7]   # a chat turn: the model answers briefly and emits EOS
    free = smollm2.generate([prompt], GenerationParams(greedy=True, out_seq_length=24))[0].outputs[0]
    assert free.finish_reason == "eos" and len(free.token_ids) < 12
    res = smollm2.generate([prompt], GenerationParams(greedy=True, out_seq_length=24, min_tokens=12))[0].outputs[0]
    assert len(res.token_ids) >= 12
    assert_same(res.token_ids, hf_greedy(smollm2_hf, smollm2.tokenizer, prompt, 24, min_new_tokens=12), prompt)


@pytest.mark.parametrize("name", ["gqa_untied", "tied_headdim"])
def test_random_safetensors_greedy_equals_transformers(random_models, name):
    from transformers import AutoModelForCausalLM
    path = random_models[name]
    ref_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    gen = Generator.from_pretrained(str(path), dtype="float32")
    prompts = PROMPTS[:6]
    for rp in (1.0, 5.0):
        results = gen.generate(prompts, GenerationParams(greedy=True, out_seq_length=32, repetition_penalty=rp,
                                                         ignore_eos=True))
        for prompt, res in zip(prompts, results):
            # ignore_eos on our side; on the reference side no EOS id is set (random weights)
            ref = hf_greedy(ref_model, gen.tokenizer, prompt, 32, repetition_penalty=rp, eos_token_id=None)
            assert_same(res.outputs[0].token_ids, ref, prompt)


def test_same_tokens_alone_and_in_a_mixed_batch(smollm2):
    params = GenerationParams(greedy=True, out_seq_length=24, ignore_eos=True)
    batch = smollm2.generate(PROMPTS, params)
    for i in (0, 2, 6):
        alone = smollm2.generate([PROMPTS[i]], params)[0]
        assert alone.outputs[0].token_ids == batch[i].outputs[0].token_ids
    # and with a small batch limit, so rows join and leave the running batch at different steps
    small = Generator(smollm2.runner, smollm2.tokenizer, smollm2.config, max_batch_size=3, max_batch_tokens=128)
    again = small.generate(PROMPTS, params)
    assert [r.outputs[0].token_ids for r in again] == [r.outputs[0].token_ids for r in batch]


def test_recompute_equals_cached(smollm2):
    params = GenerationParams(greedy=True, out_seq_length=12, ignore_eos=True, repetition_penalty=1.3)
    prompts = PROMPTS[:4]
    cached = smollm2.generate(prompts, params)
    recomputed = smollm2.generate(prompts, params.replace(recompute=True))
    assert [r.outputs[0].token_ids for r in recomputed] == [r.outputs[0].token_ids for r in cached]
