"""Shared fixtures. Models are loaded once per test session (GGUF dequantisation and the
transformers reference are the slow parts)."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2():
    """Our generator on the bundled SmolLM2-135M-Instruct GGUF, fp32 CPU."""
    from libinfer import Generator
    gen = Generator.from_pretrained(None, dtype="float32", device="cpu")
    yield gen
    gen.close()


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' own model from the same GGUF: the reference."""
    from transformers import AutoModelForCausalLM
    from libinfer import bundled_model
    folder, gguf_file = bundled_model()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def random_models(tmp_path_factory):
    """Two random-initialised configs as safetensors dirs: GQA + untied embeddings, and
    tied embeddings with a head_dim that is not hidden/heads."""
    from libinfer.random_model import save_random_model
    root = tmp_path_factory.mktemp("random_models")
    return {
        "gqa_untied": save_random_model(root / "gqa_untied", seed=1, hidden_size=128, n_layers=3, n_heads=8,
                                        n_kv_heads=2, intermediate_size=320, tie_embeddings=False),
        "tied_headdim": save_random_model(root / "tied_headdim", seed=2, hidden_size=96, n_layers=2, n_heads=4,
                                          n_kv_heads=4, head_dim=32, intermediate_size=200, tie_embeddings=True),
    }
