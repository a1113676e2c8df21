"""`--dtype` / `--device` from the command line: a bf16 source gives a bf16 checkpoint (half the bytes), `--dtype
fp32` overrides it, `sharp info` shows the dtype, and a device the machine lacks is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sharp
from sharp.io.manifest import folder_bytes
from tests.conftest import run_cli

SHARE = ["--strategy", "next:1-4", "--recovery", "lora:4"]


@pytest.fixture
def bf16_source(stories_path, tmp_path) -> Path:
    """stories260K converted to bf16 (a plain Hugging Face folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "stories-bf16"
    AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(stories_path).save_pretrained(folder)
    return folder


def _stored_dtypes(folder: Path) -> set[torch.dtype]:
    return {t.dtype for name in ("model.safetensors", "recovery.safetensors")
            for t in load_file(folder / name).values() if t.is_floating_point()}


def _info(path: Path, capsys) -> dict:
    code, stdout, err = run_cli(["info", path, "--json"], capsys)
    assert code == 0, err
    return json.loads(stdout)


def test_share_keeps_a_bf16_source_in_bf16_at_half_the_bytes(stories_path, bf16_source, tmp_path, capsys):
    fp32_out, bf16_out = tmp_path / "from-fp32", tmp_path / "from-bf16"
    for source, out in ((stories_path, fp32_out), (bf16_source, bf16_out)):
        code, _, err = run_cli(["share", source, *SHARE, "--out", out], capsys)
        assert code == 0, err
    assert _stored_dtypes(fp32_out) == {torch.float32}
    assert _stored_dtypes(bf16_out) == {torch.bfloat16}  # recovery parameters too
    weights = [(f / "model.safetensors").stat().st_size + (f / "recovery.safetensors").stat().st_size
               for f in (fp32_out, bf16_out)]
    assert 0.49 < weights[1] / weights[0] < 0.51, weights
    assert folder_bytes(bf16_out) < 0.55 * folder_bytes(fp32_out)  # tokenizer and configs are the same size
    assert json.loads((bf16_out / "config.json").read_text())["dtype"] == "bfloat16"
    assert _info(bf16_out, capsys)["dtype"] == "bfloat16"
    assert _info(fp32_out, capsys)["dtype"] == "float32"
    assert _info(bf16_source, capsys)["dtype"] == "bfloat16"


def test_dtype_fp32_on_a_bf16_source_writes_fp32(bf16_source, tmp_path, capsys):
    out = tmp_path / "fp32"
    code, _, err = run_cli(["share", bf16_source, *SHARE, "--dtype", "fp32", "--out", out], capsys)
    assert code == 0, err
    assert _stored_dtypes(out) == {torch.float32}
    assert _info(out, capsys)["dtype"] == "float32"


def test_merge_writes_the_dtype_asked_for(bf16_source, tmp_path, capsys):
    ck = tmp_path / "ck"
    assert run_cli(["share", bf16_source, *SHARE, "--out", ck], capsys)[0] == 0
    for flag, expected in ((["--dtype", "auto"], torch.bfloat16), (["--dtype", "fp32"], torch.float32)):
        out = tmp_path / f"merged-{expected}"
        code, _, err = run_cli(["merge", ck, "--out", out, *flag], capsys)
        assert code == 0, err
        assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {expected}


def test_load_of_a_bf16_checkpoint_is_bf16_and_close_to_the_fp32_path(stories_path, bf16_source, tmp_path, capsys):
    fp32_ck, bf16_ck = tmp_path / "f32", tmp_path / "b16"
    for source, out in ((stories_path, fp32_ck), (bf16_source, bf16_ck)):
        assert run_cli(["share", source, *SHARE, "--out", out], capsys)[0] == 0
    low, full = sharp.load(bf16_ck), sharp.load(fp32_ck)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = low(input_ids=ids).logits.float(), full(input_ids=ids).logits
    # bf16 weights and math (8 bits of mantissa): measured max |diff| 0.32 for a logit spread (std) of 8.2, 97%
    # the same top token; other weights would differ by about the spread itself
    assert (a - b).abs().max() < 0.1 * b.std(), float((a - b).abs().max())
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 0.05


def test_eval_on_a_missing_gpu_is_one_line_before_loading(bf16_source, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(["eval", bf16_source, "--tasks", "ppl:text=x.txt", "--device", "cuda"], capsys)
    assert code == 2
    assert "--device cuda: CUDA is not available" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("flag", "fragment"), [(["--dtype", "int4"], "unknown --dtype 'int4'"),
                                                (["--device", "gpu"], "unknown --device 'gpu'")])
def test_bad_dtype_or_device_is_one_line(stories_path, tmp_path, capsys, flag, fragment):
    code, _, err = run_cli(["eval", stories_path, "--tasks", "ppl:text=x.txt", *flag], capsys)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1


def test_share_of_a_gguf_writes_bf16(stories_path, tmp_path, capsys):
    from sharp.io.export import export_gguf

    gguf = export_gguf(stories_path, tmp_path / "g", outtype="f32")["merged"]
    out = tmp_path / "from-gguf"
    code, _, err = run_cli(["share", gguf, *SHARE, "--out", out], capsys)
    assert code == 0, err
    assert _stored_dtypes(out) == {torch.bfloat16}
    assert _info(gguf, capsys)["dtype"] == "bfloat16"
