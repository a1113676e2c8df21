"""Turn what the user typed (folder, .gguf file, sharp checkpoint, alias, hub id) into a model + tokenizer.

`load_model` is the one loader (`sharp.load` is its checkpoint-only form without the tokenizer): it resolves
the spec, tells the folder's kind from its files (`sharp.io.formats`) and hands it to the reader of that kind,
all with one set of defaults.

`load_config` answers "what architecture, how many layers" without loading weights, so commands can
validate their arguments in the first second.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from sharp.errors import SharpError
from sharp.io import asset_cache, assets
from sharp.io.assign import load_on_empty
from sharp.io.checkpoint import load_checkpoint, read_checkpoint_config, saved_dtype
from sharp.io.formats import (
    QUANT_CONFIG,
    RECOVERY,
    SHARP_CONFIG,
    first_line,
    is_adapter_only,
    is_pruned,
    is_quantized_folder,
    is_sharp_checkpoint,
)
from sharp.io.pruned import load_pruned
from sharp.io.quantize import QuantConfig
from sharp.sharing.config import SharpConfig
from sharp.sharing.state import ensure_state

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODES = ("shared", "merged")  # runtime modes of a sharp checkpoint (see `load`)


def resolve_model_path(spec: str) -> str:
    """A local path or hub id for `spec`; aliases (e.g. `smollm2-135m`) resolve to the asset cache."""
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
        f"({', '.join(sorted(asset_cache.MODEL_ALIASES))})"
    )


def refuse_sharp_checkpoint(spec: str, verb: str) -> None:
    """Refuse a sharp checkpoint where a base model is needed (`verb`: compress, share, plan for), before loading."""
    if is_sharp_checkpoint(Path(spec).expanduser()):  # an alias or hub id is never one
        raise SharpError(f"'{spec}' is already a sharp checkpoint; {verb} its base model instead")


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
        raise SharpError(f"cannot read the config of model '{spec}': {first_line(e)}") from None


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
        raise SharpError(f"cannot load the tokenizer of '{spec}': {first_line(e)}") from None


def load_model(
    spec: str,
    dtype: torch.dtype | str | None = "auto",
    *,
    mode: str = "shared",
    verify: bool = True,
    base: str | os.PathLike | nn.Module | None = None,
    tokenizer: bool = True,
) -> tuple[nn.Module, object | None]:
    """(model, tokenizer) for any supported spec: the one loader of every command, recipe and benchmark.

    A sharp checkpoint loads with its sharing (`mode`, `verify` and `base` as in `load`); a quantized folder
    (`sharp quantize`) loads quantized, a pruned baseline with its per-layer widths, a .gguf file dequantized,
    anything else through transformers. `dtype="auto"` keeps the source's (`source_dtype`: bf16 for a GGUF
    file). `tokenizer=False` skips the tokenizer (None in its place) for callers that only run the weights."""
    tok = load_tokenizer(spec) if tokenizer else None  # first: a few hundred ms, and a bad spec fails fast
    return _load(spec, resolve_model_path(spec), dtype, mode, verify, base), tok


def load(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = "auto",
    verify: bool = True,
    mode: str = "shared",
    base: str | os.PathLike | nn.Module | None = None,
) -> nn.Module:
    """Load a sharp checkpoint with real sharing (one tensor object per unique weight); `load_model` without
    the tokenizer, refusing anything but a sharp checkpoint.

    `verify` checks every file against the manifest first. `mode="shared"` keeps one copy of each unique weight
    and applies recovery on the fly; `mode="merged"` materializes every target weight at load (a plain model:
    no RAM saving, no recovery matmuls). A checkpoint written by `sharp quantize` loads quantized.
    An adapter-only checkpoint is rebuilt on `base` (a model spec or a loaded, unshared model, which is then
    shared in place); without `base` its recorded source is used when it is a local folder or an alias."""
    if not is_sharp_checkpoint(path):
        raise SharpError(f"'{path}' is not a sharp checkpoint (no {SHARP_CONFIG}); create one with `sharp share`")
    return _load(str(path), str(path), dtype, mode, verify, base)


def _load(spec: str, path: str, dtype, mode: str, verify: bool, base) -> nn.Module:
    """The model `spec` names (`path`: where it resolved to), whatever the folder's kind."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if mode not in MODES:
        raise SharpError(f"unknown runtime mode '{mode}'; choose {' or '.join(MODES)}")
    folder = Path(path)
    try:
        if is_sharp_checkpoint(folder):
            config = read_checkpoint_config(folder, verify)
            if is_adapter_only(folder):
                base = _base_model(folder, config, base, dtype)
            model = load_checkpoint(folder, config, dtype, mode, base)
        else:
            if mode != "shared":
                raise SharpError(f"'{spec}' is a plain model: the {mode} runtime mode only applies to sharp "
                                 "checkpoints")
            if base is not None:
                raise SharpError(f"'{spec}' is not an adapter-only sharp checkpoint; load it without base=")
            if is_quantized_folder(folder):  # a plain model quantized by `sharp quantize`
                quant = QuantConfig.from_json((folder / QUANT_CONFIG).read_text())
                model = load_on_empty(folder, AutoConfig.from_pretrained(folder), quant=quant)
            elif is_pruned(folder):  # a pruned baseline (`sharp prune`)
                model = load_pruned(folder, dtype=dtype)
            else:
                if dtype == "auto":  # the source's (transformers' "auto" would read a GGUF as float32)
                    dtype = source_dtype(path)
                if folder.suffix == ".gguf":
                    model = _load_gguf(folder, dtype=dtype)
                else:
                    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except SharpError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:  # a damaged weights file too
        raise SharpError(f"cannot load model '{spec}': {first_line(e)}") from None
    model.eval()
    ensure_state(model).source = spec
    return model


