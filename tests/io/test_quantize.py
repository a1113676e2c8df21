"""4-bit quantized sharp checkpoints: round trip, sharing kept, recovery in 16-bit, runtime modes."""

import json

import pytest
import safetensors
import torch
from torch import nn

import sharp
from sharp.errors import SharpError
from sharp.io.formats import QUANT_CONFIG
from sharp.io.quantize import quantize_model, quantized_linears
from sharp.recipes.quantize import quantize_checkpoint
from sharp.sharing.shared import dense_weight, recoveries, shared_linears
from tests.conftest import run_cli

IDS = torch.tensor([[1, 400, 35, 90, 7, 300, 12, 5, 77, 2]])


def _reference_module(model: nn.Module, name: str, reference: int) -> nn.Module:
    parts = name.split(".")
    parts[2] = str(reference)  # model.layers.<i>.mlp.<proj>
    return model.get_submodule(".".join(parts))


QUANTIZED_CLASS = {"quanto": "QLinear", "nf4": "Linear4bit"}


@pytest.mark.parametrize("method", ["quanto", "nf4"])
def test_quantized_checkpoint_round_trips_and_keeps_sharing(shared_ckpt, tmp_path, method):
    model = sharp.load(shared_ckpt)
    with torch.no_grad():
        exact = model(input_ids=IDS).logits.float()
    quantize_model(model, method=method)
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    sharp.save(model, tmp_path / "s4")
    loaded = sharp.load(tmp_path / "s4")
    with torch.no_grad():
        after = loaded(input_ids=IDS).logits
    assert torch.equal(before, after)
    # 4-bit changes the logits, but not beyond recognition (a broken kernel or mixed-up state would)
    err = (after.float() - exact).norm() / exact.norm()
    assert 0 < err < 0.2, err

    shared = shared_linears(loaded)
    assert len(shared) == 6  # 2 targets x gate/up/down
    for name, s in shared:
        ref = _reference_module(loaded, name, s.reference)
        assert s.base_layer is ref  # the quantized reference module itself, not a copy
        assert type(ref).__name__ == QUANTIZED_CLASS[method]
    # 5 layers x 7 linears, minus the 6 shared projections; the tied LM head stays 16-bit
    assert len(quantized_linears(loaded)) == 35 - 6
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for _, rec in recoveries(loaded):
        for p in rec.parameters():
            assert type(p.data) is torch.Tensor and p.dtype == torch.bfloat16
    config = json.loads((tmp_path / "s4" / QUANT_CONFIG).read_text())
    assert config["method"] == method and config["bits"] == 4 and len(config["modules"]) == 29


@pytest.mark.parametrize("method", ["quanto", "nf4"])
def test_quantized_file_stores_each_unique_weight_once(shared_ckpt, tmp_path, method):
    model = quantize_model(sharp.load(shared_ckpt), method=method)
    sharp.save(model, tmp_path / "s4")
    with safetensors.safe_open(tmp_path / "s4" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        # the 4-bit codes themselves: exactly half a byte per weight of each unique quantized linear
        payload = "._data" if method == "quanto" else ".weight"
        code_bytes = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[-1]
                         for k in keys if k.endswith(payload) and "embed" not in k and "norm" not in k)
        linear_params = sum(m.in_features * m.out_features for _, m in quantized_linears(model))
        assert code_bytes == linear_params // 2, (code_bytes, linear_params)
    assert not any(".base_layer." in k for k in keys)
    assert not any(k.startswith(("model.layers.2.mlp.", "model.layers.4.mlp.")) for k in keys)
    assert any(k.startswith("model.layers.1.mlp.gate_proj.weight") for k in keys)
    size16 = (shared_ckpt / "model.safetensors").stat().st_size
    size4 = (tmp_path / "s4" / "model.safetensors").stat().st_size
    # linear weights go from 16 to ~4.5 bits; the 16-bit embedding (512x64) bounds the total gain, and on this
    # 260K-parameter model nf4's fixed cost per layer (a 1 KiB nested quantization map) is still visible
    assert size4 < {"quanto": 0.45, "nf4": 0.55}[method] * size16, (size4, size16)


