"""Strategies that mix sharing with dropping MLPs and blocks: structure, counts, save/load, merge."""

from __future__ import annotations

import copy

import pytest
import torch

import sharp
from sharp.errors import SharpError
from sharp.sharing.shared import SharedLinear
from sharp.sharing.state import sharp_config
from sharp.sharing.strategy import parse_strategy
from tests.conftest import randomize_recovery, tiny_model

PLAN = "map:2=1@4,4=drop-mlp,5=drop-block"


def test_map_items_parse_and_spell_back():
    s = parse_strategy(" map:5=drop-block,2=1@4,4=drop-mlp ")
    assert s.pairs == ((2, 1),) and s.ranks == ((2, 4),) and s.mlp_drops == (4,) and s.block_drops == (5,)
    assert s.text == PLAN and parse_strategy(s.text) == s
    for bad, fragment in [("map:2=2", "own reference"), ("map:2=1,2=drop-mlp", "more than once"),
                          ("map:2=1,1=drop-mlp", "target and a reference"), ("map:2=1@0", "at least 1"),
                          ("map:2=drop", "malformed")]:
        with pytest.raises(SharpError, match=fragment):
            parse_strategy(bad)
    with pytest.raises(SharpError, match="planner"):
        parse_strategy("auto:40%").resolve(6)


def _planned():
    original = tiny_model()
    torch.manual_seed(0)
    model = sharp.share(copy.deepcopy(original), PLAN, "lora+gate:8")
    randomize_recovery(model)
    return original, model


def test_plan_builds_the_structure_it_names():
    original, model = _planned()
    layers = model.model.layers
    assert len(layers) == 5 and model.config.num_hidden_layers == 5
    assert isinstance(layers[2].mlp.down_proj, SharedLinear) and layers[2].mlp.down_proj.recovery.rank == 4
    assert layers[2].mlp.up_proj.base_layer is layers[1].mlp.up_proj
    assert layers[4].mlp.down_proj.in_features == 0  # MLP deleted: output exactly zero
    torch.testing.assert_close(layers[4].mlp(torch.randn(3, 32)), torch.zeros(3, 32))
    cfg = sharp_config(model)
    assert cfg.sharing == {2: 1} and cfg.ranks == {2: 4} and cfg.dropped_mlps == [4] and cfg.dropped_blocks == [5]
    assert cfg.base_layers(5) == {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}
    counts = sharp.count_parameters(model)
    base = sum(p.numel() for p in original.parameters())
    mlp = sum(p.numel() for p in original.model.layers[0].mlp.parameters())
    block = sum(p.numel() for p in original.model.layers[5].parameters())
    assert counts["original"] == base
    assert counts["stored"] == base - 2 * mlp - block + counts["recovery"]  # layer 2's and 4's MLPs, block 5
    rank4 = sum(sharp.sharing.recovery.parse_recovery("lora+gate:4").num_params(m.in_features, m.out_features)
                for m in (layers[2].mlp.gate_proj, layers[2].mlp.up_proj, layers[2].mlp.down_proj))
    assert counts["recovery"] == rank4


def test_planned_checkpoint_round_trips_and_merges(tmp_path):
    _, model = _planned()
    ids = torch.randint(128, (2, 12))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    sharp.save(model, tmp_path / "ck")
    loaded = sharp.load(tmp_path / "ck")
    assert sharp_config(loaded) == sharp_config(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
        merged = sharp.merge_sharing(sharp.load(tmp_path / "ck"))
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert sharp.count_parameters(loaded) == sharp.count_parameters(model)
    with pytest.raises(SharpError, match="adapter"):
        sharp.save(model, tmp_path / "ad", adapter_only=True)
        sharp.load(tmp_path / "ad", base=tiny_model())


def test_one_reference_serves_targets_across_a_dropped_block(tmp_path):
    """What the planner's --plan-reach 2-3 can write: layer 1 serves 3 and 4; block 2 between them is gone."""
    torch.manual_seed(0)
    model = sharp.share(tiny_model(), "map:2=drop-block,3=1@4,4=1", "lora+gate:8")
    randomize_recovery(model)
    layers = model.model.layers
    assert len(layers) == 5 and sharp_config(model).sharing == {2: 1, 3: 1}
    assert layers[2].mlp.up_proj.base_layer is layers[1].mlp.up_proj is layers[3].mlp.up_proj.base_layer
    ids = torch.randint(128, (2, 12))
    sharp.save(model, tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(sharp.load(tmp_path / "ck")(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("reach", [1, 3])
def test_planner_output_is_a_strategy_share_accepts(reach):
    from sharp.recovery.planner import plan_strategy
    from sharp.sharing.recovery import parse_recovery

    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(128, (4, 20), generator=g)} for _ in range(3)]
    text, plan, costs = plan_strategy(model, batches, parse_recovery("lora+gate:4"), "50%", reach=reach)
    assert all(1 <= t - ref <= reach for t, (ref, _) in plan.shares.items())
    shared = sharp.share(copy.deepcopy(model), text, "lora+gate:4")
    counts = sharp.count_parameters(shared)
    mlp_total = sum(p.numel() for i in range(6) for p in model.model.layers[i].mlp.parameters())
    assert counts["original"] - counts["stored"] >= 0.5 * mlp_total - 1000  # within one planning unit
    assert counts["original"] - counts["stored"] == plan.removed
    assert len(costs) == 6
