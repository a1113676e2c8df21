"""Budgets against a model: the stored-parameter target of each form, match:DIR against a sharp checkpoint.
(The grammar itself: tests/test_budget_grammar.py.)"""

import pytest

import sharp
from sharp.baselines.budget import spread, target_stored
from sharp.errors import SharpError
from tests.conftest import tiny_model


def test_percent_target_removes_that_share_of_mlp_weights():
    model = tiny_model()
    counts = sharp.count_parameters(model)
    assert target_stored(model, "40%") == counts["stored"] - round(0.4 * counts["mlp_original"])
    assert target_stored(model, "0.4") == target_stored(model, "40%")
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
