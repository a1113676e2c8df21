"""Loading a folder sharp wrote: build the model on empty weights, then assign the stored tensors.

Every folder with sharp's own layout loads the same way, whatever it holds: a 16-bit or quantized sharp
checkpoint, or a plain quantized model (`sharp quantize` of an unshared model).

1. The model is built from config.json on meta weights (rotary tables and other buffers are real) and `build`
   reshapes it as recorded (sharing, deleted MLPs); quantized folders swap each recorded linear for an empty
   quantized module. Nothing is allocated or randomly initialized only to be thrown away (the targets' absent
   weights), so loading costs about what reading the unique bytes costs.
2. `model.safetensors` is assigned (`load_state_dict(assign=True)`), tensors stored in 8 or 4 bits dequantized
   first; every key is accounted for: a target's shared projection is its reference's, a tied LM head is the
   embedding, anything else missing or unexpected is refused in one line.
3. `recovery.safetensors` (sharp checkpoints) is assigned with its names, shapes and finiteness checked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from sharp.errors import SharpError
from sharp.io.formats import RECOVERY, WEIGHTS, first_line
from sharp.io.quantize import QuantConfig, replace_modules
from sharp.io.stored_quant import unpack
from sharp.sharing.shared import shared_linears
from sharp.sharing.state import ensure_state


def load_on_empty(
    path: Path,
    hf_config,
    build: Callable[[nn.Module], object] | None = None,
    quant: QuantConfig | None = None,
    recovery: bool = False,
) -> nn.Module:
    """The model stored in `path` (see the module docstring), in eval mode. `build(model)` reshapes the empty
    model as recorded; `quant` is the folder's quantization (None: 16-bit, in the stored dtype); `recovery`
    says a `recovery.safetensors` belongs to it."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:
        state = load_file(path / WEIGHTS)
    except (OSError, SafetensorError) as e:
        raise SharpError(f"cannot load checkpoint '{path}': {WEIGHTS}: {first_line(e)}") from None
    stored = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    dtype = getattr(torch, quant.dtype) if quant is not None else stored
    # rotary tables etc. are computed, weights stay meta and uninitialized (random init of meta tensors still
    # runs torch's Python decompositions: ~0.1 s of a 0.15 s SmolLM2 load before this was skipped)
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        if build is not None:
            build(model)
    packs = unpack(state, dtype)  # tensors stored in 8 or 4 bits, if any
    assigned: set[str] = set()
    if quant is not None:
        with no_init_weights():  # the empty quantized modules: their values are assigned below
            replace_modules(model, quant.modules, quant.backend.shell, dtype)
        assigned = {key for name in quant.modules
                    for key in quant.backend.assign(model.get_submodule(name), name, state)}
    # a deleted MLP's projections have no elements: the file cannot hold them, so they are made here, not read
    state.update({k: torch.empty(p.shape, dtype=p.dtype) for k, p in model.state_dict().items()
                  if p.numel() == 0 and k not in state})
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shapes that contradict config.json
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), first_line(e))
        raise SharpError(f"cannot load checkpoint '{path}': {detail}") from None
    model.tie_weights()
    shared = tuple(name + "." for name, _ in shared_linears(model))
    missing = [k for k in result.missing_keys  # a target's base_layer.* is its reference's; recovery comes next
               if k not in assigned and not k.startswith(shared) and ".recovery." not in k
               and not is_tied_key(model, k)]
    if missing or result.unexpected_keys:
        what = f"missing {missing[0]}" if missing else f"unexpected {result.unexpected_keys[0]}"
        raise SharpError(f"checkpoint '{path}' does not match its configs ({what}); re-create it")
    if recovery:
        packs.update(load_recovery(model, path))
    check_assigned(model, path)
    if quant is not None or packs:
        sharp = ensure_state(model)
        sharp.quantization, sharp.stored_packs = quant, packs  # packs: saved again as loaded
    return model.eval()


def is_tied_key(model: nn.Module, key: str) -> bool:
    """`key` names the output embedding that shares the input embedding's weight (stored once)."""
    head = model.get_output_embeddings()
    return (
        head is not None
        and key.endswith("weight")
        and model.get_submodule(key.rpartition(".")[0]) is head
        and head.weight is model.get_input_embeddings().weight
    )


def load_recovery(model: nn.Module, path: Path) -> dict:
    """The recovery tensors of `path` into `model`: exactly the expected names and shapes, all finite. Returns
    the packs of those stored in 8 or 4 bits (`sharp.io.stored_quant`)."""
    if not (path / RECOVERY).is_file():
        raise SharpError(f"checkpoint '{path}' does not match its sharing map ({RECOVERY} is missing); re-create it")
    try:
        recovery = load_file(path / RECOVERY)
    except (OSError, SafetensorError) as e:
        raise SharpError(f"cannot read {path / RECOVERY}: {first_line(e)}; re-create the checkpoint") from None
    params = {n: p for n, p in model.named_parameters() if ".recovery." in n}
    packs = unpack(recovery, next((p.dtype for p in params.values()), torch.float32))
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
    return packs


def check_assigned(model: nn.Module, path: Path) -> None:
    """Refuse a model that still has a tensor on the meta device (the folder lacked it)."""
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if on_meta:
        raise SharpError(f"checkpoint '{path}' lacks tensor {on_meta[0]}; re-create it")
