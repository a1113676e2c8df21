"""SLW's pieces on tiny models: the random split, the gate's guarantee, sequential inputs, Gemma3's post-norm."""

from __future__ import annotations

import copy

import pytest
import torch

import sharp
from sharp.recovery import SLWConfig, capture_activations, run_slw, train_slw
from sharp.recovery.slw_layer import loss_fn, split_rows
from sharp.sharing.recovery import Recovery
from sharp.sharing.shared import shared_linears
from tests.conftest import tiny_model


def _batches(vocab: int, n: int = 6, t: int = 24, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(vocab, (4, t), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _cfg(**kw) -> SLWConfig:
    base = dict(steps=20, lr=1e-2, batch_tokens=128, warmup_steps=2, eval_every=5, eval_tokens=64,
                checkpoint_every=10, patience=100, dtype="float32", threads=1)
    return SLWConfig(**{**base, **kw})


def test_split_is_random_disjoint_and_reproducible():
    n = 500
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    pos = torch.arange(n) % 25  # 20 sink rows (position 0)
    cfg = _cfg(eval_tokens=50)
    a = split_rows(x, x.clone(), pos, cfg, layer=3)
    b = split_rows(x, x.clone(), pos, cfg, layer=3)
    c = split_rows(x, x.clone(), pos, cfg, layer=4)
    ids = lambda t: set(t[:, 0].long().tolist())  # noqa: E731
    assert ids(a.x_eval) == ids(b.x_eval) and ids(a.x_eval) != ids(c.x_eval)  # per (seed, layer)
    assert len(ids(a.x_eval)) == 50 and not ids(a.x_eval) & ids(a.x_train)
    assert len(ids(a.x_train)) + 50 == 480
    assert max(ids(a.x_eval)) > 400 > min(ids(a.x_eval))  # not the last rows: drawn across the capture
    sink = ids(a.sink_train[0]) | ids(a.sink_eval[0])
    assert sink == {i for i in range(n) if i % 25 == 0} and len(ids(a.sink_eval[0])) == 4


def _slw(model_type: str, recovery: str, tmp_path, batches: list | None = None, modules: str = "mlp", **cfg):
    original = tiny_model(model_type)
    torch.manual_seed(0)
    shared = sharp.share(copy.deepcopy(original), "map:2=1,4=3", recovery, modules=modules)
    batches = batches or _batches(original.config.vocab_size)
    results = run_slw(original, shared, batches, _cfg(**cfg), tmp_path, progress=False)
    return original, shared, results


@pytest.mark.parametrize("init,sink_weight", [("zero", 0.1), ("zero", 0.0), ("closed-form", 0.1)])
def test_a_gated_target_never_ends_worse_than_deleting_its_mlp(tmp_path, init, sink_weight):
    # on either group of rows: a light sink weight may trade sink error for ordinary-token error, up to deletion
    # unrelated random layers: Direct Sharing is worse than deleting the MLP, and one step cannot fix it
    _, _, plain = _slw("llama", "lora:16", tmp_path / "plain", steps=1, init="zero")
    _, _, gated = _slw("llama", "lora+gate:16", tmp_path / "gated", steps=1, init=init, max_tokens=240,
                       sink_weight=sink_weight)
    assert max(r["rel_err_after"] for r in plain.values()) > 1.0  # the guarantee below is not vacuous
    for r in gated.values():
        assert r["sink_tokens"] > 0
        assert r["rel_err_after"] <= 1.0 + 1e-6
        assert r["sink_rel_err_after"] <= 1.0 + 1e-6
    if init == "zero":  # the bound is what holds the sink here: a step beat deletion on ordinary rows, not on sink rows
        evals = [p for r in gated.values() for p in r["curve"]]
        assert any(p["rel_err"] <= 1.0 and p["sink_rel_err"] > 1.0 for p in evals)  # measured 0.991 / 1.015


def test_closed_form_init_beats_direct_sharing_and_the_output_only_fit(tmp_path):
    _, _, cf = _slw("llama", "lora+gate:8", tmp_path / "cf", steps=1, init="closed-form")
    _, _, out_only = _slw("llama", "lora+gate:8", tmp_path / "lstsq", steps=1, init="lstsq")
    for t in cf:
        assert cf[t]["init"]["score_fit"] < 0.9 * cf[t]["init"]["score_identity"]
        assert cf[t]["init"]["score_fit"] < out_only[t]["init"]["score_fit"]
        assert set(cf[t]["init"]["fit"]) == {"gate_proj", "up_proj", "down_proj"}
        assert set(out_only[t]["init"]["fit"]) == {"down_proj"}


def _kept_scores(init: dict) -> list[float]:
    """The init candidates' scores, less those out of bounds (worse than the deleted MLP on a group of rows)."""
    out = set(init.get("out_of_bounds", []))
    return [v for k, v in init.items() if k.startswith("score_") and k.removeprefix("score_") not in out]


@pytest.mark.parametrize("recovery", ["lora:8", "lora+gate:8"])
def test_closed_form_init_is_never_worse_than_the_output_only_fit(tmp_path, recovery):
    # closed-form also tries lstsq's fit (the same rows, the same solve) and keeps the best held-out score
    _, _, cf = _slw("llama", recovery, tmp_path / "cf", steps=1, init="closed-form")
    _, _, out_only = _slw("llama", recovery, tmp_path / "lstsq", steps=1, init="lstsq")
    for t in cf:
        init, alone = cf[t]["init"], out_only[t]["init"]
        assert init["score_fit_output"] == pytest.approx(alone["score_fit"], rel=1e-5)
        chosen = min(_kept_scores(init))
        assert init[f"score_{init['chosen']}"] == chosen
        assert chosen <= min(_kept_scores(alone)) * (1 + 1e-5)
        assert set(init["fit_output"]) == {"down_proj"}


def test_first_sequential_target_sees_the_original_capture(tmp_path):
    original = tiny_model()
    shared = sharp.share(copy.deepcopy(original), "map:2=1,4=3", "lora:4")
    with torch.no_grad():  # make the first target's recovery non-trivial, as if it were trained
        for m in shared.model.layers[2].mlp.modules():
            if isinstance(m, Recovery):
                for p in m.parameters():
                    p.add_(0.3)
    batches = _batches(original.config.vocab_size, n=2)
    ref = capture_activations(original, batches, [2, 4], tmp_path / "orig", dtype="float32", progress=False)
    outputs = {t: original.model.layers[t].mlp for t in (2, 4)}
    first = capture_activations(shared, batches, [2], tmp_path / "s2", dtype="float32", progress=False,
                                outputs=outputs)
    second = capture_activations(shared, batches, [4], tmp_path / "s4", dtype="float32", progress=False,
                                 outputs=outputs)
    torch.testing.assert_close(first.load(2)[0], ref.load(2)[0])  # x: nothing before layer 2 changed
    torch.testing.assert_close(first.load(2)[1], ref.load(2)[1])  # y: the original MLP's output
    x4, y4 = second.load(4)
    assert not torch.allclose(x4, ref.load(4)[0], atol=1e-4)  # layer 4 sees what shared layer 2 gives it
    with torch.no_grad():
        torch.testing.assert_close(y4, original.model.layers[4].mlp(x4))  # and is fitted to the original MLP


def test_sequential_slw_trains_every_target_in_order(tmp_path):
    _, shared, results = _slw("llama", "lora+gate:4", tmp_path, inputs="sequential")
    assert sorted(results) == [2, 4]
    for r in results.values():
        assert r["rel_err_after"] < r["rel_err_before"]
    assert not (tmp_path / "activations").exists()
    log = (tmp_path / "slw_log.jsonl").read_text().splitlines()
    starts = [line for line in log if '"event": "start"' in line]
    assert '"layer": 2' in starts[0] and '"layer": 4' in starts[1]


def test_gemma3_fits_what_the_layer_adds_after_its_post_norm(tmp_path):
    original, shared, results = _slw("gemma3_text", "lora:4", tmp_path, steps=1, init="zero", keep_activations=True)
    from sharp.recovery import ActivationStore

    store = ActivationStore(tmp_path / "activations")
    layer = original.model.layers[2]
    x, y = store.load(2)
    rows = split_rows(x, y, store.positions(2), _cfg(), 2)
    ref_mlp = original.model.layers[1].mlp
    norm = layer.post_feedforward_layernorm
    with torch.no_grad():
        post = float((norm(ref_mlp(rows.x_eval)) - norm(rows.y_eval)).norm() / norm(rows.y_eval).norm())
        pre = float((ref_mlp(rows.x_eval) - rows.y_eval).norm() / rows.y_eval.norm())
    assert results[2]["rel_err_before"] == pytest.approx(post, rel=1e-4)
    assert abs(post - pre) > 1e-3  # the norm matters: a fit of the raw MLP output would report `pre`


def test_train_slw_without_originals_refuses_closed_form(tmp_path):
    original = tiny_model()
    shared = sharp.share(copy.deepcopy(original), "map:2=1", "lora:4")
    store = capture_activations(original, _batches(original.config.vocab_size, n=2), [2], tmp_path / "a",
                                dtype="float32", progress=False)
    with pytest.raises(sharp.SharpError, match="original target MLPs"):
        train_slw(shared, store, _cfg(), tmp_path, progress=False)


def test_early_stopping_ends_a_layer_after_patience_evaluations_without_gain(tmp_path):
    # a learning rate too small to gain min_delta: two evaluations (steps 5, 10) without gain end the layer
    _, _, stalled = _slw("llama", "lora:4", tmp_path / "a", steps=40, eval_every=5, patience=2, lr=1e-9, init="zero")
    _, _, learning = _slw("llama", "lora:4", tmp_path / "b", steps=40, eval_every=5, patience=2, init="zero")
    for t, r in stalled.items():
        assert r["stopped_early"] and r["step"] == 10 and r["best_step"] == 0
        assert r["rel_err_after"] == r["rel_err_before"]  # the kept state is the best one: the start
        assert learning[t]["step"] > 10 and learning[t]["best_step"] > 0


def test_zero_init_starts_from_direct_sharing_and_trains_from_there(tmp_path):
    _, _, results = _slw("llama", "lora:8", tmp_path, init="zero")
    for r in results.values():
        assert "fit" not in r["init"] and r["init"]["chosen"] == "identity"
        assert r["rel_err_init"] == r["rel_err_before"]
        assert r["rel_err_after"] < 0.95 * r["rel_err_before"]


def test_token_loss_weighs_every_row_alike():
    target = torch.tensor([[1.0, 0.0], [10.0, 0.0]])
    pred = torch.tensor([[0.0, 0.0], [10.0, 0.0]])  # the small row entirely wrong, the large one exact
    assert float(loss_fn(pred, target, "token")) == pytest.approx(0.5)
    assert float(loss_fn(pred, target, "relative")) == pytest.approx(1 / 101)


def test_slw_trains_with_the_token_loss(tmp_path):
    _, relative, _ = _slw("llama", "lora:8", tmp_path / "r", init="zero")
    _, token, results = _slw("llama", "lora:8", tmp_path / "t", init="zero", loss="token")
    for r in results.values():
        assert r["rel_err_after"] < 0.95 * r["rel_err_before"]
    b = [(n, p) for n, p in token.named_parameters() if n.endswith("lora_B")]
    assert b and any(not torch.equal(p, relative.get_parameter(n)) for n, p in b)  # another objective


def test_sink_weight_sets_how_much_the_sink_tokens_count(tmp_path):
    batches = _batches(128)
    for b in batches:  # the same first token in every sequence (a BOS), as in real data: the sink rows recur
        b["input_ids"][:, 0] = 1
    _, _, ignored = _slw("llama", "lora:8", tmp_path / "a", batches, init="zero", sink_weight=0.0)
    _, _, weighted = _slw("llama", "lora:8", tmp_path / "b", batches, init="zero", sink_weight=1.0)
    for t, r in weighted.items():
        assert r["sink_rel_err_after"] < 0.5 * ignored[t]["sink_rel_err_after"]  # measured 0.08 vs 1.17
        # early stopping and the init's choice score the held-out sink rows with the same weight
        assert r["init"]["score_identity"] == pytest.approx(r["rel_err_before"] ** 2 + r["sink_rel_err_before"] ** 2)
        assert ignored[t]["init"]["score_identity"] == pytest.approx(ignored[t]["rel_err_before"] ** 2)


def test_slw_fits_the_mlps_of_a_model_that_shares_attention_too(tmp_path):
    original, shared, results = _slw("llama", "lora:4", tmp_path / "all", modules="all")
    assert sorted(results) == [2, 4] and all(r["rel_err_after"] < r["rel_err_before"] for r in results.values())
    attn = [s for n, s in shared_linears(shared) if ".self_attn." in n]
    assert attn and all(not s.recovery.lora_B.any() for s in attn)  # left to SFT, at Direct Sharing
    attn_only = sharp.share(copy.deepcopy(original), "map:2=1,4=3", "lora:4", modules="attn")
    with pytest.raises(sharp.SharpError, match="shares no MLP"):
        run_slw(original, attn_only, _batches(128), _cfg(), tmp_path / "attn", progress=False)
