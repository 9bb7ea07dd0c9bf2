"""The pieces a decoder is assembled from (models/ puts them together per family)."""
from .attention import Attention, Step, attention_groups
from .linear import QUANTIZATIONS, Dense, QuantizedDense, check_quantization, dense, packable, project_out
from .mlp import GatedMLP
from .norm import HeadNorm, RMSNorm
from .rotary import Rotary

__all__ = ["Attention", "Step", "attention_groups", "Dense", "QuantizedDense", "QUANTIZATIONS", "check_quantization",
           "dense", "packable", "project_out", "GatedMLP", "HeadNorm", "RMSNorm", "Rotary"]
