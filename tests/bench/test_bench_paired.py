"""`sharp.bench.paired`: models decoding in turn, a decode speed ratio per round, the median's distribution-free
interval (the CLI's --paired is tested in test_bench.py). Nothing here checks a real speed: the drift test uses a
simulated clock."""

import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharp.bench.paired import median_interval, paired_decode, summarize
from sharp.errors import SharpError


def test_median_interval_order_statistics():
    xs = list(range(1, 21))  # n = 20: the textbook 95% interval is the 6th and 15th values
    lo, hi, coverage = median_interval([float(x) for x in reversed(xs)])
    assert (lo, hi) == (6.0, 15.0) and coverage == pytest.approx(0.9586, abs=1e-4)
    # too few for 95%: the full range, and how sure it is (1 - 2 / 2^5)
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) == (1.0, 5.0, 0.9375)
    with pytest.raises(SharpError, match="no paired rounds"):
        median_interval([])


@given(st.lists(st.floats(0.1, 10.0), min_size=1, max_size=60))
def test_median_interval_holds_the_median(values):
    lo, hi, coverage = median_interval(values)
    assert coverage >= (0.95 if len(values) >= 6 else 0.0)
    assert min(values) <= lo <= statistics.median(values) <= hi <= max(values)


def test_median_interval_covers_the_true_median_95_percent_of_the_time():
    rng = random.Random(0)
    trials = 2000
    hits = sum(lo <= 0.0 <= hi for lo, hi, _ in
               (median_interval([rng.gauss(0, 1) for _ in range(20)]) for _ in range(trials)))
    assert 0.93 <= hits / trials <= 0.985  # exact coverage for n = 20: 1 - 2 P(Binomial(20, 1/2) <= 5) = 0.959


def test_pairing_cancels_a_drifting_machine():
    """The machine slows down 3x over the run while model B is 10% slower than A: pooled medians (A measured
    first, then B) say B is far slower; the per-round ratios recover 0.90."""
    clock = {"calls": 0}
    order = []

    def decode_at(work: float):
        def decode(name, prompt, tokens):
            clock["calls"] += 1
            order.append(name)
            speed = 100.0 / (1 + clock["calls"] / 20)  # drift
            return 0.0, speed / work
        return decode

    models = [("A", decode_at(1.0), None), ("B", decode_at(1 / 0.9), None)]
    speeds = paired_decode(models, tokens=8, rounds=30)
    assert order[:2] == ["A", "B"] and order[2:6] == ["A", "B", "B", "A"]  # warm-ups, then rotated rounds
    a, b = summarize(speeds)
    assert a["ratio_median"] == 1.0 and a["ratio_ci95"] == [1.0, 1.0]
    assert b["ratio_median"] == pytest.approx(0.9, abs=0.02)
    lo, hi = b["ratio_ci95"]
    assert lo <= 0.9 <= hi + 0.01 and hi - lo < 0.05
    assert len(b["ratios"]) == 30


def test_paired_processes_pool_their_rounds():
    from sharp.bench.runner import pool_paired

    first = [{"decode_tok_s": [10.0, 10.0]}, {"decode_tok_s": [20.0, 20.0]}]
    other = [{"decode_tok_s": [9.0, 11.0], "ratio_median": 1.0}, {"decode_tok_s": [18.0, 18.0], "ratio_median": 0.9}]
    p = pool_paired(other, first)
    assert p["ratios"] == pytest.approx([0.9, 1.1, 0.9, 0.9]) and p["ratio_median"] == pytest.approx(0.9)
    assert p["process_medians"] == [1.0, 0.9]


def test_paired_refuses_what_it_cannot_measure():
    from sharp.bench.runner import bench

    with pytest.raises(SharpError, match="--compile"):
        bench(["no-such-model"], paired=2, compile=True)
