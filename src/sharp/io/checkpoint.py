"""SHARP checkpoints: unique weights stored once, recovery tensors, and `sharp_config.json`.

A checkpoint folder is a partial Hugging Face folder plus two files:

    config.json, generation_config.json, tokenizer files   the base model's, unchanged
    model.safetensors      every unique base tensor once, under the base model's own names (targets' shared
                           projections are absent: they are the reference's)
    recovery.safetensors   the recovery parameters, under the shared model's names
    sharp_config.json      sharing map, recovery spec, base identity (`SharpConfig`)
    manifest.json          sha256 and size of every file above

`load` = `from_pretrained` on the folder (the absent target weights are reported missing and replaced right
away) + `apply_sharing` + the recovery tensors, with every key accounted for.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sharp.errors import SharpError
from sharp.io.atomic import atomic_dir
from sharp.sharing.config import SharpConfig
from sharp.sharing.recovery import parse_recovery
from sharp.sharing.shared import apply_sharing, shared_linears

SHARP_CONFIG = "sharp_config.json"
WEIGHTS = "model.safetensors"
RECOVERY = "recovery.safetensors"
MANIFEST = "manifest.json"


def is_sharp_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / SHARP_CONFIG).is_file()


def split_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(unique base tensors under base names, recovery tensors). Aliases of a shared tensor are dropped."""
    shared_prefixes = [name + "." for name, _ in shared_linears(model)]
    base: dict[str, torch.Tensor] = {}
    recovery: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in model.state_dict().items():
        prefix = next((p for p in shared_prefixes if name.startswith(p)), None)
        if prefix is not None:
            if name.startswith(prefix + "recovery."):
                recovery[name] = tensor.detach().contiguous()
            continue  # prefix + "base_layer.*" is the reference's tensor under a second name
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:  # tied embeddings and the like: stored once under the first name
            continue
        seen.add(key)
        base[name] = tensor.detach().contiguous()
    return base, recovery


def save(model: nn.Module, out: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a sharp checkpoint atomically. The model must carry `model.sharp_config` (set by `share`)."""
    config: SharpConfig | None = getattr(model, "sharp_config", None)
    if config is None:
        raise RuntimeError("save() needs a model built by sharp.share() or loaded by sharp.load()")
    base, recovery = split_state_dict(model)
    with atomic_dir(out, overwrite) as tmp:
        save_file(base, tmp / WEIGHTS, metadata={"format": "pt"})
        save_file(recovery, tmp / RECOVERY, metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / SHARP_CONFIG).write_text(config.to_json())
        if getattr(model, "sharp_quantization", None) is not None:
            from sharp.io.quantize import write_quant_config

            write_quant_config(model, tmp)
        write_manifest(tmp)
    return Path(out)


def write_manifest(folder: Path) -> None:
    files = {
        f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        for f in sorted(folder.iterdir())
        if f.is_file() and f.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2, sort_keys=True) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_manifest(folder: str | os.PathLike, hashes: bool = True) -> list[str]:
    """Problems found in `folder` against its manifest (empty list = intact)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return [f"{MANIFEST} is missing"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return [f"{MANIFEST} is unreadable"]
    problems = []
    for name, entry in sorted(manifest.items()):
        f = folder / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != entry["bytes"]:
            problems.append(f"{name} has {f.stat().st_size} bytes, expected {entry['bytes']} (truncated?)")
        elif hashes and sha256_file(f) != entry["sha256"]:
            problems.append(f"{name} does not match its sha256 (corrupted)")
    return problems


def load(
    path: str | os.PathLike, dtype: torch.dtype | str | None = "auto", verify: bool = True, mode: str = "shared"
) -> nn.Module:
    """Load a sharp checkpoint with real sharing (one tensor object per unique weight).

    `mode="shared"` keeps one copy of each unique weight and applies recovery on the fly; `mode="merged"`
    materializes every target weight at load (a plain model: no RAM saving, no recovery matmuls).
    A checkpoint written by `sharp quantize` loads quantized (see `sharp.io.quantize`)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not is_sharp_checkpoint(path):
        raise SharpError(f"'{path}' is not a sharp checkpoint (no {SHARP_CONFIG}); create one with `sharp share`")
    if verify:
        problems = verify_manifest(path)
        if problems:
            raise SharpError(f"checkpoint '{path}' is damaged: {problems[0]}; re-create or re-download it")
    if mode not in ("shared", "merged"):
        raise SharpError(f"unknown runtime mode '{mode}'; choose shared or merged")
    config = SharpConfig.from_json((path / SHARP_CONFIG).read_text())
    if (path / "quantization.json").is_file():
        from sharp.io.quantize import QUANT_CONFIG, QuantConfig, load_quantized, merge_quantized

        qconfig = QuantConfig.from_json((path / QUANT_CONFIG).read_text())
        model = load_quantized(
            path, qconfig, lambda m: apply_sharing(m, config.sharing, parse_recovery(config.recovery), config.modules)
        )
        model.sharp_config = config
        return merge_quantized(model) if mode == "merged" else model
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the targets' absent weights are expected; we check keys ourselves
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, SafetensorError) as e:
        raise SharpError(f"cannot load checkpoint '{path}': {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    apply_sharing(model, config.sharing, parse_recovery(config.recovery), config.modules)
    _check_keys(model, info, path)
    try:
        recovery = load_file(path / RECOVERY)
    except (OSError, SafetensorError) as e:
        raise SharpError(f"cannot read {path / RECOVERY}: {e}") from None
    expected = {n for n in model.state_dict() if ".recovery." in n}
    if set(recovery) != expected:
        gone = sorted(expected - set(recovery)) or sorted(set(recovery) - expected)
        raise SharpError(f"checkpoint '{path}': recovery tensors do not match the sharing map (e.g. {gone[0]})")
    model.load_state_dict(recovery, strict=False)
    model.sharp_config = config
    model.eval()
    if mode == "merged":
        from sharp.sharing.shared import merge_sharing

        merge_sharing(model)
    return model


def _check_keys(model: nn.Module, info: dict, path: Path) -> None:
    """Every base key missing from the file must belong to a target's shared projection."""
    shared = tuple(name + "." for name, _ in shared_linears(model))
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(shared)]
    unexpected = list(info.get("unexpected_keys", []))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise SharpError(f"checkpoint '{path}' does not match its sharing map ({what}); re-create it")
