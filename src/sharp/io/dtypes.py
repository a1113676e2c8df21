"""Storage dtypes (`--dtype`): what a model is loaded as and what checkpoints are written in, parsed in one place.

`auto` keeps the source's (`sharp.io.models.source_dtype`): a bf16 model stays bf16 (half the bytes of fp32), an
fp32 one stays fp32, and a GGUF file (quantized blocks, dequantized when loaded) becomes bf16. Where the math runs
and in which dtype is `sharp.io.device`'s business.
"""

from __future__ import annotations

import torch
from torch import nn

from sharp.errors import SharpError
from sharp.sharing.state import sharp_state

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


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


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 → 'bf16' (the CLI's spelling); other dtypes by their torch name."""
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def is_quantized(model: nn.Module) -> bool:
    """Weights of `sharp quantize` (quanto, NF4) or packed integer weights: never cast those. (A GGUF loaded in
    a float dtype carries transformers' GGUF quantizer but plain dequantized weights: those cast.)"""
    state = sharp_state(model)
    return (state is not None and state.quantization is not None) or any(
        not p.is_floating_point() for p in model.parameters())


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
