"""No silent divergence: every config field that would change the computation and that we
do not implement is refused with a ModelLoadError naming it, at from_pretrained."""
from __future__ import annotations

import json

import numpy as np
import pytest

from families import config_of, save_model
from libinfer import Generator, ModelLoadError


def hf_dict(kind: str, **kw) -> dict:
    return {**config_of(kind).to_dict(), **kw}


ROPE = {"rope_theta": 10000.0}
CASES = {   # name: (config.json, a word the error must contain)
    "unknown model_type": ({**hf_dict("llama"), "model_type": "phi3"}, "model_type"),
    "yarn rope": (hf_dict("llama", rope_parameters={**ROPE, "rope_type": "yarn", "factor": 4.0}), "yarn"),
    "dynamic rope": (hf_dict("llama", rope_parameters={**ROPE, "rope_type": "dynamic", "factor": 2.0}), "dynamic"),
    "longrope (old form)": ({**hf_dict("llama"), "rope_scaling": {"type": "longrope", "short_factor": [1.0]},
                             "rope_parameters": None}, "longrope"),
    "llama3 attention_factor": (hf_dict("llama", rope_parameters={
        **ROPE, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "attention_factor": 2.0}), "attention_factor"),
    "partial rotary (in rope)": (hf_dict("llama", rope_parameters={**ROPE, "rope_type": "default",
                                                                   "partial_rotary_factor": 0.5}),
                                 "partial_rotary_factor"),
    "partial rotary": (hf_dict("llama", partial_rotary_factor=0.5), "partial_rotary_factor"),
    "activation": (hf_dict("llama", hidden_act="gelu"), "hidden_act"),
    "mlp bias": (hf_dict("llama", mlp_bias=True), "mlp_bias"),
    "quantised": (hf_dict("llama", quantization_config={"quant_method": "gptq", "bits": 4}), "quantization_config"),
    "MoE experts": (hf_dict("mistral", num_local_experts=8), "num_local_experts"),
    "Qwen MoE experts": (hf_dict("qwen3", num_experts=8), "num_experts"),
    "not a causal LM": (hf_dict("llama", architectures=["LlamaForSequenceClassification"]), "architectures"),
    "llama with a window": (hf_dict("llama", sliding_window=16), "sliding_window"),
    "mistral layer_types": (hf_dict("mistral", sliding_window=16, layer_types=["full_attention"] * 3),
                            "layer_types"),
    "qwen2 unknown layer type": (hf_dict("qwen2", layer_types=["chunked_attention"] * 3), "chunked_attention"),
    "gemma3 final soft-capping": (hf_dict("gemma3_text", final_logit_softcapping=30.0), "final_logit_softcapping"),
    "gemma3 attention soft-capping": (hf_dict("gemma3_text", attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    "gemma3 bidirectional": ({**hf_dict("gemma3_text"), "use_bidirectional_attention": True},
                             "use_bidirectional_attention"),
    "gemma3 activation": (hf_dict("gemma3_text", hidden_activation="silu"), "hidden_activation"),
    "gemma3 multimodal": ({"model_type": "gemma3", "text_config": {}, "vision_config": {}}, "multimodal"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unimplemented_field_is_refused(tmp_path, case):
    cfg, word = CASES[case]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=word):
        Generator.from_pretrained(str(tmp_path))


def test_unknown_tensor_is_refused(tmp_path):
    """A checkpoint carrying weights our block has no place for (it computes something else)."""
    from safetensors.torch import load_file, save_file
    path = save_model(config_of("llama"), tmp_path / "extra", seed=1)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.self_attn.sinks"] = tensors["model.norm.weight"][:4].clone()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="sinks"):
        Generator.from_pretrained(str(path))


def test_missing_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    path = save_model(config_of("qwen3", head_dim=32), tmp_path / "missing", seed=1)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.q_norm.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="q_norm"):
        Generator.from_pretrained(str(path))


def _gguf(path, arch: str, **meta):
    from gguf import GGUFWriter
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_feed_forward_length(16)
    for k, v in meta.items():
        w.add_string(f"{arch}.{k}", v) if isinstance(v, str) else w.add_float32(f"{arch}.{k}", v)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch,meta,word", [("phi3", {}, "phi3"),
                                            ("llama", {"rope.scaling.type": "linear"}, "rope scaling")])
def test_gguf_unsupported_is_refused(tmp_path, arch, meta, word):
    from libinfer import Checkpoint
    with pytest.raises(ModelLoadError, match=word):
        Checkpoint.open(_gguf(tmp_path / "m.gguf", arch, **meta))
