"""libinfer: our own batch LLM inference core (no Spark, no MLflow needed).

    from libinfer import Generator, GenerationParams
    gen = Generator.from_pretrained(path, gguf_file=None, dtype="float32", device="cpu", tp_size=1)
    results = gen.generate(prompts, GenerationParams(out_seq_length=16, greedy=True))

The names below are imported on first use (PEP 562), so that a process which needs only a
torch-free part (a Spark worker that tokenizes: `loading.tokenizer.fast_tokenizer`,
`engine.BLOCK`) does not pay torch's import (~1.6 s) for it.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "generator": ("CompletionOutput", "Generator", "RequestOutput", "Results", "TokenEvent", "TokenLogprob"),
    "loading": ("Checkpoint", "ModelConfig", "ModelLoadError", "bundled_model"),
    "metrics": ("GenerationMetrics",),
    "params": ("PRESETS", "GenerationParams", "ParamError"),
    "structured": ("GuideError", "from_response_format"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["Generator", "GenerationParams", "GenerationMetrics", "RequestOutput", "CompletionOutput", "Results",
           "TokenEvent", "TokenLogprob", "GuideError", "from_response_format", "Checkpoint", "ModelConfig", "ModelLoadError", "ParamError", "PRESETS", "bundled_model"]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'libinfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
