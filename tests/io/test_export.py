"""GGUF export: the files re-read by transformers' GGUF loader give the PyTorch model's logits.

Tolerances: f32 files must match to 1e-4 (they hold the same numbers); f16 files to 2e-2 absolute on logits of
magnitude ~15 (f16 rounding of every weight)."""

import numpy as np
import pytest
import torch

import sharp
from sharp.errors import SharpError
from sharp.io.export import compare_logits, export_gguf
from sharp.io.quantize import quantize_model
from tests.conftest import randomize_recovery

IDS = torch.tensor([[1, 400, 35, 90, 7, 300, 12, 5, 77, 2, 300, 301]])


@pytest.fixture
def lora_ckpt(stories_path, tmp_path):
    model, tok = sharp.load_model(str(stories_path), dtype=torch.float32)
    sharp.share(model, "next:1-4", "lora:4")
    randomize_recovery(model)
    sharp.save(model, tmp_path / "s", tokenizer=tok)
    return tmp_path / "s"


def test_merged_gguf_matches_pytorch(lora_ckpt, tmp_path):
    files = export_gguf(lora_ckpt, tmp_path / "g32", outtype="f32")
    merged = sharp.load(lora_ckpt, dtype=torch.float32, mode="merged")
    with torch.no_grad():
        assert compare_logits(merged, files["merged"], IDS) < 1e-4
        files16 = export_gguf(lora_ckpt, tmp_path / "g16", outtype="f16")
        assert compare_logits(merged, files16["merged"], IDS) < 2e-2
        # and the check can fail: the Direct-Sharing base is a different model
        assert compare_logits(merged, files["base"], IDS) > 1e-2
    assert files16["merged"].stat().st_size < 0.6 * files["merged"].stat().st_size


def test_base_plus_lora_adapter_rebuilds_the_model(lora_ckpt, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    files = export_gguf(lora_ckpt, tmp_path / "g", outtype="f32")
    shared = sharp.load(lora_ckpt, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="base.gguf", dtype=torch.float32).eval()
    reader = gguf.GGUFReader(str(files["lora"]))
    kv = {f.name: f for f in reader.fields.values()}
    assert bytes(kv["general.type"].parts[-1]).decode() == "adapter"
    assert float(kv["adapter.lora.alpha"].parts[-1][0]) == 4.0  # alpha = rank: scale 1
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert len(tensors) == 2 * 6  # A and B for gate/up/down of targets 2 and 4
    proj = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
    with torch.no_grad():
        for name in [n for n in tensors if n.endswith(".lora_a")]:
            _, layer, kind = name.split(".")[:3]
            a = torch.from_numpy(tensors[name])  # numpy shape = torch shape (r, in)
            b = torch.from_numpy(tensors[name.replace("lora_a", "lora_b")])  # (out, r)
            linear = getattr(base.model.layers[int(layer)].mlp, proj[kind])
            linear.weight += b @ a
        torch.testing.assert_close(base(input_ids=IDS).logits, shared(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)


def test_export_errors(lora_ckpt, stories_path, tmp_path):
    sharp.save(quantize_model(sharp.load(lora_ckpt)), tmp_path / "q")
    with pytest.raises(SharpError, match="quantized"):
        export_gguf(tmp_path / "q", tmp_path / "out")
    with pytest.raises(SharpError, match="outtype"):
        export_gguf(lora_ckpt, tmp_path / "out", outtype="q4")
    model, tok = sharp.load_model(str(stories_path))
    sharp.share(model, "next:1-4", "scale")
    sharp.save(model, tmp_path / "scale", tokenizer=tok)
    files = export_gguf(tmp_path / "scale", tmp_path / "gs")
    assert set(files) == {"merged"}  # a scale recovery has no LoRA form


F32_CACHE = {"type_k": 0, "type_v": 0}  # GGML_TYPE_F32: llama.cpp's default f16 KV cache adds ~1e-2 on logits


def test_llama_cpp_runtime_matches_pytorch(lora_ckpt, tmp_path):
    """The exported files run in llama.cpp itself (llama-cpp-python, `pip install 'sharp-llm[llamacpp]'`, which
    compiles llama.cpp: ~10 min on 2 cores, so CI skips this)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="optional extra llama-cpp-python is not installed "
                                    "(pip install 'sharp-llm[llamacpp]')")
    files = export_gguf(lora_ckpt, tmp_path / "g", outtype="f32")
    merged = sharp.load(lora_ckpt, dtype=torch.float32, mode="merged")
    llm = llama_cpp.Llama(model_path=str(files["merged"]), logits_all=True, n_ctx=64, n_threads=1, verbose=False,
                          **F32_CACHE)
    llm.eval(IDS[0].tolist())
    got = torch.tensor(np.array(llm.scores[: IDS.shape[1]]))
    with torch.no_grad():
        want = merged(input_ids=IDS).logits[0]
    assert (got - want).abs().max() < 1e-4  # f32 file, f32 cache: measured 1e-5
    # base (Direct Sharing) + the recovery as a llama.cpp LoRA adapter: the shared model, and not the base alone
    llm = llama_cpp.Llama(model_path=str(files["base"]), lora_path=str(files["lora"]), logits_all=True, n_ctx=64,
                          n_threads=1, verbose=False, **F32_CACHE)
    llm.eval(IDS[0].tolist())
    got_lora = torch.tensor(np.array(llm.scores[: IDS.shape[1]]))
    assert (got_lora - want).abs().max() < 1e-4
    plain = llama_cpp.Llama(model_path=str(files["base"]), logits_all=True, n_ctx=64, n_threads=1, verbose=False,
                          **F32_CACHE)
    plain.eval(IDS[0].tolist())
    assert (torch.tensor(np.array(plain.scores[: IDS.shape[1]])) - want).abs().max() > 1e-2
