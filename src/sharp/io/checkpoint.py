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
from sharp.io.atomic import atomic_dir, write_text_atomic
from sharp.sharing.build import apply_layout
from sharp.sharing.config import BaseIdentity, SharpConfig
from sharp.sharing.recovery import parse_recovery
from sharp.sharing.shared import shared_linears

SHARP_CONFIG = "sharp_config.json"
WEIGHTS = "model.safetensors"
RECOVERY = "recovery.safetensors"
MANIFEST = "manifest.json"
KEPT_SHA = "sharp_base_kept_sha256"  # recovery-file metadata of an adapter-only checkpoint


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


def save(
    model: nn.Module,
    out: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    adapter_only: bool = False,
) -> Path:
    """Write a sharp checkpoint atomically. The model must carry `model.sharp_config` (set by `share`).

    `adapter_only=True` writes the recovery tensors and configs but no base weights (see module docstring);
    `load(out, base=...)` needs the original base model then."""
    config: SharpConfig | None = getattr(model, "sharp_config", None)
    if config is None:
        raise RuntimeError("save() needs a model built by sharp.share() or loaded by sharp.load()")
    quantized = getattr(model, "sharp_quantization", None) is not None
    if adapter_only and quantized:
        raise SharpError("a quantized model cannot be saved adapter-only (its base weights changed); save it whole")
    if adapter_only and not config.base.weights_sha256:
        raise SharpError("this model records no base weights hash, so an adapter-only checkpoint could not be "
                         "checked against its base; save it whole")
    base, recovery = split_state_dict(model)
    meta = {"format": "pt"}
    if adapter_only:
        meta[KEPT_SHA] = tensors_sha256(base)
    with atomic_dir(out, overwrite) as tmp:
        if not adapter_only:
            save_file(base, tmp / WEIGHTS, metadata={"format": "pt"})
        save_file(recovery, tmp / RECOVERY, metadata=meta)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / SHARP_CONFIG).write_text(config.to_json())
        if quantized:
            from sharp.io.quantize import write_quant_config

            write_quant_config(model, tmp)
        write_manifest(tmp)
    return Path(out)


def is_adapter_only(path: str | os.PathLike) -> bool:
    """A sharp checkpoint without base weights (`save(..., adapter_only=True)`)."""
    return is_sharp_checkpoint(path) and not (Path(path) / WEIGHTS).is_file() and (Path(path) / RECOVERY).is_file()


