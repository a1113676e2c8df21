"""What each training stage may update, chosen by module type (never by name matching).

    recovery    only the `Recovery` modules of shared layers (default for SLW and SFT)
    full-lora   recovery + a PEFT LoRA on every linear layer outside the shared projections (the paper's
                downstream runs); `merge_full_lora` folds those LoRAs back into the weights before saving
    +shared     (suffix: `recovery+shared`, `full-lora+shared`) also the reference weights of every shared
                projection. They are stored once whatever their values, so training them costs no storage (RRT
                trains its shared block the same way); they then serve the reference and its targets at once.
    none        everything frozen (evaluation)

A shared model reaches each reference projection under two names (its own and a target's `base_layer`).
PEFT is therefore pointed at exact module names that exclude every `SharedLinear`'s insides, and each
`SharedLinear` is re-linked to the LoRA-wrapped reference afterwards, so a target sees exactly what its
reference sees, in training and after merging.
"""

from __future__ import annotations

import logging

from torch import nn

from sharp.errors import SharpError
from sharp.sharing.shared import recoveries, relink_shared, shared_linears, unique_parameters

log = logging.getLogger(__name__)

TRAIN_CHOICES = ("recovery", "full-lora", "recovery+shared", "full-lora+shared", "none")


def mark_trainable(model: nn.Module, stage: str = "recovery") -> dict[str, int]:
    """Freeze everything, then unfreeze what `stage` trains. Returns and logs the counts.

    Counts are over unique tensors: `trainable`, `frozen`, `shared` (reference weights also used by a target).
    """
    if stage not in TRAIN_CHOICES:
        raise SharpError(f"unknown --train '{stage}'; choose one of: {', '.join(TRAIN_CHOICES)}")
    for p in model.parameters():
        p.requires_grad_(False)
    if stage != "none":
        recs = recoveries(model)
        if not recs:
            raise SharpError("the model has no recovery parameters to train; build it with sharp.share() first")
        for _, rec in recs:
            for p in rec.parameters():
                p.requires_grad_(True)
    if stage.startswith("full-lora"):
        for p in lora_parameters(model):
            p.requires_grad_(True)
    if stage.endswith("+shared"):
        for p in shared_reference_parameters(model):
            p.requires_grad_(True)
    counts = trainable_counts(model)
    log.info(
        "stage %s: %s trainable, %s frozen (%s of them shared by a reference and its targets)",
        stage, f"{counts['trainable']:,}", f"{counts['frozen']:,}", f"{counts['shared']:,}",
    )
    return counts


def shared_reference_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The reference projections' own weights (and biases) that some target reuses, each once. A LoRA-wrapped
    reference (full-lora) contributes its frozen base weight, not its LoRA."""
    seen: dict[int, nn.Parameter] = {}
    for _, shared in shared_linears(model):
        base = shared.base_layer
        base = base.get_base_layer() if hasattr(base, "get_base_layer") else base
        for p in base.parameters(recurse=False):
            seen.setdefault(id(p), p)
    return list(seen.values())


def trainable_counts(model: nn.Module) -> dict[str, int]:
    shared_ids = {id(p) for _, s in shared_linears(model) for p in s.base_layer.parameters()}
    unique = [t for _, t in unique_parameters(model)]
    return {
        "trainable": sum(t.numel() for t in unique if t.requires_grad),
        "frozen": sum(t.numel() for t in unique if not t.requires_grad),
        "shared": sum(t.numel() for t in unique if id(t) in shared_ids),
    }


def full_lora_targets(model: nn.Module) -> list[str]:
    """The linears full-lora puts a LoRA on: every one but the LM head, the shared projections' insides and the
    empty ones a deleted MLP leaves (a LoRA there would count as trained parameters and never change)."""
    inside_shared = {f"{n}.{sub}" for n, s in shared_linears(model) for sub, _ in s.named_modules() if sub}
    lm_head = model.get_output_embeddings()
    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and n not in inside_shared and m is not lm_head
                  and m.weight.numel() > 0)


def add_full_lora(model: nn.Module, rank: int = 8) -> nn.Module:
    """Inject PEFT LoRA (rank `rank`, alpha 2 * rank) on each of `full_lora_targets`, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = full_lora_targets(model)
    if not targets:
        raise SharpError("found no linear layer to put LoRA on; use --train recovery")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
    inject_adapter_in_model(config, model)
    relink_shared(model)  # targets now reuse the LoRA-wrapped reference, as the reference itself does
    return model


def merge_full_lora(model: nn.Module) -> nn.Module:
    """Fold every PEFT LoRA into its base weight and put the plain module back (before `sharp.save`)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer) and not _inside_shared(model, name):
            module.merge()
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, module.get_base_layer())
    relink_shared(model)
    return model


def _inside_shared(model: nn.Module, name: str) -> bool:
    return any(name.startswith(n + ".") for n, _ in shared_linears(model))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    from peft.tuners.lora import LoraLayer

    params = []
    for _, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for attr in module.adapter_layer_names:
                params.extend(getattr(module, attr).parameters())
    if not params:
        raise SharpError("--train full-lora needs LoRA layers; call add_full_lora(model) first")
    return params
