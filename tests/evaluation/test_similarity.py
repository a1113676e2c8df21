"""Layer similarity: streamed statistics equal a naive hold-everything computation; replacement = Direct Sharing."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import sharp
from sharp.arch import get_adapter
from sharp.data import collate_examples
from sharp.evaluation.perplexity import response_perplexity
from sharp.evaluation.similarity import (
    analysis_examples,
    analyze_model,
    layer_similarity,
    replaced_mlp,
    replacement_costs,
)
from sharp.sharing.strategy import parse_strategy
from tests.conftest import ALPACA, run_cli, tiny_model
from tests.conftest import C4 as C4_FILE


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


C4 = f"text:{C4_FILE}"


def test_analyze_cli_on_stories260k(stories_path, tmp_path, capsys):
    out = tmp_path / "an"
    code, stdout, err = run_cli(["analyze", stories_path, "--data", C4, "--out", out, "--max-tokens", 600,
                                 "--ppl-examples", 2, "--max-len", 64, "--budget", "40%", "--replace-layers", "2-4"],
                           capsys)
    assert code == 0, err
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["layers"] == 5 and 590 <= analysis["tokens"] <= 600  # position 0 of each window left out
    assert [r["target"] for r in analysis["replacement"]["layers"]] == [2, 3, 4]
    suggestion = analysis["suggestion"]
    assert parse_strategy(suggestion["strategy"]).resolve(5) == {2: 1, 4: 3}  # the only pair among 2-4
    assert suggestion["strategy"] in stdout
    for name in ("analysis.md", "mlp_similarity.png", "residual_cosine.png", "replacement.png"):
        assert (out / name).stat().st_size > 0


def test_analyze_instruction_data_scores_responses_only(stories_path, tmp_path):
    model, tok = sharp.load_model(str(stories_path))
    data = f"alpaca:{ALPACA}[:3]"
    analysis = analyze_model(model, tok, data, max_tokens=300, ppl_examples=3, max_len=256)
    examples, _ = analysis_examples(tok, data, max_len=256, needed_examples=3)
    assert len(examples) == 3
    assert analysis["replacement"]["base"] == pytest.approx(response_perplexity(model, examples, 4)["ppl"])
    assert analysis["replacement"]["tokens"] < sum(len(e["input_ids"]) for e in examples)  # prompts not scored
    lengths, used = [len(e["input_ids"]) for e in examples], 0
    while sum(lengths[:used]) < 300:
        used += 1
    assert analysis["tokens"] == min(300, sum(lengths)) - used  # position 0 of each sequence left out


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--data", "nope:x.json"], "unknown data format"),
    (["--data", "alpaca:/no/such.json"], "does not exist"),
    (["--data", C4, "--budget", "abc"], "malformed --budget"),
    (["--data", C4, "--budget", "90%"], "at most 2"),
    (["--data", C4, "--max-tokens", "0"], "--max-tokens"),
    (["--data", C4, "--replace-layers", "0-9"], "must lie within 1-4"),
    (["--data", C4, "--replace-layers", "3-4", "--budget", "40%"], "at most 1"),
])
def test_analyze_cli_bad_input_exits_2_with_one_line(stories_path, tmp_path, capsys, extra, fragment):
    args = ["analyze", stories_path, "--out", tmp_path / "o", "--max-tokens", 64, "--ppl-examples", 1,
            "--max-len", 32, *extra]
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_analyze_cli_refuses_a_non_empty_out_before_loading(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "f").write_text("x")
    code, _, err = run_cli(["analyze", "/no/model", "--data", C4, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "not empty" in err
