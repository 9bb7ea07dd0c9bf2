"""libinfer: our own batch LLM inference core (no Spark, no MLflow needed).

    from libinfer import Generator, GenerationParams
    gen = Generator.from_pretrained(path, gguf_file=None, dtype="float32", device="cpu", tp_size=1)
    results = gen.generate(prompts, GenerationParams(out_seq_length=16, greedy=True))
"""
from .generator import CompletionOutput, Generator, RequestOutput, Results, TokenEvent, TokenLogprob
from .loading import Checkpoint, ModelConfig, ModelLoadError, bundled_model
from .metrics import GenerationMetrics
from .params import PRESETS, GenerationParams, ParamError
from .structured import GuideError, from_response_format

__all__ = ["Generator", "GenerationParams", "GenerationMetrics", "RequestOutput", "CompletionOutput", "Results",
           "TokenEvent", "TokenLogprob", "GuideError", "from_response_format", "Checkpoint", "ModelConfig", "ModelLoadError", "ParamError", "PRESETS", "bundled_model"]
