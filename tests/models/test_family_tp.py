"""Tensor parallelism for every family: tp_size=2 gives the tokens of tp_size=1 (gloo,
CPU), including a Gemma 3 with one KV head (copied to both ranks, query heads split) and
a Llama with attention_bias (the row-parallel o bias is added once)."""
from __future__ import annotations

import pytest

from families import PROMPTS, config_of, ours_greedy, save_model
from libinfer import Generator
from test_family_gemma3 import gemma_config

CASES = {
    "llama_bias": lambda: config_of("llama", attention_bias=True),
    "mistral_window": lambda: config_of("mistral", sliding_window=16),
    "qwen2": lambda: config_of("qwen2"),
    "qwen3": lambda: config_of("qwen3", head_dim=32),
    "gemma3_one_kv_head": lambda: gemma_config(num_key_value_heads=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_equals_tp1(tmp_path, case):
    path = str(save_model(CASES[case](), tmp_path / case, seed=11))
    one = ours_greedy(Generator.from_pretrained(path), PROMPTS)
    with Generator.from_pretrained(path, tp_size=2, tp_timeout_s=60) as gen:
        assert ours_greedy(gen, PROMPTS) == one
