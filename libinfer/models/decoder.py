"""The decoder every family is assembled into: embeddings, the family's blocks, the
final norm and the LM head, with the two batched passes of inference.

Prefill runs the linear layers once over all prompts packed end to end (no padding) and
attention per sequence. Decode runs one token for each of the B rows that occupy cache
slots 0..B-1. The model knows nothing about ranks: `parallel.py` shards its weights and
sets `all_reduce`, which the row-parallel projections of each block then call.

Weights arrive as (name, getter) pairs in our own names (`embed`, `norm`, `lm_head`,
`layers.{i}.{part}`), mapped from HF or GGUF names by the family (models/<family>.py).
After loading, `prepare()` makes each projection a `layers.Dense` (on CPU in bf16:
oneDNN-packed weights with the activation, gate product and residual sum fused in), or
with `quantization` int8/int4 a `layers.QuantizedDense` (weight-only integer kernels).
"""
from __future__ import annotations

import torch
from torch import nn

from ..engine.kv_cache import KVCache
from ..layers import Dense, QuantizedDense, RMSNorm, Rotary, Step, dense
from ..layers.attention import decode_mask, segment_batches
from .config import ModelConfig, ModelLoadError

# Parts of a fused projection: (module attribute path, the parts in their order).
FUSED = {"attn.wqkv.weight": ("q", "k", "v"), "attn.wqkv.bias": ("q_bias", "k_bias", "v_bias"),
         "mlp.w13.weight": ("gate", "up")}


