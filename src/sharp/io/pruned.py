"""Saving and loading pruned baselines.

A pruned model is written with `save_pretrained` (config.json + model.safetensors + tokenizer) plus
`sharp_prune.json` (the `PruneReport`: method, budget, what was removed, per-layer MLP widths).

- Uniform MLP widths (layer-drop, layer-drop-adapted, width with `--allocation even`): config.json says
  everything (`num_hidden_layers`, `intermediate_size`), so the folder is a plain smaller model that vanilla
  `AutoModelForCausalLM.from_pretrained` loads.
- Non-uniform widths (mlp-drop: removed MLPs have width 0; width with `--allocation global`): a Llama-style
  config has one `intermediate_size` for all layers, so config.json carries the largest width and
  `sharp_prune.json` the per-layer list. `load_pruned` (called by `sharp.load_model`, hence `sharp eval`) builds
  the model from the config, narrows each MLP to its width and loads the weights with every key checked.
  A removed MLP is stored as three empty (0-row / 0-column) tensors; its output is exactly zero.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from sharp.errors import SharpError
from sharp.io.atomic import atomic_dir
from sharp.io.formats import PRUNE_CONFIG
from sharp.sharing import surgery
from sharp.sharing.state import ensure_state

FORMAT_VERSION = 1


def save_pruned(model: nn.Module, out: str | os.PathLike, report, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a pruned model atomically (see the module docstring for the layout)."""
    widths = surgery.mlp_widths(model)
    model.config.intermediate_size = max(widths)
    info = dict(report.to_dict(), format_version=FORMAT_VERSION, uniform=len(set(widths)) == 1)
    info["intermediate_sizes"] = widths
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / PRUNE_CONFIG).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return Path(out)


def read_prune_config(path: str | os.PathLike) -> dict:
    try:
        info = json.loads((Path(path) / PRUNE_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SharpError(f"cannot read {Path(path) / PRUNE_CONFIG} ({e}); re-create the pruned model") from None
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise SharpError(f"{PRUNE_CONFIG} has format {info['format_version']}; upgrade sharp-llm")
    return info


def load_pruned(path: str | os.PathLike, dtype: torch.dtype | str | None = "auto") -> nn.Module:
    """Load a pruned model; non-uniform MLP widths are restored from `sharp_prune.json`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    info = read_prune_config(path)
    if info.get("uniform", False):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        config = AutoConfig.from_pretrained(path)
        torch_dtype = getattr(config, "dtype", None) if dtype == "auto" else dtype
        if isinstance(torch_dtype, str):
            torch_dtype = getattr(torch, torch_dtype)
        with warnings.catch_warnings():  # removed MLPs are empty tensors: "initializing zero-element tensors"
            warnings.simplefilter("ignore", UserWarning)
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype or torch.float32)
        widths = info["intermediate_sizes"]
        if len(widths) != config.num_hidden_layers:
            raise SharpError(f"{PRUNE_CONFIG} lists {len(widths)} MLP widths for {config.num_hidden_layers} layers")
        for i, w in enumerate(widths):
            if not 0 <= w <= surgery.mlp_width(model, i):
                raise SharpError(f"{PRUNE_CONFIG}: layer {i}'s MLP width {w} exceeds config.json's intermediate_size")
            surgery.keep_mlp_channels(model, i, range(w))
        _load_weights(model, path)
    ensure_state(model).prune = info
    model.eval()
    return model


def _load_weights(model: nn.Module, path: Path) -> None:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SharpError(f"'{path}' holds no .safetensors weights; re-create the pruned model")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: the widths in sharp_prune.json are not the stored ones
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise SharpError(f"pruned model '{path}' does not match its {PRUNE_CONFIG} ({detail[:160]})") from None
    tied = {k for k in result.missing_keys if _is_tied(model, k)}
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        what = f"missing {missing[0]}" if missing else f"unexpected {result.unexpected_keys[0]}"
        raise SharpError(f"pruned model '{path}' does not match its {PRUNE_CONFIG} ({what}); re-create it")
    if tied:
        model.tie_weights()


def _is_tied(model: nn.Module, key: str) -> bool:
    """True when `key` is an output embedding tied to the input embedding (saved once, under the input's name)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    return tied and key.startswith(_name_of(model, out))


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)
