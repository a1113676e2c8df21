import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharp.errors import SharpError
from sharp.sharing.strategy import parse_strategy


def test_next_pairs_each_odd_offset_with_its_predecessor():
    assert parse_strategy("next:6-29").resolve(30) == {t: t - 1 for t in range(7, 30, 2)}
    assert parse_strategy("next:1-4").resolve(5) == {2: 1, 4: 3}


def test_group_uses_first_layer_of_each_group():
    assert parse_strategy("group:3:3-29").resolve(30) == {
        t: t - (t - 3) % 3 for t in range(3, 30) if (t - 3) % 3
    }
    assert parse_strategy("group:3:0-4").resolve(5) == {1: 0, 2: 0, 4: 3}
    assert parse_strategy("group:9:0-4").resolve(5) == {1: 0, 2: 0, 3: 0, 4: 0}  # one short group


@given(a=st.integers(0, 40), length=st.integers(1, 40))
def test_group2_equals_next(a, length):
    b = a + length
    assert parse_strategy(f"group:2:{a}-{b}").resolve(100) == parse_strategy(f"next:{a}-{b}").resolve(100)


def test_map_round_trips_its_canonical_text():
    s = parse_strategy("map: 5=4, 3=2")
    assert s.resolve(6) == {3: 2, 5: 4}
    assert parse_strategy(s.text) == s


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("next:4-2", "after its end"),
        ("next:3-3", "one layer"),
        ("next:6-40", "out of range"),
        ("map:3=3", "its own reference"),
        ("map:3=2,3=4", "more than once"),
        ("map:3=2,2=1", "both a target and a reference"),
        ("map:9=8", "out of range"),
        ("group:1:0-4", "at least 2"),
        ("nxt:1-2", "malformed"),
        ("next:a-b", "malformed"),
        ("", "malformed"),
        ("map:", "malformed"),
    ],
)
def test_bad_strategies_get_one_line_errors(text, fragment):
    with pytest.raises(SharpError) as e:
        parse_strategy(text).resolve(30 if "40" in text else 6)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@settings(max_examples=300)
@given(st.text(max_size=30))
def test_parser_never_crashes_with_anything_but_sharp_error(text):
    try:
        mapping = parse_strategy(text).resolve(12)
    except SharpError:
        return
    assert mapping, "a strategy that parses selects at least one target"
    targets, refs = set(mapping), set(mapping.values())
    assert not targets & refs
    assert all(0 <= layer < 12 for layer in targets | refs)
    assert all(t != r for t, r in mapping.items())


@given(
    st.dictionaries(st.integers(0, 30), st.integers(0, 30), min_size=1, max_size=8)
)
def test_valid_maps_resolve_to_themselves(pairs):
    text = "map:" + ",".join(f"{t}={r}" for t, r in pairs.items())
    valid = all(t != r for t, r in pairs.items()) and not set(pairs) & set(pairs.values())
    if valid:
        assert parse_strategy(text).resolve(31) == pairs
    else:
        with pytest.raises(SharpError):
            parse_strategy(text).resolve(31)
