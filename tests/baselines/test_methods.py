"""The four baselines on tiny random models: budgets met, the right structures removed, plain forward works."""

import pytest
import torch

import sharp
from sharp.baselines import calibration, prune
from sharp.errors import SharpError
from sharp.sharing import surgery
from tests.conftest import tiny_model

ARCHS = ["llama", "qwen2", "mistral", "gemma3_text", "phi3"]


def _examples(n=4, t=16, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, vocab, (t,), generator=g).tolist()), "labels": list(ids)}
            for _ in range(n)]


def _logits(model, seed=3):
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["layer-drop", "layer-drop-adapted", "mlp-drop", "width"])
def test_budget_met_within_one_channel_group(arch, method):
    model = tiny_model(arch)
    target = sharp.count_parameters(model)["stored"] - round(0.3 * sharp.count_parameters(model)["mlp_original"])
    report = prune(model, method, "30%", _examples(), "next:0-5")
    stored = sharp.count_parameters(model)["stored"]
    assert report.params_target == target and report.params_stored == stored
    grain = surgery.params_per_channel(model) * len(surgery.mlp_widths(model))
    assert target - grain <= stored <= target
    assert torch.isfinite(_logits(model)).all()


def test_layer_drop_removes_the_most_similar_contiguous_block():
    model = tiny_model()
    examples = _examples()
    per_block = surgery.block_parameters(model, 0)
    distances = calibration.block_distances(calibration.residual_streams(model, examples), 2)
    best = min(range(len(distances)), key=distances.__getitem__)
    target = sharp.count_parameters(model)["stored"] - 2 * per_block
    report = prune(model, "layer-drop", str(target), examples)
    assert report.dropped_layers == [best, best + 1] and report.fill_channels == 0
    assert model.config.num_hidden_layers == 4 == len(model.model.layers)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]


def test_layer_drop_equals_skipping_the_layers():
    """Dropping blocks = running the original model without them (the residual passes through)."""
    model = tiny_model()
    ref = tiny_model()
    surgery.drop_layers(model, [2, 3])
    keep = [layer for i, layer in enumerate(ref.model.layers) if i not in (2, 3)]
    ref.model.layers = torch.nn.ModuleList(keep)
    ref.config.num_hidden_layers = 4
    assert torch.allclose(_logits(model), _logits(ref))


def test_mlp_drop_without_budget_removes_exactly_the_targets():
    model = tiny_model()
    before = sharp.count_parameters(model)
    report = prune(model, "mlp-drop", None, None, "next:1-4")
    assert report.dropped_mlps == [2, 4]
    assert surgery.mlp_widths(model) == [48, 48, 0, 48, 0, 48]
    assert before["stored"] - sharp.count_parameters(model)["stored"] == 2 * surgery.mlp_parameters(tiny_model(), 2)


def test_dropped_mlp_outputs_zero():
    model = tiny_model()
    surgery.drop_mlps(model, [1])
    x = torch.randn(2, 5, 32)
    assert torch.equal(model.model.layers[1].mlp(x), torch.zeros(2, 5, 32))


def test_mlp_drop_with_budget_picks_the_targets_that_turn_the_stream_least():
    model = tiny_model()
    examples = _examples()
    distances = calibration.mlp_distances(model, examples)
    target = sharp.count_parameters(model)["stored"] - surgery.mlp_parameters(model, 0)
    report = prune(model, "mlp-drop", str(target), examples, "next:0-5")
    assert report.dropped_mlps == [min([1, 3, 5], key=distances.__getitem__)]


def test_layer_drop_adapted_drops_whole_target_blocks():
    model = tiny_model()
    report = prune(model, "layer-drop-adapted", None, None, "next:1-4")
    assert report.dropped_layers == [2, 4] and len(model.model.layers) == 4


def test_width_keeps_the_most_important_channels():
    model = tiny_model()
    examples = _examples()
    scores = calibration.taylor_importance(model, examples)
    gate = model.model.layers[0].mlp.gate_proj.weight.detach().clone()
    prune(model, "width", "50%", examples)
    width = surgery.mlp_width(model, 0)
    assert width == 24
    keep = sorted(torch.argsort(scores[0], descending=True)[:width].tolist())
    assert torch.equal(model.model.layers[0].mlp.gate_proj.weight, gate[keep])


def test_width_global_allocation_is_uneven_but_meets_budget():
    model = tiny_model()
    report = prune(model, "width", "50%", _examples(), allocation="global")
    widths = surgery.mlp_widths(model)
    assert sum(48 - w for w in widths) == sum(report.scores["removed_channels"])
    assert report.params_stored <= report.params_target


def test_taylor_importance_matches_autograd_by_hand():
    model = tiny_model()
    examples = _examples(2)
    scores = calibration.taylor_importance(model, examples)
    mlp = model.model.layers[3].mlp
    loss = sum(model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss
               for e in examples)
    grads = torch.autograd.grad(loss, [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight])
    expected = ((mlp.gate_proj.weight * grads[0]).abs().sum(1) + (mlp.up_proj.weight * grads[1]).abs().sum(1)
                + (mlp.down_proj.weight * grads[2]).abs().sum(0))
    assert torch.allclose(scores[3], expected.detach(), rtol=1e-4, atol=1e-7)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(method="nope", budget="30%"), "unknown --method"),
    (dict(method="width", budget=None), "needs a --budget"),
    (dict(method="mlp-drop", budget=None, strategy=None), "pass --strategy"),
    (dict(method="width", budget="30%", examples=None), "pass --data"),
    (dict(method="mlp-drop", budget="90%", strategy="next:0-3"), "only 2 targets"),
])
def test_user_errors(kwargs, fragment):
    kwargs = {"examples": _examples(), "strategy": kwargs.get("strategy", "next:0-5"), **kwargs}
    with pytest.raises(SharpError, match=fragment):
        prune(tiny_model(), **kwargs)


def test_width_keeps_what_torch_pruning_keeps_on_llama():
    """Cross-check with torch-pruning's dependency graph + Taylor importance (|w * dL/dw| summed over the group)."""
    import torch_pruning as tp

    examples = _examples(3)
    ours, theirs = tiny_model(), tiny_model()
    prune(ours, "width", "50%", examples)
    ignored = [theirs.lm_head, theirs.model.embed_tokens] + [layer.self_attn for layer in theirs.model.layers]
    ids = torch.tensor([examples[0]["input_ids"]])
    pruner = tp.pruner.MetaPruner(theirs, ids, importance=tp.importance.TaylorImportance("sum", normalizer=None),
                                  pruning_ratio=0.5, ignored_layers=ignored,
                                  forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits)
    for e in examples:
        theirs(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss.backward()
    pruner.step()
    for a, b in zip(ours.model.layers, theirs.model.layers, strict=True):
        assert torch.equal(a.mlp.gate_proj.weight, b.mlp.gate_proj.weight)
        assert torch.equal(a.mlp.down_proj.weight, b.mlp.down_proj.weight)
