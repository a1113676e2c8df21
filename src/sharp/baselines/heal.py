"""`--heal`: fine-tune a pruned baseline with the same SFT as `sharp compress --train full-lora`.

A pruned model has no recovery parameters, so what SHARP trains as recovery + LoRA, a baseline trains as LoRA
alone: a PEFT LoRA of the same rank on every remaining linear layer (empty, removed MLPs excepted), the same
`run_sft` (AdamW, warmup + cosine, same steps, batch, learning rate and data), then merged back into the weights.
The healed model stores exactly as many parameters as the unhealed one.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path

from torch import nn

from sharp.errors import SharpError


def lora_parameters_per_rank(model: nn.Module) -> int:
    """Trainable parameters one unit of healing-LoRA rank adds: sum of (in + out) over the LoRA targets."""
    from sharp.recovery.trainable import full_lora_targets

    targets = set(full_lora_targets(model))
    return sum(m.in_features + m.out_features for n, m in model.named_modules() if n in targets)


def add_lora(model: nn.Module, rank: int) -> list[nn.Parameter]:
    """Inject the LoRA of `sharp compress --train full-lora` (`add_full_lora`: every non-empty linear but the LM
    head); freeze everything else. Returns the LoRA parameters."""
    from sharp.recovery.trainable import add_full_lora, full_lora_targets, lora_parameters

    if not full_lora_targets(model):
        raise SharpError("found no linear layer to heal with LoRA")
    add_full_lora(model, rank)
    for p in model.parameters():
        p.requires_grad_(False)
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params


def heal(
    model: nn.Module,
    train: Sequence[dict],
    eval_examples: Sequence[dict],
    sft_config=None,
    lora_rank: int = 8,
    pad_id: int = 0,
    work_dir: str | Path | None = None,
    log_file: str | Path | None = None,
    seed: int = 0,
    teacher: nn.Module | None = None,
    teacher_layers: dict[int, int] | None = None,
) -> dict:
    """SFT a pruned model in place (LoRA on every remaining linear, merged at the end); returns run_sft's summary
    with the LoRA rank and the SFT settings used (so a comparison can show they are SHARP's). `teacher` (the
    unpruned model) is needed when `sft_config.loss` distills; `teacher_layers` ({pruned layer: its original
    index}, `PruneReport.base_layers()`) pairs the layers of the kd losses' hidden-state term."""
    from transformers import set_seed

    from sharp.data import collate_examples
    from sharp.recovery.sft import SFTConfig, run_sft
    from sharp.recovery.trainable import merge_full_lora

    sft_config = sft_config or SFTConfig(seed=seed)
    set_seed(seed)  # as compress before add_full_lora: the LoRA A matrices start the same way
    add_lora(model, lora_rank)
    with tempfile.TemporaryDirectory(prefix="sharp-heal-") as tmp:
        summary = run_sft(model, train, eval_examples, sft_config, work_dir or tmp,
                          partial(collate_examples, pad_id=pad_id), log_file=log_file, teacher=teacher,
                          teacher_layers=teacher_layers)
    merge_full_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return dict(summary, lora_rank=lora_rank, config=asdict(sft_config))
