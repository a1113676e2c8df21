"""The file names of sharp's folders and what their presence says, shared by every reader and writer in `io`.

    sharp checkpoint         sharp_config.json + recovery.safetensors (+ model.safetensors unless adapter-only)
    quantized folder         quantization.json beside the weights (a sharp checkpoint or a plain model)
    pruned baseline          sharp_prune.json beside a `save_pretrained` folder
    every folder sharp saves manifest.json (sha256 and size of each file)
"""

from __future__ import annotations

import os
from pathlib import Path

SHARP_CONFIG = "sharp_config.json"
WEIGHTS = "model.safetensors"
RECOVERY = "recovery.safetensors"
MANIFEST = "manifest.json"
QUANT_CONFIG = "quantization.json"
PRUNE_CONFIG = "sharp_prune.json"


def is_sharp_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / SHARP_CONFIG).is_file()


def is_adapter_only(path: str | os.PathLike) -> bool:
    """A sharp checkpoint without base weights (`save(..., adapter_only=True)`)."""
    return is_sharp_checkpoint(path) and not (Path(path) / WEIGHTS).is_file() and (Path(path) / RECOVERY).is_file()


def is_quantized_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def is_pruned(path: str | os.PathLike) -> bool:
    return (Path(path) / PRUNE_CONFIG).is_file()


def first_line(e: BaseException) -> str:
    """The first line of an exception's text (library errors run to pages; ours are one line)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
