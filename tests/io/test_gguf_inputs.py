"""Every command that takes a model runs end to end from a .gguf file, written here by `sharp export`.

The file is stories260K exported as f16 (matrices f16, norms f32): loaded back (dequantized to float32) its logits
are within 5e-2 of the original's (measured 7.3e-3 on logits of magnitude ~17: f16 rounding of every weight); an
f32 export reads back exactly, a Q8_0 file within 1.0 (measured 0.25).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import sharp
from sharp.io.device import load_on_device
from sharp.io.models import load_model, load_tokenizer
from tests.conftest import STORIES, run_cli

# Short made-up stories: ~5 training and ~2 held-out chunks of 64 tokens, so each command runs in seconds.
TRAIN = [
    "Once upon a time there was a little girl named Lily. She liked to play in the park with her dog.",
    "Tom had a big red ball. He threw the ball to his friend Sam, and Sam threw it back.",
    "The sun was hot, so the cat slept under a tree. A bird sang a happy song in the tree.",
    "Mom made a cake for the party. Everyone said it was the best cake they ever had.",
    "Ben wanted to fly like a bird. He jumped and jumped, but he could not fly. Then he laughed.",
    "One day a small fish swam far away from home. It met a kind turtle who showed it the way back.",
    "Anna found a shiny stone in the garden. She gave it to her brother, and he smiled.",
    "The dog barked at the big truck. The truck was loud, but the dog was brave.",
]
HELD = [
    "Lucy and her mom went to the store. They bought apples, milk and a new toy for the baby.",
    "At night the moon was bright. The little boy looked out of the window and said good night.",
]
HELD_RECORDS = [{"text": t} for t in HELD]
IDS = torch.tensor([[1, 400, 35, 90, 7, 300, 12, 5, 77, 2, 300, 301]])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One f16 GGUF of stories260K and the text files, shared by the whole module."""
    from sharp.io.export import export_gguf

    root = tmp_path_factory.mktemp("gguf")
    out = {"gguf": export_gguf(STORIES, root / "g")["merged"]}
    for name, texts in (("train", TRAIN), ("held", HELD)):
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return out


def _assert_plain(model: nn.Module) -> None:
    """No trace of transformers' GGUF quantizer: what made the Trainer refuse to fine-tune."""
    from transformers.trainer_utils import validate_quantization_for_training

    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert all(type(m) is nn.Linear for name, m in model.named_modules() if name.endswith(("_proj", "lm_head")))
    assert all(p.dtype.is_floating_point for p in model.parameters())  # dequantized, not packed blocks
    validate_quantization_for_training(model)  # raises "purely quantized models" on the bug


def test_gguf_loads_as_a_plain_model_close_to_the_source(files, tmp_path):
    from sharp.io.export import export_gguf

    model, tok = load_model(str(files["gguf"]), dtype=torch.float32)
    _assert_plain(model)
    original, original_tok = load_model(str(STORIES), dtype=torch.float32)
    text = "Once upon a time, there was a little girl named Lily."
    assert tok(text).input_ids == original_tok(text).input_ids
    with torch.no_grad():
        diff = (model(IDS).logits - original(IDS).logits).abs().max().item()
        assert 1e-5 < diff < 5e-2  # f16 rounding: close, and not the same file read twice
        exact, _ = load_model(str(export_gguf(STORIES, tmp_path / "f32", outtype="f32")["merged"]), torch.float32)
        torch.testing.assert_close(exact(IDS).logits, original(IDS).logits, rtol=0, atol=0)


