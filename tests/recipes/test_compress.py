"""`sharp compress` end to end on stories260K: argument checks, the perplexity ordering, the output folder,
and a run killed with SIGKILL during SFT that resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sharp
from sharp.errors import SharpError
from sharp.recipes import CompressConfig
from tests.conftest import C4
from tests.conftest import STORIES as MODEL

ARGS = [str(MODEL), "--strategy", "next:1-4", "--recovery", "lora:8", "--data", f"text:{C4}",
        "--max-len", "128", "--batch-size", "8", "--slw-steps", "40", "--sft-steps", "30", "--lr", "5e-3",
        "--eval-steps", "15", "--save-steps", "10", "--eval-fraction", "0.15"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cli(args: list[str], **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from sharp.cli import main; main()", "compress", *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _run(args: list[str]) -> tuple[int, str]:
    proc = _cli(args)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def _cfg(tmp_path: Path, **kw) -> CompressConfig:
    base = dict(model=str(MODEL), strategy="next:1-4", recovery="lora:8", data=f"text:{C4}", out=str(tmp_path / "o"))
    return CompressConfig(**{**base, **kw})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": "sft,sft"}, "--stages"),
        ({"stages": "warmup"}, "--stages"),
        ({"recovery": "none"}, "nothing to train"),
        ({"strategy": "next:1-9"}, "out of range"),
        ({"recovery": "lora:999"}, "rank"),
        ({"data": "text:/nonexistent/x.jsonl"}, "does not exist"),
        ({"max_len": 100_000}, "--max-len"),
        ({"lr": -1.0}, "--lr"),
        ({"slw_fraction": 0.0}, "--slw-fraction"),
        ({"train": "everything"}, "--train"),
        ({"template": "fancy"}, "--template"),
        ({"eval_fraction": 0.0}, "--eval-fraction"),
        ({"model": "/nonexistent/model"}, "not found"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, change, message):
    with pytest.raises(SharpError, match=message):
        _cfg(tmp_path, **change).validate()
    assert not (tmp_path / "o.work").exists()


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "file").write_text("x")
    with pytest.raises(SharpError, match="--overwrite"):
        _cfg(tmp_path).validate()
    _cfg(tmp_path, overwrite=True).validate()


@pytest.mark.parametrize("make", [lambda w: (w.mkdir(), (w / "notes.txt").write_text("mine")),
                                  lambda w: w.write_text("x")])
def test_a_work_folder_sharp_did_not_make_is_never_removed(tmp_path, make):
    from sharp.recipes.config import prepare_work_dir

    cfg = _cfg(tmp_path)
    make(cfg.work_dir)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for check in (cfg.validate, lambda: prepare_work_dir(cfg)):
        with pytest.raises(SharpError, match="not a sharp work folder"):
            check()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_cli_reports_a_bad_argument_in_one_line(tmp_path):
    code, out = _run([ARGS[0], "--strategy", "next:3-3", *ARGS[3:], "--out", str(tmp_path / "o")])
    assert code == 2 and "Traceback" not in out and "next:3-3" in out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    code, log = _run([*ARGS, "--out", str(out)])
    assert code == 0, log
    assert "held-out perplexity" in log and "Direct Sharing" in log
    return out


def test_compress_orders_perplexity_and_writes_a_checkpoint(finished):
    summary = json.loads((finished / "summary.json").read_text())
    ppl = summary["perplexity"]
    assert ppl["sft"] <= ppl["slw"] < ppl["direct"], ppl
    assert summary["mlp_reduction"] == pytest.approx(0.4)
    assert not Path(str(finished) + ".work").exists()  # work files go once the checkpoint is complete
    rows = [json.loads(line) for line in (finished / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"eval", "slw", "sft"}
    assert {r["layer"] for r in rows if r["stage"] == "slw"} == {2, 4}
    model = sharp.load(finished)  # a normal sharp checkpoint (manifest verified), recovery trained
    lora_b = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)


@pytest.mark.slow
def test_killed_during_sft_resumes_to_the_same_result(finished, tmp_path):
    out = tmp_path / "out"
    proc = _cli([*ARGS, "--out", str(out)])
    sft = tmp_path / "out.work" / "sft"
    deadline = time.time() + 600
    while not list(sft.glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first SFT checkpoint"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not out.exists()
    code, log = _run([*ARGS, "--out", str(out)])
    assert code == 0, log
    assert "SFT resumes from" in log
    got, want = (json.loads((d / "summary.json").read_text())["perplexity"] for d in (out, finished))
    for stage in ("original", "direct", "slw", "sft"):
        assert got[stage] == pytest.approx(want[stage], rel=1e-4), stage
    a, b = sharp.load(out), sharp.load(finished)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_hidden_state_distillation_pairs_a_plans_layers_with_the_original(tmp_path, monkeypatch):
    """A plan that drops block 1: SFT's hidden-state term compares compressed layer i with the original's
    `base_layers()[i]` (0, 2, 3, 4), and the run trains to a checkpoint."""
    import sharp.recovery.distill as distill
    from sharp.recipes.compress import compress

    maps = []
    hidden_state_loss = distill.hidden_state_loss

    def recording(student, teacher, keep, teacher_layers=None):
        maps.append(teacher_layers)
        return hidden_state_loss(student, teacher, keep, teacher_layers)

    monkeypatch.setattr(distill, "hidden_state_loss", recording)
    cfg = _cfg(tmp_path, strategy="map:3=2,1=drop-block", recovery="lora:4", max_len=64, batch_size=4,
               slw_steps=2, sft_steps=2, eval_steps=0, loss="kd", kd_hidden=1.0, data=f"text:{C4}[:12]")
    summary = compress(cfg, progress=False)
    assert summary["sft"]["steps"] == 2 and maps
    assert all(m == {0: 0, 1: 2, 2: 3, 3: 4} for m in maps)


def test_a_rerun_that_changes_only_sft_settings_keeps_the_finished_slw(tmp_path, monkeypatch):
    """The first run trains SLW and SFT and dies while saving; the rerun with another --lr / --sft-steps / --loss
    loads SLW's layers instead of capturing and training them again, keeps the perplexities before SFT, and redoes
    SFT: the old SFT's checkpoints, perplexity and log lines are gone."""
    import importlib

    import sharp.recovery.slw as slw

    recipe = importlib.import_module("sharp.recipes.compress")  # the module (sharp.recipes.compress is the function)
    small = dict(max_len=64, batch_size=4, slw_steps=6, sft_steps=2, eval_steps=0, save_steps=1, eval_fraction=0.15,
                 data=f"text:{C4}[:8]")
    atomic_dir = recipe.atomic_dir

    def killed(*args, **kwargs):
        raise RuntimeError("killed while saving")

    monkeypatch.setattr(recipe, "atomic_dir", killed)
    with pytest.raises(RuntimeError, match="killed"):
        recipe.compress(_cfg(tmp_path, **small), progress=False)
    work = tmp_path / "o.work"
    log = work / "train_log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    slw_rows = [r for r in rows if r["stage"] == "slw"]
    before = json.loads((work / "evals.json").read_text())
    assert slw_rows and "sft" in before and any(r["stage"] == "sft" for r in rows)
    assert list((work / "sft").glob("checkpoint-*"))
    discarded = next(r["seconds"] for r in rows if r["stage"] == "eval" and r["model"] == "sft")
    with open(log, "a") as f:
        f.write('{"stage": "sft", "ste')  # a line a kill cut off

    monkeypatch.setattr(recipe, "atomic_dir", atomic_dir)

    def no_capture(*args, **kwargs):
        raise AssertionError("SLW captured activations again")

    monkeypatch.setattr(slw, "capture_activations", no_capture)
    changed = _cfg(tmp_path, **{**small, "lr": 2e-3, "sft_steps": 3, "loss": "kd"})  # kd: the teacher loads
    changed.validate()  # an SFT-only change is not refused
    with pytest.warns(UserWarning, match="only SFT settings changed.*--lr"):
        summary = recipe.compress(changed, progress=False)
    after = summary["perplexity"]
    assert {k: after[k] for k in ("original", "direct", "slw")} == {k: before[k] for k in ("original", "direct", "slw")}
    assert after["sft"] != before["sft"] and summary["sft"]["steps"] == 3
    rows = [json.loads(line) for line in (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()]
    assert [r for r in rows if r["stage"] == "slw"] == slw_rows  # once each, as the first run logged them
    evals = [r for r in rows if r["stage"] == "eval"]
    assert sum(r.get("model") == "sft" for r in evals) == 1
    # the evaluations' time: the first run's three before SFT and the rerun's SFT one, not the discarded one
    assert abs(summary["timing"]["eval"]["seconds"] - sum(r["seconds"] for r in evals)) < discarded / 2
