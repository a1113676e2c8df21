"""sharp-llm: SHaring Adjacent layers with Recovery Parameters.

    import sharp
    model, tok = sharp.load_model("smollm2-135m")
    sharp.share(model, "next:6-29", "lora:32")
    sharp.save(model, "out/", tokenizer=tok)
    model = sharp.load("out/")

The functions below are imported on first use: they need torch and transformers, which take seconds to import,
and `import sharp` (so `sharp --help`, or a mistyped option) should not wait for them.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from sharp._version import __version__  # noqa: E402
from sharp.errors import SharpError  # noqa: E402

if TYPE_CHECKING:
    from sharp.io.checkpoint import save
    from sharp.io.models import load, load_model
    from sharp.sharing.build import share
    from sharp.sharing.shared import count_parameters, merge_sharing

_LAZY = {
    "load": "sharp.io.models",
    "save": "sharp.io.checkpoint",
    "load_model": "sharp.io.models",
    "share": "sharp.sharing.build",
    "count_parameters": "sharp.sharing.shared",
    "merge_sharing": "sharp.sharing.shared",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'sharp' has no attribute '{name}'")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def _quiet_bitsandbytes_import() -> None:
    """Drop the one warning bitsandbytes logs whenever it is imported on a CPU with AVX512-BF16 but without the
    optional `kernels` package ("Failed to load CPU gemm_4bit_forward from kernels-community ..."). peft imports
    bitsandbytes eagerly and transformers' Trainer imports peft, so every `sharp compress` printed it although
    nothing is quantized; sharp's NF4 never uses that kernel either (see `sharp.io.quantize.BnbNF4`). Done here,
    before anything can import bitsandbytes; its other messages still show."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_bnb_kernel_notice)  # once: same filter


def _not_bnb_kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


_quiet_bitsandbytes_import()

__all__ = ["SharpError", "__version__", "count_parameters", "load", "load_model", "merge_sharing", "save", "share"]
