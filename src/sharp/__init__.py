"""sharp-llm: SHaring Adjacent layers with Recovery Parameters.

    import sharp
    model, tok = sharp.load_model("smollm2-135m")
    sharp.share(model, "next:6-29", "lora:32")
    sharp.save(model, "out/", tokenizer=tok)
    model = sharp.load("out/")
"""

from __future__ import annotations

__version__ = "0.1.0"

from sharp.errors import SharpError  # noqa: E402
from sharp.io.checkpoint import load, save  # noqa: E402
from sharp.io.models import load_model  # noqa: E402
from sharp.io.quantize import quiet_bitsandbytes_import  # noqa: E402
from sharp.sharing.build import share  # noqa: E402
from sharp.sharing.shared import count_parameters, merge_sharing  # noqa: E402

quiet_bitsandbytes_import()  # before anything (peft, transformers' Trainer) can import bitsandbytes

__all__ = ["SharpError", "__version__", "count_parameters", "load", "load_model", "merge_sharing", "save", "share"]
