"""Numerical guards: a NaN/inf loss stops SLW and SFT with one line naming the last good checkpoint, which stays on
disk intact, and a rerun resumes from it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import sharp
from sharp.errors import SharpError
from sharp.recovery import slw, slw_layer
from sharp.recovery.capture import capture_activations
from sharp.recovery.sft import NonFiniteLossError, SFTConfig, run_sft
from sharp.recovery.sft_workdir import TRAINABLE, last_checkpoint
from sharp.recovery.trainable import mark_trainable
from sharp.sharing.shared import recoveries
from tests.conftest import C4, STORIES, run_cli

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def batches():
    tok = AutoTokenizer.from_pretrained(STORIES)
    texts = [json.loads(line)["text"] for line in C4.read_text().splitlines()[:8]]
    ids = [tok(t, truncation=True, max_length=64)["input_ids"] for t in texts]
    ids = [i for i in ids if len(i) == 64][:6]
    return [{"input_ids": torch.tensor(ids[i : i + 2]), "labels": torch.tensor(ids[i : i + 2])}
            for i in range(0, len(ids), 2)]


def _shared():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    return sharp.share(model, "next:1-4", "lora:4")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_slw_stops_on_a_non_finite_loss_and_keeps_its_last_good_state(batches, tmp_path, monkeypatch, bad):
    original = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    store = capture_activations(original, batches, [2], tmp_path / "act", dtype="float32", progress=False)
    # sink_positions=0: one loss call per step (no separate position-0 group), so call 7 is step 7
    cfg = slw.SLWConfig(steps=12, checkpoint_every=4, eval_every=4, patience=100, threads=1, dtype="float32",
                        sink_positions=0)
    real_loss, calls = slw_layer.loss_fn, []

    def poisoned(pred, target, kind):
        calls.append(1)
        loss = real_loss(pred, target, kind)
        return loss * bad if len(calls) == 7 else loss  # step 7 goes bad

    monkeypatch.setattr(slw_layer, "loss_fn", poisoned)
    with pytest.raises(SharpError, match="SLW loss of layer 2 became .* at step 7.*state.pt") as e:
        slw.train_slw(_shared(), store, cfg, tmp_path / "w", targets=[2], progress=False,
                      originals={2: original.model.layers[2].mlp})
    assert "\n" not in str(e.value)
    layer = tmp_path / "w" / "layer_002"
    state = torch.load(layer / "state.pt", weights_only=False)
    assert state["info"]["step"] == 4  # the last periodic state before the bad step
    assert all(torch.isfinite(t).all() for t in state["mlp"].values())
    assert not (layer / "result.json").exists()  # the layer is not marked done

    monkeypatch.setattr(slw_layer, "loss_fn", real_loss)  # the problem fixed: a rerun resumes from step 4
    result = slw.train_slw(_shared(), store, cfg, tmp_path / "w", targets=[2], progress=False,
                      originals={2: original.model.layers[2].mlp})
    assert result[2]["step"] == 12
    events = [json.loads(line)["event"] for line in (tmp_path / "w" / slw.LOG).read_text().splitlines()]
    assert "resume" in events


class _Poison(TrainerCallback):
    def __init__(self, step: int, value: float) -> None:
        self.step, self.value = step, value

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                recoveries(model)[0][1].lora_B.fill_(self.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sft_stops_on_a_non_finite_loss_and_keeps_the_last_good_checkpoint(batches, tmp_path, bad):
    examples = [{"input_ids": row.tolist(), "labels": row.tolist()} for b in batches for row in b["input_ids"]]
    model = _shared()
    mark_trainable(model, "recovery")
    cfg = SFTConfig(steps=8, lr=1e-3, batch_size=2, save_steps=2, eval_steps=0, logging_steps=1, progress=False)

    def collate(rows):
        return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels")}

    with pytest.raises(NonFiniteLossError, match="checkpoint-4") as e:
        run_sft(model, examples, [], cfg, tmp_path / "w", collate, callbacks=[_Poison(5, bad)])
    assert isinstance(e.value, SharpError) and "\n" not in str(e.value)
    good = last_checkpoint(tmp_path / "w")
    assert good.name == "checkpoint-4"
    assert all(torch.isfinite(t).all() for t in load_file(good / TRAINABLE).values())


def test_cli_reports_a_non_finite_loss_in_one_line(monkeypatch, tmp_path, capsys):
    import importlib

    recipe = importlib.import_module("sharp.recipes.compress")  # the module (the package exports a function)

    def diverge(cfg, work, progress):
        raise NonFiniteLossError("SFT loss became nan at step 3; training stopped and the last good checkpoint "
                                 "is checkpoint-2; lower --lr or check the data")

    monkeypatch.setattr(recipe, "_compress", diverge)
    code, _, err = run_cli(["compress", STORIES, "-s", "next:1-4", "-r", "lora:4", "--data", f"text:{C4}",
                            "--out", tmp_path / "o"], capsys)
    assert code == 2 and err.count("\n") == 1 and "lower --lr" in err
    assert not (tmp_path / "o").exists()
