"""SHARP checkpoints: unique weights stored once, recovery tensors, and `sharp_config.json`.

A checkpoint folder is a partial Hugging Face folder plus two files:

    config.json, generation_config.json, tokenizer files   the base model's, unchanged
    model.safetensors      every unique base tensor once, under the base model's own names (targets' shared
                           projections are absent: they are the reference's)
    recovery.safetensors   the recovery parameters, under the shared model's names
    sharp_config.json      sharing map, recovery spec, base identity (`SharpConfig`)
    manifest.json          sha256 and size of every file above, the base identity, `adapter_only`

An *adapter-only* checkpoint (`save(..., adapter_only=True)`) leaves out `model.safetensors`: it holds the
recovery tensors and the configs only, for users who keep the base model. `load(dir, base=MODEL)` rebuilds it
on that base after checking the base is the one the recovery was trained on (architecture, config hash,
weights hash from `BaseIdentity`, and a hash of the base tensors the shared model keeps, stored in the
recovery file's metadata); any difference is refused with one line, since recovery parameters applied to
another base give a silently wrong model.

`load_checkpoint` builds the recorded structure on empty weights and assigns the stored tensors
(`sharp.io.assign`), with every key accounted for. Users reach it through `sharp.load` / `sharp.load_model`
(`sharp.io.models`), which also find the base of an adapter-only checkpoint. A model `sharp quantize` made
without sharing is saved here too: weights, configs and `quantization.json`, no sharing files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from sharp.arch import num_layers
from sharp.errors import SharpError
from sharp.io.assign import load_on_empty, load_recovery
from sharp.io.atomic import atomic_dir
from sharp.io.dtypes import cast_to
from sharp.io.formats import (
    QUANT_CONFIG,
    RECOVERY,
    SHARP_CONFIG,
    WEIGHTS,
    first_line,
    is_adapter_only,
    is_sharp_checkpoint,
)
from sharp.io.manifest import tensors_sha256, verify_manifest, write_manifest
from sharp.io.quantize import QuantConfig, merge_quantized, quant_config, stored_tensors, write_quant_config
from sharp.sharing.build import apply_layout, config_sha256, weights_sha256
from sharp.sharing.config import BaseIdentity, SharpConfig
from sharp.sharing.recovery import parse_recovery
from sharp.sharing.shared import merge_sharing, shared_linears
from sharp.sharing.state import ensure_state, sharp_config
from sharp.sharing.strategy import parse_strategy

KEPT_SHA = "sharp_base_kept_sha256"  # recovery-file metadata of an adapter-only checkpoint


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


def save(
    model: nn.Module,
    out: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    adapter_only: bool = False,
) -> Path:
    """Write a sharp checkpoint atomically. The model must be shared (`share`, `sharp.load`) or quantized
    (`sharp quantize` of a plain model: then the folder holds weights, configs and `quantization.json` only).

    `adapter_only=True` writes the recovery tensors and configs but no base weights (see module docstring);
    `load(out, base=...)` needs the original base model then."""
    config = sharp_config(model)
    quantized = quant_config(model) is not None
    if config is None and not quantized:
        raise RuntimeError("save() needs a model built by sharp.share() or loaded by sharp.load()")
    if adapter_only and quantized:
        raise SharpError("a quantized model cannot be saved adapter-only (its base weights changed); save it whole")
    if adapter_only and not config.base.weights_sha256:
        raise SharpError("this model records no base weights hash, so an adapter-only checkpoint could not be "
                         "checked against its base; save it whole")
    base, recovery = split_state_dict(model)
    stored = next((t.dtype for t in base.values() if t.is_floating_point()), None)
    if stored is not None and not quantized:
        model.config.dtype = stored  # config.json states the dtype the weights are stored in (a cast model's too)
    if quantized:  # recovery / embedding may be stored in 8 or 4 bits (`sharp.io.stored_quant`)
        base, recovery = stored_tensors(model, base), stored_tensors(model, recovery)
    meta = {"format": "pt"}
    if adapter_only:
        meta[KEPT_SHA] = tensors_sha256(base)
    with atomic_dir(out, overwrite) as tmp:
        if not adapter_only:
            save_file(base, tmp / WEIGHTS, metadata={"format": "pt"})
        if config is not None:
            save_file(recovery, tmp / RECOVERY, metadata=meta)
            (tmp / SHARP_CONFIG).write_text(config.to_json())
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if quantized:
            write_quant_config(model, tmp)
        write_manifest(tmp)
    return Path(out)


def read_checkpoint_config(path: Path, verify: bool = True) -> SharpConfig:
    """The `SharpConfig` of the checkpoint in `path`, after checking its files against the manifest (`verify`)
    and its recovery spec: a damaged checkpoint fails here, before any weight is read."""
    if not is_sharp_checkpoint(path):
        raise SharpError(f"'{path}' is not a sharp checkpoint (no {SHARP_CONFIG}); create one with `sharp share`")
    if verify:
        problems = verify_manifest(path)
        if problems:
            raise SharpError(f"checkpoint '{path}' is damaged: {problems[0]}; re-create or re-download it")
    config = SharpConfig.from_json((path / SHARP_CONFIG).read_text())
    parse_recovery(config.recovery)
    return config


def load_checkpoint(
    path: Path,
    config: SharpConfig,
    dtype: torch.dtype | str | None = "auto",
    mode: str = "shared",
    base: nn.Module | None = None,
) -> nn.Module:
    """The sharp checkpoint in `path` (its `config` read by `read_checkpoint_config`) with real sharing: one
    tensor object per unique weight. `mode="merged"` materializes every target weight (see `sharp.load`).
    An adapter-only checkpoint is rebuilt on `base`, a loaded unshared model that is checked against the recorded
    base identity, then shared in place."""
    if is_adapter_only(path):
        if base is None:
            raise SharpError(f"'{path}' is an adapter-only checkpoint; load it with its base model")
        model = _load_on_base(path, config, base)
    else:
        if base is not None:
            raise SharpError(f"'{path}' is a full checkpoint (it holds its base weights); load it without base=")
        hf_config = _hf_config(path, config)
        quant = QuantConfig.from_json((path / QUANT_CONFIG).read_text()) if (path / QUANT_CONFIG).is_file() else None
        model = load_on_empty(path, hf_config, lambda m: _apply_layout(m, config, path), quant, recovery=True)
        if quant is None and dtype not in (None, "auto"):
            # parameters only: `model.to(bf16)` would round the float32 rotary tables too (positions drift)
            cast_to(model, getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    ensure_state(model).config = config
    model.eval()
    if mode == "merged":
        return merge_quantized(model) if quant_config(model) is not None else merge_sharing(model)
    return model


def _hf_config(path: Path, config: SharpConfig):
    """The checkpoint's config.json, refused when it names another architecture than the recovery's."""
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise SharpError(f"cannot read the config.json of checkpoint '{path}': {first_line(e)}") from None
    ident = config.base
    if ident.model_type and hf_config.model_type != ident.model_type:
        raise SharpError(f"checkpoint '{path}': config.json describes a {hf_config.model_type} model but the "
                         f"recovery was trained on {ident.model_type}; re-create the checkpoint")
    return hf_config


def _apply_layout(model: nn.Module, config: SharpConfig, path: Path) -> nn.Module:
    """The recorded layout (sharing map, per-target ranks, deleted MLPs), checked like a `map:` strategy against
    this model (an edited file fails here with one line), then applied."""
    if not config.sharing and not config.dropped_mlps:
        raise SharpError(f"checkpoint '{path}': {SHARP_CONFIG} has an empty sharing map; re-create it")
    ranks = config.ranks
    items = [f"{t}={r}" + (f"@{ranks[t]}" if t in ranks else "") for t, r in sorted(config.sharing.items())]
    items += [f"{t}=drop-mlp" for t in config.dropped_mlps]
    try:
        strategy = parse_strategy("map:" + ",".join(items))
        strategy.resolve(num_layers(model.config))
        if set(ranks) - set(config.sharing):
            raise SharpError(f"ranks are recorded for layers {sorted(set(ranks) - set(config.sharing))} that share "
                             "nothing")
    except SharpError as e:
        raise SharpError(f"checkpoint '{path}': bad sharing map in {SHARP_CONFIG} ({e}); re-create it") from None
    return apply_layout(model, config)


def _load_on_base(path: Path, config: SharpConfig, model: nn.Module) -> nn.Module:
    """Rebuild an adapter-only checkpoint on the loaded `model`, refusing any base other than the recorded one."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"base must be a model spec or a model, not {type(model).__name__}")
    if shared_linears(model):
        raise SharpError("the base model already shares layers; pass the original (unshared) model")
    check_base_identity(model, config.base, path)
    if config.dropped_mlps or config.dropped_blocks:
        raise SharpError(f"'{path}' drops layers of its base, so it cannot be an adapter; use the full checkpoint")
    _apply_layout(model, config, path)
    kept = _recovery_metadata(path).get(KEPT_SHA)
    if kept and tensors_sha256(split_state_dict(model)[0]) != kept:
        raise SharpError(f"adapter '{path}' was saved from a model whose kept base weights differ from this base "
                         "(e.g. trained with --train full-lora); use the full checkpoint instead")
    load_recovery(model, path)
    return model