@torch.no_grad()
def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of named tensors: sorted names, dtypes, shapes and raw bytes."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """sha256 and size of every file, plus (for a sharp checkpoint) the base identity and `adapter_only`."""
    folder = Path(folder)
    files = {
        f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        for f in sorted(folder.iterdir())
        if f.is_file() and f.name != MANIFEST
    }
    manifest: dict = {"files": files}
    if (folder / SHARP_CONFIG).is_file():
        try:
            manifest["base"] = json.loads((folder / SHARP_CONFIG).read_text()).get("base")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            manifest["base"] = None  # load refuses such a config itself
        manifest["adapter_only"] = is_adapter_only(folder)
    # a rewrite (compress adds files) never leaves half a manifest
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


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
        full = json.loads((folder / MANIFEST).read_text())
        manifest = full["files"]
        entries = [(str(name), int(e["bytes"]), str(e["sha256"])) for name, e in sorted(manifest.items())]
    except FileNotFoundError:
        return [f"{MANIFEST} is missing"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError):
        return [f"{MANIFEST} is unreadable"]
    problems = []
    for name, size, sha in entries:
        f = folder / name
        if Path(name).name != name or name == MANIFEST:
            problems.append(f"{MANIFEST} lists an invalid file name '{name}'")
        elif not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{name} has {f.stat().st_size} bytes, expected {size} (truncated?)")
        elif hashes and sha256_file(f) != sha:
            problems.append(f"{name} does not match its sha256 (corrupted)")
    if (folder / SHARP_CONFIG).is_file():
        for required in (SHARP_CONFIG, RECOVERY, "config.json"):
            if required not in manifest:
                problems.append(f"{MANIFEST} does not list {required}")
        if WEIGHTS not in manifest and not full.get("adapter_only", False):
            problems.append(f"{MANIFEST} does not list {WEIGHTS}")
        if not problems and "base" in full:
            try:
                recorded = json.loads((folder / SHARP_CONFIG).read_text()).get("base")
            except (OSError, json.JSONDecodeError, AttributeError):
                recorded = None
            if recorded != full["base"]:
                problems.append(f"the base identity in {MANIFEST} differs from {SHARP_CONFIG}")
    return problems


def load(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = "auto",
    verify: bool = True,
    mode: str = "shared",
    base: str | os.PathLike | nn.Module | None = None,
) -> nn.Module:
    """Load a sharp checkpoint with real sharing (one tensor object per unique weight).

    `mode="shared"` keeps one copy of each unique weight and applies recovery on the fly; `mode="merged"`
    materializes every target weight at load (a plain model: no RAM saving, no recovery matmuls).
    A checkpoint written by `sharp quantize` loads quantized (see `sharp.io.quantize`).
    An adapter-only checkpoint is rebuilt on `base` (a model spec or a loaded, unshared model, which is then
    shared in place); without `base` its recorded source is used when it is a local folder or an alias."""
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
    parse_recovery(config.recovery)  # a bad spec fails here, before any weight is read
    if is_adapter_only(path):
        model = _load_on_base(path, config, base, dtype)
    else:
        if base is not None:
            raise SharpError(f"'{path}' is a full checkpoint (it holds its base weights); load it without base=")
        if (path / "quantization.json").is_file():
            from sharp.io.quantize import QUANT_CONFIG, QuantConfig, load_quantized, merge_quantized

            qconfig = QuantConfig.from_json((path / QUANT_CONFIG).read_text())
            model = load_quantized(path, qconfig, lambda m: _apply_layout(m, config, path))
            model.sharp_config = config
            return merge_quantized(model) if mode == "merged" else model
        model = _load_full(path, config, dtype)
    _load_recovery(model, path)
    model.sharp_config = config
    model.eval()
    if mode == "merged":
        from sharp.sharing.shared import merge_sharing

        merge_sharing(model)
    return model


def _apply_layout(model: nn.Module, config: SharpConfig, path: Path) -> nn.Module:
    """The recorded layout (sharing map, per-target ranks, deleted MLPs), checked like a `map:` strategy against
    this model (an edited file fails here with one line), then applied."""
    from sharp.arch import num_layers
    from sharp.sharing.strategy import parse_strategy

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


def _load_full(path: Path, config: SharpConfig, dtype) -> nn.Module:
    """Build the model on empty (meta) weights, share, then assign the stored tensors: nothing is allocated
    or randomly initialized only to be thrown away (the targets' absent weights), so loading costs about
    what reading the unique bytes costs."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise SharpError(f"cannot read the config.json of checkpoint '{path}': {_first_line(e)}") from None
    ident = config.base
    if ident.model_type and hf_config.model_type != ident.model_type:
        raise SharpError(f"checkpoint '{path}': config.json describes a {hf_config.model_type} model but the "
                         f"recovery was trained on {ident.model_type}; re-create the checkpoint")
    try:
        state = load_file(path / WEIGHTS)
    except (OSError, SafetensorError) as e:
        raise SharpError(f"cannot load checkpoint '{path}': {WEIGHTS}: {_first_line(e)}") from None
    stored_dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    # rotary tables etc. are computed, weights stay meta and uninitialized (random init of meta tensors still
    # runs torch's Python decompositions: ~0.1 s of a 0.15 s SmolLM2 load before this was skipped)
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=stored_dtype)
        _apply_layout(model, config, path)
    # a deleted MLP's projections have no elements: the file cannot hold them, so they are made here, not read
    state.update({k: torch.empty(p.shape, dtype=p.dtype) for k, p in model.state_dict().items()
                  if p.numel() == 0 and k not in state})
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shapes that contradict config.json
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), _first_line(e))
        raise SharpError(f"cannot load checkpoint '{path}': {detail}") from None
    model.tie_weights()
    shared = tuple(name + "." for name, _ in shared_linears(model))
    missing = [k for k in result.missing_keys
               if not k.startswith(shared) and ".recovery." not in k and not is_tied_key(model, k)]
    _check_keys(model, {"missing_keys": missing, "unexpected_keys": result.unexpected_keys}, path)
    if dtype not in (None, "auto"):
        model.to(dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model


def is_tied_key(model: nn.Module, key: str) -> bool:
    """`key` names the output embedding that shares the input embedding's weight (stored once)."""
    head = model.get_output_embeddings()
    return (
        head is not None
        and key.endswith("weight")
        and model.get_submodule(key.rpartition(".")[0]) is head
        and head.weight is model.get_input_embeddings().weight
    )


def _load_on_base(path: Path, config: SharpConfig, base, dtype) -> nn.Module:
    """Rebuild an adapter-only checkpoint on `base`, refusing any base other than the recorded one."""
    from sharp.io.models import load_model, resolve_model_path

    ident = config.base
    if base is None:
        base = _default_base(path, ident)
    if isinstance(base, str | os.PathLike):
        spec = str(base)
        if is_sharp_checkpoint(resolve_model_path(spec)):
            raise SharpError(f"base '{spec}' is a sharp checkpoint; pass the original model the adapter "
                             f"'{path}' was made from ({ident.source or ident.model_type})")
        model, _ = load_model(spec, dtype=_saved_dtype(path) if dtype == "auto" else dtype)
    elif isinstance(base, nn.Module):
        model = base
        if shared_linears(model):
            raise SharpError("the base model already shares layers; pass the original (unshared) model")
    else:
        raise TypeError(f"base must be a model spec or a model, not {type(base).__name__}")
    check_base_identity(model, ident, path)
    if config.dropped_mlps or config.dropped_blocks:
        raise SharpError(f"'{path}' drops layers of its base, so it cannot be an adapter; use the full checkpoint")
    _apply_layout(model, config, path)
    kept = _recovery_metadata(path).get(KEPT_SHA)
    if kept and tensors_sha256(split_state_dict(model)[0]) != kept:
        raise SharpError(f"adapter '{path}' was saved from a model whose kept base weights differ from this base "
                         "(e.g. trained with --train full-lora); use the full checkpoint instead")
    return model


def check_base_identity(model: nn.Module, ident: BaseIdentity, where: str | os.PathLike = "the adapter") -> None:
    """Refuse (one line) a base model whose architecture, config or weights differ from `ident`."""
    from sharp.sharing.build import config_sha256, weights_sha256

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


def _default_base(path: Path, ident: BaseIdentity) -> str:
    from sharp.io import assets

    source = ident.source
    if source and (Path(source).expanduser().exists() or assets.resolve_model_alias(source) is not None):
        return source
    raise SharpError(f"'{path}' is an adapter-only checkpoint; load it with its base model, e.g. "
                     f"sharp.load('{path}', base='{source or 'BASE_MODEL'}')")


def _saved_dtype(path: Path):
    """The dtype the adapter was saved in (its config.json), so the base hashes as it did then."""
    try:
        dtype = json.loads((path / "config.json").read_text()).get("dtype")
    except (OSError, json.JSONDecodeError, AttributeError):
        dtype = None
    return getattr(torch, dtype) if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None),
                                                                         torch.dtype) else "auto"


