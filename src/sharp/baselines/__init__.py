"""Pruning baselines at matched stored-parameter budgets (`sharp prune`) and the SHARP comparison (`sharp compare`).

    report = prune(model, "layer-drop", "40%", examples)     # in place; see methods.py for the four methods
    save_pruned(model, "out/", report, tokenizer)            # a (plain, when possible) smaller HF folder
    model, tokenizer = sharp.load_model("out/")              # any pruned folder loads through the one loader
"""

from sharp.baselines.budget import Budget, parse_budget, spread, stored_parameters, target_stored
from sharp.baselines.methods import ALLOCATIONS, METHODS, PruneReport, prune
from sharp.io.formats import is_pruned
from sharp.io.pruned import save_pruned  # re-exported: pruned folders are baselines

__all__ = [
    "ALLOCATIONS",
    "METHODS",
    "Budget",
    "PruneReport",
    "is_pruned",
    "parse_budget",
    "prune",
    "save_pruned",
    "spread",
    "stored_parameters",
    "target_stored",
]
