"""Distillation losses of the SFT stage (`SFTConfig.loss`), over the response tokens (labels != -100):

    kd      T^2 KL(teacher || student) of the next-token distributions at temperature T, the teacher being the
            original, uncompressed model run alongside (no gradients)
    ce+kd   that plus the next-token cross-entropy on the data

The teacher's full distribution carries far more signal per token than the one-hot label, and it is the
distribution the compressed model should reproduce; the baselines' healing takes the same option.
"""

from __future__ import annotations

import torch
from torch import nn

from sharp.data import IGNORE


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """sum over rows of T^2 KL(softmax(teacher / T) || softmax(student / T)); logits (n, V)."""
    t = temperature
    log_p = nn.functional.log_softmax(teacher / t, dim=-1)
    log_q = nn.functional.log_softmax(student / t, dim=-1)
    return (t * t) * (log_p.exp() * (log_p - log_q)).sum()


def kd_loss(
    model: nn.Module,
    teacher: nn.Module,
    inputs: dict[str, torch.Tensor],
    kind: str,
    temperature: float,
    tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, object]:
    """(loss, the student's outputs) of `kind` ("kd" or "ce+kd") on a batch, summed over its response tokens and
    divided by `tokens` (default: the batch's own; under gradient accumulation the Trainer passes those of the
    whole accumulated batch, so the micro-batches add up to the mean)."""
    labels = inputs["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    keep = labels != IGNORE
    mask = inputs.get("attention_mask")
    outputs = model(input_ids=inputs["input_ids"], attention_mask=mask, use_cache=False)
    student = outputs.logits[:, :-1][keep].float()  # (n, V)
    with torch.no_grad():
        teacher.to(student.device)
        target = teacher(input_ids=inputs["input_ids"], attention_mask=mask, use_cache=False).logits
        target = target[:, :-1][keep].float()  # (n, V)
    tokens = tokens if tokens is not None else keep.sum()
    loss = distillation_loss(student, target, temperature) / tokens
    if kind == "ce+kd":
        loss = loss + nn.functional.cross_entropy(student, labels[keep], reduction="sum") / tokens
    return loss, outputs
