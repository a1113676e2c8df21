"""The four pruning baselines SHARP is compared with, each cut to a stored-parameter budget.

    layer-drop           Gromov et al.: the contiguous block of n layers with the smallest angular distance
    layer-drop-adapted   whole blocks at the target layers of a SHARP strategy (no prediction)
    mlp-drop             only the MLPs of a SHARP strategy's target layers (attention kept)
    width                LLM-Pruner-style: the least important MLP channels (first-order Taylor), evenly per
                         layer or globally

Whole blocks and whole MLPs are coarse (a SmolLM2 block is 2.6% of the model), so after removing the largest
number n that still fits the budget, the remainder is taken as the least important MLP channels, evenly from the
MLPs left ("fill"). That is what keeps every row within a fraction of a percent of the same stored size; the
fill is reported. With a strategy and no budget, `layer-drop-adapted` and `mlp-drop` remove exactly the
strategy's targets and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sharp.arch import get_adapter
from sharp.baselines import calibration
from sharp.baselines.budget import Budget, stored_parameters, target_stored
from sharp.errors import SharpError
from sharp.sharing import surgery
from sharp.sharing.config import kept_layers

METHODS = ("layer-drop", "layer-drop-adapted", "mlp-drop", "width")
ALLOCATIONS = ("even", "global")


@dataclass
class PruneReport:
    """What a baseline removed; saved as `sharp_prune.json` next to the weights."""

    method: str
    budget: str = ""
    strategy: str = ""
    allocation: str = ""
    original_layers: int = 0
    params_original: int = 0
    params_target: int = 0
    params_stored: int = 0
    dropped_layers: list[int] = field(default_factory=list)  # original indices
    dropped_mlps: list[int] = field(default_factory=list)  # original indices (== current: no layer dropped)
    fill_channels: int = 0  # channels removed per remaining MLP to meet the budget exactly
    intermediate_sizes: list[int] = field(default_factory=list)  # per remaining layer
    scores: dict[str, list[float]] = field(default_factory=dict)
    healed: bool = False
    heal: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def base_layers(self) -> dict[int, int]:
        """{layer of the pruned model: its index in the original} (they differ after dropped blocks)."""
        if not self.original_layers:
            raise ValueError(f"this {self.method} report does not record the original model's layer count")
        return kept_layers(self.original_layers, self.dropped_layers)


def _targets(model: nn.Module, strategy: str | None, method: str) -> list[int]:
    from sharp.sharing.strategy import parse_strategy

    if not strategy:
        raise SharpError(f"--method {method} removes a SHARP strategy's target layers; pass --strategy (e.g. "
                         "next:6-29)")
    return sorted(parse_strategy(strategy).resolve(len(get_adapter(model).layers(model))))


def _need(model: nn.Module, target: int | None) -> int:
    return 0 if target is None else stored_parameters(model) - target


def _fill(model: nn.Module, remaining: int, examples: list[dict] | None, report: PruneReport) -> None:
    """Remove `remaining` parameters (rounded up) as the least important channels, evenly over the MLPs left."""
    if remaining <= 0:
        return
    widths = surgery.mlp_widths(model)
    live = [i for i, w in enumerate(widths) if w > 0]
    per_layer = math.ceil(remaining / (surgery.params_per_channel(model) * max(len(live), 1)))
    if not live or per_layer >= min(widths[i] for i in live):
        raise SharpError("the budget cannot be met by this method (it would empty the remaining MLPs); "
                         "choose a larger budget or another method")
    scores = calibration.taylor_importance(model, examples or [])
    for i in live:
        keep = torch.argsort(scores[i], descending=True)[: widths[i] - per_layer]
        surgery.keep_mlp_channels(model, i, keep)
    report.fill_channels = per_layer


def layer_drop(model: nn.Module, target: int, examples: list[dict], report: PruneReport) -> None:
    """Drop the contiguous block with the smallest angular distance, as long as the budget allows, then fill."""
    per_block = surgery.block_parameters(model, 0)
    n = min(_need(model, target) // per_block, len(get_adapter(model).layers(model)) - 1)
    if n > 0:
        distances = calibration.block_distances(calibration.residual_streams(model, examples), n)
        start = min(range(len(distances)), key=distances.__getitem__)
        report.scores[f"angular_distance_n{n}"] = distances
        report.dropped_layers = list(range(start, start + n))
        surgery.drop_layers(model, report.dropped_layers)
    _fill(model, _need(model, target), examples, report)


def layer_drop_adapted(model: nn.Module, target: int | None, examples: list[dict] | None, strategy: str,
                       report: PruneReport) -> None:
    """Drop whole blocks at the strategy's targets (all of them, or the n most similar ones under a budget)."""
    targets = _targets(model, strategy, "layer-drop-adapted")
    if target is not None:
        n = _need(model, target) // surgery.block_parameters(model, 0)
        if n > len(targets):
            raise SharpError(f"the budget needs {n} blocks dropped but strategy '{strategy}' has only {len(targets)} "
                             "targets; use a strategy with more targets or a larger budget")
        distances = calibration.block_distances(calibration.residual_streams(model, examples), 1)
        report.scores["angular_distance_n1"] = distances
        targets = sorted(sorted(targets, key=distances.__getitem__)[:n])
    report.dropped_layers = targets
    surgery.drop_layers(model, targets)
    _fill(model, _need(model, target), examples, report)


