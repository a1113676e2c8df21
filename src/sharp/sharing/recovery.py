"""Recovery parameterizations: how a target layer's projection is rebuilt from its reference's weight.

Each is one small `nn.Module` (a `Recovery`) with a paired config, registered by name in `RECOVERIES`:

    none          W_t = W_ref                                   (Direct Sharing)
    lora:R        W_t = W_ref + s B A,        B: (out, R) zeros, A: (R, in), s = alpha / R
    scale         W_t = diag(g) W_ref diag(c),  g: (out,) ones,  c: (in,) ones (a gate plus input scales)
    lora+scale:R  W_t = diag(g) W_ref diag(c) + s B A
    gate          W_t = diag(g) W_ref,          g: (out,) ones
    lora+gate:R   W_t = diag(g) W_ref + s B A

Every parameterization starts as the identity (an untrained model equals Direct Sharing). `forward` calls the
reference module itself (`base(x)`), never reads its weight, so quantized references keep working.

The gate exists because adjacent MLPs of small models are functionally unrelated (SmolLM2: relative L2 of their
outputs 1.33): a low-rank correction on top of the full reference output spends its capacity cancelling the
reference. With a per-output-channel gate the fit can turn the reference down, and g = 0, B = 0 on the output
projection is exactly "MLP deleted", so a gated target never needs to be worse than dropping its MLP.

LoRA ranks take PEFT's scaling: `lora:64,alpha=128` computes s = alpha / R = 2 (default alpha = R, s = 1, which
is what checkpoints written before the option hold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sharp.errors import SharpError


@dataclass(frozen=True)
class RecoveryConfig:
    """A recovery spec such as `lora:32`. `rank` is 0 for parameterizations without one."""

    name: str
    rank: int = 0
    alpha: float | None = None  # LoRA scaling s = alpha / rank; None means alpha = rank (s = 1)

    def __post_init__(self) -> None:
        if self.name not in RECOVERIES:
            raise SharpError(f"unknown recovery '{self.name}'; choose one of: {', '.join(RECOVERY_FORMS)}")
        needs_rank = RECOVERIES[self.name].has_rank
        if needs_rank and self.rank < 1:
            raise SharpError(f"recovery '{self.name}' needs a rank of at least 1, e.g. {self.name}:32")
        if not needs_rank and self.rank:
            raise SharpError(f"recovery '{self.name}' takes no rank; write '{self.name}'")
        if self.alpha is not None:
            if not needs_rank:
                raise SharpError(f"recovery '{self.name}' has no LoRA, so it takes no alpha")
            if not (math.isfinite(self.alpha) and self.alpha > 0):
                raise SharpError(f"recovery alpha must be a positive number, got {self.alpha}")
            if self.alpha == self.rank:  # one spelling per configuration: alpha = rank is the default
                object.__setattr__(self, "alpha", None)

    def with_rank(self, rank: int) -> RecoveryConfig:
        """The same family at another rank (a planner's per-target rank)."""
        if not RECOVERIES[self.name].has_rank:
            raise SharpError(f"recovery '{self.text}' has no rank, so a per-target rank (T=R@K) cannot apply")
        return RecoveryConfig(self.name, rank, self.alpha)

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank if self.rank else 1.0

    @property
    def text(self) -> str:
        if not self.rank:
            return self.name
        return f"{self.name}:{self.rank}" + (f",alpha={self.alpha:g}" if self.alpha is not None else "")

    def build(self, in_features: int, out_features: int) -> Recovery:
        if self.rank > min(in_features, out_features):
            raise SharpError(
                f"recovery rank {self.rank} is larger than a {out_features}x{in_features} matrix allows "
                f"(at most {min(in_features, out_features)}); pick a smaller rank"
            )
        return RECOVERIES[self.name](in_features, out_features, self.rank, self.scaling)

    def num_params(self, in_features: int, out_features: int) -> int:
        return RECOVERIES[self.name].count(in_features, out_features, self.rank)


def parse_recovery(text: str) -> RecoveryConfig:
    """Parse `none`, `lora:R`, `scale`, `lora+scale:R`, `gate` or `lora+gate:R`; ranked forms take an optional
    `,alpha=A` (LoRA scaling A / R)."""
    body, _, option = text.strip().partition(",")
    name, _, rank = body.strip().partition(":")
    if name not in RECOVERIES:
        raise SharpError(f"unknown recovery '{text}'; choose one of: {', '.join(RECOVERY_FORMS)}")
    if rank and not rank.isdigit():
        raise SharpError(f"recovery '{text}': rank '{rank}' is not a positive integer (e.g. {name}:32)")
    alpha = None
    if option:
        key, _, value = option.strip().partition("=")
        try:
            alpha = float(value) if key.strip() == "alpha" else None
        except ValueError:
            alpha = None
        if alpha is None or not math.isfinite(alpha):
            raise SharpError(f"recovery '{text}': expected ',alpha=A' with a positive number A "
                             f"(e.g. {name}:32,alpha=64)")
    return RecoveryConfig(name, int(rank) if rank else 0, alpha)


class Recovery(nn.Module):
    """Base class: turns the reference projection into the target projection."""

    has_rank: ClassVar[bool] = False

    def __init__(self, in_features: int, out_features: int, rank: int = 0, scaling: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank, self.scaling = in_features, out_features, rank, scaling

    @staticmethod
    def count(in_features: int, out_features: int, rank: int) -> int:
        return 0

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return base(x)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The target's dense weight W_t given the reference weight W_ref (out, in)."""
        return weight

    def merged_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        return bias

    def reset_parameters(self) -> None:
        """Back to the identity (Direct Sharing)."""


class NoRecovery(Recovery):
    """Direct Sharing: the target uses the reference weight as is."""


class LowRankMixin:
    """Adds s B A (B: (out, R) zeros, A: (R, in)) to whatever the parameterization it is mixed into computes."""

    has_rank: ClassVar[bool] = True

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float = 1.0) -> None:
        super().__init__(in_features, out_features, rank, scaling)
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.rank))
        self.reset_parameters()

    @classmethod
    def count(cls, in_features: int, out_features: int, rank: int) -> int:
        return super().count(in_features, out_features, rank) + rank * (in_features + out_features)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / PEFT
            nn.init.zeros_(self.lora_B)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        out = x.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T  # (..., out)
        return (out * self.scaling if self.scaling != 1.0 else out).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s B A, the (out, in) low-rank correction."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def set_delta(self, b: torch.Tensor, a: torch.Tensor) -> None:
        """Store a fitted correction dW = b @ a (b: (out, R), a: (R, in)) so that s B A = dW."""
        with torch.no_grad():
            self.lora_B.copy_((b / self.scaling).to(self.lora_B.dtype))
            self.lora_A.copy_(a.to(self.lora_A.dtype))

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return super().forward(x, base) + self.delta(x)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return super().merged_weight(weight) + self.delta_weight().to(weight.dtype)


