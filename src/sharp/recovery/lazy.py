"""Weights from disk: a model folder's tensors read on demand, so SLW holds no copy of the original model.

`SafetensorsWeights` reads named tensors from a folder (`capture.py` reads the model one decoder layer at a time
with it); `DiskModule` / `original_mlps` give each SLW job its target's original MLP (the closed-form init fits towards
it) as a meta skeleton plus where its tensors are: the job reads them when it starts, not before. And
`frozen_sharing_copy` gives an SLW job a copy of a target's shared MLP that reuses the frozen reference weights'
storage (float32 already) instead of duplicating it for each job.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from sharp.arch import get_adapter
from sharp.errors import SharpError
from sharp.io.formats import is_pruned, is_quantized_folder, is_sharp_checkpoint
from sharp.sharing.shared import recoveries

INDEX = "model.safetensors.index.json"


class SafetensorsWeights:
    """Tensors of a model folder by name, read on demand (only the requested ones leave the file)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for f in sorted(self.folder.glob("*.safetensors")):
                with safe_open(f, framework="pt") as handle:
                    self.files.update(dict.fromkeys(handle.keys(), f))
        if not self.files:
            raise SharpError(f"'{folder}' has no safetensors weights to read layer by layer")

    @staticmethod
    def available(folder: str | Path) -> bool:
        """A plain model folder with safetensors weights (not a sharp checkpoint, a quantized or pruned one)."""
        p = Path(folder)
        return p.is_dir() and any(p.glob("*.safetensors")) and not any(
            marked(p) for marked in (is_sharp_checkpoint, is_quantized_folder, is_pruned))

    def load_into(self, module: nn.Module, prefix: str, dtype: torch.dtype, device: str | torch.device,
                  storage: torch.dtype | None = None) -> None:
        """Give every parameter and persistent buffer of `module` its tensor `prefix + name` from disk, floats in
        `dtype`; rounded to `storage` first when given (what a model loaded in that dtype would hold)."""
        names = list(module.state_dict().keys())
        missing = [prefix + n for n in names if prefix + n not in self.files]
        if missing:
            raise SharpError(f"'{self.folder}' has no tensor {missing[0]}; load the model instead of reading it lazily")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[prefix + n], []).append(n)
        state = {}
        for f, group in by_file.items():
            with safe_open(f, framework="pt") as handle:
                for n in group:
                    t = handle.get_tensor(prefix + n)
                    if t.is_floating_point():
                        t = (t if storage is None else t.to(storage)).to(dtype)
                    state[n] = t.to(device)
        module.load_state_dict(state, strict=True, assign=True)


def meta_model(model_path: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> nn.Module:
    """The model of a folder's config.json with every weight on the meta device (nothing allocated or read);
    non-persistent buffers (rotary tables) are real, on `device`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(model_path)
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    for module in model.modules():  # rotary tables etc. were computed for real; weights stay on meta
        for name, buf in module._buffers.items():
            if buf is not None and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)
    return model


@dataclass
class DiskModule:
    """A module whose weights stay on disk until `load()`: a meta skeleton and the name prefix of its tensors
    in a model folder. Small to pickle (to a spawned worker or a Ray task), so it is read where it is used."""

    skeleton: nn.Module
    folder: str
    prefix: str
    storage: torch.dtype | None = None  # weights are rounded to it when read (see `SafetensorsWeights.load_into`)

    def load(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
        module = copy.deepcopy(self.skeleton)
        SafetensorsWeights(self.folder).load_into(module, self.prefix, dtype, device, self.storage)
        return module


def original_mlps(model_path: str | Path, layers: Mapping[int, int],
                  storage: torch.dtype | None = None) -> dict[int, DiskModule]:
    """{key: the MLP of decoder layer `layers[key]` of the model folder}, each read only when loaded (its weights
    rounded to `storage` when given)."""
    model = meta_model(model_path)
    adapter = get_adapter(model)
    return {k: DiskModule(adapter.mlp(model, i), str(model_path), f"{adapter.layers_path}.{i}.{adapter.mlp_attr}.",
                          storage) for k, i in layers.items()}


def frozen_sharing_copy(mlp: nn.Module) -> nn.Module:
    """A float32 CPU copy of `mlp` (a shared MLP, an original MLP or a norm) for one SLW job (jobs cross to worker
    processes; `train_layer` moves it to the job's device): its recovery is copied, its frozen weights are new
    Parameters over the original storage when that is float32 on the CPU already (a view, no memory), else
    float32 CPU copies."""
    trainable = {id(p) for _, r in recoveries(mlp) for p in r.parameters()}
    memo = {id(p): nn.Parameter(p.detach().to("cpu", torch.float32), requires_grad=False)
            for p in mlp.parameters() if id(p) not in trainable}
    return copy.deepcopy(mlp, memo).to("cpu", torch.float32)
