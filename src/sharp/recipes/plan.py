"""`plan()`: what a `sharp compress` run stores, needs and takes, before any weight is read.

For each stage of the run (eval, SLW capture, SLW per target, SFT) the plan gives the memory per device
(weights, activations, gradients + optimizer state), the FLOPs, and a time: FLOPs divided by a throughput that
is either measured by a short probe (`sharp.bench.probe`: one or two decoder layers of the model's shape on the
chosen device, random weights, so no weights are needed) or stated by the user (`--tflops`). Every
approximation the numbers rest on is listed in the plan's `assumptions`, next to the numbers.

Counts (parameters stored / removed / recovery) are exact: they come from the same sharing code on an empty
(meta) model; see `plan_model.py`.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from sharp.errors import SharpError
from sharp.io.dtypes import parse_dtype
from sharp.io.models import check_max_len, refuse_sharp_checkpoint
from sharp.recipes.config import CompressConfig
from sharp.recipes.plan_model import ModelShape, model_shape, read_config, run_dtype
from sharp.recovery.slw_config import BACKENDS

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SFT_PARALLEL = ("ddp", "fsdp", "zero2", "zero3")
_DEFAULTS = {f.name: f.default for f in fields(CompressConfig) if f.default is not MISSING}


def _like_compress(name: str):
    return field(default=_DEFAULTS[name])


@dataclass(kw_only=True)
class PlanSettings:
    """What `sharp plan` is asked about: the run's flags (defaults as `sharp compress`) plus the hardware."""

    model: str  # model folder, alias, hub id, .gguf, or a bare config.json
    strategy: str
    recovery: str = "lora:32"
    modules: str = "mlp"
    data_size: int = 1000  # examples in --data (before the held-out split)
    example_tokens: int | None = None  # average tokens per example (default: --max-len, an upper bound)
    devices: int = 1  # GPUs (or CPU hosts) that SLW tasks and SFT ranks spread over
    sft_parallel: str = "ddp"  # ddp | fsdp | zero2 | zero3
    slw_backend: str = "local"
    dtype: str = "fp32"  # weights and compute during the run (compress on a CPU: fp32); auto: the source's
    slw_fraction: float = _like_compress("slw_fraction")
    slw_workers: int = _like_compress("slw_workers")
    slw_tokens: int | None = _like_compress("slw_tokens")
    slw_steps: int = _like_compress("slw_steps")
    sft_steps: int = _like_compress("sft_steps")
    epochs: float = _like_compress("epochs")
    batch_size: int = _like_compress("batch_size")
    grad_accum: int = _like_compress("grad_accum")
    max_len: int = _like_compress("max_len")
    eval_fraction: float = _like_compress("eval_fraction")
    eval_steps: int = _like_compress("eval_steps")
    stages: str = _like_compress("stages")
    train: str = _like_compress("train")
    full_lora_rank: int = _like_compress("full_lora_rank")
    tflops: float | None = None  # stated sustained TFLOP/s per device; skips the probe
    probe: bool = True  # measure throughput on `probe_device` (when tflops is not given)
    probe_device: str = "cpu"
    probe_tokens: int = 256

    def __post_init__(self) -> None:
        if self.data_size < 2:
            raise SharpError(f"--data-size must be at least 2 examples, got {self.data_size}")
        if self.devices < 1:
            raise SharpError(f"--devices must be at least 1, got {self.devices}")
        if self.sft_parallel not in SFT_PARALLEL:
            raise SharpError(f"unknown --sft-parallel '{self.sft_parallel}'; choose one of: {', '.join(SFT_PARALLEL)}")
        if self.slw_backend not in BACKENDS:
            raise SharpError(f"unknown --slw-backend '{self.slw_backend}'; choose one of: {', '.join(BACKENDS)}")
        parse_dtype(self.dtype)  # compress's spellings: auto, bf16, fp16, fp32 (or bfloat16, float16, float32)
        if self.tflops is not None and not self.tflops > 0:
            raise SharpError(f"--tflops must be positive, got {self.tflops}")
        if self.example_tokens is not None and self.example_tokens < 1:
            raise SharpError(f"--example-tokens must be at least 1, got {self.example_tokens}")
        if self.probe and self.tflops is None:
            from sharp.io.device import resolve_device

            resolve_device(self.probe_device, flag="--probe-device")
        # the flags a compress run takes as well: refused as compress refuses them
        same = {name: getattr(self, name) for name in _DEFAULTS.keys() & {f.name for f in fields(self)}
                if name not in ("dtype", "slw_backend")}  # plan's dtype and backend are checked above
        CompressConfig(model=self.model, strategy=self.strategy, recovery=self.recovery, data="", out="",
                       **same).check_flags()