def test_quantized_gguf_loads_dequantized(files, tmp_path):
    """A Q8_0 file (what users download) gives a plain float model too."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from sharp.io.export import _add_vocab, _finish, _tensors, _writer

    original, _ = load_model(str(STORIES), dtype=torch.float32)
    path = tmp_path / "q8.gguf"
    w = _writer(path, original.config, "stories260K Q8_0", "f16")
    _add_vocab(w, STORIES)
    quantized = 0
    for name, data in _tensors(original, "f32"):
        if data.ndim == 2 and data.shape[1] % 32 == 0:  # Q8_0 blocks are 32 wide (the 172-wide down_proj is not)
            w.add_tensor(name, quantize(data, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
            quantized += 1
        else:
            w.add_tensor(name, data)
    _finish(w)
    assert quantized >= 20
    model, _ = load_model(str(path), dtype=torch.float32)
    _assert_plain(model)
    with torch.no_grad():
        diff = (model(IDS).logits - original(IDS).logits).abs().max().item()
    assert 1e-3 < diff < 1.0  # 8-bit rounding of most weights, measured 0.25 on logits of magnitude ~17


def test_info_share_verify_load(files, tmp_path, capsys):
    gguf = str(files["gguf"])
    code, stdout, err = run_cli(["info", gguf, "--json"], capsys)
    assert code == 0, err
    info = json.loads(stdout)
    assert info["layers"] == 5 and info["params_stored"] == info["params_original"] == 260032
    assert info["bytes_on_disk"] == files["gguf"].stat().st_size  # the file, not its folder
    out = tmp_path / "s"
    code, _, err = run_cli(["share", gguf, "--strategy", "next:1-4", "--recovery", "lora:4", "--out", out], capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["verify", out], capsys)
    assert code == 0 and "OK" in stdout, err
    config = json.loads((out / "sharp_config.json").read_text())
    assert config["base"]["source"] == gguf and config["sharing"] == {"2": 1, "4": 3}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = sharp.load(out)
    base, _ = load_model(gguf)
    with torch.no_grad():  # untrained LoRA (B = 0): Direct Sharing of the GGUF model
        sharp.share(base, "next:1-4", "lora:4")
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits)


def test_compress_from_gguf_saves_a_checkpoint_that_reproduces_its_perplexity(files, tmp_path, capsys):
    from sharp.data import record_examples
    from sharp.evaluation.perplexity import response_perplexity

    gguf, out = str(files["gguf"]), tmp_path / "c"
    code, _, err = run_cli(["compress", gguf, "--strategy", "next:1-4", "--recovery", "lora:4",
                            "--data", f"text:{files['train']}", "--eval-data", f"text:{files['held']}",
                            "--slw-steps", "5", "--sft-steps", "2", "--max-len", "64", "--batch-size", "4",
                            "--lr", "1e-2", "--out", out], capsys)
    assert code == 0, err
    code, _, err = run_cli(["verify", out], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "sharp_config.json").read_text())["base"]["source"] == gguf
    held = record_examples(HELD_RECORDS, load_tokenizer(gguf), 64)
    assert len(held) == summary["eval_examples"] >= 2
    # a GGUF's weights are stored in bf16 (`--dtype auto`); `sharp eval` on the CPU computes in fp32, as compress did
    assert summary["dtype"] == "bf16"
    stored, _, storage = load_on_device(str(out), "cpu")
    assert storage == torch.bfloat16
    with torch.no_grad():
        ppl = response_perplexity(stored, held)["ppl"]
        assert ppl == pytest.approx(summary["perplexity"]["sft"], rel=1e-5)  # the saved model is the trained one
        assert ppl != pytest.approx(summary["perplexity"]["direct"], rel=1e-3)  # and training changed it
        source = response_perplexity(load_model(str(STORIES))[0], held)["ppl"]
        # the GGUF is stories260K (measured 9e-5 apart: f16 weights)
        assert summary["perplexity"]["original"] == pytest.approx(source, rel=1e-2)
    # an adapter-only copy finds its base (the recorded .gguf path) and passes the base-identity check
    sharp.save(sharp.load(out), tmp_path / "a", adapter_only=True)
    with torch.no_grad():
        torch.testing.assert_close(sharp.load(tmp_path / "a")(IDS).logits, sharp.load(out)(IDS).logits)


def test_eval_gguf_matches_the_source_model(files, tmp_path, capsys):
    task = f"ppl:text={files['held']}"
    ppl = {}
    for name, model in (("gguf", files["gguf"]), ("folder", STORIES)):
        code, _, err = run_cli(["eval", model, "--tasks", task, "--max-len", "64", "--json", tmp_path / f"{name}.json"],
                               capsys)
        assert code == 0, err
        ppl[name] = json.loads((tmp_path / f"{name}.json").read_text())["tasks"][task]["ppl"]
    assert ppl["gguf"] == pytest.approx(ppl["folder"], rel=1e-2)  # f16 weights


def test_prune_analyze_quantize_export_from_gguf(files, tmp_path, capsys):
    gguf, data = str(files["gguf"]), f"text:{files['train']}"
    code, _, err = run_cli(["prune", gguf, "--method", "layer-drop", "--budget", "40%", "--data", data,
                            "--calib-samples", "2", "--max-len", "64", "--out", tmp_path / "p"], capsys)
    assert code == 0, err
    pruned, _ = load_model(str(tmp_path / "p"))
    assert pruned.config.num_hidden_layers < 5
    code, _, err = run_cli(["analyze", gguf, "--data", data, "--out", tmp_path / "an", "--max-tokens", 200,
                            "--ppl-examples", 2, "--max-len", 64, "--budget", "40%", "--replace-layers", "2-4"], capsys)
    assert code == 0, err
    analysis = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert analysis["model"] == gguf
    code, _, err = run_cli(["quantize", gguf, "--method", "quanto", "--out", tmp_path / "q"], capsys)
    assert code == 0, err
    assert load_model(str(tmp_path / "q"))[0](IDS).logits.isfinite().all()
    # GGUF -> GGUF: f16 weights read back exactly, tokenizer metadata carried over
    code, _, err = run_cli(["export", gguf, "--out", tmp_path / "e"], capsys)
    assert code == 0, err
    again, tok = load_model(str(tmp_path / "e" / "model.gguf"))
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, load_model(gguf)[0](IDS).logits, rtol=0, atol=0)
    assert tok("Lily had a dog.").input_ids == load_tokenizer(gguf)("Lily had a dog.").input_ids


def test_bench_gguf(files, tmp_path, capsys):
    out = tmp_path / "b.json"
    code, _, err = run_cli(["bench", files["gguf"], "--json", out, "--repeats", "1", "--tokens", "2",
                            "--prompt-tokens", "4", "--threads", "1"], capsys)
    assert code == 0, err
    (row,) = json.loads(out.read_text())["models"]
    assert row["bytes_on_disk"] == files["gguf"].stat().st_size and row["decode_tok_s"] > 0


@pytest.mark.slow
def test_compare_from_gguf(files, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, _, err = run_cli(["compare", files["gguf"], "--strategy", "next:1-4", "--recovery", "lora:4",
                            "--data", f"text:{files['train']}", "--eval", f"ppl:text={files['held']}",
                            "--eval-limit", "2", "--eval-max-len", "64", "--max-len", "64", "--eval-fraction", "0.2",
                            "--calib-samples", "2", "--slw-steps", "2", "--sft-steps", "2", "--batch-size", "2",
                            "--out", out], capsys)
    assert code == 0, err
    data = json.loads((out / "comparison.json").read_text())
    rows = {r["key"]: r for r in data["rows"]}
    assert {"original", "direct", "sharp", "layer-drop", "width"} <= set(rows)
    assert rows["original"]["stored"] == 260032
