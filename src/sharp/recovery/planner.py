"""A planner that may mix methods: per layer, share its MLP (with a recovery rank), drop its MLP, drop the whole
block, or keep it, under one stored-parameter budget, from cheap closed-form measurements.

Costs come from one pass of the original model over calibration data (`measure_costs`). For every layer t, with
h_t the residual stream entering it and what it adds to it measured in squared norm over the tokens:

    drop-mlp     || mlp_t(x) ||^2                       (what the MLP writes, lost)
    drop-block   || h_{t+1} - h_t ||^2                  (what attention and MLP write, lost)
    share(r)     || y - g * D_ref h_ref - M h_ref ||^2  at the closed-form optimum of a rank-r correction with a
                                                        gate (`closed_form.fit_ranks`), reference t - d

each divided by || h_{t+1} ||^2, so a cost is the relative perturbation of the residual stream at that layer
(`cost="residual"`, the default).
In SmolLM2 the attention sink's massive activation at position 0 dominates || h_{t+1} ||^2 from layer 11 on, so the
deep layers' costs come out tiny (1e-4 against 0.02-0.4 for layers 1-10). Averaging each token's perturbation
relative to its own residual instead was tried (one run, comparison_smollm2's budget): it moved the plan (7 shares,
among them layers 3, 12 and 28; blocks 13, 14, 17) and scored 11.07 / 22.57 / 78.12 (GPT4-Alpaca / DialogSum /
WikiText-2) against this cost's 11.04 / 21.82 / 73.17 — no better, so it is not offered.

`cost="kl"` scores each action end to end instead: applied alone (a share as its closed-form fit), the KL divergence
of the model's next-token distribution from the original's, averaged over the first calibration sequences holding
`KL_TOKENS` tokens; after the residual pass (the shares' fits come from it), one forward pass per layer and action
the plan may choose, shares at the middle rank only (a share's other ranks keep their residual costs' ratios to it).
It sees what the residual cost cannot: how much a layer's perturbation moves the loss after the layers above have
processed it. Measured once each at comparison_smollm2's budget (docs/results/comparison_smollm2_kl*.md, built at
5c9c2c4, which scored on whole batches of 4 sequences until 1,024 tokens; SmolLM2 on one core: 23 min to measure at
reach 1, 32 at reach 2, 42 at reach 3): at reach 1 it shares far more (10 MLPs at ranks 32-64 and one block dropped;
sharing 87% of the removal) and scored 10.96 / 19.89 / 82.34 (GPT4-Alpaca / DialogSum / WikiText-2) against the
residual cost's 11.04 / 21.82 / 73.17; at reach 2 (6 MLPs serving two targets each) 10.39 / 23.17 / 86.53; at reach
3 (11 shares, 4 references) 9.83 / 26.09 / 77.17. Rerun at reach 1 with this code (whole sequences up to the quota)
the plan moved its first three shares down one layer and scored 11.16 / 22.98 / 83.90: the earlier DialogSum lead
was that plan's, not the cost's. The plan follows its calibration tokens (the SLW data,
instructions there): level or better within noise on one instruction-style task at a time, worse beyond noise on
plain text; calibrated on C4 web text instead, it shares about as little as the 50% floor allows (54%; closed-form
shares keep less there). So the default stays "residual".

The plan minimizes the sum of the chosen costs subject to the parameters it removes (net of recovery parameters)
reaching the budget; a share's reference is the nearest earlier layer that keeps its own MLP and block, at most
`reach` layers back (reach 1: always t - 1, the paper's adjacent sharing; reach 2 or 3 lets a run of layers share
one MLP, or share across a dropped block, so that sharing can go where it is cheap instead of every other layer).
Measured once at comparison_smollm2's budget, reach 3 lowered the plan's summed cost by 32% (layer 10 serving 11-13,
18 serving 19-21, blocks 14, 15, 17) yet scored 10.41 / 24.81 / 76.39 against reach 1's 11.04 / 21.82 / 73.17
(GPT4-Alpaca / DialogSum / WikiText-2): better on GPT4-Alpaca within noise, worse on DialogSum beyond it, so the
default stays 1. Costs are summed as if independent, which they are not (RESEARCH.md: losses compound), so the plan
is a ranking, not a prediction.

Sharing where it fits and dropping where it does not can never lose to either alone *on this cost*: every pure
strategy (all shares, all MLP drops) is among the candidates the exact search (dynamic programming over layers)
compares. `min_shared` asks that shared MLPs account for at least that share of the removed parameters (SHARP's
own method doing most of the work); it is met by a Lagrangian penalty on the other actions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from sharp.arch import get_adapter, layer_hidden
from sharp.errors import SharpError
from sharp.recovery.closed_form import ProjectionStats, fit_ranks, float64
from sharp.recovery.distill import distillation_loss
from sharp.sharing.recovery import RecoveryConfig

ACTIONS = ("keep", "share", "drop-mlp", "drop-block")
COSTS = ("residual", "kl")
KL_TOKENS = 1024  # calibration tokens the "kl" cost scores each action on (one forward pass per action)
PROTECTED = (0,)  # layers a plan never changes by default (see plan_layers)


def check_plan_settings(actions: str, min_shared: float, reach: int, cost: str) -> None:
    """The planner's flags (--plan-actions, --plan-min-shared, --plan-reach, --plan-cost) checked before any weights
    load: the planner itself would only refuse them after the model loaded and its costs were measured."""
    names = {a.strip() for a in actions.split(",") if a.strip()}
    if not names or names - set(ACTIONS):
        raise SharpError(f"unknown --plan-actions '{actions}'; choose from {', '.join(ACTIONS[1:])} (comma-separated)")
    if not (math.isfinite(min_shared) and 0 <= min_shared <= 1):
        raise SharpError(f"--plan-min-shared is a share of the removed parameters in [0, 1], got {min_shared}")
    if min_shared > 0 and "share" not in names:
        raise SharpError("--plan-min-shared needs the share action in --plan-actions")
    if reach < 1:
        raise SharpError(f"--plan-reach must be at least 1 (the layer just before), got {reach}")
    if cost not in COSTS:
        raise SharpError(f"unknown --plan-cost '{cost}'; choose one of: {', '.join(COSTS)}")


@dataclass
class LayerCosts:
    """Measured costs of one layer's options (relative residual perturbations, or KL divergences with
    `cost="kl"`; inf where an action was not scored) and their parameter counts."""

    layer: int
    drop_mlp: float
    drop_block: float
    share: dict[int, float] = field(default_factory=dict)  # rank -> cost (reference = layer - 1); empty for 0
    mlp_params: int = 0
    block_params: int = 0
    share_further: dict[int, dict[int, float]] = field(default_factory=dict)  # d >= 2 -> rank -> cost (ref t - d)

    def share_at(self, distance: int) -> dict[int, float]:
        """rank -> cost of sharing with reference `layer - distance` (empty where not measured)."""
        return self.share if distance == 1 else self.share_further.get(distance, {})


@dataclass
class Plan:
    """What to do with each layer; `shares` maps target -> (reference, rank)."""

    shares: dict[int, tuple[int, int]] = field(default_factory=dict)
    mlp_drops: list[int] = field(default_factory=list)
    block_drops: list[int] = field(default_factory=list)
    removed: int = 0  # parameters removed, net of recovery parameters
    removed_by_sharing: int = 0  # of which by shared MLPs (net of their recovery)
    cost: float = 0.0

    @property
    def shared_fraction(self) -> float:
        return self.removed_by_sharing / self.removed if self.removed else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shares"] = {str(t): list(v) for t, v in sorted(self.shares.items())}
        d["shared_fraction"] = self.shared_fraction
        return d


@torch.no_grad()
def measure_costs(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], ranks: Iterable[int],
                  damping: float = 1e-4, max_tokens: int | None = None, reach: int = 1, cost: str = "residual",
                  kl_tokens: int = KL_TOKENS, actions: Iterable[str] = ACTIONS, protect: Iterable[int] = PROTECTED,
                  progress: bool = False) -> list[LayerCosts]:
    """One pass of `model` over `batches` (on the model's device; padding excluded, position 0 included): every
    layer's costs, accumulated in float64; shares with references up to `reach` layers back. `cost` "kl" then
    rescores the `actions` of every layer not in `protect` end to end (see the module docstring; the others get an
    infinite cost) on the first sequences of that pass holding `kl_tokens` tokens."""
    if reach < 1:
        raise SharpError(f"the planner's reach must be at least 1 (the layer just before), got {reach}")
    if cost not in COSTS:
        raise SharpError(f"unknown planner cost '{cost}'; choose one of: {', '.join(COSTS)}")
    if kl_tokens < 1:
        raise SharpError(f"the planner's KL needs at least 1 calibration token, got {kl_tokens}")
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    n = len(layers)
    ranks = sorted(set(ranks))
    inter = getattr(adapter.mlp(model, 0), adapter.mlp_projs[-1]).in_features
    stats = {(t, d): ProjectionStats.zeros(inter, model.config.hidden_size)
             for t in range(1, n) for d in range(1, min(reach, t) + 1)}
    mlp_e, block_e, resid_e = np.zeros(n), np.zeros(n), np.zeros(n)
    pre_e = np.zeros(n)  # the MLP's own output energy, before a post-norm (Gemma3); mlp_e is what it adds
    keep: dict[str, torch.Tensor] = {}
    seen = {"tokens": 0}
    calib: list[tuple[torch.Tensor, torch.Tensor]] = []  # the sequences the "kl" cost scores on

    def layer_hook(t: int):
        def hook(module, args, kwargs, output):
            h_in = float64((args[0] if args else kwargs["hidden_states"])[keep["mask"]])
            out = layer_hidden(output)
            h_out = float64(out[keep["mask"]])
            block_e[t] += float(((h_out - h_in) ** 2).sum())
            resid_e[t] += float((h_out**2).sum())
        return hook

    def mlp_hook(t: int):
        def hook(module, args, output):
            if keep.get("inner"):  # the reference's own hook, fired by the call below
                return
            x, y = args[0][keep["mask"]], output[keep["mask"]]
            post = adapter.mlp_post_norm(layers[t])
            energy = float((float64(y) ** 2).sum())
            pre_e[t] += energy
            mlp_e[t] += energy if post is None else float((float64(post(y)) ** 2).sum())
            for d in range(1, min(reach, t) + 1):
                keep["inner"] = True
                try:
                    h, p = _reference_features(adapter, adapter.mlp(model, t - d), x)
                finally:
                    keep["inner"] = False
                stats[t, d].add(h, p, y)  # fitted before any post-norm: the closed form is linear in it
        return hook

    handles = [layers[t].register_forward_hook(layer_hook(t), with_kwargs=True) for t in range(n)]
    handles += [adapter.mlp(model, t).register_forward_hook(mlp_hook(t)) for t in range(n)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            keep["mask"] = mask.bool()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            if cost == "kl":
                _take(calib, ids, mask, kl_tokens)
            seen["tokens"] += int(mask.sum())
            if max_tokens is not None and seen["tokens"] >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen["tokens"] == 0:
        raise SharpError("the planner's calibration data gave no tokens; give more data")
    out, fits = [], {}
    for t in range(n):
        norm = max(resid_e[t], 1e-30)
        # a share's error in what the layer adds: its relative error times that energy (after a post-norm)
        added = mlp_e[t] / pre_e[t] if adapter.mlp_post_norm(layers[t]) is not None and pre_e[t] > 0 else 1.0
        share = {d: {} for d in range(1, min(reach, t) + 1)}
        for d in share:
            by_rank = fit_ranks(stats[t, d], ranks, gate=True, damping=damping)
            for r, fit in by_rank.items():
                share[d][r] = fit.rel_err**2 * float(stats[t, d].yy.sum()) * added / norm
            if cost == "kl":
                fits[t, d] = by_rank[ranks[len(ranks) // 2]]
        out.append(LayerCosts(t, mlp_e[t] / norm, block_e[t] / norm, share.pop(1, {}),
                              sum(p.numel() for p in adapter.mlp(model, t).parameters()),
                              sum(p.numel() for p in layers[t].parameters()), share))
    if cost == "kl":
        _rescore_by_kl(model, calib, out, fits, ranks[len(ranks) // 2], set(actions), set(protect), progress)
    return out


def _take(calib: list, ids: torch.Tensor, mask: torch.Tensor, quota: int) -> None:
    """Append this batch's first sequences to `calib` until it holds `quota` tokens (bounds the teacher's
    stored logits at about `quota` x vocabulary)."""
    have = sum(int(m.sum()) for _, m in calib)
    rows = 0
    while rows < len(ids) and have < quota:
        have += int(mask[rows].sum())
        rows += 1
    if rows:
        calib.append((ids[:rows], mask[:rows]))


def _rescore_by_kl(model: nn.Module, calib: list[tuple[torch.Tensor, torch.Tensor]], costs: list[LayerCosts],
                   fits: dict, rank: int, actions: set[str], protect: set[int], progress: bool) -> None:
    """Replace each action's residual cost by the KL divergence of the final next-token distribution, the
    action applied alone (shares at `rank`, as fitted in `fits`; a share's other ranks keep their residual cost's
    ratio to it). Actions the plan cannot choose are not run and cost inf."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    tokens = sum(int(mask.sum()) for _, mask in calib)
    was_training = model.training
    model.eval()
    try:
        teacher = [_logits(model, ids, mask) for ids, mask in calib]

        def kl() -> float:
            total = sum(float(distillation_loss(_logits(model, ids, mask), t))
                        for t, (ids, mask) in zip(teacher, calib, strict=True))
            return max(total / tokens, 0.0)

        jobs = []
        for c in costs:
            if c.layer in protect:
                c.drop_mlp = c.drop_block = math.inf
                for by_rank in (c.share, *c.share_further.values()):
                    by_rank.update(dict.fromkeys(by_rank, math.inf))
                continue
            for action, module, hook in (("drop-mlp", adapter.mlp(model, c.layer), _zero_output),
                                         ("drop-block", layers[c.layer], _skip_block)):
                if action in actions:
                    jobs.append((c, action, 0, module, hook))
                else:
                    setattr(c, action.replace("-", "_"), math.inf)
            for d in [1, *c.share_further] if c.share else []:
                if "share" in actions:
                    jobs.append((c, "share", d, adapter.mlp(model, c.layer),
                                 _shared_output(adapter, adapter.mlp(model, c.layer - d), fits[c.layer, d])))
                else:
                    c.share_at(d).update(dict.fromkeys(c.share_at(d), math.inf))
        if progress:
            from rich.console import Console
            from rich.progress import track

            jobs = track(jobs, description="planner: KL of each action", console=Console(stderr=True),
                         transient=True)
        for c, action, d, module, hook in jobs:
            handle = module.register_forward_hook(hook, with_kwargs=action == "drop-block")
            try:
                value = kl()
            finally:
                handle.remove()
            if action == "drop-mlp":
                c.drop_mlp = value
            elif action == "drop-block":
                c.drop_block = value
            else:
                by_rank = c.share_at(d)
                base = by_rank[rank]
                for r in by_rank:  # a residual cost of 0 at the measured rank gives no ratio: all ranks get its KL
                    by_rank[r] = by_rank[r] * value / base if base > 1e-30 else value
    finally:
        model.train(was_training)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits at the real (unpadded) positions, float32: (tokens, vocab)."""
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()].float()


def _zero_output(module, args, output):
    return torch.zeros_like(output)


def _skip_block(module, args, kwargs, output):
    h = args[0] if args else kwargs["hidden_states"]
    return (h, *output[1:]) if isinstance(output, tuple) else h


def _reference_features(adapter, ref: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the reference MLP on `x`: (h, D h), its down projection's input and output."""
    *_, down_name = adapter.mlp_projs
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = getattr(ref, down_name).register_forward_hook(lambda m, a, o: captured.append((a[0], o)))
    try:
        ref(x)
    finally:
        handle.remove()
    return captured[0]


