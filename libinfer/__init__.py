"""libinfer: our own batch LLM inference core (no Spark, no MLflow needed).

    from libinfer import Generator, GenerationParams
    gen = Generator.from_pretrained(path, gguf_file=None, dtype="float32", device="cpu", tp_size=1)
    results = gen.generate(prompts, GenerationParams(out_seq_length=16, greedy=True))
"""
from .generator import CompletionOutput, Generator, RequestOutput, Results
from .loading import Checkpoint, ModelConfig, ModelLoadError, bundled_model
from .metrics import GenerationMetrics
from .params import PRESETS, GenerationParams, ParamError

__all__ = ["Generator", "GenerationParams", "GenerationMetrics", "RequestOutput", "CompletionOutput", "Results",
           "Checkpoint", "ModelConfig", "ModelLoadError", "ParamError", "PRESETS", "bundled_model"]