def plan(s: PlanSettings) -> dict:
    """The plan as a JSON-able dict: counts, per-stage memory / FLOPs / time, SLW disk, assumptions."""
    from sharp.recovery.slw_config import SLWConfig

    refuse_sharp_checkpoint(s.model, "plan for")
    config = read_config(s.model)
    check_max_len(config, s.max_len)
    shape = model_shape(config, s.strategy, s.recovery, s.modules, s.train, s.full_lora_rank)
    slw = SLWConfig(steps=s.slw_steps)  # compress's other SLW defaults
    stages = [] if s.stages.strip() == "none" else [x.strip() for x in s.stages.split(",")]
    tokens = min(s.example_tokens or s.max_len, s.max_len)
    n_eval = max(1, round(s.data_size * s.eval_fraction))
    n_train = s.data_size - n_eval
    s = replace(s, dtype=str(run_dtype(s.dtype, s.model)).removeprefix("torch."))  # every stage reads it
    wb = DTYPE_BYTES[s.dtype]
    c = shape.counts

    rates, rate_source = _throughput(s, config)
    out: dict = {
        "model": s.model, "architecture": shape.model_type, "layers": shape.layers,
        "params": {**c, "trainable": shape.trainable, "mlp_reduction": 1 - c["mlp_stored"] / c["mlp_original"]},
        "bytes": {"original": c["original"] * wb, "stored": c["stored"] * wb, "dtype": s.dtype},
        "targets": shape.targets, "settings": asdict(s), "throughput": {**rates, "source": rate_source},
        "stages": {},
    }

    # evaluation: the original, Direct Sharing, and after each training stage (compress's perplexity rows)
    n_evals = 2 + len(stages)
    eval_tokens = n_eval * tokens
    eval_flops = n_evals * shape.forward_flops(eval_tokens, tokens, shared=True)
    out["stages"]["eval"] = _stage(
        weights=c["original"] * wb,
        activations=s.batch_size * tokens * (shape.vocab * 4 * 2 + 4 * shape.hidden * wb),
        optimizer=0, flops=eval_flops, rate=rates["forward"], devices=1,
        note=f"{n_evals} evaluations of {n_eval} held-out examples, one device")

    if "slw" in stages:
        n_slw = max(1, round(n_train * s.slw_fraction))
        captured = min(s.slw_tokens or n_slw * tokens, n_slw * tokens)  # rows per target layer
        last = max(shape.targets) + 1
        disk_per_target = slw_disk_bytes(captured, shape.hidden, slw.dtype)
        out["slw_disk"] = {"tokens_per_target": captured, "bytes_per_target": disk_per_target,
                           "bytes": disk_per_target * len(shape.targets), "dtype": slw.dtype}
        capture_seqs = math.ceil(captured / tokens)
        out["stages"]["capture"] = _stage(
            # the shared model stays loaded; the original is read from disk one decoder layer at a time
            weights=(c["stored"] + shape.embed_params + max(shape.layer_params)) * wb,
            activations=capture_seqs * tokens * shape.hidden * wb  # every captured sequence's hidden states
            + s.batch_size * tokens * (4 * shape.hidden + 3 * shape.intermediate) * wb + (64 << 20),
            optimizer=0,
            flops=shape.forward_flops(capture_seqs * tokens, tokens, upto=last, head=False),
            rate=rates["forward"], devices=1,
            note=f"{capture_seqs} sequences through layers 0-{last - 1}, one device")
        out["stages"]["slw"] = _slw_stage(s, shape, slw, captured, rates["slw"])

    if "sft" in stages:
        out["stages"]["sft"] = _sft_stage(s, shape, n_train, tokens, eval_tokens, rates)

    out["total_seconds"] = sum(st["seconds"] for st in out["stages"].values() if st["seconds"] is not None) \
        if all(st["seconds"] is not None for st in out["stages"].values()) else None
    out["assumptions"] = _assumptions(s, tokens, rate_source)
    return out