def _shared_output(adapter, ref: nn.Module, fit):
    """A hook making a target's MLP return the closed-form share: g * down_ref(h_ref) + h_ref (B A)^T."""

    def hook(module, args, output):
        h, p = _reference_features(adapter, ref, args[0])
        like = {"dtype": h.dtype, "device": h.device}
        y = fit.gate.to(**like) * p
        if fit.b is not None:
            y = y + (h @ fit.a.T.to(**like)) @ fit.b.T.to(**like)
        return y
    return hook


def recovery_params(recovery: RecoveryConfig, rank: int, shapes: Iterable[tuple[int, int]]) -> int:
    """Parameters of one target's recovery at `rank` (the spec's family) over its projections' (in, out) shapes."""
    spec = recovery.with_rank(rank)
    return sum(spec.num_params(i, o) for i, o in shapes)


def plan_layers(costs: list[LayerCosts], need: int, recovery_cost: Mapping[int, int],
                actions: Iterable[str] = ACTIONS, min_shared: float = 0.0, protect: Iterable[int] = PROTECTED,
                unit: int = 1000) -> Plan:
    """The least-cost choice per layer removing at least `need` parameters (net); see the module docstring.

    `recovery_cost`: rank -> recovery parameters of one target; `protect`: layers never changed (layer 0 by
    default: the first block turns embeddings into features every later layer relies on)."""
    actions = set(actions)
    unknown = actions - set(ACTIONS)
    if unknown:
        raise SharpError(f"unknown planner action(s) {sorted(unknown)}; choose from {', '.join(ACTIONS[1:])}")
    protect = set(protect)
    if need <= 0:
        return Plan()
    if min_shared > 0 and "share" not in actions:
        raise SharpError("min_shared needs the share action")
    best = _solve(costs, need, recovery_cost, actions, protect, unit, 0.0)
    if best is None:
        most = sum(max(c.block_params if "drop-block" in actions else 0, c.mlp_params) for c in costs
                   if c.layer not in protect)
        raise SharpError(f"no plan removes {need:,} parameters with actions {sorted(actions)} (at most about "
                         f"{most:,}); lower the budget or allow more actions")
    if best.shared_fraction >= min_shared:
        return best
    low, high = 0.0, 1.0  # penalty per removed parameter (in cost units per unit) on the non-sharing actions
    while (p := _solve(costs, need, recovery_cost, actions, protect, unit, high)) is not None \
            and p.shared_fraction < min_shared and high < 1e6:
        low, high = high, high * 4
    if p is None or p.shared_fraction < min_shared:
        raise SharpError(f"no plan removes {need:,} parameters with shared MLPs doing at least {min_shared:.0%} "
                         "of it; lower the budget or min_shared")
    best = p
    for _ in range(30):
        mid = (low + high) / 2
        p = _solve(costs, need, recovery_cost, actions, protect, unit, mid)
        if p is not None and p.shared_fraction >= min_shared:
            best, high = p, mid
        else:
            low = mid
    return best


