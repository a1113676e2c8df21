"""`--device` / `--dtype` parsing, the source dtype of every kind of model, and the dtype helpers."""

from __future__ import annotations

import json

import pytest
import torch

from sharp.errors import SharpError
from sharp.io.device import compute_dtype, place, resolve_device, worker_devices
from sharp.io.dtypes import cast_to, parse_dtype, resolve_dtype, round_to
from sharp.io.models import source_dtype
from tests.conftest import tiny_model


def test_resolve_device_cpu_and_auto_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    expected = "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("text", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_one_clear_line(monkeypatch, text):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SharpError, match=rf"--device {text}: CUDA is not available.*use --device cpu or auto") as e:
        resolve_device(text)
    assert "\n" not in str(e.value)


def test_cuda_index_past_the_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")  # no index: the current GPU, workers may spread
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(SharpError, match=r"only 2 CUDA device\(s\) are visible \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


def test_mps_without_mps_is_refused(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SharpError, match="MPS"):
        resolve_device("mps")


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "cuda0", "", "tpu"])
def test_unknown_device_text_lists_the_forms(text):
    with pytest.raises(SharpError, match="use auto, cpu, cuda, cuda:N or mps"):
        resolve_device(text)


def test_dtype_names_and_auto():
    assert parse_dtype("bf16") == parse_dtype("bfloat16") == parse_dtype(torch.bfloat16) == torch.bfloat16
    assert parse_dtype("FP16") == parse_dtype("float16") == torch.float16
    assert parse_dtype("fp32") == parse_dtype("float32") == torch.float32
    assert parse_dtype("auto") is None
    with pytest.raises(SharpError, match="unknown --dtype 'int8'; use auto, bf16, fp16 or fp32"):
        parse_dtype("int8")
    with pytest.raises(SharpError, match="unsupported dtype"):
        parse_dtype(torch.float64)


def test_auto_dtype_keeps_the_source_and_an_explicit_one_wins():
    assert resolve_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("auto", torch.float32) == torch.float32
    assert resolve_dtype("auto", None) == torch.float32
    assert resolve_dtype("auto", torch.float64) == torch.float32
    assert resolve_dtype("fp32", torch.bfloat16) == torch.float32
    assert resolve_dtype("bf16", torch.float32) == torch.bfloat16


def test_cpu_computes_in_float32_whatever_the_storage():
    cpu = torch.device("cpu")
    for storage in (torch.bfloat16, torch.float16, torch.float32):
        assert compute_dtype(storage, cpu) == torch.float32


def test_cuda_computes_in_the_storage_dtype_unless_it_lacks_bf16(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert compute_dtype(torch.bfloat16, cuda) == torch.bfloat16
    assert compute_dtype(torch.float16, cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # a pre-Ampere GPU
    assert compute_dtype(torch.bfloat16, cuda) == torch.float32


def test_workers_go_round_robin_over_the_visible_gpus():
    cuda = torch.device("cuda")
    assert worker_devices(cuda, 5, visible=2) == [torch.device("cuda", i) for i in (0, 1, 0, 1, 0)]
    assert worker_devices(cuda, 2, visible=4) == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert worker_devices(cuda, 1, visible=4) == [cuda]  # one worker: the current GPU
    assert worker_devices(cuda, 3, visible=1) == [cuda] * 3
    pinned = torch.device("cuda", 1)  # an explicit index pins every worker there
    assert worker_devices(pinned, 3, visible=4) == [pinned] * 3
    assert worker_devices(torch.device("cpu"), 3, visible=4) == [torch.device("cpu")] * 3


def _save(model, folder, dtype):
    model.to(dtype).save_pretrained(folder)
    return folder


def test_source_dtype_of_folders_gguf_and_checkpoints(tmp_path):
    import sharp

    assert source_dtype(tmp_path / "model.Q4_K_M.gguf") == torch.bfloat16
    assert source_dtype(_save(tiny_model(), tmp_path / "f32", torch.float32)) == torch.float32
    assert source_dtype(_save(tiny_model(), tmp_path / "b16", torch.bfloat16)) == torch.bfloat16
    assert source_dtype(_save(tiny_model(), tmp_path / "f16", torch.float16)) == torch.float16
    # the weights' header wins over what config.json claims
    cfg = tmp_path / "b16" / "config.json"
    cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), dtype="float32")))
    assert source_dtype(tmp_path / "b16") == torch.bfloat16
    # an asset folder dequantized from a GGUF counts as a GGUF source
    conv = _save(tiny_model(), tmp_path / "conv", torch.float32)
    (conv / "sharp_source.json").write_text(json.dumps({"source": {"gguf": "x.gguf"}, "dtype": "float32"}))
    assert source_dtype(conv) == torch.bfloat16
    # a sharp checkpoint: its stored weights (also an adapter-only one, by its config.json)
    model = tiny_model().to(torch.bfloat16)
    sharp.share(model, "next:1-4", "lora:4")
    sharp.save(model, tmp_path / "ck")
    assert source_dtype(tmp_path / "ck") == torch.bfloat16
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["dtype"] == "bfloat16"


def test_place_computes_in_float32_on_cpu_and_keeps_sharing():
    import sharp

    model = tiny_model().to(torch.bfloat16)
    sharp.share(model, "next:1-4", "lora:4")
    place(model, torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    layers = model.model.layers
    assert layers[2].mlp.down_proj.base_layer is layers[1].mlp.down_proj


def test_round_to_rounds_in_place_and_cast_to_keeps_buffers():
    model = tiny_model()
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    round_to(model, torch.bfloat16)
    after = model.model.layers[0].mlp.up_proj.weight
    assert after.dtype == torch.float32
    assert torch.equal(after, before.to(torch.bfloat16).float())
    assert not torch.equal(after, before)
    buffers = {n: b.dtype for n, b in model.named_buffers()}
    cast_to(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {n: b.dtype for n, b in model.named_buffers()} == buffers


def test_loading_a_checkpoint_in_another_dtype_keeps_the_rotary_table_float32(tmp_path):
    import sharp

    model = tiny_model()
    exact = model.model.rotary_emb.inv_freq.clone()
    sharp.share(model, "next:1-4", "lora:4")
    sharp.save(model, tmp_path / "ck")
    low = sharp.load(tmp_path / "ck", dtype=torch.bfloat16)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    # `model.to(bf16)` would round it (0.1 -> 0.10009765625): every position's angle drifts
    assert low.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(low.model.rotary_emb.inv_freq, exact)
    place(low, torch.device("cpu"), torch.bfloat16)
    assert torch.equal(low.model.rotary_emb.inv_freq, exact)
