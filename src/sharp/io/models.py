"""Turn what the user typed (folder, .gguf file, sharp checkpoint, alias, hub id) into a model + tokenizer.

`load_config` answers "what architecture, how many layers" without loading weights, so commands can
validate their arguments in the first second.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from sharp.errors import SharpError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(spec: str) -> str:
    """A local path or hub id for `spec`; aliases (e.g. `smollm2-135m`) resolve to the asset cache."""
    from sharp.io import assets

    alias = assets.resolve_model_alias(spec)
    if alias is not None:
        return str(alias)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise SharpError(f"model folder '{spec}' has no config.json; point at a Hugging Face model folder")
        if path.is_file() and path.suffix != ".gguf":
            raise SharpError(f"model file '{spec}' is not a .gguf file; pass a model folder or a .gguf file")
        return str(path)
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return spec  # a hub id: transformers downloads it (needs internet)
    raise SharpError(
        f"model '{spec}' not found: pass a model folder, a .gguf file, a hub id (org/name) or an alias "
        f"({', '.join(sorted(assets.MODEL_ALIASES))})"
    )


def load_config(spec: str):
    """The model's transformers config (no weights), for early validation."""
    from transformers import AutoConfig

    path = resolve_model_path(spec)
    try:
        if path.endswith(".gguf"):
            p = Path(path)
            return AutoConfig.from_pretrained(p.parent, gguf_file=p.name)
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise SharpError(f"cannot read the config of model '{spec}': {_first_line(e)}") from None


def check_max_len(config, max_len: int, flag: str = "--max-len") -> None:
    """Refuse a sequence length the model cannot attend over (its `max_position_embeddings`)."""
    limit = getattr(config, "max_position_embeddings", None)
    if max_len < 2 or (isinstance(limit, int) and max_len > limit):
        raise SharpError(f"{flag} {max_len} must be between 2 and the model's limit ({limit} positions); "
                         f"lower {flag}")


def load_tokenizer(spec: str):
    """The tokenizer of any supported spec (a few hundred ms: callers tokenize before loading the weights, so
    bad data fails fast)."""
    from transformers import AutoTokenizer

    path, kwargs = _path_and_kwargs(spec)
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SharpError(f"cannot load the tokenizer of '{spec}': {_first_line(e)}") from None


def load_model(spec: str, dtype: torch.dtype | str | None = "auto") -> tuple[nn.Module, object]:
    """(model, tokenizer) for any supported spec; sharp checkpoints load with their sharing."""
    from transformers import AutoModelForCausalLM

    from sharp.io.checkpoint import is_sharp_checkpoint, load

    tokenizer = load_tokenizer(spec)
    path, kwargs = _path_and_kwargs(spec)
    try:
        if is_sharp_checkpoint(path):
            model = load(path, dtype=dtype)
        elif (Path(path) / "quantization.json").is_file():  # a plain model quantized by `sharp quantize`
            from sharp.io.quantize import load_quantized_folder

            model = load_quantized_folder(path)
        elif (Path(path) / "sharp_prune.json").is_file():  # a pruned baseline (`sharp prune`)
            from sharp.baselines.io import load_pruned

            model = load_pruned(path, dtype=dtype)
        elif "gguf_file" in kwargs:
            model = load_gguf(Path(path) / kwargs["gguf_file"], dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except SharpError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SharpError(f"cannot load model '{spec}': {_first_line(e)}") from None
    model.eval()
    model.sharp_source = spec
    return model, tokenizer


def load_gguf(path: str | os.PathLike, dtype: torch.dtype | str | None = "auto") -> nn.Module:
    """A plain dense model from a .gguf file, whatever its quantization (no tokenizer: see `load_model`).

    Without `dequantize=True` transformers keeps its GGUF quantizer attached (`hf_quantizer`, `is_quantized`,
    `config.quantization_config`) even when the weights are unpacked to dense tensors, and then the Trainer
    refuses to fine-tune ("purely quantized models"), `save_pretrained` refuses to save, and with the optional
    `kernels` package quantized blocks would stay packed in `GgufLinear` modules that sharing cannot reuse.
    """
    from transformers import AutoModelForCausalLM, GgufConfig

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    left = [what for what, value in (("hf_quantizer", getattr(model, "hf_quantizer", None)),
                                     ("is_quantized", getattr(model, "is_quantized", False)),
                                     ("config.quantization_config", getattr(model.config, "quantization_config", None)),
                                     ("packed modules", any(type(m).__name__.startswith("Gguf")
                                                            for m in model.modules())))
            if value]
    if left:  # a transformers upgrade changed what dequantize=True does: fail here, not deep inside the Trainer
        raise RuntimeError(f"loading '{path.name}' left GGUF quantization in place ({', '.join(left)}); "
                           "this transformers version changed how GGUF files load")
    return model


def _path_and_kwargs(spec: str) -> tuple[str, dict]:
    """(folder, from_pretrained kwargs): a .gguf file is read from its folder with `gguf_file=`."""
    path = resolve_model_path(spec)
    if path.endswith(".gguf"):
        p = Path(path)
        return str(p.parent), {"gguf_file": p.name}
    return path, {}


def folder_bytes(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
