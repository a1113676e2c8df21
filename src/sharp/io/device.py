"""`--device`: where a model runs and in which dtype its math runs there, parsed in one place.

Storage dtype (`--dtype`, `sharp.io.dtypes`): what a model is loaded as and what checkpoints are written in.

Compute dtype: what the math runs in. GPUs (and Apple MPS) compute in the storage dtype; a CUDA GPU without
bf16 (before Ampere) computes bf16 storage in fp32. CPUs compute in fp32 whatever the storage: bf16 matmuls
have no fast kernels on CPUs without AVX512-BF16/AMX (`sharp compress` of stories260K on this project's AVX2
machine: see `docs/results/dtype_cpu.md`), and fp32 math on bf16-rounded weights gives what the stored model
gives, a little more exactly. Training keeps float32 copies of what it trains whatever the storage dtype (SLW
fits in float32; SFT's trainable tensors are float32 during training), then rounds them to the storage dtype.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from sharp.errors import SharpError
from sharp.io.dtypes import cast_to, parse_dtype, resolve_dtype
from sharp.io.models import load_model, resolve_model_path, source_dtype

DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(text: str | torch.device = "auto", flag: str = "--device") -> torch.device:
    """`auto` (a CUDA GPU, else MPS, else the CPU), `cpu`, `cuda`, `cuda:N` or `mps` → a torch.device.

    `cuda` keeps no index (the current GPU; SLW workers spread over every visible GPU); `cuda:N` pins one.
    An unavailable device or unknown text is one `SharpError` line, naming `flag`."""
    raw = str(text).strip()
    name = raw.lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise SharpError(f"{flag} mps: Apple's Metal (MPS) backend is not available here; use {flag} cpu "
                             "or auto")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise SharpError(f"unknown {flag} '{raw}'; use {DEVICE_FORMS}")
    if not torch.cuda.is_available():
        build = "this PyTorch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise SharpError(f"{flag} {raw}: CUDA is not available ({build}); use {flag} cpu or auto")
    if match.group(1) is None:
        return torch.device("cuda")
    index, count = int(match.group(1)), torch.cuda.device_count()
    if index >= count:
        raise SharpError(f"{flag} {raw}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1}); "
                         "pick one of them")
    return torch.device("cuda", index)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def compute_dtype(storage: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the math runs in on `device` for weights stored in `storage` (see the module docstring)."""
    if device.type == "cpu":
        return torch.float32
    if device.type == "cuda" and storage == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return torch.float32
    return storage


def worker_devices(device: torch.device, workers: int, visible: int | None = None) -> list[torch.device]:
    """The device of each of `workers` parallel jobs: round-robin over the visible GPUs when `device` is a CUDA
    device without an index and several are visible (`visible` defaults to torch's count), else `device`."""
    if device.type == "cuda" and device.index is None:
        visible = torch.cuda.device_count() if visible is None else visible
        if visible > 1 and workers > 1:
            return [torch.device("cuda", i % visible) for i in range(workers)]
    return [device] * workers


def place(model: nn.Module, device: torch.device, storage: torch.dtype) -> nn.Module:
    """Move a model loaded in its storage dtype to `device`, its parameters in the compute dtype for that device
    (in place; shared weights stay shared: `nn.Module.to` keeps every module object)."""
    model.to(device)
    return cast_to(model, compute_dtype(storage, device))


def load_on_device(spec: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"
                   ) -> tuple[nn.Module, object, torch.dtype]:
    """(model, tokenizer, storage dtype): `spec` loaded in its storage dtype (`dtype`; `auto`: the source's),
    then placed on `device` in the compute dtype there (`place`)."""
    where = resolve_device(device)
    requested = parse_dtype(dtype)
    storage = requested if requested is not None else resolve_dtype("auto", source_dtype(resolve_model_path(spec)))
    model, tokenizer = load_model(spec, dtype=storage)
    return place(model, where, storage), tokenizer, storage
