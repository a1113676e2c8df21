"""`compress` of a bf16 source on the CPU: a bf16 checkpoint whose stored model scores what the summary says
(training and scoring run in fp32 on bf16-exact weights), and whose base identity is the bf16 base's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import sharp
from sharp.data import record_examples
from sharp.evaluation.perplexity import response_perplexity
from sharp.io.device import load_on_device
from sharp.recipes import CompressConfig, compress
from tests.conftest import C4

SETTINGS = dict(strategy="next:1-4", recovery="lora:8", data=f"text:{C4}[:12]", max_len=96, batch_size=8,
                slw_steps=12, sft_steps=8, lr=5e-3, eval_steps=4, save_steps=4, eval_fraction=0.15, seed=0,
                device="cpu")


@pytest.fixture
def bf16_source(stories_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "stories-bf16"
    AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(stories_path).save_pretrained(folder)
    return folder


@pytest.mark.slow  # one compress run (~30 s on an idle 2-core machine)
def test_compress_of_a_bf16_source_stores_bf16_and_scores_what_it_stores(bf16_source, tmp_path):
    from sharp.data import load_records, split_examples

    out = tmp_path / "out"
    summary = compress(CompressConfig(model=str(bf16_source), out=str(out), **SETTINGS), progress=False)
    assert summary["dtype"] == "bf16"
    stored = {t.dtype for f in ("model.safetensors", "recovery.safetensors")
              for t in load_file(out / f).values() if t.is_floating_point()}
    assert stored == {torch.bfloat16}

    model, tokenizer, storage = load_on_device(str(out), "cpu", "auto")  # as `sharp eval --device cpu` loads it
    assert storage == torch.bfloat16 and {p.dtype for p in model.parameters()} == {torch.float32}
    held = split_examples(load_records(SETTINGS["data"]), SETTINGS["eval_fraction"], SETTINGS["seed"])[1]
    ppl = response_perplexity(model, record_examples(held, tokenizer, SETTINGS["max_len"]), SETTINGS["batch_size"])
    assert ppl["ppl"] == pytest.approx(summary["perplexity"]["sft"], rel=1e-5)

    # an adapter-only copy checks out against the bf16 base it was trained on
    sharp.save(sharp.load(out), tmp_path / "adapter", adapter_only=True)
    rebuilt = sharp.load(tmp_path / "adapter", base=str(bf16_source))
    assert {p.dtype for p in rebuilt.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(("change", "message"), [({"device": "gpu"}, "unknown --device 'gpu'"),
                                                 ({"dtype": "int8"}, "unknown --dtype 'int8'")])
def test_bad_device_or_dtype_fails_before_loading(stories_path, tmp_path, change, message):
    from sharp.errors import SharpError

    cfg = CompressConfig(model=str(stories_path), out=str(tmp_path / "o"), **{**SETTINGS, **change})
    with pytest.raises(SharpError, match=message):
        cfg.validate()
    assert not (tmp_path / "o").exists()


def test_the_device_is_not_part_of_a_run_s_identity(stories_path, tmp_path):
    """A run started on one device resumes on another (same work folder); a new dtype starts over."""
    from sharp.recipes import prepare_work_dir

    base = dict(model=str(stories_path), out=str(tmp_path / "o"), **SETTINGS)
    work = prepare_work_dir(CompressConfig(**base))
    (work / "marker").write_text("kept")
    assert (prepare_work_dir(CompressConfig(**{**base, "device": "auto"})) / "marker").is_file()
    # nor where SLW runs: Ray reproduces the local SLW bit for bit
    on_ray = {"slw_backend": "ray", "ray_address": "auto", "slw_task_gpus": 1.0}
    assert (prepare_work_dir(CompressConfig(**{**base, **on_ray})) / "marker").is_file()
    # a folder from a version that recorded those settings in run.json is resumed too
    run_file = work / "run.json"
    run_file.write_text(json.dumps({**json.loads(run_file.read_text()), "slw_backend": "local", "device": "cpu"}))
    assert (prepare_work_dir(CompressConfig(**base)) / "marker").is_file()
    with pytest.warns(UserWarning, match="other settings"):
        assert not (prepare_work_dir(CompressConfig(**{**base, "dtype": "fp32"})) / "marker").exists()


def test_a_run_recorded_before_the_sink_weight_flag_ran_at_1(stories_path, tmp_path):
    from sharp.recipes import prepare_work_dir

    base = dict(model=str(stories_path), out=str(tmp_path / "o"), **SETTINGS)
    work = prepare_work_dir(CompressConfig(**base, slw_sink_weight=1.0))
    (work / "marker").write_text("kept")
    run_file = work / "run.json"
    old = {k: v for k, v in json.loads(run_file.read_text()).items() if k != "slw_sink_weight"}
    run_file.write_text(json.dumps(old))
    assert (prepare_work_dir(CompressConfig(**base, slw_sink_weight=1.0)) / "marker").is_file()
    with pytest.warns(UserWarning, match="other settings"):
        assert not (prepare_work_dir(CompressConfig(**base)) / "marker").exists()  # the default is 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compress_on_cuda_in_bf16_with_a_kd_teacher_stores_bf16(stories_path, tmp_path):
    """Every stage on the GPU in bf16 (capture, closed-form SLW, SFT with the teacher beside the student)."""
    out = tmp_path / "out"
    cfg = CompressConfig(model=str(stories_path), out=str(out), **{**SETTINGS, "device": "cuda", "dtype": "bf16",
                                                                   "loss": "ce+kd"})
    summary = compress(cfg, progress=False)
    assert summary["dtype"] == "bf16" and summary["device"].startswith("cuda")
    stored = {t.dtype for f in ("model.safetensors", "recovery.safetensors")
              for t in load_file(out / f).values() if t.is_floating_point()}
    assert stored == {torch.bfloat16}
    ppl = summary["perplexity"]
    assert ppl["sft"] < ppl["direct"]  # the recovery trained