def check_base_identity(model: nn.Module, ident: BaseIdentity, where: str | os.PathLike = "the adapter") -> None:
    """Refuse (one line) a base model whose architecture, config or weights differ from `ident`."""
    named = f" ({ident.source})" if ident.source else ""
    if ident.model_type and model.config.model_type != ident.model_type:
        raise SharpError(f"'{where}' holds recovery for a {ident.model_type} base{named}, not this "
                         f"{model.config.model_type} model; pass the base it was made from")
    if ident.config_sha256 and config_sha256(model.config) != ident.config_sha256:
        raise SharpError(f"'{where}' was made from another base{named}: this model's config differs; pass the "
                         "base it was made from")
    if ident.weights_sha256 and weights_sha256(model) != ident.weights_sha256:
        dtype = next(model.parameters()).dtype
        raise SharpError(f"'{where}' was made from another base{named}: this model's weights differ (it is "
                         f"{str(dtype).removeprefix('torch.')}; a different checkpoint, fine-tune or dtype); "
                         "pass the exact base it was made from")


def saved_dtype(path: Path) -> torch.dtype | str:
    """The dtype a checkpoint was saved in (its config.json; `auto` when it says none), so an adapter's base
    loads, and hashes, as it did then."""
    try:
        dtype = json.loads((path / "config.json").read_text()).get("dtype")
    except (OSError, json.JSONDecodeError, AttributeError):
        dtype = None
    return getattr(torch, dtype) if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None),
                                                                         torch.dtype) else "auto"


def _recovery_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(path / RECOVERY, "pt") as f:
            return f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise SharpError(f"cannot read {path / RECOVERY}: {first_line(e)}; re-create the checkpoint") from None
