"""Llama: plain, rope scaling llama3 and linear (transformers 5's rope_parameters form and
the older rope_scaling form), Llama 3.2-style tied embeddings; token-exact in fp32."""
from __future__ import annotations

import pytest

from families import assert_token_exact, config_of, save_model

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 10000.0}


def old_form(cfg: dict) -> None:
    """Rewrite transformers 5's rope_parameters as the older rope_theta + rope_scaling."""
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params


CASES = {
    "plain": (dict(), None),
    "llama3_rope": (dict(rope_parameters=LLAMA3, tie_word_embeddings=True), None),   # Llama 3.2-style
    "llama3_rope_old_form": (dict(rope_parameters=LLAMA3), old_form),
    "linear_rope": (dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}), None),
    "linear_rope_old_form": (dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
                             old_form),
}


@pytest.mark.parametrize("case", list(CASES))
def test_llama_token_exact(tmp_path, case):
    overrides, edit = CASES[case]
    path = save_model(config_of("llama", **overrides), tmp_path / f"llama_{case}", seed=len(case), edit=edit)
    gen = assert_token_exact(path)
    if "rope" in case:
        assert gen.config.rope.type == overrides["rope_parameters"]["rope_type"]


def test_llama_attention_bias_token_exact(tmp_path):
    """attention_bias puts biases on q, k, v and o (transformers' Llama)."""
    gen = assert_token_exact(save_model(config_of("llama", attention_bias=True), tmp_path / "llama_bias", seed=12))
    assert gen.config.attention_bias and gen.config.o_bias
