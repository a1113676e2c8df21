"""Stored-parameter budgets: what `--budget` means and how many parameters a baseline must remove.

    40%          remove 40% of the model's MLP weights (SHARP's "MLP reduction"): target = stored - 0.4 * MLP
    107500000    keep this many stored parameters (also 107.5M, 250K, 1.2B)
    match:DIR    keep as many stored parameters as the sharp checkpoint (or pruned model) in DIR

Every budget resolves to one number, the *target stored parameter count*, so that baselines and SHARP rows are
compared at the same size: a SHARP model's recovery parameters count as stored, exactly like any kept weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from sharp.errors import SharpError

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}
BUDGET_FORMS = "40% (of MLP weights), an absolute stored-parameter count (107.5M) or match:DIR"


@dataclass(frozen=True)
class Budget:
    """A parsed budget: `kind` is "mlp_fraction", "count" or "match"."""

    kind: str
    value: float = 0.0
    path: str = ""

    @property
    def text(self) -> str:
        if self.kind == "mlp_fraction":
            return f"{self.value * 100:g}%"
        if self.kind == "match":
            return f"match:{self.path}"
        return str(int(self.value))


def parse_budget(text: str) -> Budget:
    """Check a budget's syntax (and that a `match:` folder exists) without loading a model."""
    if text.strip().startswith("match:"):
        path = text.strip()[len("match:"):]
        if not path or not Path(path).is_dir():
            raise SharpError(f"budget '{text}': '{path}' is not a folder; write match:DIR with DIR a sharp checkpoint")
        return Budget("match", path=path)
    s = text.strip().replace(" ", "").replace("_", "")
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)%", s):
        frac = float(m[1]) / 100
        if not 0 < frac < 1:
            raise SharpError(f"budget '{text}': a percentage of MLP weights must be between 0% and 100% (e.g. 40%)")
        return Budget("mlp_fraction", frac)
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)([KMB]?)", s.upper()):
        count = float(m[1]) * _SUFFIX[m[2]]
        if count < 1:
            raise SharpError(f"budget '{text}' keeps no parameters; give a positive count")
        return Budget("count", count)
    raise SharpError(f"malformed budget '{text}'; expected {BUDGET_FORMS}")


def stored_parameters(model: nn.Module) -> int:
    """Unique stored parameters (shared weights once, recovery included): what budgets are measured in."""
    from sharp.sharing.shared import count_parameters

    return count_parameters(model)["stored"]


def checkpoint_stored_parameters(path: str | Path) -> int:
    """Stored parameters of the model in `path` (a sharp checkpoint, a pruned model or a plain HF folder)."""
    from transformers import AutoModelForCausalLM

    from sharp.baselines.io import is_pruned, load_pruned
    from sharp.inspect import describe
    from sharp.io.checkpoint import is_sharp_checkpoint, load

    if is_sharp_checkpoint(path):
        model = load(path)
    elif is_pruned(path):
        model = load_pruned(path)
    elif (Path(path) / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        raise SharpError(f"budget match:{path}: not a model folder (no config.json); point at a sharp checkpoint")
    return int(describe(model)["params_stored"])


def target_stored(model: nn.Module, budget: Budget | str) -> int:
    """The stored-parameter count a baseline built from `model` must reach."""
    from sharp.sharing.shared import count_parameters

    budget = parse_budget(budget) if isinstance(budget, str) else budget
    counts = count_parameters(model)
    if budget.kind == "mlp_fraction":
        target = counts["stored"] - round(budget.value * counts["mlp_original"])
    elif budget.kind == "match":
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
