"""The planner: exact on its cost model (checked by brute force), never worse than a pure strategy, and its
measured costs mean what they say."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sharp
from sharp.errors import SharpError
from sharp.recovery.planner import LayerCosts, Plan, measure_costs, plan_layers
from tests.conftest import tiny_model

REC = {4: 30, 16: 120}  # rank -> recovery parameters of one target


def _random_costs(seed: int, n: int, reach: int = 1) -> list[LayerCosts]:
    g = torch.Generator().manual_seed(seed)
    u = lambda: float(torch.rand(1, generator=g))  # noqa: E731
    share = lambda: {4: 0.8 * u(), 16: 0.5 * u()}  # noqa: E731
    return [LayerCosts(t, drop_mlp=u(), drop_block=1.5 * u(), share=share() if t else {}, mlp_params=300,
                       block_params=400, share_further={d: share() for d in range(2, min(reach, t) + 1)})
            for t in range(n)]


def _brute_force(costs, need, actions, protect=(0,), reach=1):
    best = None
    per_layer = []
    for c in costs:
        opts = [("keep", 0)]
        if c.layer not in protect:
            opts += [("share", r) for r in c.share if "share" in actions]
            opts += [(a, 0) for a in ("drop-mlp", "drop-block") if a in actions]
        per_layer.append(opts)
    for combo in itertools.product(*per_layer):
        removed = cost = 0.0
        ok = True
        for i, (name, r) in enumerate(combo):
            c = costs[i]
            if name == "share":  # the reference: the nearest earlier layer kept whole, at most `reach` back
                d = next((d for d in range(1, i + 1) if combo[i - d][0] == "keep"), None)
                if d is None or d > reach:
                    ok = False
                    break
                removed += c.mlp_params - REC[r]
                cost += c.share_at(d)[r]
            elif name == "drop-mlp":
                removed, cost = removed + c.mlp_params, cost + c.drop_mlp
            elif name == "drop-block":
                removed, cost = removed + c.block_params, cost + c.drop_block
        if ok and removed >= need and (best is None or cost < best - 1e-12):
            best = cost
    return best


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(100, 1200),
       st.sampled_from([("share",), ("share", "drop-mlp"), ("share", "drop-mlp", "drop-block"), ("drop-mlp",)]))
def test_plan_is_the_exact_optimum_of_its_cost(seed, need, actions):
    costs = _random_costs(seed, 6)
    expected = _brute_force(costs, need, actions)
    if expected is None:
        with pytest.raises(sharp.SharpError, match="no plan"):
            plan_layers(costs, need, REC, actions, unit=1)
        return
    plan = plan_layers(costs, need, REC, actions, unit=1)
    assert plan.cost == pytest.approx(expected, abs=1e-9)
    assert plan.removed >= need
    for t, (ref, _) in plan.shares.items():  # every reference keeps its own MLP and block
        assert ref == t - 1 and ref not in plan.shares and ref not in plan.mlp_drops + plan.block_drops


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(100, 1500), st.integers(2, 3))
def test_plan_with_farther_references_is_the_exact_optimum(seed, need, reach):
    costs = _random_costs(seed, 7, reach)
    expected = _brute_force(costs, need, ("share", "drop-mlp", "drop-block"), reach=reach)
    near = _brute_force(costs, need, ("share", "drop-mlp", "drop-block"), reach=1)
    if expected is None:
        with pytest.raises(sharp.SharpError, match="no plan"):
            plan_layers(costs, need, REC, unit=1)
        return
    plan = plan_layers(costs, need, REC, unit=1)
    assert plan.cost == pytest.approx(expected, abs=1e-9)
    assert near is None or plan.cost <= near + 1e-9  # reaching further never costs more
    assert plan.removed >= need
    touched = set(plan.shares) | set(plan.mlp_drops) | set(plan.block_drops)
    for t, (ref, _) in plan.shares.items():  # the nearest layer kept whole, within reach
        assert 1 <= t - ref <= reach and ref not in touched
        assert all(layer in touched for layer in range(ref + 1, t))


def test_mixing_never_loses_to_a_pure_strategy():
    costs = _random_costs(3, 8)
    need = 700
    mixed = plan_layers(costs, need, REC, unit=1)
    for pure in (("share",), ("drop-mlp",), ("drop-block",)):
        try:
            assert mixed.cost <= plan_layers(costs, need, REC, pure, unit=1).cost + 1e-12
        except sharp.SharpError:
            pass  # that pure strategy cannot reach the budget at all


def test_min_shared_makes_sharing_do_most_of_the_removal():
    costs = _random_costs(5, 10)
    for c in costs:  # dropping is cheap here, so the unconstrained plan avoids sharing
        c.drop_mlp /= 10
    free = plan_layers(costs, 1000, REC, unit=1)
    assert free.shared_fraction < 0.5
    constrained = plan_layers(costs, 1000, REC, min_shared=0.5, unit=1)
    assert constrained.shared_fraction >= 0.5 and constrained.removed >= 1000
    assert constrained.cost >= free.cost


def _mlp_and_layer_outputs(model, layer, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """What `layer`'s MLP returns and what the layer outputs on `batches`, every token, computed independently."""
    ys, hs = [], []
    h1 = layer.mlp.register_forward_hook(lambda m, a, o: ys.append(o))
    h2 = layer.register_forward_hook(lambda m, a, o: hs.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in (h1, h2):
        h.remove()
    return torch.cat(ys), torch.cat(hs)


def test_measured_costs_mean_what_they_say():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(128, (4, 20), generator=g)} for _ in range(4)]
    costs = measure_costs(model, batches, ranks=[0, 4, 16])
    assert [c.layer for c in costs] == list(range(6)) and costs[0].share == {}
    assert all(c.share_further == {} for c in costs)
    farther = measure_costs(model, batches, ranks=[0, 4, 16], reach=3)
    for c, f in zip(costs, farther, strict=True):  # reference t - 1: the same numbers; t - 2, t - 3 where they exist
        assert f.share == pytest.approx(c.share) and sorted(f.share_further) == list(range(2, min(3, c.layer) + 1))
        for by_rank in f.share_further.values():
            assert by_rank[16] <= by_rank[0] * (1 + 1e-6) and by_rank[0] <= c.drop_mlp * (1 + 1e-6)
    for c in costs[1:]:
        assert 0 < c.drop_mlp and 0 < c.drop_block
        assert c.share[16] <= c.share[4] + 1e-9 <= c.share[0] + 2e-9  # more rank, less error
        assert c.share[0] <= c.drop_mlp * (1 + 1e-6)  # the gate can always switch the reference off
    # drop-mlp cost = what the MLP writes, over the residual after the layer, computed independently
    layer = model.model.layers[3]
    y, h = _mlp_and_layer_outputs(model, layer, batches)
    assert costs[3].drop_mlp == pytest.approx(float((y.double() ** 2).sum() / (h.double() ** 2).sum()), rel=1e-6)


