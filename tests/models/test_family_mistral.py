"""Mistral with a sliding window shorter than the prompts: attention honours the window
in prefill (also in chunks) and decode; token-exact in fp32."""
from __future__ import annotations

from families import PROMPTS, assert_token_exact, config_of, save_model


def test_mistral_sliding_window_token_exact(tmp_path):
    path = save_model(config_of("mistral", sliding_window=16), tmp_path / "mistral", seed=3)
    gen = assert_token_exact(path)
    assert gen.config.sliding_window == 16 and set(gen.config.layer_types) == {"sliding_attention"}
    assert max(len(gen.tokenizer(p).input_ids) for p in PROMPTS) > 4 * 16


def test_mistral_without_window_is_full_attention(tmp_path):
    path = save_model(config_of("mistral", sliding_window=None), tmp_path / "mistral_full", seed=4)
    assert assert_token_exact(path).config.layer_types == ()


def test_sliding_window_over_a_shared_prefix_token_exact(tmp_path):
    """Rows sharing a 64-token prefix with a 16-token window: the window cuts into the
    shared segment, in prefill and in decode."""
    from families import hf_greedy, ours_greedy
    from libinfer import Generator
    path = save_model(config_of("mistral", sliding_window=16), tmp_path / "mistral", seed=3)
    prompts = [PROMPTS[3] + f" query {i}" for i in range(4)]
    gen = Generator.from_pretrained(str(path))
    res = gen.generate(prompts, __import__("libinfer").GenerationParams(greedy=True, out_seq_length=4, ignore_eos=True))
    assert res.metrics.prefix_hit_tokens > 0
    assert ours_greedy(gen, prompts) == hf_greedy(path, gen.tokenizer, prompts)
