"""The loader against damaged checkpoints: truncated safetensors, flipped bytes, edited or invalid JSON, missing
files, a wrong sharing map. Every case is a one-line `SharpError` from `sharp.load` and a failing
`sharp verify`; none loads a silently wrong model. Structural damage is refused even with `verify=False`
(the manifest skipped), and hypothesis truncates the tensor files at arbitrary lengths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import sharp
from sharp.errors import SharpError
from sharp.io.formats import MANIFEST, RECOVERY, SHARP_CONFIG, WEIGHTS
from sharp.io.manifest import write_manifest
from tests.conftest import run_cli


def _truncate(name: str, keep: float = 0.5):
    def damage(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: int(len(data) * keep)])

    return damage


def _flip(name: str):
    def damage(d: Path) -> None:
        data = bytearray((d / name).read_bytes())
        data[len(data) * 2 // 3] ^= 0x55
        (d / name).write_bytes(bytes(data))

    return damage


def _remove(name: str):
    return lambda d: (d / name).unlink()


def _edit_json(name: str, edit):
    def damage(d: Path) -> None:
        obj = json.loads((d / name).read_text())
        edit(obj)
        (d / name).write_text(json.dumps(obj))

    return damage


def _write(name: str, text: str):
    return lambda d: (d / name).write_text(text)


def _resign(damage):
    """Damage, then rewrite the manifest to match: only the loader's own checks can catch it now."""

    def both(d: Path) -> None:
        damage(d)
        write_manifest(d)

    return both


def _nan_recovery(d: Path) -> None:
    tensors = load_file(d / RECOVERY)
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, d / RECOVERY, metadata={"format": "pt"})


def _drop_recovery_tensor(d: Path) -> None:
    tensors = load_file(d / RECOVERY)
    del tensors[sorted(tensors)[0]]
    save_file(tensors, d / RECOVERY, metadata={"format": "pt"})


# name -> (damage, fragment of the load error); all are caught by the manifest (verify=True)
DAMAGE = {
    "truncated-weights": (_truncate(WEIGHTS), "truncated"),
    "truncated-recovery": (_truncate(RECOVERY), "truncated"),
    "empty-weights": (_truncate(WEIGHTS, 0.0), "truncated"),
    "flipped-byte-weights": (_flip(WEIGHTS), "sha256"),
    "flipped-byte-recovery": (_flip(RECOVERY), "sha256"),
    "missing-weights": (_remove(WEIGHTS), "missing"),
    "missing-recovery": (_remove(RECOVERY), "missing"),
    "missing-config": (_remove("config.json"), "missing"),
    "missing-manifest": (_remove(MANIFEST), "manifest.json is missing"),
    "manifest-garbage": (_write(MANIFEST, "{not json"), "unreadable"),
    "manifest-wrong-types": (_write(MANIFEST, '{"files": {"x": 3}}'), "unreadable"),
    "manifest-escapes-folder": (_write(MANIFEST, '{"files": {"../x": {"bytes": 1, "sha256": "0"}}}'), "invalid"),
    "manifest-forgets-weights": (_edit_json(MANIFEST, lambda m: m["files"].pop(WEIGHTS)), "does not list"),
    "sharing-map-edited": (_edit_json(SHARP_CONFIG, lambda c: c["sharing"].update({"3": 2})), "sharp_config"),
    "recovery-spec-edited": (_edit_json(SHARP_CONFIG, lambda c: c.update(recovery="lora:8")), "sharp_config"),
    "config-edited": (_edit_json("config.json", lambda c: c.update(hidden_size=32)), "config.json"),
}

