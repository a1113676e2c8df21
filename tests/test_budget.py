"""`sharp.budget.parse_budget`, the one `--budget` grammar of `sharp prune` and `sharp analyze`: each form, round
trips through `Budget.text` (hypothesis), one-line errors for everything else, and forms a command refuses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharp.budget import COUNT, MATCH, SHARE, Budget, parse_budget
from sharp.errors import SharpError


@pytest.mark.parametrize(("text", "value"), [("40%", 0.4), ("0.4", 0.4), (".4", 0.4), ("12.5%", 0.125),
                                             ("0.125", 0.125), (" 40 % ", 0.4), ("99.9%", 0.999)])
def test_a_share_of_mlp_weights_as_percent_or_fraction(text, value):
    assert parse_budget(text) == Budget(SHARE, pytest.approx(value))


def test_percent_and_fraction_are_the_same_budget():
    assert parse_budget("40%") == parse_budget("0.4") and parse_budget("40%").text == "40%"


@pytest.mark.parametrize(("text", "count"), [("1000", 1000), ("107.5M", 107_500_000), ("107500000", 107_500_000),
                                             ("250k", 250_000), ("1_000", 1000), ("1.2B", 1_200_000_000), ("1", 1),
                                             ("2.5K", 2500)])
def test_a_stored_parameter_count(text, count):
    assert parse_budget(text) == Budget(COUNT, count)


def test_match_names_an_existing_folder(tmp_path):
    assert parse_budget(f"match:{tmp_path}") == Budget(MATCH, path=str(tmp_path))


@pytest.mark.parametrize("text", ["", "abc", "0%", "0", "0.0", "100%", "150%", "-10%", "-5", "40%%", "forty",
                                  "3X", "1.5", "1.2345K", "match:", "match:/no/such/dir", "1e6", "nan", "inf"])
def test_anything_else_is_one_line_naming_the_forms(text):
    with pytest.raises(SharpError, match="budget") as e:
        parse_budget(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["abc", "1.5"])
def test_malformed_budgets_name_every_form(text):
    with pytest.raises(SharpError, match=r"40% or 0\.4.*107\.5M.*match:DIR"):
        parse_budget(text)


@pytest.mark.parametrize("text", ["107.5M", "5000"])
def test_a_command_taking_only_shares_refuses_counts_naming_what_it_takes(text, tmp_path):
    for refused in (text, f"match:{tmp_path}"):
        with pytest.raises(SharpError, match=r"this command's --budget takes a share .*\(40% or 0\.4\)$") as e:
            parse_budget(refused, forms=(SHARE,))
        assert "\n" not in str(e.value)
    assert parse_budget("0.4", forms=(SHARE,)).value == 0.4


shares = st.floats(min_value=0, max_value=1, exclude_min=True, exclude_max=True)


@given(shares)
def test_shares_round_trip(value):
    b = Budget(SHARE, value)
    assert parse_budget(b.text) == b


@given(st.integers(1, 99))
def test_whole_percents_keep_their_percent_text(p):
    assert parse_budget(f"{p}%").text == f"{p}%"


@given(st.integers(1, 10**15), st.sampled_from(["", "K", "M", "B"]))
def test_counts_round_trip(n, suffix):
    b = parse_budget(f"{n}{suffix}")
    assert b.kind == COUNT and b.value == n * {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}[suffix]
    assert parse_budget(b.text) == b


@given(st.one_of(st.text(max_size=20), st.text("0123456789.%_ kKmMbB-+e:", max_size=12),
                 st.builds(str, st.floats()), st.builds(lambda x: f"{x}%", st.floats())))
def test_garbage_raises_only_a_one_line_sharp_error(text):
    try:
        b = parse_budget(text)
    except SharpError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert b.kind in (SHARE, COUNT, MATCH) and parse_budget(b.text) == b
    assert 0 < b.value < 1 if b.kind == SHARE else b.kind != COUNT or b.value >= 1
