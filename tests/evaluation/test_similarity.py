"""Layer similarity: streamed statistics equal a naive hold-everything computation; replacement = Direct Sharing."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import sharp
from sharp.arch import get_adapter
from sharp.data import collate_examples
from sharp.evaluation.perplexity import response_perplexity
from sharp.evaluation.similarity import layer_similarity, replaced_mlp, replacement_costs
from tests.conftest import tiny_model


def _sequences(lengths, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _batches(seqs, batch_size):
    examples = [{"input_ids": s, "labels": s} for s in seqs]
    return [collate_examples(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


@torch.no_grad()
def _naive(model, seqs, skip_first):
    """Hold every MLP input / output and residual stream of every sequence (run one at a time, no padding)."""
    adapter = get_adapter(model)
    n = len(adapter.layers(model))
    mlps = [adapter.mlp(model, i) for i in range(n)]
    xs, ys, hs = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n + 1)]
    def keep(store, value):  # a hook returning None leaves the module's output alone
        store.append(value[0])

    handles = [
        m.register_forward_hook(lambda m, a, o, i=i: keep(xs[i], a[0]) or keep(ys[i], o)) for i, m in enumerate(mlps)
    ]
    handles.append(adapter.layers(model)[0].register_forward_pre_hook(lambda m, a: keep(hs[0], a[0])))
    handles += [
        layer.register_forward_hook(lambda m, a, o, i=i: keep(hs[i + 1], o))
        for i, layer in enumerate(adapter.layers(model))
    ]
    for s in seqs:
        model(input_ids=torch.tensor([s]))
    for h in handles:
        h.remove()
    x = [torch.cat([t[skip_first:] for t in xi]).double() for xi in xs]
    y = [torch.cat([t[skip_first:] for t in yi]).double() for yi in ys]
    h = [torch.cat([t[skip_first:] for t in hi]).double() for hi in hs]
    rel, cos = [], []
    for t in range(1, n):
        shared = mlps[t - 1].double()(x[t])
        mlps[t - 1].float()
        rel.append(float((shared - y[t]).norm() / y[t].norm()))
        cos.append(float(torch.nn.functional.cosine_similarity(shared, y[t], dim=-1).mean()))
    resid = [float(torch.nn.functional.cosine_similarity(h[i], h[i + 1], dim=-1).mean()) for i in range(n)]
    return rel, cos, resid, h


@pytest.mark.parametrize("skip_first", [0, 1])
def test_streamed_statistics_match_a_naive_computation(skip_first):
    model = tiny_model("llama")
    seqs = _sequences([9, 5, 12, 3, 7])
    result = layer_similarity(model, _batches(seqs, batch_size=2), skip_first=skip_first)  # padded batches
    rel, cos, resid, h = _naive(model, seqs, skip_first)
    assert result["tokens"] == sum(len(s) - skip_first for s in seqs)
    assert [p["rel_l2"] for p in result["pairs"]] == pytest.approx(rel, rel=1e-4)
    assert [p["cosine"] for p in result["pairs"]] == pytest.approx(cos, rel=1e-4, abs=1e-5)
    assert [r["cosine"] for r in result["residual"]] == pytest.approx(resid, rel=1e-4)
    a, b = 0, len(h) - 1
    far = float(torch.nn.functional.cosine_similarity(h[a], h[b], dim=-1).mean())
    assert result["residual_matrix"][a][b] == pytest.approx(far, rel=1e-4, abs=1e-5)
    assert result["residual_matrix"][2][2] == pytest.approx(1.0, abs=1e-5)


def test_first_position_is_reported_apart():
    model = tiny_model("llama")
    seqs = _sequences([6, 6, 6])
    with_first = layer_similarity(model, _batches(seqs, 3), skip_first=0)
    without = layer_similarity(model, _batches(seqs, 3), skip_first=1)
    assert with_first["tokens"] == without["tokens"] + 3
    assert with_first["pairs"][0]["rel_l2"] != pytest.approx(without["pairs"][0]["rel_l2"], rel=1e-6)
    assert without["mlp_norm"][1]["first_token"] == pytest.approx(with_first["mlp_norm"][1]["first_token"])


def test_identical_adjacent_mlps_measure_as_identical():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    adapter.mlp(model, 3).load_state_dict(adapter.mlp(model, 2).state_dict())
    result = layer_similarity(model, _batches(_sequences([8, 8]), 2))
    pair = result["pairs"][2]
    assert (pair["reference"], pair["target"]) == (2, 3)
    assert pair["rel_l2"] == pytest.approx(0.0, abs=1e-6)
    assert pair["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert result["pairs"][1]["rel_l2"] > 0.1


def test_hooks_are_removed_even_on_error():
    model = tiny_model("llama")
    bad = [{"input_ids": torch.tensor([[1, 2, 999]])}]  # id outside the vocabulary
    with pytest.raises(IndexError):
        layer_similarity(model, bad)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text", "phi3"])
def test_replaced_mlp_equals_direct_sharing_and_restores(model_type):
    model = tiny_model(model_type)
    ids = torch.tensor(_sequences([10]))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        shared = sharp.share(copy.deepcopy(model), "map:4=3", "none")
        expected = shared(input_ids=ids).logits
        with replaced_mlp(model, 4, 3):
            got = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, before)
    torch.testing.assert_close(after, before)


def test_replacement_costs_use_the_given_score():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    adapter.mlp(model, 5).load_state_dict(adapter.mlp(model, 4).state_dict())  # sharing 5 costs nothing
    seqs = _sequences([12, 9, 14])
    examples = [{"input_ids": s, "labels": s} for s in seqs]
    result = replacement_costs(model, lambda m: response_perplexity(m, examples, 2)["ppl"])
    assert [r["target"] for r in result["layers"]] == [1, 2, 3, 4, 5]
    by_target = {r["target"]: r for r in result["layers"]}
    assert by_target[5]["delta_nll"] == pytest.approx(0.0, abs=1e-6)
    assert abs(by_target[2]["delta_nll"]) > 1e-6  # a random tiny model: small, but not zero
    row = by_target[3]
    assert row["increase"] == pytest.approx(row["ppl"] / result["base"] - 1)
    assert row["delta_nll"] == pytest.approx(math.log(row["ppl"] / result["base"]))
    with replaced_mlp(model, 3, 2):
        assert response_perplexity(model, examples, 2)["ppl"] == pytest.approx(row["ppl"])
