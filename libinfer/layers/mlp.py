"""The gated MLP: down(act(gate(x)) * up(x)), act = SiLU (Llama, Qwen) or tanh-GELU (Gemma)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Dense, packable, project_out


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu"):
        super().__init__()
        self.activation = activation
        self.w13 = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)  # fused gate, up
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up = self.gate = self.up = self.down = None

    def prepare(self) -> None:
        w, i = self.w13.weight, self.w13.weight.shape[0] // 2
        if packable(w):   # two products whose post-ops do act(gate) * up
            self.gate, self.up = Dense(w[:i]), Dense(w[i:])
        else:             # one product, then the elementwise ops
            self.gate_up = Dense(w)
        self.down = Dense(self.w2.weight)
        for mod in (self.w13, self.w2):
            if packable(mod.weight):
                mod.weight = nn.Parameter(mod.weight.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, all_reduce=None) -> torch.Tensor:
        """x: [N, H] normed; returns [residual +] MLP(x)."""
        if self.gate_up is None:
            act = self.up(x, "mul", self.gate(x, self.activation))
        else:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            act = (F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")) * up
        return project_out(self.down, act, residual, all_reduce)
