"""A short throughput probe for `sharp plan`: time the model's own layer shapes on a device, no weights needed.

The probe builds the model with two decoder layers (the second shares the first's MLP with the planned
recovery, so both a plain and a shared layer run) and a 512-token vocabulary, in the run's dtype and with
random weights, then times, after one warm-up each:

    forward   one sequence of `tokens` tokens, no gradients            (eval, SLW capture)
    train     the same sequence forward + backward, recovery trainable  (SFT)
    slw       one SLW step of the shared MLP on float32 rows           (SLW)

It returns the probe's config and the median seconds of each; the caller divides the FLOPs of what was timed
(counted on that config) to get FLOP/s for this shape on this device. Random and real weights of the same
shape and dtype run at the same speed, so the probe needs the config only.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from sharp.bench.measure import synchronize
from sharp.errors import SharpError

PROBE_VOCAB = 512
PROBE_STRATEGY = "map:1=0"


def probe_config(config):
    """`config` cut to two decoder layers and a small vocabulary (the head is counted, not timed)."""
    d = copy.deepcopy(config.to_dict())
    d["num_hidden_layers"] = 2
    d["vocab_size"] = PROBE_VOCAB
    d.pop("layer_types", None)  # recomputed for 2 layers (Gemma 3, Qwen 2: sliding/full pattern)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(d.get(key), int) and d[key] >= PROBE_VOCAB:
            d[key] = 0
    return type(config).from_dict(d)


def probe_throughput(config, recovery: str, dtype: str, device: str = "cpu", tokens: int = 256,
                     slw_rows: int = 1056, repeats: int = 2) -> dict:
    """Median seconds of a forward pass, an SFT step and an SLW step on `device` (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    from sharp.recovery.trainable import mark_trainable
    from sharp.sharing.build import share
    from sharp.sharing.shared import SharedLinear

    cfg = probe_config(config)
    _check_room(cfg, dtype, device)
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype).to(device)
    share(model, PROBE_STRATEGY, recovery)
    ids = torch.randint(PROBE_VOCAB, (1, tokens), device=device)

    @torch.no_grad()
    def forward() -> None:
        model(input_ids=ids, use_cache=False)

    if _has_recovery(model):
        mark_trainable(model, "recovery")
    else:
        model.requires_grad_(False)

    def train() -> None:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        if loss.requires_grad:
            loss.backward()
        model.zero_grad(set_to_none=True)

    from sharp.arch import get_adapter

    mlp = copy.deepcopy(get_adapter(model).mlp(model, 1)).float()
    assert any(isinstance(m, SharedLinear) for m in mlp.modules())
    x = torch.randn(slw_rows, cfg.hidden_size, device=device)
    y = torch.randn(slw_rows, cfg.hidden_size, device=device)

    def slw_step() -> None:
        loss = (mlp(x) - y).pow(2).sum() / y.pow(2).sum()
        if loss.requires_grad:
            loss.backward()
        mlp.zero_grad(set_to_none=True)

    model.train()
    start = time.perf_counter()
    seconds = {name: _time(fn, device, repeats) for name, fn in
               (("forward", forward), ("train", train), ("slw", slw_step))}
    return {"config": cfg, "seconds": seconds, "tokens": tokens, "slw_rows": slw_rows, "device": str(device),
            "dtype": dtype, "wall": time.perf_counter() - start}


def _has_recovery(model) -> bool:
    from sharp.sharing.shared import recoveries

    return any(p.numel() for _, r in recoveries(model) for p in r.parameters())


def _time(fn, device: str, repeats: int) -> float:
    fn()  # warm-up: first-call allocations, kernel selection
    synchronize(torch.device(device))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(torch.device(device))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _check_room(cfg, dtype: str, device: str) -> None:
    """Refuse a probe whose two layers would not fit comfortably (a 70B-class layer on a small machine)."""
    import psutil

    h, i = cfg.hidden_size, cfg.intermediate_size
    need = 2 * (4 * h * h + 3 * h * i) * {"float32": 4}.get(dtype, 2) * 3  # weights, grads, workspace
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise SharpError(f"--probe-device {device}: no CUDA device here; use cpu or pass --tflops")
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        free = psutil.virtual_memory().available
    if need > free / 2:
        raise SharpError(f"the throughput probe needs about {need / 2**30:.1f} GiB on {device} "
                         f"({free / 2**30:.1f} GiB free); pass --tflops instead")