def _recovery_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(path / RECOVERY, "pt") as f:
            return f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise SharpError(f"cannot read {path / RECOVERY}: {_first_line(e)}; re-create the checkpoint") from None


def _load_recovery(model: nn.Module, path: Path) -> None:
    """The recovery tensors into `model`: exactly the expected names and shapes, all finite."""
    try:
        recovery = load_file(path / RECOVERY)
    except (OSError, SafetensorError) as e:
        raise SharpError(f"cannot read {path / RECOVERY}: {_first_line(e)}; re-create the checkpoint") from None
    params = {n: p for n, p in model.named_parameters() if ".recovery." in n}
    if set(recovery) != set(params):
        gone = sorted(set(params) - set(recovery)) or sorted(set(recovery) - set(params))
        raise SharpError(f"checkpoint '{path}': recovery tensors do not match the sharing map (e.g. {gone[0]})")
    for name, t in recovery.items():
        if t.shape != params[name].shape:
            raise SharpError(f"checkpoint '{path}': recovery tensor {name} has shape {tuple(t.shape)}, the "
                             f"recovery spec needs {tuple(params[name].shape)}; re-create the checkpoint")
        # a float64 sum of 16/32-bit values is non-finite exactly when an element is (it cannot overflow), at 1/6
        # of isfinite()'s cost
        if t.is_floating_point() and not torch.isfinite(t.sum(dtype=torch.float64)):
            raise SharpError(f"checkpoint '{path}': recovery tensor {name} holds NaN/inf; re-create it")
    for name, t in recovery.items():  # assign in place of load_state_dict, which would walk every module again
        module_name, _, attr = name.rpartition(".")
        old = params[name]  # cast to the model's dtype: a bf16 checkpoint loaded in fp32 gets fp32 recovery too
        setattr(model.get_submodule(module_name), attr, nn.Parameter(t.to(old.dtype), requires_grad=old.requires_grad))
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if on_meta:
        raise SharpError(f"checkpoint '{path}' lacks tensor {on_meta[0]}; re-create it")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_keys(model: nn.Module, info: dict, path: Path) -> None:
    """Every base key missing from the file must belong to a target's shared projection."""
    shared = tuple(name + "." for name, _ in shared_linears(model))
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(shared)]
    unexpected = list(info.get("unexpected_keys", []))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise SharpError(f"checkpoint '{path}' does not match its sharing map ({what}); re-create it")
