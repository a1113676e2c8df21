"""The export form of LoRA recovery: modules XNNPACK runs as fully-connected ops (see `executorch.py`)."""

from __future__ import annotations

import torch
from torch import nn

from sharp.sharing.recovery import LoRARecovery
from sharp.sharing.shared import SharedLinear, shared_linears

_GATED = ("gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """Export form of a `SharedLinear` with LoRA recovery: base(x) + B(A(x)). `base` is the reference's module
    and `lora_a` / `lora_b` hold the recovery's Parameters (no copies)."""

    def __init__(self, base: nn.Module, lora_a: nn.Linear, lora_b: nn.Linear) -> None:
        super().__init__()
        self.base, self.lora_a, self.lora_b = base, lora_a, lora_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x))


class FusedLoRAMLP(nn.Module):
    """A target gated MLP: down(act(gate(x) + Bg a_g) * (up(x) + Bu a_u)) with [a_g, a_u] = [Ag; Au] x in one
    matmul (gate and up read the same x)."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, lora_a: nn.Linear, lora_b_gate: nn.Linear,
                 lora_b_up: nn.Linear, act: nn.Module) -> None:
        super().__init__()
        self.gate, self.up, self.down, self.act = gate, up, down, act
        self.lora_a, self.lora_b_gate, self.lora_b_up = lora_a, lora_b_gate, lora_b_up
        self.rank = lora_b_gate.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_a(x)  # (..., 2r); sliced, not split: XNNPACK delegates slices, a split would cut its graph
        a_gate, a_up = a[..., : self.rank], a[..., self.rank :]
        g = self.gate(x) + self.lora_b_gate(a_gate)
        u = self.up(x) + self.lora_b_up(a_up)
        return self.down(self.act(g) * u)


def _linear(weight: nn.Parameter | torch.Tensor) -> nn.Linear:
    """An nn.Linear around an existing weight (out, in), without allocating a new one."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta", dtype=weight.dtype)
    linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    return linear


def _lora_b(rec) -> nn.Linear:
    """B as a linear; PEFT's scaling s = alpha/R folded in (a copy only when s != 1)."""
    return _linear(rec.lora_B if rec.scaling == 1.0 else rec.lora_B.detach() * rec.scaling)


def _lora_linear(shared) -> LoRALinear:
    rec = shared.recovery
    return LoRALinear(shared.base_layer, _linear(rec.lora_A), _lora_b(rec))


def lora_modules(model: nn.Module, fuse: bool = True) -> int:
    """Replace every LoRA `SharedLinear` by its export form, in place (a gated target MLP whose three
    projections are all LoRA targets becomes a `FusedLoRAMLP` when `fuse`). Returns the number of fused MLPs.
    Other recoveries (none, scale) export as they are."""

    def is_lora(m) -> bool:
        return isinstance(m, SharedLinear) and type(m.recovery) is LoRARecovery

    fused = 0
    mlps = [(n, m) for n, m in model.named_modules() if all(is_lora(getattr(m, p, None)) for p in _GATED)]
    for name, mlp in mlps if fuse else []:
        gate, up, down = (getattr(mlp, p) for p in _GATED)
        if gate.recovery.rank != up.recovery.rank or not hasattr(mlp, "act_fn"):
            continue
        a = torch.cat([gate.recovery.lora_A.detach(), up.recovery.lora_A.detach()])  # (2r, in)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, FusedLoRAMLP(
            gate.base_layer, up.base_layer, _lora_linear(down), _linear(a), _lora_b(gate.recovery),
            _lora_b(up.recovery), mlp.act_fn))
        fused += 1
    for name, shared in shared_linears(model):
        if is_lora(shared):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, _lora_linear(shared))
    return fused
