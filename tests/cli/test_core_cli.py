"""`sharp share` / `sharp info` / `sharp merge`: the issue's must-show checks, in-process."""

import json

import pytest

from sharp.io.manifest import folder_bytes
from tests.conftest import run_cli


def test_share_then_info_counts_exactly(stories_path, tmp_path, capsys):
    out = tmp_path / "s260"
    code, _, err = run_cli(["share", stories_path, "--strategy", "next:1-4", "--recovery", "lora:4", "--out", out],
                           capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["info", out, "--json"], capsys)
    assert code == 0, err
    info = json.loads(stdout)
    h, i = 64, 172  # stories260K: dim 64, MLP 172, 5 layers
    removed = 2 * 3 * h * i  # targets 2 and 4
    recovery = 2 * 3 * 4 * (h + i)
    assert info["params_removed"] == removed
    assert info["params_recovery"] == recovery
    assert info["params_stored"] == info["params_original"] - removed + recovery
    assert info["shared_mlps"] == 2 and info["sharing"] == {"2": 1, "4": 3}

    code, stdout, _ = run_cli(["info", stories_path, "--json"], capsys)
    original = json.loads(stdout)
    assert original["params_stored"] == original["params_original"] == info["params_original"]
    # bytes on disk shrink by the removed weights (fp32) minus what recovery adds
    saved = (removed - recovery) * 4
    shrink = original["bytes_on_disk"] - info["bytes_on_disk"]
    assert abs(shrink - saved) < 0.02 * original["bytes_on_disk"], (shrink, saved)
    assert folder_bytes(out) == info["bytes_on_disk"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--strategy", "next:4-2", "--recovery", "lora:4"], "after its end"),
        (["--strategy", "next:1-9", "--recovery", "lora:4"], "out of range"),
        (["--strategy", "banana", "--recovery", "lora:4"], "malformed strategy"),
        (["--strategy", "next:1-4", "--recovery", "dora:4"], "unknown recovery"),
        (["--strategy", "next:1-4", "--recovery", "lora:100"], "larger than"),
        (["--strategy", "next:1-4", "--recovery", "lora:4", "--modules", "ffn"], "--modules"),
    ],
)
def test_bad_share_arguments_fail_in_one_line_and_write_nothing(stories_path, tmp_path, capsys, args, fragment):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["share", stories_path, *args, "--out", out], capsys)
    assert code == 2
    assert fragment in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_or_corrupt_model_folder(tmp_path, capsys):
    code, _, err = run_cli(["share", tmp_path / "nope", "--strategy", "next:1-4", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "not found" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    code, _, err = run_cli(["share", bad, "--strategy", "next:1-4", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("keep", [0, 1000])  # an empty file, a header cut short
def test_damaged_weights_of_a_plain_model_folder_are_one_line(stories_path, tmp_path, capsys, keep):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(stories_path, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    code, _, err = run_cli(["info", bad], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"cannot load model '{bad}'" in err


def test_existing_output_is_not_overwritten_without_flag(stories_path, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run_cli(["share", stories_path, "--strategy", "next:1-4", "--out", out], capsys)
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"


def test_verify_accepts_intact_and_rejects_damaged_checkpoints(stories_path, tmp_path, capsys):
    out = tmp_path / "s"
    args = ["share", stories_path, "--strategy", "next:1-4", "--recovery", "scale", "--out", out]
    assert run_cli(args, capsys)[0] == 0
    code, stdout, _ = run_cli(["verify", out], capsys)
    assert code == 0 and "OK" in stdout
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    code, _, err = run_cli(["verify", out], capsys)
    assert code == 1 and "model.safetensors" in err and "corrupted" in err
