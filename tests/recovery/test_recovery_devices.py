"""Device and dtype of the recovery stages: SLW fits in float32 whatever the model's dtype and spreads parallel
workers over GPUs; SFT trains float32 copies of 16-bit trainable tensors on the chosen device. The `gpu` tests
check that capture, SLW, SFT and perplexity on CUDA give what they give on the CPU."""

from __future__ import annotations

import copy
import json
import queue
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import sharp
from sharp.arch import get_adapter
from sharp.io.device import load_on_device
from sharp.io.dtypes import cast_to
from sharp.recovery import slw, slw_parallel
from sharp.recovery.capture import capture_activations
from sharp.recovery.sft import SFTConfig, run_sft
from sharp.recovery.slw import SLWConfig, train_slw
from sharp.recovery.slw_layer import LayerJob
from sharp.recovery.trainable import mark_trainable
from sharp.sharing.shared import recoveries
from tests.conftest import C4
from tests.conftest import STORIES as MODEL

TARGETS = [2, 4]  # next:1-4
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def original():
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    tok = AutoTokenizer.from_pretrained(MODEL)
    ids: list[int] = []
    for line in C4.read_text().splitlines():
        ids += tok(json.loads(line)["text"])["input_ids"]
    return [{"input_ids": ids[i : i + 48], "labels": ids[i : i + 48]} for i in range(0, 48 * 40, 48)]


def _batches(examples: list[dict], n: int = 16) -> list[dict]:
    return [{"input_ids": torch.tensor([e["input_ids"] for e in examples[i : i + 4]])} for i in range(0, n, 4)]


def _collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([b[k] for b in batch]) for k in ("input_ids", "labels")}


def _shared(original, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)  # cast_to, not .to(dtype): the rotary table stays float32 as from_pretrained keeps it
    return sharp.share(cast_to(copy.deepcopy(original).to(device), dtype), "next:1-4", "lora:8")


def _slw_config(**kw) -> SLWConfig:
    base = dict(steps=20, batch_tokens=256, warmup_steps=2, eval_every=10, eval_tokens=128, checkpoint_every=10,
                patience=100, max_tokens=1024, dtype="float32", threads=1)
    return SLWConfig(**{**base, **kw})


def _originals(original) -> dict[int, torch.nn.Module]:
    """The original target MLPs, which the default closed-form init fits the shared gate/up projections to."""
    return {t: get_adapter(original).mlp(original, t) for t in TARGETS}


def _recovery(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu() for n, p in model.named_parameters() if ".recovery." in n}


def test_each_parallel_worker_trains_its_jobs_on_the_device_it_took():
    devices: queue.Queue = queue.Queue()
    for d in ("cuda:1", "cuda:0"):
        devices.put(d)
    seen = []
    try:
        for _ in range(2):  # two workers start, each takes the next device
            slw_parallel._init_worker(queue.Queue(), devices)
            job = LayerJob(layer=2, store_layer=2, mlp=None, projections=("down_proj",), store_root=Path(),
                           config=None, layer_dir="", log_path="", device="cuda")
            seen.append(slw_parallel._worker_main(lambda j, threads, report: j.device, job, 1))
    finally:
        slw_parallel._init_worker(None, None)
    assert seen == ["cuda:1", "cuda:0"]


def test_slw_fits_a_bf16_model_in_float32(original, examples, tmp_path, monkeypatch):
    store = capture_activations(original, _batches(examples), TARGETS, tmp_path / "act", max_tokens=1024,
                                dtype="float32", progress=False)
    fitted = []
    train_layer = slw.train_layer

    def spy(job, threads, report=None):
        modules = (job.mlp, job.original)  # what the closed-form init and the steps compute with
        fitted.append(({p.dtype for m in modules for p in m.parameters()}, job.device))
        return train_layer(job, threads, report)

    monkeypatch.setattr(slw, "train_layer", spy)
    full, low = _shared(original), _shared(original, torch.bfloat16)
    originals = _originals(cast_to(copy.deepcopy(original), torch.bfloat16))
    res_full = train_slw(full, store, _slw_config(), tmp_path / "f32", progress=False, originals=_originals(original))
    res_low = train_slw(low, store, _slw_config(), tmp_path / "b16", progress=False, originals=originals)
    assert fitted == [({torch.float32}, "cpu")] * 4
    for t in TARGETS:  # the closed-form fit of each projection: float64 statistics, bf16-rounded weights only
        fits_low, fits_full = res_low[t]["init"]["fit"], res_full[t]["init"]["fit"]
        assert set(fits_low) == {"gate_proj", "up_proj", "down_proj"}
        for proj, fit in fits_low.items():
            assert abs(fit["rel_err"] - fits_full[proj]["rel_err"]) < 1e-3 * fits_full[proj]["rel_err"], proj
    assert {p.dtype for _, r in recoveries(low) for p in r.parameters()} == {torch.bfloat16}
    # the bf16 model's reference weights are bf16-rounded, so the fits differ a little, not more
    for t in TARGETS:
        assert abs(res_low[t]["rel_err_after"] - res_full[t]["rel_err_after"]) < 0.02
    a, b = _deltas(low), _deltas(full)  # B A: the fit's factors are defined up to signs
    for name in a:
        assert (a[name] - b[name]).norm() < 0.05 * b[name].norm(), name


def _deltas(model) -> dict[str, torch.Tensor]:
    return {n: (r.lora_B.float() @ r.lora_A.float()).detach() for n, r in recoveries(model)}


