"""Budgets: parsing (hypothesis), targets against a model, match:DIR against a sharp checkpoint."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import sharp
from sharp.baselines.budget import parse_budget, spread, target_stored
from sharp.errors import SharpError
from tests.conftest import tiny_model


@given(st.integers(1, 99))
def test_percent_round_trips(p):
    b = parse_budget(f"{p}%")
    assert b.kind == "mlp_fraction" and b.value == pytest.approx(p / 100)
    assert parse_budget(b.text) == b


@pytest.mark.parametrize("text, count", [("1000", 1000), ("107.5M", 107_500_000), ("250k", 250_000),
                                         ("1_000", 1000), ("1.2B", 1_200_000_000)])
def test_counts(text, count):
    assert parse_budget(text).kind == "count" and parse_budget(text).value == count


@pytest.mark.parametrize("text", ["", "0%", "100%", "150%", "-5", "forty", "40%%", "match:", "match:/no/such/dir",
                                  "3X"])
def test_malformed_budgets_are_one_line_errors(text):
    with pytest.raises(SharpError) as e:
        parse_budget(text)
    assert "\n" not in str(e.value)


@given(st.text(max_size=12))
def test_parser_never_crashes(text):
    try:
        parse_budget(text)
    except SharpError:
        pass


def test_percent_target_removes_that_share_of_mlp_weights():
    model = tiny_model()
    counts = sharp.count_parameters(model)
    assert target_stored(model, "40%") == counts["stored"] - round(0.4 * counts["mlp_original"])
    assert target_stored(model, "1000") == 1000
    with pytest.raises(SharpError, match="nothing to prune"):
        target_stored(model, str(counts["stored"]))


def test_match_reads_a_sharp_checkpoint(tmp_path):
    model = tiny_model()
    shared = sharp.share(tiny_model(), "next:1-4", "lora:2")
    sharp.save(shared, tmp_path / "ck")
    expected = sharp.count_parameters(shared)["stored"]
    assert expected < sharp.count_parameters(model)["stored"]
    assert target_stored(model, f"match:{tmp_path / 'ck'}") == expected


def test_spread():
    assert spread({"a": 100, "b": 101}) == pytest.approx(0.01)
    assert spread({"a": 5}) == 0.0