def slw_disk_bytes(tokens: int, hidden: int, dtype: str) -> int:
    """Bytes one target's captured activations take on disk: x and y rows plus an int32 position each."""
    return tokens * (2 * hidden * DTYPE_BYTES[dtype] + 4)


def _slw_stage(s: PlanSettings, shape: ModelShape, slw, captured: int, rate: float | None) -> dict:
    """One SLW task (one target layer) per device; memory is the largest task's, time spreads over tasks."""
    h, i = shape.hidden, shape.intermediate
    t = max(shape.targets, key=lambda x: shape.mlp_matmul[x] + shape.recovery_per_layer.get(x, 0))
    rec = shape.recovery_per_layer.get(t, 0)
    step_rows = slw.batch_tokens + slw.sink_batch
    held = min(slw.eval_tokens, captured // 5)
    per_target = [
        slw.steps * 2 * shape.mlp_flops(step_rows, x)  # forward + backward (input grads, recovery grads)
        + (slw.steps // slw.eval_every + 2) * shape.mlp_flops(held, x)  # held-out evaluations
        + (2.0 * captured * (i * i + h * i) if rec and slw.init != "zero" else 0.0)  # closed-form init statistics
        + (2.0 * captured * h * h if rec and slw.init == "closed-form" else 0.0)  # + gate/up's input covariance
        for x in shape.targets
    ]
    parallel = min(len(shape.targets), s.devices if s.slw_backend == "ray" else s.slw_workers)
    waves = math.ceil(len(shape.targets) / parallel)
    init = 8 * (3 * i * i + 4 * h * i + 2 * h * h) if rec and slw.init != "zero" else 0  # float64 statistics
    return _stage(
        weights=(shape.mlp_matmul[t] + rec) * 4,  # the job's float32 copy of the shared MLP
        activations=2 * captured * 2 * h * DTYPE_BYTES[slw.dtype]  # x, y loaded, then split (a copy)
        + 2 * step_rows * (2 * h + 4 * i) * 4 + init,
        optimizer=rec * 4 * 3,  # grad + AdamW's two states, float32
        flops=sum(per_target), rate=rate, devices=parallel,
        seconds_override=None if rate is None else waves * max(per_target) / rate,
        note=f"{len(shape.targets)} targets, {parallel} at a time ({s.slw_backend} backend); memory per task")


def _sft_stage(s: PlanSettings, shape: ModelShape, n_train: int, tokens: int, eval_tokens: int, rates) -> dict:
    k, wb = s.devices, DTYPE_BYTES[s.dtype]
    c = shape.counts
    if s.sft_steps:
        steps = s.sft_steps
        seen = steps * s.batch_size * s.grad_accum * k * tokens
    else:
        steps = math.ceil(s.epochs * n_train / (s.batch_size * s.grad_accum * k))
        seen = s.epochs * n_train * tokens
    sharded_weights = s.sft_parallel in ("fsdp", "zero3") and k > 1
    sharded_state = s.sft_parallel != "ddp" and k > 1
    extra_lora = shape.trainable - c["recovery"]
    weights = (c["stored"] + extra_lora) * wb
    if sharded_weights:
        weights = weights / k + max(shape.layer_params) * wb  # own shard + one gathered layer
    if s.sft_parallel.startswith("zero"):
        state = shape.trainable * (wb + 8 + (4 if wb < 4 else 0))  # grads + fp32 Adam states (+ fp32 master)
    else:
        state = shape.trainable * 3 * wb  # grads + AdamW's two states, in the parameters' dtype
    if sharded_state:
        state /= k
    per_token_layer = (10 * shape.hidden + 4 * shape.kv_dim + 4 * shape.intermediate) * wb
    activations = s.batch_size * tokens * (shape.layers * per_token_layer + shape.vocab * 4 * 3)
    train_flops = 2 * shape.forward_flops(seen, tokens, shared=True)  # forward + input-gradient backward
    evals = steps // s.eval_steps if s.eval_steps else 0
    eval_flops = evals * shape.forward_flops(eval_tokens, tokens, shared=True)
    seconds = None
    if rates["train"] is not None and rates["forward"] is not None:
        seconds = (train_flops / rates["train"] + eval_flops / rates["forward"]) / k  # the Trainer shards evals too
    return _stage(weights=weights, activations=activations, optimizer=state, flops=train_flops + eval_flops,
                  rate=rates["train"], devices=k, seconds_override=seconds,
                  note=f"{steps} steps × {s.batch_size}×{s.grad_accum} examples × {k} device(s), "
                       f"{s.sft_parallel if k > 1 else 'one process'}; {evals} held-out evaluations")


def _stage(weights: float, activations: float, optimizer: float, flops: float, rate: float | None, devices: int,
           note: str, seconds_override: float | None = None) -> dict:
    seconds = seconds_override if seconds_override is not None else (
        None if rate is None else flops / (devices * rate))
    return {"memory": {"weights": int(weights), "activations": int(activations), "optimizer": int(optimizer),
                       "total": int(weights + activations + optimizer)},
            "flops": flops, "seconds": seconds, "devices": devices, "note": note}


def _throughput(s: PlanSettings, config) -> tuple[dict[str, float | None], str]:
    """FLOP/s per device for forward passes, SFT steps and SLW steps: stated, probed, or unknown."""
    if s.tflops is not None:
        rate = s.tflops * 1e12
        return {"forward": rate, "train": rate, "slw": rate}, f"stated: {s.tflops:g} TFLOP/s per device"
    if not s.probe:
        return {"forward": None, "train": None, "slw": None}, "none (pass --tflops or allow the probe)"
    from sharp.bench.probe import PROBE_STRATEGY, probe_throughput
    from sharp.io.device import resolve_device

    device = str(resolve_device(s.probe_device, flag="--probe-device"))  # `auto` as a device the probe can use
    measured = probe_throughput(config, s.recovery, s.dtype, device, s.probe_tokens)
    probe = model_shape(measured["config"], PROBE_STRATEGY, s.recovery)
    n, rows = measured["tokens"], measured["slw_rows"]
    flops = {"forward": probe.forward_flops(n, n, shared=True), "train": 2 * probe.forward_flops(n, n, shared=True),
             "slw": 2 * probe.mlp_flops(rows, 1)}
    rates = {k: flops[k] / measured["seconds"][k] for k in flops}
    return rates, (f"probe: 2 decoder layers of this shape, {s.dtype}, on {measured['device']}, {n} tokens, "
                   f"random weights ({measured['wall']:.1f} s)")


def _assumptions(s: PlanSettings, tokens: int, rate_source: str) -> list[str]:
    return [
        f"every example has {tokens} tokens" + (" (--max-len: an upper bound)" if not s.example_tokens else ""),
        f"weights and compute in {s.dtype} (a GPU's; sharp compress on a CPU computes in float32: --dtype fp32 "
        "plans that); SLW's per-layer copy and its recovery train in float32",
        "FLOPs: 2 per weight per token for every matmul (targets still run their reference's projections), "
        "attention 2·T·q_dim per token per layer; training = forward + input-gradient backward (base frozen)",
        "SFT activations: (10·hidden + 4·kv_dim + 4·intermediate) values per token per layer, plus float32 "
        "logits ×3; no activation checkpointing",
        "SFT optimizer: AdamW; DDP/FSDP keep grads + 2 states in the parameters' dtype, DeepSpeed ZeRO keeps "
        "fp32 states (+ an fp32 master copy under 16-bit); ZeRO-2/3 and FSDP shard them over devices",
        "capture: the shared model stays loaded and the original is read from its safetensors one decoder layer "
        "at a time (a model that is not a plain safetensors folder is deep-copied instead: + the original's bytes)",
        "SLW per task: stored x/y loaded and split (2 copies), the closed-form init's float64 Gram/solve "
        "matrices (3·i² + 4·h·i + 2·h²); steps are an upper bound (early stopping ends sooner)",
        f"time = FLOPs / throughput ({rate_source}); loading and saving weights are not included",
    ]
