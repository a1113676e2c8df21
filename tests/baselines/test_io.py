"""Pruned folders: plain HF when widths are uniform, sharp.load_model for the rest; logits survive the trip."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import sharp
from sharp.baselines import prune, save_pruned
from sharp.errors import SharpError
from sharp.io.pruned import PRUNE_CONFIG
from sharp.sharing import surgery
from tests.conftest import tiny_model


def _logits(model):
    ids = torch.arange(10)[None] % 128
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _load(path):
    return sharp.load_model(str(path), tokenizer=False)[0]  # the one loader; a bare pruned folder has no tokenizer


def _examples():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (i := torch.randint(0, 128, (12,), generator=g).tolist()), "labels": list(i)}
            for _ in range(3)]


def test_layer_drop_is_a_plain_hf_model(tmp_path):
    model = tiny_model()
    report = prune(model, "layer-drop", "35%", _examples())
    save_pruned(model, tmp_path / "p", report)
    info = json.loads((tmp_path / "p" / PRUNE_CONFIG).read_text())
    assert info["uniform"] and info["method"] == "layer-drop"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "p")  # vanilla transformers, no sharp code
    assert plain.config.num_hidden_layers == len(model.model.layers)
    assert torch.allclose(_logits(plain), _logits(model), atol=1e-6)


@pytest.mark.parametrize("method, kwargs", [("mlp-drop", dict(budget=None, strategy="next:1-4")),
                                            ("width", dict(budget="40%", allocation="global"))])
def test_non_uniform_widths_round_trip(tmp_path, method, kwargs):
    model = tiny_model()
    report = prune(model, method, examples=_examples(), **kwargs)
    assert len(set(surgery.mlp_widths(model))) > 1
    save_pruned(model, tmp_path / "p", report)
    loaded = _load(tmp_path / "p")
    assert surgery.mlp_widths(loaded) == surgery.mlp_widths(model)
    assert sharp.count_parameters(loaded)["stored"] == report.params_stored
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight or not loaded.config.tie_word_embeddings


def test_load_model_dispatches_to_pruned_folders(tmp_path, stories_path):
    model, tok = sharp.load_model(str(stories_path))
    report = prune(model, "mlp-drop", None, None, "next:1-4")
    save_pruned(model, tmp_path / "p", report, tok)
    loaded, tok2 = sharp.load_model(str(tmp_path / "p"))
    assert surgery.mlp_widths(loaded) == [172, 172, 0, 172, 0]
    assert torch.equal(_logits(loaded), _logits(model))


def test_damaged_prune_config_is_one_line(tmp_path):
    model = tiny_model()
    save_pruned(model, tmp_path / "p", prune(model, "mlp-drop", None, None, "next:1-4"))
    info = json.loads((tmp_path / "p" / PRUNE_CONFIG).read_text())
    info["intermediate_sizes"] = [48] * 6
    (tmp_path / "p" / PRUNE_CONFIG).write_text(json.dumps(info))
    with pytest.raises(SharpError, match="does not match"):
        _load(tmp_path / "p")
    (tmp_path / "p" / PRUNE_CONFIG).write_text("{")
    with pytest.raises(SharpError, match="cannot read"):
        _load(tmp_path / "p")