class Decoder(nn.Module):
    block: type[nn.Module]          # the family's block: Block(cfg, layer_index, unit_offset_norms)
    unit_offset_norms = False       # Gemma's (1 + w) RMSNorms

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # _weight: no normal_() init (weights are loaded; on the meta device of `empty` that init
        # alone imported torch's Python reference ops, 1.5 s of every model load)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(self.block(cfg, i, self.unit_offset_norms) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, self.unit_offset_norms)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.ropes: dict = {}
        self.windows = sorted({cfg.window(i) for i in range(cfg.n_layers)}, key=lambda w: w or 0)
        self.head: Dense | QuantizedDense | None = None
        self.quantization = "none"  # set before load_weights: the projections' and the LM head's weight format
        self.all_reduce = None      # set by parallel.py on a tensor-parallel shard
        self.weight_nbytes = 0
        self.requires_grad_(False)

    @classmethod
    def empty(cls, cfg: ModelConfig, dtype: torch.dtype, device, quantization: str = "none") -> "Decoder":
        """Build with uninitialised storage (no random init): `load_weights` fills it."""
        with torch.device("meta"):
            model = cls(cfg)
        # Each parameter allocated in its final dtype (torch's to_empty + to(dtype) went through
        # its Python reference ops for meta tensors: ~0.6 s of every model load, and two passes).
        for mod in model.modules():
            for name, p in mod._parameters.items():
                if p is not None:
                    mod._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                                         requires_grad=False)
        model.quantization = quantization
        model.setup_rope(cfg.max_position)
        return model

    def setup_rope(self, max_pos: int) -> None:
        p = self.lm_head.weight
        self.ropes = {r: Rotary(r, self.cfg.head_dim, max_pos, p.dtype, p.device)
                      for r in {self.cfg.rope_of(i) for i in range(self.cfg.n_layers)}}

    def prepare(self) -> None:
        """Make the loaded weights ready for the hot path (see layers/linear.py). Where a
        weight was repacked or quantised, the plain copy is released: the model holds its
        weights once (a tied LM head quantised is the exception: the embeddings stay)."""
        self.weight_nbytes = sum(p.numel() * p.element_size() for p in self.parameters())
        for layer in self.layers:      # layer by layer: at most one layer is held twice
            layer.prepare(self.quantization)
        self.head = dense(self.lm_head.weight, None, self.quantization)
        if self.head.owns_weight and not self.cfg.tie_embeddings:
            self.lm_head.weight = nn.Parameter(self.lm_head.weight.new_empty(0), requires_grad=False)
        if self.quantization != "none":
            self.weight_nbytes = self._quantized_nbytes()

    def _quantized_nbytes(self) -> int:
        """Bytes the weights hold when the products are quantised: the integers and scales
        of every product, and the float parameters left (norms, embeddings)."""
        products = [d for m in self.modules() for d in vars(m).values() if isinstance(d, QuantizedDense)]
        ints = sum(t.numel() * t.element_size() for d in products for t in vars(d).values()
                   if isinstance(t, torch.Tensor) and t is not d.bias)
        return ints + sum(p.numel() * p.element_size() for p in self.parameters())

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        if self.cfg.embed_scale is not None:   # in the weights' dtype, as the reference scales
            h = h * torch.tensor(self.cfg.embed_scale, dtype=h.dtype)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h)).float()

    def _tables(self, pos: torch.Tensor) -> dict:
        return {rope: table.at(pos) for rope, table in self.ropes.items()}

    def _layers(self, h: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            h = layer(h, step, (cache.k[i], cache.v[i], cache.pool_k[i], cache.pool_v[i]))
        return h

    def _layers_prefill(self, tokens, spans, locs, cache: KVCache) -> torch.Tensor:
        pos = torch.cat([torch.arange(start, start + n, device=tokens.device) for _, n, start in spans])
        step = Step(self._tables(pos), self.all_reduce, spans=spans, locs=locs)
        return self._layers(self.embed_tokens(tokens), step, cache)

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, spans, locs, cache: KVCache) -> torch.Tensor:
        """tokens: [T] packed prompt pieces; spans: (offset, length, start) per piece; locs:
        (slot, segment offset, P) per piece (see layers.Step); returns fp32 logits of each
        piece's last token [S, V] (the LM head runs on those rows only)."""
        h = self._layers_prefill(tokens, spans, locs, cache)
        last = torch.tensor([off + n - 1 for off, n, _ in spans], device=tokens.device)
        return self.logits(h[last])

    @torch.inference_mode()
    def forward_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [T] one sequence; fp32 logits of every position [T, V] (for scoring),
        through the prefill path with a throwaway one-slot cache."""
        n = tokens.shape[0]
        p = self.lm_head.weight
        cache = KVCache(self.cfg.n_layers, 1, self.cfg.n_kv_heads, n, self.cfg.head_dim, p.dtype, p.device)
        return self.logits(self._layers_prefill(tokens, [(0, n, 0)], [(0, 0, 0)], cache))

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache, groups, prefix=None,
               segments=()) -> torch.Tensor:
        """tokens, pos: [B] (row b in slot b); groups: attention_groups of the rows' own key
        counts (the caller has them as host lists; no device read here); prefix: [B] each
        row's segment length P (None: no row has one); segments: (offset, P, row list) per
        segment read. Returns fp32 logits [B, V]."""
        L = max(e for _, _, e in groups)
        own = pos if prefix is None else pos - prefix
        masks = {w: decode_mask(own, L, w, cache.k.dtype) for w in self.windows}
        segs = segment_batches(segments, pos, self.windows, self.cfg.n_heads // self.cfg.n_kv_heads)
        step = Step(self._tables(pos), self.all_reduce, pos=pos, own_pos=own, groups=groups, masks=masks,
                    segments=segs)
        return self.logits(self._layers(self.embed_tokens(tokens), step, cache))

    # -------------------------------------------------------------------- weights

    def load_weights(self, tensors, shard=None) -> None:
        """Fill parameters from (name, getter) pairs; `shard(name, t)` slices for TP.
        Every parameter must be filled: a checkpoint that lacks one is refused."""
        shard = shard or (lambda name, t: t)
        pending: dict[int, dict[str, torch.Tensor]] = {}
        unset = {name for name, _ in self.named_parameters()}
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
            unset.discard("lm_head.weight")
        for name, get in tensors:
            t = shard(name, get())
            if name in ("embed", "norm", "lm_head"):
                target = {"embed": "embed.weight", "norm": "norm.weight", "lm_head": "lm_head.weight"}[name]
                if name == "lm_head" and self.cfg.tie_embeddings:
                    continue      # a tied checkpoint may still carry a copy of the head
                self._set(target, t, unset)
                continue
            _, i, part = name.split(".")
            layer = self.layers[int(i)]
            if part in layer.parts:
                self._set(f"layers.{i}.{layer.parts[part]}", t, unset)
                continue
            group = pending.setdefault(int(i), {})
            group[part] = t
            for attr, parts in FUSED.items():   # parts of a fused projection wait for their siblings
                if all(p in group for p in parts):
                    self._set(f"layers.{i}.{attr}", torch.cat([group.pop(p) for p in parts]), unset)
        leftover = {f"layers.{i}.{p}" for i, g in pending.items() for p in g}
        if leftover:
            raise ModelLoadError(f"checkpoint has incomplete or unknown projections: {sorted(leftover)[:4]}")
        if unset:
            ours = {}       # parameter -> our checkpoint name, for the message
            for i, layer in enumerate(self.layers):
                ours.update({f"layers.{i}.{path}": f"layers.{i}.{part}" for part, path in layer.parts.items()})
                ours.update({f"layers.{i}.{attr}": f"layers.{i}.{'/'.join(ps)}" for attr, ps in FUSED.items()})
            raise ModelLoadError(f"checkpoint lacks weights the model needs: {sorted(ours.get(u, u) for u in unset)[:4]}"
                                 + (" (no lm_head and embeddings are not tied)" if "lm_head.weight" in unset else ""))
        self.prepare()

    def _set(self, target: str, value: torch.Tensor, unset: set) -> None:
        param = self.get_parameter(target)
        if param.shape != value.shape:
            raise ModelLoadError(f"{target}: weight shape {tuple(value.shape)} does not match the model's "
                                 f"{tuple(param.shape)}")
        param.copy_(value)
        unset.discard(target)
