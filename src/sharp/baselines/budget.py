"""Stored-parameter budgets: how many parameters a baseline must keep to meet a `--budget`.

The grammar (40% or 0.4, 107.5M, match:DIR) is `sharp.budget.parse_budget`, shared by every command. Every budget
resolves to one number, the *target stored parameter count*, so that baselines and SHARP rows are compared at the
same size: a SHARP model's recovery parameters count as stored, exactly like any kept weight.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from sharp.budget import COUNT, MATCH, SHARE, Budget, parse_budget
from sharp.errors import SharpError

__all__ = ["COUNT", "MATCH", "SHARE", "Budget", "checkpoint_stored_parameters", "parse_budget", "spread",
           "stored_parameters", "target_stored"]


def stored_parameters(model: nn.Module) -> int:
    """Unique stored parameters (shared weights once, recovery included): what budgets are measured in."""
    from sharp.sharing.shared import count_parameters

    return count_parameters(model)["stored"]


def checkpoint_stored_parameters(path: str | Path) -> int:
    """Stored parameters of the model in `path` (a sharp checkpoint, a pruned model or a plain HF folder)."""
    from sharp.inspect import describe
    from sharp.io.models import load_model

    if not (Path(path) / "config.json").is_file():
        raise SharpError(f"budget match:{path}: not a model folder (no config.json); point at a sharp checkpoint")
    model, _ = load_model(str(path), tokenizer=False)
    return int(describe(model)["params_stored"])


def target_stored(model: nn.Module, budget: Budget | str) -> int:
    """The stored-parameter count a baseline built from `model` must reach."""
    from sharp.sharing.shared import count_parameters

    budget = parse_budget(budget) if isinstance(budget, str) else budget
    counts = count_parameters(model)
    if budget.kind == SHARE:
        target = counts["stored"] - round(budget.value * counts["mlp_original"])
    elif budget.kind == MATCH:
        target = checkpoint_stored_parameters(budget.path)
    else:
        target = int(budget.value)
    if target >= counts["stored"]:
        raise SharpError(f"budget '{budget.text}' keeps {target:,} parameters, not fewer than the model's "
                         f"{counts['stored']:,}; nothing to prune")
    return target


def spread(counts: dict[str, int]) -> float:
    """(max - min) / min of the stored-parameter counts: how far apart the compared rows are."""
    values = list(counts.values())
    return (max(values) - min(values)) / min(values) if values else 0.0