def test_gemma3_costs_count_what_the_layer_adds_after_its_post_norm():
    """Gemma3 adds post_feedforward_layernorm(mlp(x)) to the residual: drop-mlp costs that energy, and a share
    costs its relative error times it (so the gate still bounds a share by drop-mlp)."""
    model = tiny_model("gemma3_text")
    with torch.no_grad():
        model.model.layers[3].post_feedforward_layernorm.weight.fill_(2.0)  # not a unit norm: the two differ
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(128, (4, 20), generator=g)} for _ in range(2)]
    costs = measure_costs(model, batches, ranks=[0, 4])
    layer = model.model.layers[3]
    y, h = _mlp_and_layer_outputs(model, layer, batches)
    with torch.no_grad():
        added = float((layer.post_feedforward_layernorm(y).double() ** 2).sum() / (h.double() ** 2).sum())
    assert costs[3].drop_mlp == pytest.approx(added, rel=1e-6)
    assert abs(added - float((y.double() ** 2).sum() / (h.double() ** 2).sum())) > 0.1 * added
    assert all(c.share[4] <= c.share[0] * (1 + 1e-6) <= c.drop_mlp * (1 + 1e-6) for c in costs[1:])


def test_kl_cost_scores_each_action_end_to_end():
    model = tiny_model()
    mlps = [layer.mlp for layer in model.model.layers]
    with torch.no_grad():
        mlps[3].down_proj.weight.zero_()  # layer 3's MLP writes nothing: deleting it moves no prediction
        for name in ("gate_proj", "up_proj", "down_proj"):  # layer 5's MLP is layer 4's: sharing it is exact
            getattr(mlps[5], name).weight.copy_(getattr(mlps[4], name).weight)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(128, (4, 20), generator=g)} for _ in range(4)]
    residual = measure_costs(model, batches, ranks=[0, 4, 16])
    kl = measure_costs(model, batches, ranks=[0, 4, 16], cost="kl")
    assert kl[3].drop_mlp == pytest.approx(0.0, abs=1e-9)
    gate_only = measure_costs(model, batches, ranks=[0], cost="kl")  # the gate alone fits a copy exactly
    assert gate_only[5].share[0] < 1e-6 * gate_only[5].drop_mlp
    for c, r in zip(kl[1:], residual[1:], strict=True):
        assert c.drop_block > 0 and (c.drop_mlp > 0 or c.layer == 3)
        if r.share[4] > 1e-12:  # other ranks keep the residual cost's ratio to the measured (middle) rank
            assert c.share[0] / c.share[4] == pytest.approx(r.share[0] / r.share[4], rel=1e-6)
    only_shares = measure_costs(model, batches, ranks=[0, 4, 16], cost="kl", actions=["share"])
    assert all(c.drop_mlp == c.drop_block == math.inf for c in only_shares)  # not run: the plan cannot choose them
    assert only_shares[0].share == {} and [c.share for c in only_shares[1:]] == [c.share for c in kl[1:]]
    # drop-block on the first two sequences (40 tokens), computed independently: the model without layer 2
    kl = measure_costs(model, batches, ranks=[4], cost="kl", kl_tokens=40)
    ids = batches[0]["input_ids"][:2]
    with torch.no_grad():
        teacher = torch.log_softmax(model(input_ids=ids).logits, -1)
        model.model.layers = torch.nn.ModuleList([m for i, m in enumerate(model.model.layers) if i != 2])
        student = torch.log_softmax(model(input_ids=ids).logits, -1)
    expected = float((teacher.exp() * (teacher - student)).sum(-1).mean())
    assert kl[2].drop_block == pytest.approx(expected, rel=1e-4)
    with pytest.raises(SharpError, match="planner cost"):
        measure_costs(model, batches, ranks=[4], cost="loss")


def test_plan_counts_what_it_removes():
    plan = Plan(shares={2: (1, 4)}, mlp_drops=[4], removed=270 + 300, removed_by_sharing=270)
    assert plan.shared_fraction == pytest.approx(270 / 570)
    assert plan.to_dict()["shares"] == {"2": [1, 4]}
