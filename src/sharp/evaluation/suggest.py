"""Suggest a sharing strategy for an MLP-reduction budget, from measured per-layer costs (beyond the paper).

The model: each candidate target t reuses its predecessor t-1 (the pairs `sharp analyze` measured), and costs
`c_t`, the measured damage of sharing that one layer alone. By preference `c_t = log(ppl_t / ppl_base)`, the
increase in mean NLL per token when only t's MLP is replaced by t-1's (single-layer replacement); without
perplexities, the relative L2 error of MLP_{t-1}(x) against MLP_t(x).

Constraints (what `map:` strategies and sharing itself allow): a target's reference keeps its own weights, so
no two targets are adjacent; layer 0 has no predecessor. Every MLP has the same size, so removing k of L MLPs
reduces MLP parameters by k / L; the budget (`sharp analyze --budget`, a share in `sharp.budget`'s grammar)
asks for at least ceil(budget * L) targets.

Among all such sets of exactly k targets, `suggest_strategy` picks the one with the least total cost, exactly
(dynamic programming over layers: f(i, j) = min(f(i-1, j), f(i-2, j-1) + c_i)). Total cost is additive in NLL,
a ranking and not a prediction: RESEARCH.md found that single-layer losses compound faster than additively.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from sharp.errors import SharpError
from sharp.sharing.strategy import parse_strategy


@dataclass(frozen=True)
class Suggestion:
    """A proposed strategy with its reasons."""

    strategy: str  # a string `parse_strategy` accepts
    targets: tuple[int, ...]
    reduction: float  # fraction of MLP parameters removed, k / L
    budget: float
    predicted_cost: float  # sum of the chosen layers' costs
    cost_source: str  # "delta_nll" (single-layer replacement) or "rel_l2"
    reasons: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def cost_table(analysis: dict) -> tuple[dict[int, float], str]:
    """Per-target costs from an `analysis.json`-shaped dict: single-layer replacement if measured, else rel L2."""
    replacement = analysis.get("replacement") or {}
    rows = replacement.get("layers") or []
    if rows:
        return {int(r["target"]): float(r["delta_nll"]) for r in rows}, "delta_nll"
    pairs = analysis.get("pairs") or []
    if not pairs:
        raise SharpError("the analysis holds neither single-layer replacement costs nor layer similarities")
    return {int(p["target"]): float(p["rel_l2"]) for p in pairs}, "rel_l2"


def max_targets(costs: dict[int, float], num_layers: int) -> int:
    """The most targets the constraints allow: no two adjacent, each with a known finite cost."""
    best, run = 0, 0  # run: length of the current stretch of usable layers
    for t in range(1, num_layers):
        if _usable(costs, t):
            run += 1
        else:
            best, run = best + (run + 1) // 2, 0
    return best + (run + 1) // 2


def _usable(costs: dict[int, float], t: int) -> bool:
    c = costs.get(t)
    return c is not None and math.isfinite(c)


def _choose(costs: dict[int, float], num_layers: int, k: int) -> list[int]:
    """The k non-adjacent usable layers in 1..L-1 of least total cost (exact; ties leave the later layer out)."""
    inf = math.inf
    # f[i][j]: least cost choosing j targets among layers 0..i (layer 0 is never a target)
    f = [[0.0] + [inf] * k for _ in range(num_layers)]
    take = [[False] * (k + 1) for _ in range(num_layers)]

    def before(i: int, j: int) -> float:  # f[i][j], with f[-1][0] = 0
        return f[i][j] if i >= 0 else (0.0 if j == 0 else inf)

    for i in range(1, num_layers):
        for j in range(1, k + 1):
            skip = f[i - 1][j]
            with_i = before(i - 2, j - 1) + costs[i] if _usable(costs, i) else inf
            if with_i < skip:
                f[i][j], take[i][j] = with_i, True
            else:
                f[i][j] = skip
    assert math.isfinite(f[num_layers - 1][k]), "the caller checks feasibility first"
    chosen, i, j = [], num_layers - 1, k
    while j > 0:
        if take[i][j]:
            chosen.append(i)
            i, j = i - 2, j - 1
        else:
            i -= 1
    return sorted(chosen)


def check_budget(budget: float, num_layers: int, candidates: range | None = None) -> None:
    """Fail before any measurement when no strategy of adjacent pairs (targets among `candidates`, default
    1..L-1) can meet `budget` on this model."""
    suggest_strategy(dict.fromkeys(candidates or range(1, num_layers), 0.0), num_layers, budget)


def strategy_text(targets: list[int]) -> str:
    """`next:A-B` when the targets are exactly A+1, A+3, ..., B; else `map:t=t-1,...`."""
    mapping = {t: t - 1 for t in targets}
    first, last = targets[0] - 1, targets[-1]
    compact = f"next:{first}-{last}"
    if last > first and parse_strategy(compact).resolve(last + 1) == mapping:
        return compact
    return "map:" + ",".join(f"{t}={t - 1}" for t in targets)


def suggest_strategy(costs: dict[int, float], num_layers: int, budget: float,
                     cost_source: str = "delta_nll") -> Suggestion:
    """The least-cost strategy removing at least `budget` of the MLP parameters (see the module doc)."""
    if not 0 < budget <= 1:
        raise SharpError(f"budget {budget} is out of range; it must be in (0, 1]")
    k = max(1, math.ceil(budget * num_layers - 1e-9))
    most = max_targets(costs, num_layers)
    if k > most:
        raise SharpError(
            f"a {budget:.0%} MLP reduction needs {k} of {num_layers} layers shared, but adjacent sharing allows "
            f"at most {most} ({most / num_layers:.0%}: each target reuses its predecessor, which keeps its weights); "
            "lower --budget or write a group:K strategy by hand"
        )
    targets = _choose(costs, num_layers, k)
    text = strategy_text(targets)
    total = sum(costs[t] for t in targets)
    unit = "Δ NLL/token" if cost_source == "delta_nll" else "rel. L2 error"
    reasons = [
        f"{k} of {num_layers} MLPs shared ({k / num_layers:.1%} of MLP parameters, budget {budget:.0%}); "
        f"each target reuses layer t-1",
        "chosen (target: cost): " + ", ".join(f"{t}: {costs[t]:.3g}" for t in targets),
    ]
    avoided = sorted((t for t in costs if t not in targets and _usable(costs, t)), key=lambda t: -costs[t])[:3]
    if avoided:
        reasons.append("most expensive layers left alone: " + ", ".join(f"{t}: {costs[t]:.3g}" for t in avoided))
    reasons.append(f"least total {unit} among non-adjacent sets of {k} targets: {total:.3g}"
                   + (f" (predicted ppl × {math.exp(min(total, 700.0)):.3g}; losses compound, so expect worse)"
                      if cost_source == "delta_nll" else ""))
    if cost_source != "delta_nll":
        reasons.append("costs are MLP output errors, a weak predictor of perplexity (on SmolLM2 the last layer "
                       "looks cheap here yet is the costliest to share); measure single-layer replacement "
                       "(--ppl-examples) for a better choice")
    return Suggestion(text, tuple(targets), k / num_layers, budget, total, cost_source, tuple(reasons))
