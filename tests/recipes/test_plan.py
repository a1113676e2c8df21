"""`sharp plan`: exact counts from a config JSON alone, the memory model's scaling, the probe, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sharp
from sharp.recipes.plan import PlanSettings, plan, slw_disk_bytes
from tests.conftest import run_cli, tiny_config

CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
LLAMA2 = CONFIGS / "llama-2-7b.json"


def _plan(model=LLAMA2, **kw) -> dict:
    return plan(PlanSettings(model=str(model), **{"strategy": "next:2-31", "recovery": "lora:64",
                                                  "data_size": 1000, "probe": False, **kw}))


def test_llama2_7b_counts_from_config_json():
    p = _plan()
    h, i, layers = 4096, 11008, 32
    mlp = 3 * h * i
    assert p["params"]["original"] == 6_738_415_616
    assert p["params"]["mlp_original"] == 4_328_521_728 == layers * mlp
    targets = list(range(3, 32, 2))  # next:2-31: 3, 5, ..., 31 reuse their predecessor
    assert p["targets"] == targets
    recovery = len(targets) * 64 * (2 * (h + i) + (i + h))  # gate, up: h -> i; down: i -> h
    assert p["params"]["removed"] == len(targets) * mlp
    assert p["params"]["recovery"] == recovery == 43_499_520
    assert p["params"]["stored"] == 6_738_415_616 - len(targets) * mlp + recovery == 4_752_920_576


@pytest.mark.parametrize("name, total", [("llama-3-8b.json", 8_030_261_248), ("qwen2.5-7b.json", 7_615_616_512)])
def test_other_7b_class_counts(name, total):
    p = _plan(CONFIGS / name, strategy="next:2-27")
    assert p["params"]["original"] == total


def test_counts_match_a_real_shared_model(stories_path):
    p = _plan(stories_path, strategy="next:1-4", recovery="lora:4", train="full-lora", full_lora_rank=2)
    model, _ = sharp.load_model(str(stories_path))
    sharp.share(model, "next:1-4", "lora:4")
    counts = sharp.count_parameters(model)
    assert {k: p["params"][k] for k in counts} == counts
    from sharp.recovery.trainable import add_full_lora, mark_trainable

    add_full_lora(model, rank=2)
    assert p["params"]["trainable"] == mark_trainable(model, "full-lora")["trainable"]


def test_planner_map_with_ranks_and_drops_matches_a_real_shared_model(stories_path):
    """A planner's map (a per-target rank, a dropped MLP, a dropped block) and --train recovery+shared: plan
    counts what `sharp.share` + `mark_trainable` give, and SLW's targets in the original model's numbering."""
    strategy = "map:3=2@2,4=2,0=drop-mlp,1=drop-block"
    p = _plan(stories_path, strategy=strategy, recovery="lora:4", train="recovery+shared")
    model, _ = sharp.load_model(str(stories_path))
    sharp.share(model, strategy, "lora:4")
    counts = sharp.count_parameters(model)
    assert {k: p["params"][k] for k in counts} == counts
    from sharp.recovery.trainable import mark_trainable

    assert p["params"]["trainable"] == mark_trainable(model, "recovery+shared")["trainable"] > counts["recovery"]
    assert p["targets"] == [3, 4]


def test_auto_strategy_is_refused_in_one_line(capsys):
    code, _, err = run_cli(["plan", LLAMA2, "-s", "auto:40%", "--data-size", "1000", "--no-probe"], capsys)
    assert code != 0 and "planner" in err and "Traceback" not in err


def test_dtype_fp32_by_default_and_auto_is_the_source_dtype(stories_path, tmp_path):
    """fp32 by default; auto: a bare config.json's declared dtype (Llama-2-7B: float16), a folder's weights'
    (stories260K: fp32; the same folder saved in bf16: bf16); compress's spellings are accepted, bytes follow."""
    from transformers import AutoModelForCausalLM

    assert _plan()["bytes"]["dtype"] == "float32"  # the default: what compress computes in on a CPU
    assert _plan(dtype="auto")["bytes"]["dtype"] == "float16"
    assert _plan(dtype="bf16")["bytes"]["dtype"] == "bfloat16"
    assert _plan()["bytes"]["original"] == 2 * _plan(dtype="auto")["bytes"]["original"]
    assert _plan(stories_path, strategy="next:1-4", dtype="auto")["bytes"]["dtype"] == "float32"
    AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert _plan(tmp_path / "bf16", strategy="next:1-4", dtype="auto")["bytes"]["dtype"] == "bfloat16"
    with pytest.raises(sharp.SharpError, match="unknown --dtype 'int8'"):
        _plan(dtype="int8")


def test_slw_steps_scale_the_slw_stage():
    flops = {n: _plan(slw_steps=n, tflops=100)["stages"]["slw"]["flops"] for n in (10, 300)}
    assert flops[10] < flops[300]


