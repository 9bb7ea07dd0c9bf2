"""ModelConfig: what our decoder computes, parsed by each family from its checkpoint's
config. Every field here changes the computation; a checkpoint field that would change
it and is not listed here is refused by the family's parser (`Refuse`), never ignored."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:      # not imported at run time: parsing configs needs no torch
    import torch


class ModelLoadError(RuntimeError):
    """The checkpoint cannot be loaded (or would not compute what it was trained to); the message says why."""


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of one kind of layer: base, and the scaling of its frequencies."""
    theta: float = 10000.0
    type: str = "default"                   # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0            # llama3
    high_freq_factor: float = 4.0           # llama3
    original_max_position: int = 8192       # llama3


ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu_tanh")
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope: Rope = field(default_factory=Rope)
    rms_eps: float = 1e-5
    max_position: int = 2048
    tie_embeddings: bool = False
    attention_bias: bool = False            # biases on q, k, v
    o_bias: bool = False                    # a bias on the attention output projection
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    arch: str = "llama"                     # the family (models/ registry key)
    # Sliding-window attention: layer i attends to the last `sliding_window` positions
    # (itself included) when layer_types[i] == SLIDING; () means every layer is FULL.
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    rope_local: Rope | None = None          # the rope of SLIDING layers where it differs (Gemma 3)
    qk_norm: bool = False                   # RMSNorm of each q/k head before rope (Qwen3, Gemma 3)
    query_scale: float | None = None        # attention score scale; None = head_dim ** -0.5
    activation: str = "silu"                # of the gated MLP
    embed_scale: float | None = None        # embeddings times this (Gemma: sqrt(hidden))

    def __post_init__(self):
        if self.layer_types and len(self.layer_types) != self.n_layers:
            raise ModelLoadError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else FULL

    def window(self, i: int) -> int | None:
        return self.sliding_window if self.layer_type(i) == SLIDING else None

    def rope_of(self, i: int) -> Rope:
        return self.rope_local if self.rope_local is not None and self.layer_type(i) == SLIDING else self.rope

    @property
    def n_params(self) -> int:
        h, i, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        q, kv = self.n_heads * d, self.n_kv_heads * d
        norms = 4 if self.arch == "gemma3" else 2         # Gemma 3 also norms each sublayer's output
        per_layer = (h * (q + 2 * kv) + q * h + 3 * h * i + norms * h + (2 * d if self.qk_norm else 0)
                     + ((q + 2 * kv) if self.attention_bias else 0) + (h if self.o_bias else 0))
        return v * h * (1 if self.tie_embeddings else 2) + self.n_layers * per_layer + h

    @property
    def kv_values_per_token(self) -> int:
        """K and V values one token keeps in the cache, over all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.kv_values_per_token * dtype.itemsize

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """Parse an HF config.json dict with its family's parser (see models/__init__.py)."""
        from . import family_for_hf
        return family_for_hf(cfg).parse_hf(cfg)


class Refuse:
    """Checks of one config dict; each failure names the field (ModelLoadError)."""

    def __init__(self, cfg: dict, what: str):
        self.cfg, self.what = cfg, what

    def unless(self, key: str, ok, why: str = "is not supported") -> None:
        """Refuse when `key` is present and `ok(value)` is false (absent keys pass)."""
        if key in self.cfg and not ok(self.cfg[key]):
            raise ModelLoadError(f"{self.what}: {key}={self.cfg[key]!r} {why}")

    def absent_or_null(self, *keys: str) -> None:
        for k in keys:
            self.unless(k, lambda v: v in (None, 0, False, [], {}), "is not implemented by our decoder")


def refuse_common(cfg: dict, what: str, hidden_acts=("silu",)) -> Refuse:
    """The checks every family shares: quantised checkpoints, MoE, activations, biases,
    partial rotary, logit soft-capping; and the architecture class."""
    r = Refuse(cfg, what)
    r.absent_or_null("quantization_config", "num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size",
                     "attn_logit_softcapping", "final_logit_softcapping", "mlp_bias", "use_bidirectional_attention")
    for key in ("hidden_act", "hidden_activation"):
        r.unless(key, lambda v: v in hidden_acts, f"is not supported (supported: {', '.join(hidden_acts)})")
    r.unless("partial_rotary_factor", lambda v: v in (None, 1, 1.0))
    r.unless("architectures", lambda v: not v or all(a.endswith("ForCausalLM") for a in v),
             "is not a causal language model")
    return r


def parse_rope(params: dict | None, theta: float | None, max_position: int, what: str) -> Rope:
    """One Rope from either config form: transformers 5's `rope_parameters` (theta inside)
    or the older `rope_theta` + `rope_scaling`. Unknown scaling types are refused."""
    p = dict(params or {})
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ModelLoadError(f"{what}: rope scaling rope_type={kind!r} is not supported (supported: "
                             f"{', '.join(ROPE_TYPES)})")
    theta = float(p.get("rope_theta", theta if theta is not None else 10000.0))
    allowed = {"rope_type", "type", "rope_theta"} | ({"factor"} if kind != "default" else set()) | (
        {"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} if kind == "llama3" else set())
    extra = sorted(k for k, v in p.items() if k not in allowed and v is not None)
    if extra:
        raise ModelLoadError(f"{what}: rope field {extra[0]}={p[extra[0]]!r} is not supported for rope_type {kind}")
    if kind == "default":
        return Rope(theta)
    if kind == "linear":
        return Rope(theta, "linear", float(p["factor"]))
    return Rope(theta, "llama3", float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"]),
                int(p.get("original_max_position_embeddings") or max_position))


def eos_ids(value) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list) else (() if value is None else (int(value),))


QUANTIZATIONS = ("none", "int8", "int4")      # model.quantization: the products' weight format (layers/linear.py)


def check_quantization(quantization: str | None, dtype, device) -> str:
    """The quantization name, or ValueError naming model.quantization when it cannot run
    here; dtype a torch dtype or its name (a job's driver validates without torch)."""
    q = quantization or "none"
    if q not in QUANTIZATIONS:
        raise ValueError(f"model.quantization must be one of {', '.join(QUANTIZATIONS)} (got {quantization!r})")
    if q != "none" and str(device).split(":")[0] != "cpu":
        raise ValueError(f"model.quantization={q} runs on CPU only (torch's weight-only CPU kernels); on "
                         f"{device} use model.quantization=none with bfloat16 or float16")
    name = str(dtype).removeprefix("torch.")
    if q != "none" and name not in ("bfloat16", "bf16"):
        raise ValueError(f"model.quantization={q} needs model.dtype=bfloat16 (the kernels multiply bf16 "
                         f"activations; got {name})")
    return q