@pytest.mark.parametrize("method", ["quanto", "nf4"])
def test_merged_mode_materializes_targets(shared_ckpt, tmp_path, method):
    shared = sharp.load(shared_ckpt, dtype=torch.float32)
    merged = sharp.load(shared_ckpt, dtype=torch.float32, mode="merged")
    assert not shared_linears(merged) and len(shared_linears(shared)) == 6
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, shared(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)

    sharp.save(quantize_model(sharp.load(shared_ckpt), method=method), tmp_path / "s4")
    q_shared = sharp.load(tmp_path / "s4")
    q_merged = sharp.load(tmp_path / "s4", mode="merged")
    assert not shared_linears(q_merged)
    assert len(quantized_linears(q_merged)) == 35  # targets own their (re-quantized) weights
    # each target owns quantize(dequantize(W_ref) + B A): one more 4-bit rounding of the exact merged weight
    name, target = shared_linears(q_shared)[0]
    exact = target.merged().weight.float()
    requantized = dense_weight(q_merged.get_submodule(name)).float()
    assert ((requantized - exact).norm() / exact.norm()) < 0.15
    assert not torch.equal(requantized, dense_weight(target.base_layer).float())
    with torch.no_grad():
        a, b = q_merged(input_ids=IDS).logits.float(), q_shared(input_ids=IDS).logits.float()
    assert (a - b).norm() / b.norm() < 0.1  # the same model up to that extra rounding


def test_quantized_checkpoint_without_its_recovery_is_refused(shared_ckpt, tmp_path):
    sharp.save(quantize_model(sharp.load(shared_ckpt), method="nf4"), tmp_path / "s4")
    (tmp_path / "s4" / "recovery.safetensors").unlink()
    with pytest.raises(SharpError, match="does not match"):
        sharp.load(tmp_path / "s4", verify=False)  # recovery is never left uninitialized


@pytest.mark.parametrize("method", ["quanto", "nf4"])
def test_plain_model_quantizes_into_a_plain_folder(stories_path, tmp_path, method):
    model = quantize_checkpoint(str(stories_path), tmp_path / "q", method=method)
    loaded, _ = sharp.load_model(str(tmp_path / "q"), tokenizer=False)
    assert not shared_linears(loaded) and len(quantized_linears(loaded)) == 35
    assert not (tmp_path / "q" / "sharp_config.json").exists()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_errors(shared_ckpt, tmp_path):
    with pytest.raises(SharpError, match="method"):
        quantize_checkpoint(str(shared_ckpt), tmp_path / "x", method="gptq")
    with pytest.raises(SharpError, match="bits"):
        quantize_checkpoint(str(shared_ckpt), tmp_path / "x", bits=3)
    model = quantize_model(sharp.load(shared_ckpt))
    with pytest.raises(SharpError, match="already quantized"):
        quantize_model(model)
    with pytest.raises(SharpError, match="runtime mode"):
        sharp.load(shared_ckpt, mode="fast")


