"""Distillation loss and the SFT trainer's kd / ce+kd losses; training the shared reference weights."""

from __future__ import annotations

import copy

import pytest
import torch

import sharp
from sharp.errors import SharpError
from sharp.recovery.distill import distillation_loss, hidden_state_loss
from sharp.recovery.sft import SFTConfig, SharpTrainer, run_sft
from sharp.recovery.trainable import mark_trainable, shared_reference_parameters
from tests.conftest import tiny_model


def test_distillation_loss_is_zero_for_the_teacher_itself_and_positive_otherwise():
    logits = torch.randn(7, 11, dtype=torch.float64)
    assert float(distillation_loss(logits, logits)) == pytest.approx(0.0, abs=1e-12)
    assert float(distillation_loss(logits + torch.randn(7, 11, dtype=torch.float64), logits)) > 0.01
    # a constant shift of the logits is the same distribution
    assert float(distillation_loss(logits + 3.0, logits, temperature=2.0)) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_gradient_matches_finite_differences(temperature):
    torch.manual_seed(0)
    teacher = torch.randn(3, 5, dtype=torch.float64)
    student = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: distillation_loss(s, teacher, temperature), (student,))
    # and the analytic form: d/ds KL(p || softmax(s/T)) * T^2 = T (softmax(s/T) - p)
    loss = distillation_loss(student, teacher, temperature)
    (grad,) = torch.autograd.grad(loss, student)
    p = torch.softmax(teacher / temperature, -1)
    q = torch.softmax(student.detach() / temperature, -1)
    torch.testing.assert_close(grad, temperature * (q - p))