def mlp_drop(model: nn.Module, target: int | None, examples: list[dict] | None, strategy: str,
             report: PruneReport) -> None:
    """Remove the MLPs of the strategy's targets (all, or the n whose MLP turns the residual stream least)."""
    targets = _targets(model, strategy, "mlp-drop")
    if target is not None:
        n = _need(model, target) // surgery.mlp_parameters(model, targets[0])
        if n > len(targets):
            raise SharpError(f"the budget needs {n} MLPs removed but strategy '{strategy}' has only {len(targets)} "
                             "targets; use a strategy with more targets or a larger budget")
        distances = calibration.mlp_distances(model, examples)
        report.scores["mlp_angular_distance"] = distances
        targets = sorted(sorted(targets, key=distances.__getitem__)[:n])
    report.dropped_mlps = targets
    surgery.drop_mlps(model, targets)
    _fill(model, _need(model, target), examples, report)


def width(model: nn.Module, target: int, examples: list[dict], allocation: str, report: PruneReport) -> None:
    """Remove the least important MLP channels (Taylor): the same number per layer, or the globally lowest."""
    if allocation not in ALLOCATIONS:
        raise SharpError(f"unknown --allocation '{allocation}'; choose one of: {', '.join(ALLOCATIONS)}")
    channels = math.ceil(_need(model, target) / surgery.params_per_channel(model))
    widths = surgery.mlp_widths(model)
    scores = calibration.taylor_importance(model, examples)
    if allocation == "even":
        per_layer = math.ceil(channels / len(widths))
        if per_layer >= min(widths):
            raise SharpError("the budget removes every MLP channel; choose a larger budget")
        removed = [per_layer] * len(widths)
    else:
        flat = torch.cat([torch.stack([s, torch.full_like(s, i)], 1) for i, s in enumerate(scores)])  # (ΣI, 2)
        lowest = flat[torch.argsort(flat[:, 0])[:channels], 1].long()
        removed = torch.bincount(lowest, minlength=len(widths)).tolist()
    for i, s in enumerate(scores):
        keep = torch.argsort(s, descending=True)[: widths[i] - removed[i]]
        surgery.keep_mlp_channels(model, i, keep)
    report.scores["removed_channels"] = removed


def prune(
    model: nn.Module,
    method: str,
    budget: Budget | str | None = None,
    examples: list[dict] | None = None,
    strategy: str | None = None,
    allocation: str = "even",
) -> PruneReport:
    """Prune `model` in place with `method` to the stored-parameter `budget`; return what was removed."""
    if method not in METHODS:
        raise SharpError(f"unknown --method '{method}'; choose one of: {', '.join(METHODS)}")
    if budget is None and method in ("layer-drop", "width"):
        raise SharpError(f"--method {method} needs a --budget (e.g. 40% or match:DIR)")
    needs_data = budget is not None
    if needs_data and not examples:
        raise SharpError(f"--method {method} with a budget ranks layers or channels on calibration data; pass --data")
    report = PruneReport(method=method, budget="" if budget is None else getattr(budget, "text", str(budget)),
                         strategy=strategy or "", allocation=allocation if method == "width" else "",
                         original_layers=len(get_adapter(model).layers(model)),
                         params_original=stored_parameters(model))
    target = None if budget is None else target_stored(model, budget)
    report.params_target = target or 0
    if method == "layer-drop":
        layer_drop(model, target, examples, report)
    elif method == "layer-drop-adapted":
        layer_drop_adapted(model, target, examples, strategy, report)
    elif method == "mlp-drop":
        mlp_drop(model, target, examples, strategy, report)
    else:
        width(model, target, examples, allocation, report)
    report.params_stored = stored_parameters(model)
    report.intermediate_sizes = surgery.mlp_widths(model)
    return report