class _Watch(TrainerCallback):
    """What the Trainer trains: the trainable tensors' dtype and device, and its own device."""

    def __init__(self) -> None:
        self.seen: set = set()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen |= {(p.dtype, p.device.type, args.device.type) for p in model.parameters() if p.requires_grad}


def test_sft_trains_float32_copies_of_a_bf16_model_on_the_cpu(original, examples, tmp_path):
    model = _shared(original, torch.bfloat16)
    mark_trainable(model, "recovery")
    before = _recovery(model)
    watch = _Watch()
    cfg = SFTConfig(steps=4, lr=5e-3, batch_size=4, save_steps=10, eval_steps=0, progress=False)
    run_sft(model, examples[:16], [], cfg, tmp_path, _collate, callbacks=[watch], device="cpu")
    assert watch.seen == {(torch.float32, "cpu", "cpu")}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # back to the model's dtype
    after = _recovery(model)
    assert any((after[n] - before[n]).abs().max() > 0 for n in after)


# --- on a GPU: the same numbers as on the CPU -------------------------------------------------------------


@pytest.mark.gpu
@cuda
def test_capture_on_cuda_matches_cpu(original, examples, tmp_path):
    cpu = capture_activations(original, _batches(examples), TARGETS, tmp_path / "cpu", dtype="float32",
                              progress=False)
    gpu = capture_activations(copy.deepcopy(original).cuda(), _batches(examples), TARGETS, tmp_path / "gpu",
                              dtype="float32", progress=False)
    for t in TARGETS:
        (xc, yc), (xg, yg) = cpu.load(t), gpu.load(t)
        assert torch.allclose(xc, xg, atol=1e-4, rtol=1e-3) and torch.allclose(yc, yg, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
@cuda
def test_slw_on_cuda_matches_cpu(original, examples, tmp_path):
    store = capture_activations(original, _batches(examples), TARGETS, tmp_path / "act", max_tokens=1024,
                                dtype="float32", progress=False)
    on_cpu, on_gpu = _shared(original), _shared(original, device="cuda")
    res_cpu = train_slw(on_cpu, store, _slw_config(), tmp_path / "cpu", progress=False,
                        originals=_originals(original))
    res_gpu = train_slw(on_gpu, store, _slw_config(), tmp_path / "gpu", progress=False, device="cuda",
                        originals=_originals(copy.deepcopy(original).cuda()))
    assert {p.device.type for _, r in recoveries(on_gpu) for p in r.parameters()} == {"cuda"}
    for t in TARGETS:  # same batches (drawn on the CPU), float32 on both: TF32/kernel differences only
        assert abs(res_cpu[t]["rel_err_after"] - res_gpu[t]["rel_err_after"]) < 0.01


@pytest.mark.gpu
@cuda
def test_slw_workers_spread_over_gpus(original, examples, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    store = capture_activations(original, _batches(examples), TARGETS, tmp_path / "act", max_tokens=1024,
                                dtype="float32", progress=False)
    model = _shared(original, device="cuda")
    res = train_slw(model, store, _slw_config(workers=2), tmp_path / "w", progress=False, device="cuda",
                    originals=_originals(original))
    assert sorted(res) == TARGETS


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sft_on_cuda_matches_cpu(original, examples, tmp_path, dtype):
    cfg = SFTConfig(steps=6, lr=5e-3, batch_size=4, save_steps=10, eval_steps=0, progress=False)
    losses = {}
    for device in ("cpu", "cuda"):
        model = _shared(original, dtype if device == "cuda" else torch.float32, device)
        mark_trainable(model, "recovery")
        watch = _Watch()
        out = run_sft(model, examples[:24], examples[24:32], cfg, tmp_path / device, _collate, callbacks=[watch])
        assert {(d, s) for _, d, s in watch.seen} == {(device, device)}
        losses[device] = out["eval_loss"]
    assert abs(losses["cuda"] - losses["cpu"]) < (0.01 if dtype == torch.float32 else 0.05) * losses["cpu"]


@pytest.mark.gpu
@cuda
def test_perplexity_on_cuda_matches_cpu(original, examples):
    from sharp.evaluation.perplexity import response_perplexity

    cpu = response_perplexity(original, examples[:16], 4)["ppl"]
    gpu = response_perplexity(copy.deepcopy(original).cuda(), examples[:16], 4)["ppl"]
    low, _, storage = load_on_device(str(MODEL), "cuda", "bf16")  # what `sharp eval --device cuda --dtype bf16` runs
    assert storage == torch.bfloat16 and {p.dtype for p in low.parameters()} == {torch.bfloat16}
    assert next(low.parameters()).device.type == "cuda"
    low_ppl = response_perplexity(low, examples[:16], 4)["ppl"]
    assert abs(gpu - cpu) < 1e-3 * cpu
    assert abs(low_ppl - cpu) < 0.03 * cpu


@pytest.mark.gpu
@cuda
def test_planner_costs_on_cuda_match_cpu(original, examples):
    """The planner runs the model where it is: CPU batches go to the GPU, statistics accumulate in float64."""
    from sharp.recovery.planner import measure_costs

    cpu = measure_costs(original, _batches(examples), [4, 8])
    gpu = measure_costs(copy.deepcopy(original).cuda(), _batches(examples), [4, 8])
    for c, g in zip(cpu, gpu, strict=True):
        assert g.drop_mlp == pytest.approx(c.drop_mlp, rel=1e-3) and g.drop_block == pytest.approx(c.drop_block,
                                                                                                    rel=1e-3)
        for r in c.share:
            assert g.share[r] == pytest.approx(c.share[r], rel=1e-2)
