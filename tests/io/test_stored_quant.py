"""`sharp quantize --recovery-bits / --embedding-bits`: recovery matrices and the embedding stored in 8 or 4 bits,
read back as what was evaluated.

Bounds: absmax rounding in groups of 64 moves each value by at most half a step (scale / 2), so the round trip
error per group is <= absmax / (2 * 127) at 8 bits and absmax / (2 * 7) at 4 bits."""

import pytest
import torch
from safetensors import safe_open

import sharp
from sharp.errors import SharpError
from sharp.io.quantize import quantize_model
from sharp.io.stored_quant import dequantize, quantize
from sharp.recipes.quantize import quantize_checkpoint
from sharp.sharing.shared import recoveries

IDS = torch.tensor([[1, 400, 35, 90, 7, 300, 12, 5, 77, 2]])


@pytest.mark.parametrize("bits,qmax", [(8, 127), (4, 7)])
def test_round_trip_error_is_within_half_a_step(bits, qmax):
    torch.manual_seed(0)
    t = torch.randn(48, 192) * torch.logspace(-3, 0, 48)[:, None]  # rows of very different magnitude
    q, scale = quantize(t, bits)
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q.numel() == t.numel() // (1 if bits == 8 else 2) and scale.shape == (48, 3)
    back = dequantize(q, scale, torch.float32)
    step = t.reshape(48, 3, 64).abs().amax(-1) / qmax  # (rows, groups)
    err = (back - t).abs().reshape(48, 3, 64).amax(-1)
    assert (err <= step / 2 * 1.001 + 1e-9).all()
    assert (err > 0).any()  # it did round


def test_group_divides_odd_ranks():
    t = torch.randn(10, 48)  # a rank-48 B: one group of 48 per row
    q, scale = quantize(t, 8)
    assert scale.shape == (10, 1)
    torch.testing.assert_close(dequantize(q, scale, torch.float32), t, atol=t.abs().max().item() / 127, rtol=0)


def _tensor_bytes(folder, file: str = "recovery.safetensors") -> tuple[int, set[str]]:
    """Bytes of the tensors in one of a checkpoint's files (its JSON header aside) and their names."""
    with safe_open(folder / file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return sum(t.numel() * t.element_size() for t in tensors.values()), set(tensors)


@pytest.mark.parametrize("bits", [8, 4])
def test_stored_recovery_is_smaller_and_loads_as_evaluated(shared_ckpt, tmp_path, bits):
    full = quantize_checkpoint(str(shared_ckpt), tmp_path / "q16", recovery_bits=16)
    small = quantize_checkpoint(str(shared_ckpt), tmp_path / f"q{bits}", recovery_bits=bits)
    size16, keys16 = _tensor_bytes(tmp_path / "q16")
    size, keys = _tensor_bytes(tmp_path / f"q{bits}")
    # LoRA r=4 matrices: 16 -> 8 or 4 bits, plus one 16-bit scale per row of A (r=4 values per row of B)
    assert size < (0.7 if bits == 8 else 0.5) * size16
    assert any(k.endswith(".lora_A.qweight") for k in keys) and not any(k.endswith(".lora_A") for k in keys)
    loaded = sharp.load(tmp_path / f"q{bits}")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, small(input_ids=IDS).logits)
        assert not torch.equal(loaded(input_ids=IDS).logits, full(input_ids=IDS).logits)
    for (_, a), (_, b) in zip(recoveries(loaded), recoveries(full), strict=True):
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert pa.dtype == torch.bfloat16
            assert (pa.float() - pb.float()).abs().max() <= pb.float().abs().max() / (127 if bits == 8 else 7)


@pytest.mark.parametrize("shared", [True, False])
def test_stored_embedding_stays_tied_and_loads_as_evaluated(shared_ckpt, stories_path, tmp_path, shared):
    src = shared_ckpt if shared else stories_path
    q = quantize_checkpoint(str(src), tmp_path / "q", embedding_bits=4, recovery_bits=8 if shared else 16)
    emb = q.get_input_embeddings().weight
    assert q.get_output_embeddings().weight is emb
    assert len(torch.unique(emb[0].float())) <= 16 * 2  # 4-bit: at most 16 levels per group of 64 (row of 64 here)
    size, keys = _tensor_bytes(tmp_path / "q", "model.safetensors")
    assert "model.embed_tokens.weight.qweight" in keys and "model.embed_tokens.weight" not in keys
    loaded, _ = sharp.load_model(str(tmp_path / "q"), tokenizer=False)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, q(input_ids=IDS).logits)
    full, _ = _tensor_bytes(tmp_path / "q", "model.safetensors")
    assert size == full
    quantize_checkpoint(str(src), tmp_path / "q16")
    size16, _ = _tensor_bytes(tmp_path / "q16", "model.safetensors")
    e = emb.element_size()  # the embedding: 512 x 64 values -> 4-bit values + one scale per row of 64
    assert size16 - size == 512 * 64 * e - (512 * 64 // 2 + 512 * e)


def test_stored_bits_are_checked(stories_path, tmp_path):
    with pytest.raises(SharpError, match="recovery-bits"):
        quantize_checkpoint(str(stories_path), tmp_path / "q", recovery_bits=2)
    with pytest.raises(SharpError, match="embedding-bits"):
        quantize_checkpoint(str(stories_path), tmp_path / "q", embedding_bits=6)
    model, _ = sharp.load_model(str(stories_path))
    with pytest.raises(SharpError, match="recovery-bits"):
        quantize_model(model, recovery_bits=12)
