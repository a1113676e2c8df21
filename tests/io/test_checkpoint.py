import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sharp
from sharp.errors import SharpError
from sharp.io.formats import MANIFEST, RECOVERY, SHARP_CONFIG, WEIGHTS
from sharp.io.manifest import verify_manifest
from sharp.sharing.shared import count_parameters, merge_sharing
from sharp.sharing.state import sharp_config
from tests.conftest import randomize_recovery, run_cli, tiny_model


@pytest.fixture
def shared_stories(stories_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(stories_path)
    tok = AutoTokenizer.from_pretrained(stories_path)
    sharp.share(model, "next:1-4", "lora+scale:4", source=str(stories_path))
    randomize_recovery(model)
    out = tmp_path / "ckpt"
    sharp.save(model, out, tokenizer=tok)
    ids = torch.tensor([tok("Once upon a time, there was a little girl").input_ids])
    return model, out, ids


def test_load_reproduces_logits_exactly_and_keeps_sharing(shared_stories):
    model, out, ids = shared_stories
    loaded = sharp.load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    layers = loaded.model.layers
    assert layers[2].mlp.up_proj.base_layer is layers[1].mlp.up_proj
    assert layers[2].mlp.up_proj.base_layer.weight is layers[1].mlp.up_proj.weight
    assert sharp_config(loaded).sharing == {2: 1, 4: 3}
    assert count_parameters(loaded) == count_parameters(model)


def test_checkpoint_stores_each_tensor_once(shared_stories, stories_path):
    model, out, _ = shared_stories
    from safetensors import safe_open

    with safe_open(out / WEIGHTS, "pt") as f:
        stored = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                     else int(torch.Size(f.get_slice(k).get_shape()).numel()) for k in f.keys())
    with safe_open(out / RECOVERY, "pt") as f:
        stored += sum(int(torch.Size(f.get_slice(k).get_shape()).numel()) for k in f.keys())
    assert stored == count_parameters(model)["stored"]
    assert os.path.getsize(out / WEIGHTS) < os.path.getsize(stories_path / "model.safetensors")


def test_merge_loads_in_plain_transformers(shared_stories, tmp_path, capsys):
    model, out, ids = shared_stories
    code, _, err = run_cli(["merge", out, "--out", tmp_path / "merged"], capsys)
    assert code == 0, err
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert not (tmp_path / "merged" / SHARP_CONFIG).exists()


def test_merge_in_memory_equals_shared_model():
    model = sharp.share(tiny_model(), "map:3=2,5=4", "lora:3")
    randomize_recovery(model)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
        after = merge_sharing(model)(ids).logits
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-5)


def test_manifest_catches_truncation_and_corruption(shared_stories):
    _, out, _ = shared_stories
    assert verify_manifest(out) == []
    data = (out / RECOVERY).read_bytes()
    (out / RECOVERY).write_bytes(data[:-8])
    with pytest.raises(SharpError, match="truncated"):
        sharp.load(out)
    (out / RECOVERY).write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(SharpError, match="corrupted"):
        sharp.load(out)


def test_edited_config_is_refused(shared_stories):
    _, out, _ = shared_stories
    cfg = json.loads((out / SHARP_CONFIG).read_text())
    cfg["surprise"] = 1
    (out / SHARP_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(SharpError):
        sharp.load(out)
    with pytest.raises(SharpError, match="unknown keys"):
        sharp.load(out, verify=False)


def test_missing_manifest_is_refused(shared_stories):
    _, out, _ = shared_stories
    (out / MANIFEST).unlink()
    with pytest.raises(SharpError, match="manifest"):
        sharp.load(out)


def test_saved_folder_size_is_what_info_reports(shared_stories, capsys):
    _, out, _ = shared_stories
    code, stdout, err = run_cli(["info", out, "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["bytes_on_disk"] == sum(f.stat().st_size for f in out.iterdir())
