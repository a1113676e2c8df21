import torch

import sharp
from sharp.recovery.trainable import mark_trainable
from sharp.sharing.shared import SharedLinear, count_parameters, recoveries, shared_linears, unique_parameters
from tests.conftest import tiny_model


def test_reference_weight_is_one_object_not_a_copy():
    model = tiny_model()
    sharp.share(model, "next:1-4", "lora:2")
    layers = model.model.layers
    for t, r in [(2, 1), (4, 3)]:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            shared = getattr(layers[t].mlp, proj)
            assert isinstance(shared, SharedLinear)
            assert shared.base_layer is getattr(layers[r].mlp, proj)
            assert shared.weight is getattr(layers[r].mlp, proj).weight
    # the optimizer / parameters() see each shared weight once
    names = [n for n, _ in model.named_parameters()]
    assert not any(".base_layer." in n for n in names)


def test_untrained_lora_equals_direct_sharing():
    ids = torch.randint(0, 128, (2, 12))
    direct = sharp.share(tiny_model(seed=3), "next:0-5", "none")
    lora = sharp.share(tiny_model(seed=3), "next:0-5", "lora:4")
    with torch.no_grad():
        torch.testing.assert_close(lora(ids).logits, direct(ids).logits, rtol=0, atol=0)


def test_sharing_changes_the_function_of_the_targets():
    ids = torch.randint(0, 128, (2, 12))
    original = tiny_model(seed=3)
    with torch.no_grad():
        before = original(ids).logits
        after = sharp.share(original, "next:0-5", "none")(ids).logits
    assert not torch.allclose(before, after)


def test_counts_add_up_exactly():
    model = tiny_model()
    original = count_parameters(model)
    assert original["stored"] == original["original"] == sum(p.numel() for p in model.parameters())
    sharp.share(model, "group:3:0-5", "lora+scale:2")
    c = count_parameters(model)
    h, i = model.config.hidden_size, model.config.intermediate_size
    n_targets = 4  # groups [0,1,2], [3,4,5]
    assert c["removed"] == n_targets * 3 * h * i
    assert c["recovery"] == n_targets * 3 * (2 * (h + i) + (h + i))
    assert c["stored"] == original["original"] - c["removed"] + c["recovery"]
    assert c["stored"] == sum(t.numel() for _, t in unique_parameters(model))
    assert c["original"] == original["original"]
    assert len(recoveries(model)) == 4 * 3 and len(shared_linears(model)) == 4 * 3


def test_only_recovery_parameters_need_training():
    model = sharp.share(tiny_model(), "next:1-4", "lora:2")
    rec_params = {id(p) for _, r in recoveries(model) for p in r.parameters()}
    assert len(rec_params) == 2 * 3 * 2  # 2 targets x 3 projections x (A, B)
    mark_trainable(model, "recovery")
    assert {id(p) for p in model.parameters() if p.requires_grad} == rec_params
    ids = torch.randint(0, 128, (2, 10))
    model(ids, labels=ids).loss.backward()
    # the gradient reaches every recovery tensor and nothing else: not the reference weights the targets reuse
    assert {id(p) for p in model.parameters() if p.grad is not None} == rec_params
    assert model.model.layers[2].mlp.up_proj.base_layer.weight.grad is None