def test_sharded_sft_divides_weights_and_state_over_devices():
    one = _plan(dtype="bfloat16", tflops=100)["stages"]["sft"]
    ddp = _plan(dtype="bfloat16", tflops=100, devices=8)["stages"]["sft"]
    zero2 = _plan(dtype="bfloat16", tflops=100, devices=8, sft_parallel="zero2")["stages"]["sft"]
    zero3 = _plan(dtype="bfloat16", tflops=100, devices=8, sft_parallel="zero3")["stages"]["sft"]
    assert ddp["memory"]["weights"] == one["memory"]["weights"]  # DDP replicates the model
    assert zero2["memory"]["weights"] == one["memory"]["weights"]
    zero2_one = _plan(dtype="bfloat16", tflops=100, sft_parallel="zero2")["stages"]["sft"]
    assert zero2["memory"]["optimizer"] == pytest.approx(zero2_one["memory"]["optimizer"] / 8, rel=1e-6)
    assert zero3["memory"]["weights"] < one["memory"]["weights"] / 4  # ZeRO-3 shards the weights too
    # same steps and per-device batch: 8 devices train on 8x the tokens (evals stay on one) in about the same time
    assert ddp["flops"] > 6 * one["flops"] and ddp["seconds"] < 1.2 * one["seconds"]


def test_stated_throughput_gives_time_per_stage():
    p = _plan(tflops=100)
    assert all(st["seconds"] > 0 for st in p["stages"].values())
    assert p["total_seconds"] == pytest.approx(sum(st["seconds"] for st in p["stages"].values()))
    assert _plan()["total_seconds"] is None  # no probe, no stated throughput: FLOPs only


def test_slw_disk_estimate_matches_a_real_capture(stories_path, tmp_path):
    from sharp.recovery.capture import capture_activations

    model, _ = sharp.load_model(str(stories_path), dtype=torch.float32)
    ids = torch.randint(1, 500, (3, 40), generator=torch.Generator().manual_seed(0))
    store = capture_activations(model, [{"input_ids": ids}], [2, 4], tmp_path / "act", progress=False)
    for layer in (2, 4):
        on_disk = sum(f.stat().st_size for f in store.shards(layer))
        expected = slw_disk_bytes(store.num_tokens(layer), model.config.hidden_size, "float16")
        assert abs(on_disk - expected) < 0.02 * expected + 512, (on_disk, expected)  # + a safetensors header


def test_probe_measures_positive_throughput():
    from sharp.recipes.plan import _throughput

    cfg = tiny_config("llama")  # the probe needs a config only, no weights
    rates, source = _throughput(PlanSettings(model="x", strategy="next:1-4", recovery="lora:4", data_size=10,
                                             probe_tokens=32, dtype="float32"), cfg)  # as plan() resolves it
    assert all(r > 0 for r in rates.values()) and source.startswith("probe")


def test_cli_plan_json_and_errors(capsys):
    code, out, err = run_cli(["plan", LLAMA2, "-s", "next:2-31", "-r", "lora:64", "--data-size", "1000",
                              "--no-probe", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["params"]["stored"] == 4_752_920_576
    code, out, err = run_cli(["plan", LLAMA2, "-s", "next:2-31", "--data-size", "1000", "--tflops", "50",
                              "--devices", "8", "--sft-parallel", "fsdp"], capsys)
    assert code == 0, err
    assert "4,752,920,576" in out.replace("\n", "") or "6,738,415,616" in out
    code, _, err = run_cli(["plan", LLAMA2, "-s", "next:2-31", "--data-size", "1000", "--sft-parallel", "tp"],
                           capsys)
    assert code == 2 and "unknown --sft-parallel 'tp'" in err and "Traceback" not in err


@pytest.mark.parametrize(("flag", "fragment"), [
    (["--stages", "warmup"], "--stages"), (["--stages", "sft,sft"], "--stages"),
    (["--batch-size", "0"], "--batch-size"),
    (["--max-len", "0"], "--max-len"), (["--max-len", "100000"], "--max-len"), (["--slw-workers", "0"], "workers"),
    (["--eval-fraction", "1"], "--eval-fraction"), (["--slw-fraction", "5"], "--slw-fraction"),
    (["--sft-steps", "-5"], "steps"), (["--grad-accum", "0"], "--grad-accum"),
    (["--probe-device", "gpu"], "--probe-device 'gpu'"),
])
def test_cli_plan_refuses_what_compress_refuses(stories_path, capsys, flag, fragment):
    probe = [] if flag[0] == "--probe-device" else ["--no-probe"]
    code, out, err = run_cli(["plan", stories_path, "-s", "next:1-4", "--data-size", "100", *probe, *flag], capsys)
    assert code == 2 and fragment in err, (code, err)
    assert len(err.strip().splitlines()) == 1 and not out
