"""The gated MLP: down(act(gate(x)) * up(x)), act = SiLU (Llama, Qwen) or tanh-GELU (Gemma)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import dense, packable, project_out


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu"):
        super().__init__()
        self.activation = activation
        self.w13 = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)  # fused gate, up
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up = self.gate = self.up = self.down = None

    def prepare(self, quantization: str | None = None) -> None:
        w, i = self.w13.weight, self.w13.weight.shape[0] // 2
        if packable(w) and quantization in (None, "none"):   # two products whose post-ops do act(gate) * up
            self.gate, self.up = dense(w[:i]), dense(w[i:])
            first = self.gate
        else:             # one product, then the elementwise ops
            self.gate_up = first = dense(w, None, quantization)
        self.down = dense(self.w2.weight, None, quantization)
        for mod, d in ((self.w13, first), (self.w2, self.down)):
            if d.owns_weight:
                mod.weight = nn.Parameter(mod.weight.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, all_reduce=None) -> torch.Tensor:
        """x: [N, H] normed; returns [residual +] MLP(x)."""
        if self.gate_up is None:
            act = self.up(x, "mul", self.gate(x, self.activation))
        else:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            act = (F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")) * up
        return project_out(self.down, act, residual, all_reduce)
