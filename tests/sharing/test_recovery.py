import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sharp.errors import SharpError
from sharp.sharing.recovery import RECOVERIES, parse_recovery

SPECS = ["none", "lora:3", "scale", "lora+scale:3", "gate", "lora+gate:3", "lora:3,alpha=6", "lora+gate:3,alpha=1.5"]


@pytest.mark.parametrize("spec", SPECS)
def test_untrained_recovery_is_the_identity(spec):
    base = nn.Linear(12, 7)
    rec = parse_recovery(spec).build(12, 7)
    x = torch.randn(5, 12)
    torch.testing.assert_close(rec(x, base), base(x))
    torch.testing.assert_close(rec.merged_weight(base.weight), base.weight)


@pytest.mark.parametrize("spec", SPECS)
def test_parameter_count_is_what_the_module_holds(spec):
    cfg = parse_recovery(spec)
    rec = cfg.build(12, 7)
    assert sum(p.numel() for p in rec.parameters()) == cfg.num_params(12, 7)


@pytest.mark.parametrize("spec", SPECS)
def test_forward_equals_the_merged_dense_layer(spec):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    rec = parse_recovery(spec).build(12, 7)
    with torch.no_grad():
        for p in rec.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(4, 12)
    expected = x @ rec.merged_weight(base.weight).T + rec.merged_bias(base.bias)
    torch.testing.assert_close(rec(x, base), expected, rtol=1e-5, atol=1e-5)


def test_lora_has_the_documented_formula():
    base = nn.Linear(4, 3, bias=False)
    rec = parse_recovery("lora:2").build(4, 3)
    with torch.no_grad():
        rec.lora_B.fill_(1.0)
    expected = base.weight + torch.ones(3, 2) @ rec.lora_A
    torch.testing.assert_close(rec.merged_weight(base.weight), expected)


@pytest.mark.parametrize(
    "text, fragment",
    [("lora", "needs a rank"), ("lora:0", "at least 1"), ("lora:x", "not a positive integer"),
     ("scale:4", "takes no rank"), ("dora:4", "unknown recovery"), ("", "unknown recovery")],
)
def test_bad_specs(text, fragment):
    with pytest.raises(SharpError, match=fragment):
        parse_recovery(text)


def test_rank_larger_than_the_matrix_is_refused():
    with pytest.raises(SharpError, match="larger than"):
        parse_recovery("lora:8").build(12, 7)


@given(st.text(max_size=20))
def test_recovery_parser_only_raises_sharp_error(text):
    try:
        cfg = parse_recovery(text)
    except SharpError:
        return
    assert cfg.name in RECOVERIES
    assert parse_recovery(cfg.text) == cfg
