"""`--device` and `--dtype`: where a model runs and in which dtype its weights are kept, parsed in one place.

Storage dtype (`--dtype`): what a model is loaded as and what checkpoints are written in. `auto` keeps the
source's: a bf16 model stays bf16 (half the bytes of fp32), an fp32 one stays fp32, and a GGUF file (quantized
blocks, dequantized when loaded) becomes bf16.

Compute dtype: what the math runs in. GPUs (and Apple MPS) compute in the storage dtype; a CUDA GPU without
bf16 (before Ampere) computes bf16 storage in fp32. CPUs compute in fp32 whatever the storage: bf16 matmuls
have no fast kernels on CPUs without AVX512-BF16/AMX (`sharp compress` of stories260K on this project's AVX2
machine: see `docs/results/dtype_cpu.md`), and fp32 math on bf16-rounded weights gives what the stored model
gives, a little more exactly. Training keeps float32 copies of what it trains whatever the storage dtype (SLW
fits in float32; SFT's trainable tensors are float32 during training), then rounds them to the storage dtype.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from sharp.errors import SharpError

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(text: str | torch.device = "auto") -> torch.device:
    """`auto` (a CUDA GPU, else MPS, else the CPU), `cpu`, `cuda`, `cuda:N` or `mps` → a torch.device.

    `cuda` keeps no index (the current GPU; SLW workers spread over every visible GPU); `cuda:N` pins one.
    An unavailable device or unknown text is one `SharpError` line."""
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
            raise SharpError("--device mps: Apple's Metal (MPS) backend is not available here; use --device cpu "
                             "or auto")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise SharpError(f"unknown --device '{raw}'; use {DEVICE_FORMS}")
    if not torch.cuda.is_available():
        build = "this PyTorch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise SharpError(f"--device {raw}: CUDA is not available ({build}); use --device cpu or auto")
    if match.group(1) is None:
        return torch.device("cuda")
    index, count = int(match.group(1)), torch.cuda.device_count()
    if index >= count:
        raise SharpError(f"--device {raw}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1}); "
                         "pick one of them")
    return torch.device("cuda", index)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def parse_dtype(text: str | torch.dtype) -> torch.dtype | None:
    """`bf16`/`fp16`/`fp32` (or bfloat16, float16, float32, a torch.dtype) → torch.dtype; `auto` → None."""
    if isinstance(text, torch.dtype):
        if text not in DTYPES.values():
            raise SharpError(f"unsupported dtype {text}; use bf16, fp16 or fp32")
        return text
    name = str(text).strip().lower().removeprefix("torch.")
    if name == "auto":
        return None
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise SharpError(f"unknown --dtype '{text}'; use auto, bf16, fp16 or fp32")
    return DTYPES[name]


def resolve_dtype(text: str | torch.dtype = "auto", source: torch.dtype | None = None) -> torch.dtype:
    """The storage dtype: the one asked for, or for `auto` the source's (`source_dtype`; fp32 when unknown)."""
    dtype = parse_dtype(text)
    if dtype is not None:
        return dtype
    return source if source in DTYPES.values() else torch.float32


def compute_dtype(storage: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the math runs in on `device` for weights stored in `storage` (see the module docstring)."""
    if device.type == "cpu":
        return torch.float32
    if device.type == "cuda" and storage == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return torch.float32
    return storage


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 → 'bf16' (the CLI's spelling); other dtypes by their torch name."""
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def source_dtype(path: str | os.PathLike) -> torch.dtype:
    """The dtype a model's weights are stored in, read without loading them (`path` as `resolve_model_path`
    returns it: a folder, a .gguf file or a hub id). A GGUF's quantized blocks count as bf16; anything other
    than bf16/fp16 counts as fp32."""
    p = Path(path)
    if p.suffix == ".gguf":
        return torch.bfloat16
    if p.is_dir():
        if (p / "quantization.json").is_file():  # `sharp quantize`: the dtype of what is not quantized
            return _known(_json(p / "quantization.json").get("dtype"))
        if (p / "sharp_source.json").is_file() and _json(p / "sharp_source.json").get("source", {}).get("gguf"):
            return torch.bfloat16  # an asset folder dequantized from a GGUF (`sharp assets fetch`)
        stored = _safetensors_dtype(p)
        if stored is not None:
            return stored
        config = _json(p / "config.json")
        return _known(config.get("dtype") or config.get("torch_dtype"))
    from sharp.io.models import load_config  # a hub id: its config says

    config = load_config(str(path))
    return _known(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _safetensors_dtype(folder: Path) -> torch.dtype | None:
    """The dtype of the first floating tensor of the folder's weights (the safetensors header only)."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(folder.glob("*.safetensors")):
        if f.name == "recovery.safetensors":
            continue
        try:
            with safe_open(f, framework="pt") as st:
                for key in st.keys():
                    kind = st.get_slice(key).get_dtype()
                    if kind in _SAFETENSORS_DTYPES or kind.startswith("F"):
                        return _SAFETENSORS_DTYPES.get(kind, torch.float32)
        except (OSError, SafetensorError):
            return None
    return None


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _known(value) -> torch.dtype:
    name = str(value).removeprefix("torch.") if value is not None else ""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def worker_devices(device: torch.device, workers: int, visible: int | None = None) -> list[torch.device]:
    """The device of each of `workers` parallel jobs: round-robin over the visible GPUs when `device` is a CUDA
    device without an index and several are visible (`visible` defaults to torch's count), else `device`."""
    if device.type == "cuda" and device.index is None:
        visible = torch.cuda.device_count() if visible is None else visible
        if visible > 1 and workers > 1:
            return [torch.device("cuda", i % visible) for i in range(workers)]
    return [device] * workers


def is_quantized(model: nn.Module) -> bool:
    """Weights of `sharp quantize` (quanto, NF4) or packed integer weights: never cast those. (A GGUF loaded in
    a float dtype carries transformers' GGUF quantizer but plain dequantized weights: those cast.)"""
    return getattr(model, "sharp_quantization", None) is not None or any(
        not p.is_floating_point() for p in model.parameters())


def place(model: nn.Module, device: torch.device, storage: torch.dtype) -> nn.Module:
    """Move a model loaded in its storage dtype to `device`, its parameters in the compute dtype for that device
    (in place; shared weights stay shared: `nn.Module.to` keeps every module object)."""
    model.to(device)
    return cast_to(model, compute_dtype(storage, device))


def round_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every floating parameter to `dtype` and back, in place: a model computing in fp32 then holds
    exactly the values it will be saved with (so what it scores is what the checkpoint scores)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype and p.dtype.itemsize > dtype.itemsize:
                p.copy_(p.to(dtype))


def cast_to(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model's floating parameters in `dtype`, in place; buffers untouched (`model.to(bf16)` would round the
    float32 rotary tables too, which shifts every position's angle). Quantized models are left as they are."""
    if not is_quantized(model):
        for p in model.parameters():  # each tensor once, however many modules share it
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model



def load_on_device(spec: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"
                   ) -> tuple[nn.Module, object, torch.dtype]:
    """(model, tokenizer, storage dtype): `spec` loaded in its storage dtype (`dtype`; `auto`: the source's),
    then placed on `device` in the compute dtype there (`place`)."""
    from sharp.io.models import load_model, resolve_model_path

    where = resolve_device(device)
    requested = parse_dtype(dtype)
    storage = requested if requested is not None else resolve_dtype("auto", source_dtype(resolve_model_path(spec)))
    model, tokenizer = load_model(spec, dtype=storage)
    return place(model, where, storage), tokenizer, storage
