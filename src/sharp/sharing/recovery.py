"""Recovery parameterizations: how a target layer's projection is rebuilt from its reference's weight.

Each is one small `nn.Module` (a `Recovery`) with a paired config, registered by name in `RECOVERIES`:

    none          W_t = W_ref                                   (Direct Sharing)
    lora:R        W_t = W_ref + B A,          B: (out, R) zeros, A: (R, in)
    scale         W_t = diag(r) W_ref diag(c),  r: (out,) ones,  c: (in,) ones
    lora+scale:R  W_t = diag(r) W_ref diag(c) + B A

Every parameterization starts as the identity (an untrained model equals Direct Sharing). `forward` calls the
reference module itself (`base(x)`), never reads its weight, so quantized references keep working.
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

    def __post_init__(self) -> None:
        if self.name not in RECOVERIES:
            raise SharpError(f"unknown recovery '{self.name}'; choose one of: {', '.join(RECOVERY_FORMS)}")
        needs_rank = RECOVERIES[self.name].has_rank
        if needs_rank and self.rank < 1:
            raise SharpError(f"recovery '{self.name}' needs a rank of at least 1, e.g. {self.name}:32")
        if not needs_rank and self.rank:
            raise SharpError(f"recovery '{self.name}' takes no rank; write '{self.name}'")

    @property
    def text(self) -> str:
        return f"{self.name}:{self.rank}" if self.rank else self.name

    def build(self, in_features: int, out_features: int) -> Recovery:
        if self.rank > min(in_features, out_features):
            raise SharpError(
                f"recovery rank {self.rank} is larger than a {out_features}x{in_features} matrix allows "
                f"(at most {min(in_features, out_features)}); pick a smaller rank"
            )
        return RECOVERIES[self.name](in_features, out_features, self.rank)

    def num_params(self, in_features: int, out_features: int) -> int:
        return RECOVERIES[self.name].count(in_features, out_features, self.rank)


def parse_recovery(text: str) -> RecoveryConfig:
    """Parse `none`, `lora:R`, `scale` or `lora+scale:R`."""
    name, _, rank = text.strip().partition(":")
    if name not in RECOVERIES:
        raise SharpError(f"unknown recovery '{text}'; choose one of: {', '.join(RECOVERY_FORMS)}")
    if rank and not rank.isdigit():
        raise SharpError(f"recovery '{text}': rank '{rank}' is not a positive integer (e.g. {name}:32)")
    return RecoveryConfig(name, int(rank) if rank else 0)


class Recovery(nn.Module):
    """Base class: turns the reference projection into the target projection."""

    has_rank: ClassVar[bool] = False

    def __init__(self, in_features: int, out_features: int, rank: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank

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


class LoRARecovery(Recovery):
    """W_t = W_ref + B A, with B zero-initialized so training starts from Direct Sharing."""

    has_rank = True

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__(in_features, out_features, rank)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank))
        self.reset_parameters()

    @staticmethod
    def count(in_features: int, out_features: int, rank: int) -> int:
        return rank * (in_features + out_features)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / PEFT
        nn.init.zeros_(self.lora_B)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T).to(x.dtype)  # (..., out)

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return base(x) + self.delta(x)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_B @ self.lora_A).to(weight.dtype)


class ScaleRecovery(Recovery):
    """W_t = diag(r) W_ref diag(c): one scale per output row and per input column (bias scaled by r)."""

    def __init__(self, in_features: int, out_features: int, rank: int = 0) -> None:
        super().__init__(in_features, out_features, rank)
        self.row_scale = nn.Parameter(torch.ones(out_features))
        self.col_scale = nn.Parameter(torch.ones(in_features))

    @staticmethod
    def count(in_features: int, out_features: int, rank: int) -> int:
        return in_features + out_features

    def reset_parameters(self) -> None:
        nn.init.ones_(self.row_scale)
        nn.init.ones_(self.col_scale)

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return base(x * self.col_scale.to(x.dtype)) * self.row_scale.to(x.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.row_scale[:, None] * weight * self.col_scale[None, :]).to(weight.dtype)

    def merged_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        return None if bias is None else (bias * self.row_scale).to(bias.dtype)


class LoRAScaleRecovery(ScaleRecovery):
    """W_t = diag(r) W_ref diag(c) + B A."""

    has_rank = True

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__(in_features, out_features, rank)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank))
        self.reset_parameters()

    @staticmethod
    def count(in_features: int, out_features: int, rank: int) -> int:
        return ScaleRecovery.count(in_features, out_features, 0) + LoRARecovery.count(
            in_features, out_features, rank
        )

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "lora_A"):
            LoRARecovery.reset_parameters(self)

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return super().forward(x, base) + LoRARecovery.delta(self, x)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return LoRARecovery.merged_weight(self, super().merged_weight(weight))


RECOVERIES: dict[str, type[Recovery]] = {
    "none": NoRecovery,
    "lora": LoRARecovery,
    "scale": ScaleRecovery,
    "lora+scale": LoRAScaleRecovery,
}
RECOVERY_FORMS = ("none", "lora:R", "scale", "lora+scale:R")