class LoRARecovery(LowRankMixin, Recovery):
    """W_t = W_ref + s B A, with B zero-initialized so training starts from Direct Sharing."""


class GateRecovery(Recovery):
    """W_t = diag(g) W_ref: one gate per output channel on the reference's output (bias gated too)."""

    def __init__(self, in_features: int, out_features: int, rank: int = 0, scaling: float = 1.0) -> None:
        super().__init__(in_features, out_features, rank, scaling)
        self.gate = nn.Parameter(torch.ones(out_features))

    @staticmethod
    def count(in_features: int, out_features: int, rank: int) -> int:
        return out_features

    def reset_parameters(self) -> None:
        nn.init.ones_(self.gate)

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return base(x) * self.gate.to(x.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.gate[:, None] * weight).to(weight.dtype)

    def merged_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        return None if bias is None else (bias * self.gate).to(bias.dtype)


class ScaleRecovery(GateRecovery):
    """W_t = diag(g) W_ref diag(c): the gate of each output channel and a scale of each input column (so the
    closed-form fit, which fits the gate, applies to it too)."""

    def __init__(self, in_features: int, out_features: int, rank: int = 0, scaling: float = 1.0) -> None:
        super().__init__(in_features, out_features, rank, scaling)
        self.col_scale = nn.Parameter(torch.ones(in_features))

    @staticmethod
    def count(in_features: int, out_features: int, rank: int) -> int:
        return in_features + out_features

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.ones_(self.col_scale)

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return super().forward(x * self.col_scale.to(x.dtype), base)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return super().merged_weight(weight * self.col_scale[None, :]).to(weight.dtype)


class LoRAScaleRecovery(LowRankMixin, ScaleRecovery):
    """W_t = diag(g) W_ref diag(c) + s B A."""


class LoRAGateRecovery(LowRankMixin, GateRecovery):
    """W_t = diag(g) W_ref + s B A: the gate turns the reference down, the low-rank term adds what it lacks."""


RECOVERIES: dict[str, type[Recovery]] = {
    "none": NoRecovery,
    "lora": LoRARecovery,
    "scale": ScaleRecovery,
    "lora+scale": LoRAScaleRecovery,
    "gate": GateRecovery,
    "lora+gate": LoRAGateRecovery,
}
RECOVERY_FORMS = ("none", "lora:R[,alpha=A]", "scale", "lora+scale:R[,alpha=A]", "gate", "lora+gate:R[,alpha=A]")
