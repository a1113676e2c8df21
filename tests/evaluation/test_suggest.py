"""Strategy suggestion: always a valid strategy that meets the budget, at the least additive cost."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharp.errors import SharpError
from sharp.evaluation.suggest import (
    check_budget,
    cost_table,
    max_targets,
    strategy_text,
    suggest_strategy,
)
from sharp.sharing.strategy import parse_strategy

costs_st = st.floats(min_value=-1.0, max_value=1e3, allow_nan=False)


@st.composite
def problems(draw, max_layers: int = 40):
    n = draw(st.integers(min_value=2, max_value=max_layers))
    costs = {t: draw(costs_st) for t in range(1, n)}
    budget = draw(st.floats(min_value=0.01, max_value=0.5))
    return n, costs, budget


@settings(max_examples=200, deadline=None)
@given(problems())
def test_suggestion_parses_resolves_and_meets_the_budget(problem):
    n, costs, budget = problem
    try:
        s = suggest_strategy(costs, n, budget)
    except SharpError:
        assert math.ceil(budget * n - 1e-9) > max_targets(costs, n)  # refused only when infeasible
        return
    mapping = parse_strategy(s.strategy).resolve(n)
    assert sorted(mapping) == list(s.targets)
    assert all(ref == t - 1 for t, ref in mapping.items())  # adjacent references
    assert not set(mapping) & set(mapping.values())  # a target is never a reference
    assert len(mapping) / n >= budget - 1e-12
    assert s.reduction == pytest.approx(len(mapping) / n)
    assert s.predicted_cost == pytest.approx(sum(costs[t] for t in mapping))


@settings(max_examples=150, deadline=None)
@given(problems(max_layers=11))
def test_suggestion_is_the_cheapest_valid_set(problem):
    n, costs, budget = problem
    k = max(1, math.ceil(budget * n - 1e-9))
    valid = [c for c in itertools.combinations(range(1, n), k) if all(b - a > 1 for a, b in itertools.pairwise(c))]
    if not valid:
        with pytest.raises(SharpError, match="at most"):
            suggest_strategy(costs, n, budget)
        return
    best = min(sum(costs[t] for t in c) for c in valid)
    assert suggest_strategy(costs, n, budget).predicted_cost == pytest.approx(best, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=6, max_value=40), st.data())
def test_a_layer_with_a_huge_cost_is_avoided(n, data):
    costs = {t: data.draw(costs_st) for t in range(1, n)}
    huge = data.draw(st.integers(min_value=1, max_value=n - 1))
    costs[huge] = 1e9
    budget = data.draw(st.floats(min_value=0.01, max_value=0.3))
    s = suggest_strategy(costs, n, budget)  # 30% of n >= 6 layers always leaves room around one layer
    assert huge not in s.targets
    assert f"{huge}: 1e+09" in s.reasons[2]  # named among the layers left alone


def test_smollm2_like_costs_pick_cheap_middle_layers():
    # RESEARCH.md: sharing 28 or 29 alone is catastrophic, 16-27 cost +15-43%
    costs = {t: math.log(1.3) for t in range(1, 30)}
    costs.update({28: math.log(57.7 / 5.13), 29: math.log(152 / 5.13), 1: math.log(3.0)})
    s = suggest_strategy(costs, 30, 0.2)
    assert len(s.targets) == 6
    assert not {1, 28, 29} & set(s.targets)


def test_unmeasured_layers_are_never_chosen():
    costs = {1: 0.1, 2: 0.1, 3: math.inf, 4: 5.0, 5: 0.1, 7: 0.2}  # 6 and 8 unmeasured, 3 unusable
    s = suggest_strategy(costs, 9, 0.3)  # 3 targets
    assert len(s.targets) == 3 and {5, 7} <= set(s.targets)
    assert not {3, 4, 6, 8} & set(s.targets)
    assert s.predicted_cost == pytest.approx(0.4)


def test_strategy_text_prefers_next_when_it_is_exact():
    assert strategy_text([1, 3, 5]) == "next:0-5"
    assert strategy_text([17, 19, 21]) == "next:16-21"
    assert strategy_text([2, 5]) == "map:2=1,5=4"
    assert strategy_text([4]) == "next:3-4"


def test_budget_beyond_half_is_refused_with_one_line():
    with pytest.raises(SharpError, match="at most 15"):
        suggest_strategy({t: 0.1 for t in range(1, 30)}, 30, 0.6)


def test_cost_table_prefers_replacement_then_rel_l2():
    pairs = [{"reference": 0, "target": 1, "rel_l2": 1.2}, {"reference": 1, "target": 2, "rel_l2": 1.4}]
    assert cost_table({"pairs": pairs}) == ({1: 1.2, 2: 1.4}, "rel_l2")
    replacement = {"base": 5.0, "layers": [{"target": 1, "reference": 0, "ppl": 6.0, "delta_nll": 0.18}]}
    assert cost_table({"pairs": pairs, "replacement": replacement}) == ({1: 0.18}, "delta_nll")
    with pytest.raises(SharpError):
        cost_table({})


def test_check_budget_matches_the_suggestion_limit():
    check_budget(0.5, 30)
    with pytest.raises(SharpError, match="at most 15"):
        check_budget(0.51, 30)