def _solve(costs, need, recovery_cost, actions, protect, unit, penalty) -> Plan | None:
    """Exact DP over layers; state = (how far back the nearest layer that keeps its own MLP and block is: 1 to
    the reach, 0 when none is within reach; units removed, capped at the need). `penalty` (cost per removed unit)
    is added to the non-sharing actions (see `min_shared`)."""
    reach = max([1] + [d for c in costs for d in c.share_further])
    cap = math.ceil(need / unit)
    f = np.full((reach + 1, cap + 1), math.inf)  # f[back, s]: least cost with s units removed
    f[0, 0] = 0.0  # layer 0 has no predecessor to share with
    steps = []  # per layer: (options, chosen option, previous state, previous s) arrays over (state, s)
    for c in costs:
        options = [("keep", 0, 0, 0, 0.0)]  # (action, rank, reference distance, parameters removed, cost)
        if c.layer not in protect:
            if "share" in actions:
                options += [("share", r, d, c.mlp_params - recovery_cost[r], cost) for d in range(1, reach + 1)
                            for r, cost in c.share_at(d).items() if c.mlp_params > recovery_cost[r]]
            if "drop-mlp" in actions:
                options.append(("drop-mlp", 0, 0, c.mlp_params, c.drop_mlp + penalty * c.mlp_params / unit))
            if "drop-block" in actions:
                options.append(("drop-block", 0, 0, c.block_params,
                                c.drop_block + penalty * c.block_params / unit))
        g = np.full((reach + 1, cap + 1), math.inf)
        choice = np.full((reach + 1, cap + 1), -1)
        prev_of = np.zeros((reach + 1, cap + 1), dtype=np.int8)
        src_of = np.zeros((reach + 1, cap + 1), dtype=np.int64)
        for k, (name, _, distance, save, cost) in enumerate(options):
            units = min(save // unit, cap)
            for prev in range(reach + 1):
                if name == "share" and prev != distance:
                    continue  # the reference is the nearest earlier layer that keeps its own MLP and block
                state = 1 if name == "keep" else (prev + 1 if 0 < prev < reach else 0)
                cand = f[prev] + cost
                shifted = np.full(cap + 1, math.inf)
                src = np.zeros(cap + 1, dtype=np.int64)
                shifted[units:cap] = cand[: cap - units]
                src[units:cap] = np.arange(cap - units)
                tail = cand[cap - units :]  # every state that reaches the cap lands on it
                j = int(np.argmin(tail))
                if tail[j] < shifted[cap]:
                    shifted[cap], src[cap] = tail[j], cap - units + j
                better = shifted < g[state]
                g[state][better] = shifted[better]
                choice[state][better] = k
                prev_of[state][better] = prev
                src_of[state][better] = src[better]
        steps.append((options, choice, prev_of, src_of))
        f = g
    state = int(np.argmin(f[:, cap]))
    if not math.isfinite(f[state, cap]):
        return None
    plan, s = Plan(), cap
    for c, (options, choice, prev_of, src_of) in zip(reversed(costs), reversed(steps), strict=True):
        name, rank, distance, save, _ = options[choice[state, s]]
        if name == "share":
            plan.shares[c.layer] = (c.layer - distance, rank)
            plan.removed_by_sharing += save
            plan.cost += c.share_at(distance)[rank]
        elif name == "drop-mlp":
            plan.mlp_drops.append(c.layer)
            plan.cost += c.drop_mlp
        elif name == "drop-block":
            plan.block_drops.append(c.layer)
            plan.cost += c.drop_block
        plan.removed += save
        state, s = int(prev_of[state, s]), int(src_of[state, s])
    plan.mlp_drops.sort()
    plan.block_drops.sort()
    return plan


def removal_needed(model: nn.Module, budget: str) -> int:
    """Parameters a plan must remove for `budget` (`sharp.budget`'s grammar): `40%` or `0.4` = that share of the
    MLP parameters (net of recovery: what `next:` strategies report as MLP reduction), `107.5M` = the stored
    total to keep."""
    from sharp.budget import COUNT, SHARE, parse_budget

    adapter = get_adapter(model)
    total = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for i in range(len(adapter.layers(model))) for p in adapter.mlp(model, i).parameters())
    parsed = parse_budget(budget, (SHARE, COUNT), flag="auto:")
    if parsed.kind == SHARE:
        return int(round(parsed.value * mlp))
    if not parsed.value < total:
        raise SharpError(f"budget '{budget}' keeps {parsed.value:,.0f} parameters, not fewer than the model's "
                         f"{total:,}")
    return int(total - parsed.value)


