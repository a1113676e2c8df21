"""Integrity: manifests carry a sha256 per file and the base identity; adapter-only checkpoints load only on the
base model they were made from (architecture, config and weights checked)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sharp
from sharp.errors import SharpError
from sharp.io.formats import MANIFEST, RECOVERY, SHARP_CONFIG, WEIGHTS, is_adapter_only
from sharp.io.manifest import sha256_file
from sharp.sharing.state import sharp_config
from tests.conftest import STORIES, randomize_recovery, run_cli, tiny_model

IDS = torch.tensor([[1, 403, 407, 261, 378, 300, 270, 261, 2]])


def _shared(seed: int = 1):
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    sharp.share(model, "next:1-4", "lora+scale:4", source=str(STORIES))
    randomize_recovery(model, seed)
    return model


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    model = _shared()
    out = tmp_path_factory.mktemp("adapter") / "a"
    sharp.save(model, out, tokenizer=AutoTokenizer.from_pretrained(STORIES), adapter_only=True)
    with torch.no_grad():
        logits = model(IDS).logits
    return out, logits


def test_manifest_lists_every_file_with_sha256_and_the_base_identity(checkpoint):
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    on_disk = {f.name for f in checkpoint.iterdir() if f.is_file() and f.name != MANIFEST}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(checkpoint / name)
        assert entry["bytes"] == (checkpoint / name).stat().st_size
    base = manifest["base"]
    assert base == json.loads((checkpoint / SHARP_CONFIG).read_text())["base"]
    assert base["model_type"] == "llama" and len(base["config_sha256"]) == len(base["weights_sha256"]) == 64
    assert manifest["adapter_only"] is False


def test_adapter_only_holds_no_base_weights_and_rebuilds_exactly(adapter, checkpoint):
    out, logits = adapter
    assert is_adapter_only(out) and not (out / WEIGHTS).exists()
    assert json.loads((out / MANIFEST).read_text())["adapter_only"] is True
    size = sum(f.stat().st_size for f in out.iterdir())
    assert size < (checkpoint / WEIGHTS).stat().st_size / 4  # recovery + configs only
    for base in (str(STORIES), AutoModelForCausalLM.from_pretrained(STORIES), None):  # None: recorded source
        model = sharp.load(out, base=base)
        with torch.no_grad():
            torch.testing.assert_close(model(IDS).logits, logits, rtol=0, atol=0)
        layers = model.model.layers
        assert layers[2].mlp.up_proj.base_layer is layers[1].mlp.up_proj  # really shared


def test_adapter_refuses_a_base_with_other_weights(adapter, tmp_path):
    out, _ = adapter
    other = AutoModelForCausalLM.from_pretrained(STORIES)
    with torch.no_grad():
        other.model.layers[3].mlp.down_proj.weight[0, 0] += 1e-3  # one weight of a fine-tune
    with pytest.raises(SharpError, match="weights differ") as e:
        sharp.load(out, base=other)
    assert "\n" not in str(e.value)
    other.save_pretrained(tmp_path / "ft")
    shutil.copy(STORIES / "tokenizer.model", tmp_path / "ft")
    with pytest.raises(SharpError, match="weights differ"):
        sharp.load(out, base=str(tmp_path / "ft"))


def test_adapter_refuses_another_architecture_or_config(adapter):
    out, _ = adapter
    with pytest.raises(SharpError, match="config differs"):
        sharp.load(out, base=tiny_model("llama"))
    with pytest.raises(SharpError, match="holds recovery for a llama base"):
        sharp.load(out, base=tiny_model("qwen2"))


def test_adapter_refuses_bad_bases(adapter, checkpoint):
    out, _ = adapter
    with pytest.raises(SharpError, match="is a sharp checkpoint"):
        sharp.load(out, base=str(checkpoint))
    with pytest.raises(SharpError, match="already shares layers"):
        sharp.load(out, base=_shared())
    with pytest.raises(SharpError, match="full checkpoint"):
        sharp.load(checkpoint, base=str(STORIES))


def test_adapter_without_a_findable_base_says_how_to_pass_one(adapter, tmp_path):
    out, _ = adapter
    moved = tmp_path / "a"
    shutil.copytree(out, moved)
    cfg = json.loads((moved / SHARP_CONFIG).read_text())
    cfg["base"]["source"] = "someone/private-model"
    (moved / SHARP_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(SharpError, match="base="):
        sharp.load(moved, verify=False)


def test_adapter_of_a_model_whose_kept_weights_changed_is_refused(tmp_path):
    model = _shared()
    with torch.no_grad():  # as --train full-lora does: the reference layers change after sharing
        model.model.layers[1].mlp.up_proj.weight.mul_(1.01)
    sharp.save(model, tmp_path / "a", adapter_only=True)
    with pytest.raises(SharpError, match="kept base weights differ"):
        sharp.load(tmp_path / "a", base=str(STORIES))


def test_adapter_of_a_quantized_or_anonymous_model_is_refused(tmp_path):
    model = _shared()
    sharp_config(model).base.weights_sha256 = ""
    with pytest.raises(SharpError, match="save it whole"):
        sharp.save(model, tmp_path / "a", adapter_only=True)
    assert not (tmp_path / "a").exists()


def test_cli_share_adapter_only_then_verify(tmp_path, capsys):
    out = tmp_path / "a"
    code, _, err = run_cli(["share", STORIES, "-s", "next:1-4", "-r", "lora:4", "--adapter-only", "--out", out],
                           capsys)
    assert code == 0, err
    assert is_adapter_only(out)
    code, stdout, err = run_cli(["verify", out], capsys)
    assert code == 0 and "OK" in stdout, err
    other = tiny_model("llama")
    other.save_pretrained(tmp_path / "other")
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(STORIES / f, tmp_path / "other")
    code, _, err = run_cli(["verify", out, "--base", tmp_path / "other"], capsys)
    assert code == 1 and "another base" in err


def test_edited_recovery_file_is_caught_by_the_manifest_even_when_sizes_match(adapter, tmp_path):
    out, _ = adapter
    bad = tmp_path / "a"
    shutil.copytree(out, bad)
    data = bytearray((bad / RECOVERY).read_bytes())
    data[-1] ^= 0xFF
    (bad / RECOVERY).write_bytes(bytes(data))
    with pytest.raises(SharpError, match="sha256"):
        sharp.load(bad, base=str(STORIES))
