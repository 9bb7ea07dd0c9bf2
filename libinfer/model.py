"""The decoder: a Llama-family transformer specialised for batched inference.

Shapes: T = packed prompt tokens of several sequences, B = decoding rows, H = hidden,
Hq/Hkv = local query/KV heads, G = Hq // Hkv, D = head_dim, L = cache length.

Prefill runs the linear layers once over all prompts packed end to end (no padding)
and attention per sequence. Decode runs one token for each of the B rows that occupy
cache slots 0..B-1, attending over the slot cache with a per-row length mask.
The model knows nothing about ranks: `parallel.py` shards its weights and sets
`all_reduce`, which the two row-parallel projections of each block then call.

After loading, `prepare()` turns each projection into a `kernels.Dense` (on CPU in
bf16: oneDNN-packed weights with SiLU, gate product and residual sum fused in).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import Dense, packable
from .loading import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics and the reference's order of operations, whatever the compute
        # dtype. x * x is x.pow(2) bit for bit and was faster at prefill sizes on CPU;
        # F.rms_norm was no faster here and in bf16 rounds differently from the reference.
        xf = x.float()
        xf = xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary:
    """cos/sin tables for all positions, built once (HF's rotate-half convention).

    rotate_half(x) = cat(-x2, x1) is computed as roll(x) = cat(x2, x1) times a sin table
    whose first half is negated: the same products, bit for bit, in fewer kernels."""

    def __init__(self, head_dim: int, base: float, max_pos: int, dtype: torch.dtype, device):
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
        freqs = torch.arange(max_pos, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        half = head_dim // 2
        self.cos = emb.cos().to(dtype)                                               # [P, D]
        self.sin = torch.cat([-emb[:, :half].sin(), emb[:, half:].sin()], -1).to(dtype)

    def at(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for the N tokens at positions pos [N], shaped [N, 1, D]: gathered once
        per forward pass and shared by every layer."""
        return self.cos[pos][:, None, :], self.sin[pos][:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # x: [N, heads, D]
        cos, sin = cos_sin
        return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class KVCache:
    """Preallocated per-slot cache: k/v of shape [layers, slots, Hkv, L, D]."""

    def __init__(self, n_layers: int, n_slots: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (n_layers, n_slots, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


def project_out(dense: Dense, x: torch.Tensor, residual: torch.Tensor, all_reduce) -> torch.Tensor:
    """residual + x W^T for a row-parallel projection: the sum is fused into the product
    unless the partial products of the ranks must be all-reduced first."""
    if all_reduce is None:
        return dense(x, "add", residual)
    out = dense(x)
    all_reduce(out)
    return residual + out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.attention_bias)   # fused q, k, v
        self.wo = nn.Linear(q, cfg.hidden_size, bias=False)
        self.qkv = self.o = None

    def prepare(self) -> None:
        self.qkv, self.o = Dense(self.wqkv.weight, self.wqkv.bias), Dense(self.wo.weight)

    def _qkv(self, x: torch.Tensor, cos_sin):
        """q [N, Hq, D] and k [N, Hkv, D] rotated together in one pass, v [N, Hkv, D]."""
        n, d = x.shape[0], self.head_dim
        qkv = self.qkv(x)
        n_qk = (self.n_heads + self.n_kv_heads) * d
        qk = Rotary.apply(qkv[:, :n_qk].view(n, self.n_heads + self.n_kv_heads, d), cos_sin)
        return qk[:, :self.n_heads], qk[:, self.n_heads:], qkv[:, n_qk:].view(n, self.n_kv_heads, d)

    def prefill(self, x, residual, cos_sin, spans, slots, cache_k, cache_v, all_reduce):
        """x: [T, H] packed, normed; spans: (offset, length, start) per sequence; writes the
        cache; returns residual + attention output."""
        q, k, v = self._qkv(x, cos_sin)
        out = q.new_empty(q.shape)                                    # [T, Hq, D], filled per sequence
        for (off, n, start), slot in zip(spans, slots):
            end = start + n
            cache_k[slot, :, start:end] = k[off:off + n].transpose(0, 1)
            cache_v[slot, :, start:end] = v[off:off + n].transpose(0, 1)
            qs = q[off:off + n].transpose(0, 1)[None]                 # [1, Hq, n, D]
            ks, vs = cache_k[slot, :, :end][None], cache_v[slot, :, :end][None]
            if start == 0:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            else:  # a later chunk of a long prompt: query i sees keys <= start + i
                mask = torch.ones(n, end, dtype=torch.bool, device=x.device).tril(start)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
            out[off:off + n] = o[0].transpose(0, 1)
        return project_out(self.o, out.view(out.shape[0], -1), residual, all_reduce)

    def decode(self, x, residual, cos_sin, pos, cache_k, cache_v, mask, groups, all_reduce):
        """x: [B, H] normed, one token per row; row b lives in slot b at position pos[b].
        groups: (first row, end row, keys to read) blocks of rows (see attention_groups)."""
        b, d = x.shape[0], self.head_dim
        q, k, v = self._qkv(x, cos_sin)
        rows = torch.arange(b, device=x.device)
        cache_k[rows, :, pos] = k
        cache_v[rows, :, pos] = v
        g = self.n_heads // self.n_kv_heads
        # The G query heads of a KV group become G query rows of that group: no repeat of k/v.
        qg = q.view(b, self.n_kv_heads, g, d)
        if len(groups) == 1:
            L = groups[0][2]
            o = F.scaled_dot_product_attention(qg, cache_k[:b, :, :L], cache_v[:b, :, :L], attn_mask=mask)
        else:
            o = qg.new_empty(qg.shape)
            for a, e, L in groups:
                o[a:e] = F.scaled_dot_product_attention(qg[a:e], cache_k[a:e, :, :L], cache_v[a:e, :, :L],
                                                        attn_mask=mask[a:e, :, :, :L])
        return project_out(self.o, o.reshape(b, self.n_heads * d), residual, all_reduce)


def attention_groups(lengths: list[int], rows: int = 16) -> list[tuple[int, int, int]]:
    """Split decode attention into blocks of `rows` neighbouring slots, each reading only
    up to its own longest row: with length-bucketed admission, short rows then skip the
    long rows' masked cache positions. One block when blocks would save under 1/8."""
    n, longest = len(lengths), max(lengths)
    groups = [(a, min(a + rows, n), max(lengths[a:a + rows])) for a in range(0, n, rows)]
    if all(8 * L >= 7 * longest for _, _, L in groups):
        return [(0, n, longest)]
    return groups


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # fused gate, up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up = self.gate = self.up = self.down = None

    def prepare(self) -> None:
        w, i = self.w13.weight, self.w13.weight.shape[0] // 2
        if packable(w):   # two products whose post-ops do silu(gate) * up
            self.gate, self.up = Dense(w[:i]), Dense(w[i:])
        else:             # one product, then the elementwise ops
            self.gate_up = Dense(w)
        self.down = Dense(self.w2.weight)

    def forward(self, x, residual, all_reduce=None):
        """x: [N, H] normed; returns residual + MLP(x)."""
        if self.gate_up is None:
            act = self.up(x, "mul", self.gate(x, "silu"))
        else:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            act = F.silu(gate) * up
        return project_out(self.down, act, residual, all_reduce)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = FeedForward(cfg)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope: Rotary | None = None
        self.head: Dense | None = None
        self.all_reduce = None      # set by parallel.py on a tensor-parallel shard
        self.weight_nbytes = 0
        self.requires_grad_(False)

    @classmethod
    def empty(cls, cfg: ModelConfig, dtype: torch.dtype, device) -> "Transformer":
        """Build with uninitialised storage (no random init): `load_weights` fills it."""
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device=device).to(dtype)
        model.setup_rope(cfg.max_position)
        return model

    def setup_rope(self, max_pos: int) -> None:
        p = self.lm_head.weight
        self.rope = Rotary(self.cfg.head_dim, self.cfg.rope_theta, max_pos, p.dtype, p.device)

    def prepare(self) -> None:
        """Make the loaded weights ready for the hot path (see kernels.py). Where a weight
        was repacked, the plain copy is released: the model holds its weights once."""
        self.weight_nbytes = sum(p.numel() * p.element_size() for p in self.parameters())
        empty = lambda p: nn.Parameter(p.new_empty(0), requires_grad=False)  # noqa: E731
        for layer in self.layers:      # layer by layer: at most one layer is held twice
            layer.attn.prepare()
            layer.mlp.prepare()
            for mod in (layer.attn.wqkv, layer.attn.wo, layer.mlp.w13, layer.mlp.w2):
                if packable(mod.weight):
                    mod.weight = empty(mod.weight)
        self.head = Dense(self.lm_head.weight)
        if self.head.packed is not None and not self.cfg.tie_embeddings:
            self.lm_head.weight = empty(self.lm_head.weight)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h)).float()

    def _layers_prefill(self, tokens, spans, slots, cache: KVCache) -> torch.Tensor:
        pos = torch.cat([torch.arange(start, start + n, device=tokens.device) for _, n, start in spans])
        cos_sin = self.rope.at(pos)
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = layer.attn.prefill(layer.attn_norm(h), h, cos_sin, spans, slots, cache.k[i], cache.v[i], self.all_reduce)
            h = layer.mlp(layer.mlp_norm(h), h, self.all_reduce)
        return h

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, spans, slots, cache: KVCache) -> torch.Tensor:
        """tokens: [T] packed prompt chunks; returns fp32 logits of each chunk's last token [S, V]
        (the LM head runs on those rows only)."""
        h = self._layers_prefill(tokens, spans, slots, cache)
        last = torch.tensor([off + n - 1 for off, n, _ in spans], device=tokens.device)
        return self.logits(h[last])

    @torch.inference_mode()
    def forward_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [T] one sequence; fp32 logits of every position [T, V] (for scoring),
        through the prefill path with a throwaway one-slot cache."""
        n = tokens.shape[0]
        p = self.lm_head.weight
        cache = KVCache(self.cfg.n_layers, 1, self.layers[0].attn.n_kv_heads, n, self.cfg.head_dim, p.dtype, p.device)
        return self.logits(self._layers_prefill(tokens, [(0, n, 0)], [0], cache))

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache, groups) -> torch.Tensor:
        """tokens, pos: [B] (row b in slot b); groups: attention_groups of the rows' lengths
        (the caller has them as host lists; no device read here). Returns fp32 logits [B, V]."""
        L = max(e for _, _, e in groups)
        valid = torch.arange(L, device=tokens.device)[None, :] <= pos[:, None]
        mask = torch.zeros(valid.shape, dtype=cache.k.dtype, device=tokens.device)
        mask.masked_fill_(~valid, float("-inf"))
        mask = mask[:, None, None, :]                                   # [B, 1, 1, L]
        cos_sin = self.rope.at(pos)
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = layer.attn.decode(layer.attn_norm(h), h, cos_sin, pos, cache.k[i], cache.v[i], mask, groups,
                                  self.all_reduce)
            h = layer.mlp(layer.mlp_norm(h), h, self.all_reduce)
        return self.logits(h)

    def load_weights(self, tensors, shard=None) -> None:
        """Fill parameters from (name, getter) pairs (see loading.py); `shard(name, t)` slices for TP."""
        shard = shard or (lambda name, t: t)
        pending: dict[str, dict[str, torch.Tensor]] = {}
        seen_head = False
        for name, get in tensors:
            t = shard(name, get())
            if name == "embed":
                self._set(self.embed.weight, t)
                if self.cfg.tie_embeddings:
                    self.lm_head.weight = self.embed.weight
            elif name == "norm":
                self._set(self.norm.weight, t)
            elif name == "lm_head":
                self._set(self.lm_head.weight, t)
                seen_head = True
            else:
                _, i, part = name.split(".")
                layer = self.layers[int(i)]
                if part in ("attn_norm", "mlp_norm"):
                    self._set(getattr(layer, part).weight, t)
                elif part == "o":
                    self._set(layer.attn.wo.weight, t)
                elif part == "down":
                    self._set(layer.mlp.w2.weight, t)
                else:  # parts of a fused projection wait for their siblings
                    group = pending.setdefault(i, {})
                    group[part] = t
                    self._fuse(layer, group)
        if not self.cfg.tie_embeddings and not seen_head:
            raise ValueError("checkpoint has no lm_head weight but does not tie embeddings")
        if any(pending.values()):
            raise ValueError(f"incomplete projections in checkpoint: {pending and list(pending.items())[0][1].keys()}")
        self.prepare()

    def _fuse(self, layer: Block, group: dict) -> None:
        if all(k in group for k in ("q", "k", "v")):
            self._set(layer.attn.wqkv.weight, torch.cat([group.pop("q"), group.pop("k"), group.pop("v")]))
        if all(k in group for k in ("q_bias", "k_bias", "v_bias")):
            self._set(layer.attn.wqkv.bias, torch.cat([group.pop("q_bias"), group.pop("k_bias"), group.pop("v_bias")]))
        if all(k in group for k in ("gate", "up")):
            self._set(layer.mlp.w13.weight, torch.cat([group.pop("gate"), group.pop("up")]))

    @staticmethod
    def _set(param: torch.Tensor, value: torch.Tensor) -> None:
        if param.shape != value.shape:
            raise ValueError(f"weight shape {tuple(value.shape)} does not match the model's {tuple(param.shape)}")
        param.copy_(value)