# damage the manifest is rewritten over: the loader itself must refuse
STRUCTURAL = {
    "sharing-map-out-of-range": (_edit_json(SHARP_CONFIG, lambda c: c.update(sharing={"2": 1, "9": 3})), "range"),
    "sharing-map-self-reference": (_edit_json(SHARP_CONFIG, lambda c: c.update(sharing={"2": 2})), "own reference"),
    "sharing-map-chained": (_edit_json(SHARP_CONFIG, lambda c: c.update(sharing={"2": 1, "3": 2})), "both"),
    "sharing-map-other-targets": (_edit_json(SHARP_CONFIG, lambda c: c.update(sharing={"2": 1, "3": 4})),
                                  "does not match"),
    "sharing-map-empty": (_edit_json(SHARP_CONFIG, lambda c: c.update(sharing={})), "empty sharing map"),
    "sharing-map-not-ints": (_edit_json(SHARP_CONFIG, lambda c: c.update(sharing={"two": 1})), "malformed"),
    "recovery-rank-edited": (_edit_json(SHARP_CONFIG, lambda c: c.update(recovery="lora:8")), "shape"),
    "recovery-kind-edited": (_edit_json(SHARP_CONFIG, lambda c: c.update(recovery="scale")), "do not match"),
    "recovery-unknown": (_edit_json(SHARP_CONFIG, lambda c: c.update(recovery="dora:4")), "unknown recovery"),
    "sharp-config-unknown-key": (_edit_json(SHARP_CONFIG, lambda c: c.update(extra=1)), "unknown keys"),
    "sharp-config-newer-format": (_edit_json(SHARP_CONFIG, lambda c: c.update(format_version=99)), "upgrade"),
    "sharp-config-invalid-json": (_write(SHARP_CONFIG, '{"sharing": '), "not valid JSON"),
    "sharp-config-a-list": (_write(SHARP_CONFIG, "[1, 2]"), "JSON object"),
    "config-other-width": (_edit_json("config.json", lambda c: c.update(hidden_size=32)), "cannot load checkpoint"),
    "config-other-architecture": (_edit_json("config.json", lambda c: c.update(model_type="qwen2")), "qwen2"),
    "truncated-weights": (_truncate(WEIGHTS), "cannot load checkpoint"),
    "truncated-recovery": (_truncate(RECOVERY), "cannot read"),
    "missing-recovery-tensor": (_drop_recovery_tensor, "do not match"),
    "nan-recovery": (_nan_recovery, "NaN"),
}


def _damaged(checkpoint: Path, tmp_path: Path, damage) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    damage(bad)
    return bad


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_manifest_catches_damage(name, checkpoint, tmp_path, capsys):
    damage, fragment = DAMAGE[name]
    bad = _damaged(checkpoint, tmp_path, damage)
    with pytest.raises(SharpError, match=fragment) as e:
        sharp.load(bad)
    assert "\n" not in str(e.value)
    code, _, err = run_cli(["verify", bad], capsys)
    assert code == 1 and "FAIL" in err and "Traceback" not in err


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
def test_loader_refuses_structural_damage_without_the_manifest(name, checkpoint, tmp_path, capsys):
    damage, fragment = STRUCTURAL[name]
    bad = _damaged(checkpoint, tmp_path, _resign(damage))
    with pytest.raises(SharpError, match=fragment) as e:
        sharp.load(bad)  # the manifest matches the damage: the loader's own checks answer
    assert "\n" not in str(e.value)
    code, _, err = run_cli(["verify", bad], capsys)
    assert code in (1, 2) and "Traceback" not in err


def test_missing_sharp_config_is_not_a_checkpoint(checkpoint, tmp_path, capsys):
    bad = _damaged(checkpoint, tmp_path, _remove(SHARP_CONFIG))
    with pytest.raises(SharpError, match="not a sharp checkpoint"):
        sharp.load(bad)
    code, _, err = run_cli(["verify", bad], capsys)
    assert code == 2 and "not a sharp checkpoint" in err


def test_intact_copy_loads(checkpoint, tmp_path):
    good = _damaged(checkpoint, tmp_path, lambda d: None)
    sharp.load(good)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from([WEIGHTS, RECOVERY]), keep=st.floats(0.0, 0.999))
def test_any_truncation_is_a_user_error(checkpoint, tmp_path_factory, which, keep):
    bad = _damaged(checkpoint, tmp_path_factory.mktemp("t"), _resign(_truncate(which, keep)))
    with pytest.raises(SharpError):
        sharp.load(bad)  # even with the manifest rewritten to match, never another exception