def test_cli_quantize(shared_ckpt, tmp_path, capsys):
    code, out, err = run_cli(["quantize", shared_ckpt, "--bits", "4", "--method", "quanto", "--out",
                              tmp_path / "q"], capsys)
    assert code == 0, err
    assert "29 unique linear layers" in out.replace("\n", " ")
    code, _, err = run_cli(["quantize", shared_ckpt, "--method", "awq", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "unknown quantization method" in err
    code, out, err = run_cli(["quantize", shared_ckpt, "--method", "nf4", "--out", tmp_path / "n"], capsys)
    assert code == 0 and "(nf4)" in out, err


def test_nf4_without_bitsandbytes_says_how_to_install(shared_ckpt, tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else find_spec(n, *a))
    code, _, err = run_cli(["quantize", shared_ckpt, "--method", "nf4", "--out", tmp_path / "n"], capsys)
    assert code == 2 and "pip install" in err and "bitsandbytes" in err
    assert not (tmp_path / "n").exists()


def test_merged_mode_keeps_bf16(shared_ckpt):
    merged = sharp.load(shared_ckpt, mode="merged")  # bf16 on disk
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        merged(input_ids=IDS)


@pytest.mark.parametrize("method", ["quanto", "nf4"])
def test_eval_scores_quantized_folders_like_the_16_bit_model(stories_path, shared_ckpt, tmp_path, method, capsys):
    """`sharp eval` (and `sharp.load_model`) read both kinds of quantized folder as quantized models: a plain one
    was once loaded by from_pretrained with random weights, and quanto's tensors failed under inference_mode."""
    from tests.conftest import WIKI

    wiki = WIKI
    quantize_checkpoint(str(stories_path), tmp_path / "plain4", method=method)
    quantize_checkpoint(str(shared_ckpt), tmp_path / "sharp4", method=method)
    for folder, reference in ((tmp_path / "plain4", stories_path), (tmp_path / "sharp4", shared_ckpt)):
        model, _ = sharp.load_model(str(folder))
        assert quantized_linears(model)
        ppl = {}
        for name, path in (("4", folder), ("16", reference)):
            code, _, err = run_cli(["eval", path, "--tasks", f"ppl:text={wiki}", "--limit", "2", "--max-len", "128",
                                    "--json", tmp_path / f"{name}.json"], capsys)
            assert code == 0, err
            ppl[name] = json.loads((tmp_path / f"{name}.json").read_text())["tasks"][f"ppl:text={wiki}"]["ppl"]
        assert abs(ppl["4"] / ppl["16"] - 1) < 0.5, ppl  # 4-bit costs some perplexity, not orders of magnitude


@pytest.fixture
def avx512_bf16_cpu(monkeypatch) -> None:
    """Pretend this CPU has AVX512-BF16: bitsandbytes' Linear4bit then repacks its weight for a fused CPU kernel
    at the first no-grad eval forward. That kernel may not run here, so it is replaced by dequantize + matmul of
    the packed weight (the layout conversion, the part that failed on 172-wide layers, runs for real)."""
    import copy

    import bitsandbytes.functional as F
    import bitsandbytes.nn.modules as bnb_modules

    def packed_gemv(A, B, out=None, state=None):
        weight, unpacked = F._convert_weight_packed_for_cpu_inverse(B.clone(), copy.deepcopy(state))
        return torch.nn.functional.linear(A, F.dequantize_4bit(weight, unpacked).to(A.dtype))

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(F, "gemv_4bit", packed_gemv)
    assert bnb_modules.Linear4bit(64, 32, device="meta").support_avx512bf16_for_cpu  # the pretence reaches bnb


def test_nf4_runs_on_cpus_with_avx512_bf16(shared_ckpt, tmp_path, avx512_bf16_cpu):
    """On such CPUs bitsandbytes' packed path failed on stories260K's 172-wide MLP ("N must be divisible by
    block_n") and, on layers it could pack, rewrote the weight in place so that a later save wrote re-quantized
    block scales. Every CPU must run any layer shape and save the same bytes before and after a forward."""
    model = quantize_model(sharp.load(shared_ckpt), method="nf4")
    sharp.save(model, tmp_path / "cold")
    name, target = shared_linears(model)[0]
    dense = dense_weight(target.base_layer)
    with torch.inference_mode():
        before = model(input_ids=IDS).logits
    assert torch.equal(dense_weight(target.base_layer), dense)  # the forward left the weight as it was
    sharp.save(model, tmp_path / "warm")
    for f in ("model.safetensors", "recovery.safetensors"):
        assert (tmp_path / "cold" / f).read_bytes() == (tmp_path / "warm" / f).read_bytes(), f
    for mode in ("shared", "merged"):
        with torch.inference_mode():
            after = sharp.load(tmp_path / "warm", mode=mode)(input_ids=IDS).logits
        if mode == "shared":
            assert torch.equal(before, after)
        else:
            assert (after.float() - before.float()).norm() / before.float().norm() < 0.1