def _base_model(path: Path, config: SharpConfig, base, dtype) -> nn.Module:
    """The base model an adapter-only checkpoint is rebuilt on: `base` loaded (a spec) or as given (a model);
    by default its recorded source when that is a local folder or an alias. A spec loads in the adapter's saved
    dtype, so its weights hash as they did when it was saved."""
    ident = config.base
    if base is None:
        source = ident.source
        if not source or (not Path(source).expanduser().exists() and assets.resolve_model_alias(source) is None):
            raise SharpError(f"'{path}' is an adapter-only checkpoint; load it with its base model, e.g. "
                             f"sharp.load('{path}', base='{source or 'BASE_MODEL'}')")
        base = source
    if not isinstance(base, str | os.PathLike):
        return base  # a loaded model (or a wrong type, refused by `load_checkpoint`)
    spec = str(base)
    if is_sharp_checkpoint(resolve_model_path(spec)):
        raise SharpError(f"base '{spec}' is a sharp checkpoint; pass the original model the adapter "
                         f"'{path}' was made from ({ident.source or ident.model_type})")
    model, _ = load_model(spec, dtype=saved_dtype(path) if dtype == "auto" else dtype, tokenizer=False)
    return model


def _load_gguf(path: Path, dtype: torch.dtype | str | None) -> nn.Module:
    """A plain dense model from a .gguf file, whatever its quantization (no tokenizer: see `load_model`).

    Without `dequantize=True` transformers keeps its GGUF quantizer attached (`hf_quantizer`, `is_quantized`,
    `config.quantization_config`) even when the weights are unpacked to dense tensors, and then the Trainer
    refuses to fine-tune ("purely quantized models"), `save_pretrained` refuses to save, and with the optional
    `kernels` package quantized blocks would stay packed in `GgufLinear` modules that sharing cannot reuse.
    """
    from transformers import AutoModelForCausalLM, GgufConfig

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


def source_dtype(path: str | os.PathLike) -> torch.dtype:
    """The dtype a model's weights are stored in, read without loading them (`path` as `resolve_model_path`
    returns it: a folder, a .gguf file or a hub id; or a bare config.json). A GGUF's quantized blocks count as
    bf16; anything other than bf16/fp16 counts as fp32."""
    p = Path(path)
    if p.suffix == ".gguf":
        return torch.bfloat16
    if p.suffix == ".json" and p.is_file():  # a bare config.json (`sharp plan`): the dtype it declares
        config = _json(p)
        return _known(config.get("dtype") or config.get("torch_dtype"))
    if p.is_dir():
        if is_quantized_folder(p):  # `sharp quantize`: the dtype of what is not quantized
            return _known(_json(p / QUANT_CONFIG).get("dtype"))
        if (p / asset_cache.SOURCE_FILE).is_file() and _json(p / asset_cache.SOURCE_FILE).get("source", {}).get("gguf"):
            return torch.bfloat16  # an asset folder dequantized from a GGUF (`sharp assets fetch`)
        stored = _safetensors_dtype(p)
        if stored is not None:
            return stored
        config = _json(p / "config.json")
        return _known(config.get("dtype") or config.get("torch_dtype"))
    config = load_config(str(path))  # a hub id: its config says
    return _known(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _safetensors_dtype(folder: Path) -> torch.dtype | None:
    """The dtype of the first floating tensor of the folder's weights (the safetensors header only)."""
    for f in sorted(folder.glob("*.safetensors")):
        if f.name == RECOVERY:
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
