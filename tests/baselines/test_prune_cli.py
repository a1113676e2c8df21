"""`sharp prune` end to end on stories260K, and its one-line errors (nothing written)."""

import json

import pytest

from sharp.io.pruned import PRUNE_CONFIG
from tests.conftest import C4 as C4_FILE
from tests.conftest import run_cli

C4 = f"text:{C4_FILE}"


def test_prune_layer_drop_then_info(stories_path, tmp_path, capsys):
    out = tmp_path / "ld"
    code, _, err = run_cli(["prune", stories_path, "--method", "layer-drop", "--budget", "40%", "--data", C4,
                            "--calib-samples", "4", "--max-len", "64", "--out", out], capsys)
    assert code == 0, err
    report = json.loads((out / PRUNE_CONFIG).read_text())
    code, stdout, err = run_cli(["info", out, "--json"], capsys)
    assert code == 0, err
    info = json.loads(stdout)
    assert info["params_stored"] == report["params_stored"] <= report["params_target"]
    assert report["params_target"] - report["params_stored"] < 0.01 * report["params_target"]
    assert info["layers"] == 5 - len(report["dropped_layers"])


def test_prune_heal_keeps_the_size(stories_path, tmp_path, capsys):
    out = tmp_path / "md"
    code, _, err = run_cli(["prune", stories_path, "--method", "mlp-drop", "--strategy", "next:1-4", "--heal",
                            "--data", C4 + "[:20]", "--max-len", "64", "--steps", "3", "--lora-rank", "2",
                            "--out", out], capsys)
    assert code == 0, err
    report = json.loads((out / PRUNE_CONFIG).read_text())
    assert report["healed"] and report["heal"]["steps"] == 3
    assert report["dropped_mlps"] == [2, 4] and report["params_stored"] == report["params_original"] - 2 * 3 * 64 * 172


@pytest.mark.parametrize("args, fragment", [
    (["--method", "drop-everything", "--budget", "40%"], "unknown --method"),
    (["--method", "width", "--budget", "forty", "--data", C4], "malformed --budget"),
    (["--method", "width", "--budget", "40%"], "pass --data"),
    (["--method", "layer-drop", "--data", C4], "needs --budget"),
    (["--method", "mlp-drop", "--budget", "40%", "--data", C4], "needs --strategy"),
    (["--method", "mlp-drop", "--strategy", "next:9-3"], "after its end"),
    (["--method", "width", "--budget", "40%", "--data", "alpaca:/no/such.json"], "does not exist"),
])
def test_bad_arguments_fail_before_work(stories_path, tmp_path, capsys, args, fragment):
    out = tmp_path / "never"
    code, _, err = run_cli(["prune", stories_path, *args, "--out", out], capsys)
    assert code == 2 and fragment in err and "Traceback" not in err
    assert not out.exists()


def test_prune_matches_a_sharp_checkpoint(stories_path, tmp_path, capsys):
    ck = tmp_path / "sharp"
    code, _, err = run_cli(["share", stories_path, "--strategy", "next:1-4", "--recovery", "lora:4", "--out", ck],
                           capsys)
    assert code == 0, err
    code, stdout, _ = run_cli(["info", ck, "--json"], capsys)
    target = json.loads(stdout)["params_stored"]
    out = tmp_path / "w"
    code, _, err = run_cli(["prune", stories_path, "--method", "width", "--budget", f"match:{ck}", "--data", C4,
                            "--calib-samples", "2", "--max-len", "64", "--out", out], capsys)
    assert code == 0, err
    report = json.loads((out / PRUNE_CONFIG).read_text())
    assert report["params_target"] == target
    assert 0 <= target - report["params_stored"] < 0.01 * target


def test_a_killed_heal_resumes_and_other_settings_are_refused(stories_path, tmp_path, monkeypatch):
    """Healing checkpoints to OUT.work: killed while saving OUT, the same call resumes from its last checkpoint
    (nothing trained again); a call with other settings is refused in one line unless overwrite; OUT.work is
    gone once OUT is saved."""
    import sharp.io.pruned as pruned
    from sharp.baselines.run import PruneOptions, prune_model
    from sharp.errors import SharpError

    out = tmp_path / "md"
    options = lambda steps: PruneOptions(  # noqa: E731
        method="mlp-drop", strategy="next:1-4", data=C4 + "[:20]", max_len=64, heal=True, lora_rank=2,
        sft={"steps": steps, "save_steps": 1, "eval_steps": 0}, device="cpu")
    save = pruned.save_pruned

    def killed(*args, **kwargs):
        raise RuntimeError("killed while saving")

    monkeypatch.setattr(pruned, "save_pruned", killed)
    with pytest.raises(RuntimeError, match="killed"):
        prune_model(str(stories_path), out, options(3))
    work = tmp_path / "md.work"
    assert list((work / "heal").glob("checkpoint-3"))
    monkeypatch.setattr(pruned, "save_pruned", save)
    with pytest.raises(SharpError, match=r"other settings \(--steps\).*--overwrite"):
        prune_model(str(stories_path), out, options(4))
    run_json = (work / "run.json").read_text()
    (work / "run.json").write_text(run_json[:20])  # cut off by a full disk, say
    with pytest.raises(SharpError, match=r"run.json' is damaged.*--overwrite"):
        prune_model(str(stories_path), out, options(3))
    (work / "run.json").write_text(run_json)
    report = prune_model(str(stories_path), out, options(3))
    assert report.heal["steps"] == 3 and report.heal["resumed_from"].endswith("checkpoint-3")
    assert (out / PRUNE_CONFIG).is_file() and not work.exists()


def test_a_heal_that_fails_before_training_leaves_nothing_that_refuses_the_fixed_rerun(stories_path, tmp_path):
    from sharp.baselines.run import PruneOptions, prune_model
    from sharp.errors import SharpError

    out = tmp_path / "md"
    options = lambda fraction: PruneOptions(  # noqa: E731
        method="mlp-drop", strategy="next:1-4", data=C4 + "[:16]", max_len=64, heal=True, lora_rank=2,
        eval_fraction=fraction, sft={"steps": 1}, device="cpu")
    with pytest.raises(SharpError, match="no training data"):
        prune_model(str(stories_path), out, options(0.99))
    assert not (tmp_path / "md.work").exists()
    assert prune_model(str(stories_path), out, options(0.1)).heal["steps"] == 1


def test_a_plain_prune_removes_the_folder_of_a_killed_heal(stories_path, tmp_path):
    """Once OUT is saved, a heal of OUT can no longer resume: its leftover OUT.work must not stay behind."""
    from sharp.baselines.run import PruneOptions, prune_model

    work = tmp_path / "md.work"
    (work / "heal" / "checkpoint-1").mkdir(parents=True)
    (work / "run.json").write_text("{}")
    prune_model(str(stories_path), tmp_path / "md", PruneOptions(method="mlp-drop", strategy="next:1-4",
                                                                 device="cpu"))
    assert (tmp_path / "md" / PRUNE_CONFIG).is_file() and not work.exists()


def test_every_front_end_heals_and_fine_tunes_at_the_same_default_lr():
    """The Python API (SFTConfig, used by PruneOptions and heal) once took 2e-4 where the CLI took 1e-3."""
    import inspect

    from sharp.cli.baselines import prune
    from sharp.cli.options import LR
    from sharp.recipes.config import CompressConfig
    from sharp.recovery.sft import SFTConfig

    prune_lr = inspect.signature(prune).parameters["lr"].default.default
    assert SFTConfig().lr == CompressConfig.lr == LR.default == prune_lr
