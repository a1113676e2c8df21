"""Weights from disk: the layer-by-layer capture stores exactly what the in-memory capture stores (every
architecture, padding, max_tokens), SLW from a folder trains the same recovery (original and sequential inputs;
the original MLPs read from disk by each job), and SLW jobs share the frozen reference weights instead of
copying them."""

from __future__ import annotations

import copy

import pytest
import torch

import sharp
from sharp.arch import ADAPTERS
from sharp.io.dtypes import cast_to
from sharp.recovery.capture import capture_activations
from sharp.recovery.lazy import SafetensorsWeights, frozen_sharing_copy, original_mlps
from sharp.recovery.slw import SLWConfig, run_slw, target_mlps
from tests.conftest import tiny_model


def _batches(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        ids = torch.randint(1, vocab, (2, 24), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 17:] = 0  # a right-padded row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.mark.parametrize("model_type", sorted(ADAPTERS))
def test_capture_from_disk_equals_in_memory_capture(model_type, tmp_path):
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path / "model")
    batches = _batches(model.config.vocab_size)
    targets = [1, 3, 4]
    kw = dict(max_tokens=100, skip_positions=0, dtype="float32", progress=False)  # 100 < 3 x 41 kept tokens
    mem = capture_activations(model, batches, targets, tmp_path / "mem", **kw)
    disk = capture_activations(tmp_path / "model", batches, targets, tmp_path / "disk", **kw)
    assert mem.meta == disk.meta and mem.meta["tokens"] == {"1": 100, "3": 100, "4": 100}
    for t in targets:
        for a, b in zip(mem.load(t), disk.load(t), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(mem.positions(t), disk.positions(t))


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inputs", ["original", "sequential"])
def test_slw_from_a_folder_trains_the_same_recovery(inputs, storage, stories_path, tmp_path):
    """The same recovery from the folder as from the loaded original, also when the model is loaded in a dtype
    narrower than the folder's (float32): the folder's weights are then rounded as the loaded copy's were."""
    cfg = SLWConfig(steps=20, batch_tokens=128, eval_every=10, eval_tokens=64, checkpoint_every=10, max_tokens=600,
                    dtype="float32", threads=1, inputs=inputs)
    batches = _batches(500)
    results = []
    for name, source in (("mem", None), ("disk", stories_path)):
        torch.manual_seed(0)
        model, _ = sharp.load_model(str(stories_path), dtype=storage)
        cast_to(model, torch.float32)  # as compress places it on a CPU
        original = source or copy.deepcopy(model)
        sharp.share(model, "next:1-4", "lora:4")
        out = run_slw(original, model, batches, cfg, tmp_path / name, progress=False, original_dtype=storage)
        results.append((out, {k: v for k, v in model.state_dict().items() if ".recovery." in k}))
    (r_mem, t_mem), (r_disk, t_disk) = results
    assert {t: r["rel_err_after"] for t, r in r_mem.items()} == {t: r["rel_err_after"] for t, r in r_disk.items()}
    assert t_mem.keys() == t_disk.keys() and all(torch.equal(t_mem[k], t_disk[k]) for k in t_mem)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slw_job_copy_shares_frozen_weights_and_leaves_the_model_alone(dtype):
    model = tiny_model("llama").to(dtype)
    sharp.share(model, "next:1-4", "lora:4")
    mlp = target_mlps(model)[2]
    before = {n: (p.dtype, p.requires_grad, p.data_ptr()) for n, p in mlp.named_parameters()}
    job = frozen_sharing_copy(mlp)
    assert all(p.dtype == torch.float32 for p in job.parameters())
    frozen = [n for n in before if ".recovery." not in n]
    for n, p in job.named_parameters():
        shares = p.data_ptr() == before[n][2]
        assert shares == (dtype == torch.float32 and n in frozen), n  # frozen float32: a view, not a copy
    assert {n: (p.dtype, p.requires_grad, p.data_ptr()) for n, p in mlp.named_parameters()} == before
    with torch.no_grad():
        next(p for n, p in job.named_parameters() if ".recovery." in n).add_(1.0)  # the job trains its own copy
    assert all(p.data_ptr() == before[n][2] for n, p in mlp.named_parameters())


def test_original_mlps_stay_on_disk_until_loaded(stories_path):
    model, _ = sharp.load_model(str(stories_path), dtype=torch.float32)
    lazy = original_mlps(stories_path, {2: 3})  # key 2 reads layer 3 (a plan that dropped a block before it)
    assert all(p.is_meta for p in lazy[2].skeleton.parameters())
    loaded = lazy[2].load(torch.float32)
    expected = model.model.layers[3].mlp.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    assert all(p.is_meta for p in lazy[2].skeleton.parameters())  # each load is a fresh copy


def test_only_plain_safetensors_folders_are_read_lazily(stories_path, tmp_path):
    assert SafetensorsWeights.available(stories_path)
    model, tok = sharp.load_model(str(stories_path))
    sharp.share(model, "next:1-4", "lora:4")
    sharp.save(model, tmp_path / "ckpt", tokenizer=tok)
    assert not SafetensorsWeights.available(tmp_path / "ckpt")  # a sharp checkpoint lacks the targets' weights
    assert not SafetensorsWeights.available(tmp_path / "missing")