def plan_strategy(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], recovery: RecoveryConfig,
                  budget: str, actions: Iterable[str] = ACTIONS, min_shared: float = 0.0,
                  max_tokens: int | None = None, reach: int = 1, cost: str = "residual",
                  progress: bool = False) -> tuple[str, Plan, list[LayerCosts]]:
    """Measure, plan and spell the plan as a `map:` strategy (ranks R/4, R/2, R, 2R of `recovery`'s family;
    references up to `reach` layers back)."""
    need = removal_needed(model, budget)
    adapter = get_adapter(model)
    mlp = adapter.mlp(model, 0)
    shapes = [(getattr(mlp, p).in_features, getattr(mlp, p).out_features) for p in adapter.mlp_projs]
    if not recovery.rank:
        raise SharpError(f"the planner allocates recovery ranks; pick a ranked recovery (e.g. lora+gate:64), not "
                         f"'{recovery.text}'")
    ranks = sorted({r for r in (recovery.rank // 4, recovery.rank // 2, recovery.rank, 2 * recovery.rank)
                    if 1 <= r <= min(min(shape) for shape in shapes)})
    actions = list(actions)
    costs = measure_costs(model, batches, ranks, max_tokens=max_tokens, reach=reach, cost=cost, actions=actions,
                          progress=progress)
    per_rank = {r: recovery_params(recovery, r, shapes) for r in ranks}
    unit = max(1000, need // 20000)
    plan = plan_layers(costs, need, per_rank, actions, min_shared, unit=unit)
    items = [f"{t}={ref}" + (f"@{r}" if r != recovery.rank else "") for t, (ref, r) in plan.shares.items()]
    items += [f"{t}=drop-mlp" for t in plan.mlp_drops] + [f"{t}=drop-block" for t in plan.block_drops]
    return "map:" + ",".join(sorted(items, key=lambda i: int(i.split("=")[0]))), plan, costs
