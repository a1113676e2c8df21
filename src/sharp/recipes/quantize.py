"""`sharp quantize`: load a model, quantize each unique weight once (`sharp.io.quantize`), save it."""

from __future__ import annotations

import os

import torch
from torch import nn

from sharp.io.atomic import check_output_dir
from sharp.io.checkpoint import save
from sharp.io.models import load_model
from sharp.io.quantize import QuantConfig, quantize_model


def quantize_checkpoint(
    source: str, out: str | os.PathLike, bits: int = 4, method: str = "quanto", overwrite: bool = False,
    recovery_bits: int = 16, embedding_bits: int = 16, dtype: torch.dtype | str = "auto",
) -> nn.Module:
    """Quantize a sharp checkpoint (or a plain model) and save it: a sharp checkpoint stays one (plus
    `quantization.json`), a plain model becomes a plain quantized folder (no sharing files; `sharp.load_model`
    reads both). `dtype` is what stays unquantized (norms, embeddings, recovery); `auto` keeps the source's.
    Returns the quantized model."""
    # validate before loading anything
    QuantConfig(method=method, bits=bits, recovery_bits=recovery_bits, embedding_bits=embedding_bits)
    check_output_dir(out, overwrite)
    model, tokenizer = load_model(source, dtype=dtype)
    quantize_model(model, bits=bits, method=method, recovery_bits=recovery_bits, embedding_bits=embedding_bits)
    save(model, out, tokenizer=tokenizer, overwrite=overwrite)
    return model
