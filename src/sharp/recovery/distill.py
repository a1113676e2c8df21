"""Distillation losses of the SFT stage (`SFTConfig.loss`), over the response tokens (labels != -100):

    kd      T^2 KL(teacher || student) of the next-token distributions at temperature T, the teacher being the
            original, uncompressed model run alongside (no gradients)
    ce+kd   that plus the next-token cross-entropy on the data

The teacher's full distribution carries far more signal per token than the one-hot label, and it is the
distribution the compressed model should reproduce; the baselines' healing takes the same option.

`hidden_weight` > 0 adds a hidden-state term (intermediate-layer distillation): after every decoder layer of the
student, the squared distance of its residual stream from the teacher's after the same layer of the original
model (`teacher_layers`: student layer -> teacher layer; they differ after dropped blocks), relative to the
teacher's squared norm per token, over the same response tokens, averaged over the layers. The last pair compares
the final normed states both LM heads read, whichever layer came last. A shared MLP's layer then gets a signal of
its own, as in SLW, but end to end: the error it leaves is measured after the rest of its block.
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


def hidden_state_loss(
    student: tuple[torch.Tensor, ...],
    teacher: tuple[torch.Tensor, ...],
    keep: torch.Tensor,
    teacher_layers: dict[int, int] | None = None,
) -> torch.Tensor:
    """Sum over the kept positions of the per-token relative squared error ||s - t||^2 / ||t||^2 of the residual
    stream, averaged over the student's layers. `student` / `teacher`: the models' `hidden_states` (embeddings, then
    after each layer but the last, then the final normed state); `keep` (B, T) selects positions;
    `teacher_layers[i]`: the teacher layer that student layer i stands for (required when the layer counts differ;
    default: the same index). The last pair is the final normed states whichever layer came last in each model."""
    layers = len(student) - 1
    if teacher_layers is None:
        if len(student) != len(teacher):
            raise ValueError(f"hidden_state_loss: the student has {layers} layers, the teacher {len(teacher) - 1}; "
                             "pass teacher_layers (which teacher layer each student layer stands for)")
        teacher_layers = {i: i for i in range(layers)}
    if any(not 0 <= teacher_layers.get(i, -1) < len(teacher) - 1 for i in range(layers - 1)):
        raise ValueError(f"hidden_state_loss: teacher_layers must map each student layer 0..{layers - 2} to a teacher "
                         f"layer below {len(teacher) - 1}, got {teacher_layers}")
    index = keep.nonzero(as_tuple=True)  # the kept positions, found once for every layer
    pairs = [(i + 1, teacher_layers[i] + 1) for i in range(layers - 1)]
    pairs.append((layers, len(teacher) - 1))  # the final normed states, read by both LM heads
    dtype = torch.promote_types(student[0].dtype, torch.float32)  # 16-bit states are summed in float32
    total = student[0].new_zeros((), dtype=dtype)
    for s, t in pairs:
        mine, target = student[s][index].to(dtype), teacher[t][index].to(dtype)
        total = total + ((mine - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)).sum()
    return total / len(pairs)


def kd_loss(
    model: nn.Module,
    teacher: nn.Module,
    inputs: dict[str, torch.Tensor],
    kind: str,
    temperature: float,
    tokens: int | torch.Tensor | None = None,
    hidden_weight: float = 0.0,
    teacher_layers: dict[int, int] | None = None,
) -> tuple[torch.Tensor, object]:
    """(loss, the student's outputs) of `kind` ("kd" or "ce+kd") on a batch, summed over its response tokens and
    divided by `tokens` (default: the batch's own; under gradient accumulation the Trainer passes those of the
    whole accumulated batch, so the micro-batches add up to the mean); plus `hidden_weight` times the hidden-state
    term (see the module docstring)."""
    labels = inputs["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    keep = labels != IGNORE
    mask = inputs.get("attention_mask")
    hidden = hidden_weight > 0
    outputs = model(input_ids=inputs["input_ids"], attention_mask=mask, use_cache=False, output_hidden_states=hidden)
    student = outputs.logits[:, :-1][keep].float()  # (n, V)
    with torch.no_grad():
        teacher.to(student.device)
        taught = teacher(input_ids=inputs["input_ids"], attention_mask=mask, use_cache=False,
                         output_hidden_states=hidden)
        target = taught.logits[:, :-1][keep].float()  # (n, V)
    tokens = tokens if tokens is not None else keep.sum()
    loss = distillation_loss(student, target, temperature) / tokens
    if kind == "ce+kd":
        loss = loss + nn.functional.cross_entropy(student, labels[keep], reduction="sum") / tokens
    if hidden:
        states = [tuple(h[:, :-1] for h in out.hidden_states) for out in (outputs, taught)]
        loss = loss + hidden_weight * hidden_state_loss(*states, keep, teacher_layers) / tokens
    return loss, outputs