def _batch(vocab: int, n: int = 2, t: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(vocab, (n, t), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _trainer(model, teacher, kind: str, tmp_path, **kd) -> SharpTrainer:
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    return SharpTrainer(model=model, args=args, loss_kind=kind, teacher=teacher, **kd)


def test_trainer_kd_loss_is_zero_when_student_is_teacher(tmp_path):
    teacher = tiny_model()
    student = copy.deepcopy(teacher)
    batch = _batch(teacher.config.vocab_size)
    loss = _trainer(student, teacher, "kd", tmp_path).compute_loss(student, batch)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    ce_kd = _trainer(student, teacher, "ce+kd", tmp_path).compute_loss(student, batch)
    ce = _trainer(student, None, "ce", tmp_path).compute_loss(student, dict(batch))
    assert float(ce_kd) == pytest.approx(float(ce), rel=1e-5)  # ce+kd = ce when kd is 0


def test_trainer_kd_loss_is_the_mean_kl_over_response_tokens(tmp_path):
    teacher = tiny_model(seed=0)
    student = tiny_model(seed=1)
    batch = _batch(teacher.config.vocab_size)
    loss = _trainer(student, teacher, "kd", tmp_path).compute_loss(student, batch)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"]).logits[:, :-1]
    keep = batch["labels"][:, 1:] != -100
    kl = torch.nn.functional.kl_div(torch.log_softmax(s[keep], -1), torch.log_softmax(t[keep], -1),
                                    log_target=True, reduction="batchmean")
    assert float(loss) == pytest.approx(float(kl), rel=1e-5)


def test_kd_sft_moves_the_student_towards_the_teacher(tmp_path):
    """A shared model distilled from its original gets closer to it (KL on held-out batches drops)."""
    teacher = tiny_model()
    student = sharp.share(copy.deepcopy(teacher), "next:1-4", "lora:4")
    mark_trainable(student, "recovery")
    vocab = teacher.config.vocab_size
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": (ids := torch.randint(vocab, (16,), generator=g).tolist()), "labels": ids}
                for _ in range(32)]

    def kl() -> float:
        batch = torch.tensor([e["input_ids"] for e in examples[:8]])
        with torch.no_grad():
            return float(distillation_loss(student(input_ids=batch).logits.flatten(0, 1),
                                           teacher(input_ids=batch).logits.flatten(0, 1)))

    from sharp.data import collate_examples

    before = kl()
    run_sft(student, examples, [], SFTConfig(steps=15, lr=1e-2, batch_size=8, eval_steps=0, save_steps=100,
                                             loss="kd", progress=False), tmp_path, collate_examples, teacher=teacher)
    assert kl() < 0.7 * before


def _layer_outputs(model, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each decoder layer's output and the final norm's, captured with hooks (not `output_hidden_states`)."""
    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    hooks.append(model.model.norm.register_forward_hook(lambda m, a, o: outs.append(o)))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return outs[:-1], outs[-1]


def _relative_error(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor) -> float:
    s, t = student[:, :-1][keep], teacher[:, :-1][keep]
    return float(((s - t).pow(2).sum(-1) / t.pow(2).sum(-1)).sum())


@pytest.mark.parametrize("dropped", [2, 5])
def test_hidden_state_term_pairs_each_layer_with_its_original_after_a_dropped_block(tmp_path, dropped):
    """kd + w * hidden: the student (the 6-layer teacher with one layer deleted, other weights perturbed) is compared
    after its layers 0-3 with the teacher's layers they stand for, and at the final norm (also when the teacher's
    last layer is the one deleted); computed here from hooks."""
    teacher = tiny_model()
    student = copy.deepcopy(teacher)
    del student.model.layers[dropped]
    student.config.num_hidden_layers -= 1
    for i, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = i
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = _batch(teacher.config.vocab_size)
    keep = batch["labels"][:, 1:] != -100
    layers = {i: i + (i >= dropped) for i in range(5)}
    plain = _trainer(student, teacher, "kd", tmp_path).compute_loss(student, dict(batch))
    both = _trainer(student, teacher, "kd", tmp_path, kd_hidden=0.5, teacher_layers=layers).compute_loss(
        student, dict(batch))
    (s_out, s_norm), (t_out, t_norm) = _layer_outputs(student, batch["input_ids"]), _layer_outputs(
        teacher, batch["input_ids"])
    pairs = [(s_out[i], t_out[layers[i]]) for i in range(4)] + [(s_norm, t_norm)]
    expected = sum(_relative_error(s, t, keep) for s, t in pairs) / len(pairs) / int(keep.sum())
    assert expected > 1e-4  # the perturbation shows
    assert float(both) - float(plain) == pytest.approx(0.5 * expected, rel=1e-4)
    # the map is required when the layer counts differ (a same-index pairing would be silently wrong)
    with pytest.raises(ValueError, match="teacher_layers"):
        _trainer(student, teacher, "kd", tmp_path, kd_hidden=0.5).compute_loss(student, dict(batch))
    with pytest.raises(ValueError, match="teacher_layers"):
        _trainer(student, teacher, "kd", tmp_path, kd_hidden=0.5, teacher_layers={0: 0}).compute_loss(
            student, dict(batch))


def test_hidden_state_term_is_zero_for_the_teacher_and_differentiable():
    teacher = tiny_model()
    batch = _batch(teacher.config.vocab_size)
    keep = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        states = teacher(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
    states = tuple(h[:, :-1] for h in states)
    assert float(hidden_state_loss(states, states, keep)) == pytest.approx(0.0, abs=1e-10)
    g = torch.Generator().manual_seed(3)
    target = tuple(torch.randn(1, 4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    mine = tuple(torch.randn(1, 4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[False, True, True, True]])
    assert torch.autograd.gradcheck(lambda *s: hidden_state_loss(s, target, mask).double(), mine)


def test_kd_hidden_needs_a_distillation_loss_and_a_sane_weight():
    with pytest.raises(SharpError, match="--kd-hidden.*--loss kd"):
        SFTConfig(loss="ce", kd_hidden=1.0)
    with pytest.raises(SharpError, match="kd_hidden must be"):
        SFTConfig(loss="kd", kd_hidden=-1.0)
    assert SFTConfig(loss="ce+kd", kd_hidden=0.3).kd_hidden == 0.3


def test_a_prune_reports_base_layers_skip_its_dropped_blocks():
    from sharp.baselines.methods import PruneReport

    report = PruneReport(method="layer-drop", original_layers=6, dropped_layers=[2, 3])
    assert report.base_layers() == {0: 0, 1: 1, 2: 4, 3: 5}
    assert PruneReport(method="width", original_layers=3).base_layers() == {0: 0, 1: 1, 2: 2}
    with pytest.raises(ValueError, match="layer count"):
        PruneReport(method="merge").base_layers()


def test_kd_without_a_teacher_is_refused(tmp_path):
    model = sharp.share(tiny_model(), "next:1-4", "lora:4")
    mark_trainable(model)
    with pytest.raises(RuntimeError, match="teacher"):
        run_sft(model, [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], [], SFTConfig(steps=1, loss="kd"),
                tmp_path, lambda b: b)


def test_recovery_plus_shared_trains_the_reference_weights_once():
    model = sharp.share(tiny_model(), "next:1-4", "lora:4")  # targets 2, 4 reuse 1, 3
    plain = mark_trainable(model, "recovery")
    counts = mark_trainable(model, "recovery+shared")
    layers = model.model.layers
    refs = shared_reference_parameters(model)
    assert len(refs) == 2 * 3  # two references x gate/up/down weights
    assert all(p.requires_grad for p in refs)
    assert layers[2].mlp.up_proj.base_layer.weight.requires_grad  # the target sees the trained reference
    assert not layers[0].mlp.up_proj.weight.requires_grad  # unshared layers stay frozen
    assert not layers[1].self_attn.q_proj.weight.requires_grad
    assert counts["trainable"] == plain["trainable"] + sum(p.numel() for p in refs)


def test_trained_shared_weights_get_their_own_learning_rate(tmp_path):
    model = sharp.share(tiny_model(), "next:1-4", "lora:4")
    mark_trainable(model, "recovery+shared")
    refs = {id(p) for p in shared_reference_parameters(model)}
    seen = {}

    class Probe(SharpTrainer):
        def create_optimizer(self, model=None):
            opt = super().create_optimizer(model)
            seen["groups"] = [({id(p) for p in g["params"]}, g["lr"]) for g in opt.param_groups]
            return opt

    import sharp.recovery.sft as sft

    original = sft.SharpTrainer
    sft.SharpTrainer = Probe
    try:
        g = torch.Generator().manual_seed(0)
        examples = [{"input_ids": (ids := torch.randint(128, (8,), generator=g).tolist()), "labels": ids}
                    for _ in range(4)]
        from sharp.data import collate_examples

        run_sft(model, examples, [], SFTConfig(steps=1, lr=1e-3, batch_size=2, eval_steps=0, progress=False),
                tmp_path, collate_examples)
    finally:
        sft.SharpTrainer = original
    fast, slow = seen["groups"]
    assert slow == (refs, pytest.approx(1e-4)) and fast[1] == pytest.approx(1e-3)
    assert not fast[0] & refs and fast[0]  # the recovery parameters, at --lr
