"""Structural edits that make a model smaller for real: drop decoder layers, drop or narrow MLPs.

Every edit leaves ordinary `nn.Linear` modules of smaller shape, so parameter counts, saving and training need
nothing special. A removed MLP keeps its three projections with an intermediate size of 0: its output is
exactly zero (an empty matmul), which is "MLP deleted, attention kept" without a new module type.

MLP layouts (from the architecture adapter):
    gated  gate_proj, up_proj: (I, H) rows = channels;  down_proj: (H, I) columns = channels
    fused  gate_up_proj: (2I, H), rows j and I + j are channel j;  down_proj: (H, I)
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from sharp.arch import get_adapter
from sharp.errors import SharpError


def mlp_projections(model: nn.Module, index: int) -> tuple[list[nn.Linear], nn.Linear]:
    """(input-side projections whose rows are channels, the output projection whose columns are channels)."""
    adapter = get_adapter(model)
    mlp = adapter.mlp(model, index)
    *inputs, down = (getattr(mlp, p) for p in adapter.mlp_projs)
    for proj in (*inputs, down):
        if not isinstance(proj, nn.Linear):
            raise SharpError(f"layer {index}'s MLP holds a {type(proj).__name__}, not nn.Linear; baselines prune "
                             "plain (unshared, unquantized) models only")
    return list(inputs), down


def is_fused(model: nn.Module) -> bool:
    return len(get_adapter(model).mlp_projs) == 2


def mlp_width(model: nn.Module, index: int) -> int:
    """The intermediate size (number of channels) of layer `index`'s MLP (0 when removed)."""
    _, down = mlp_projections(model, index)
    return down.in_features


def mlp_widths(model: nn.Module) -> list[int]:
    return [mlp_width(model, i) for i in range(len(get_adapter(model).layers(model)))]


def params_per_channel(model: nn.Module) -> int:
    """Parameters one MLP channel holds (gate row + up row + down column, biases included)."""
    inputs, down = mlp_projections(model, 0)
    per = down.out_features + sum(p.in_features for p in inputs) * (2 if is_fused(model) else 1)
    per += sum(2 if is_fused(model) else 1 for p in inputs if p.bias is not None)
    return per


def block_parameters(model: nn.Module, index: int) -> int:
    """Parameters held by decoder layer `index` (its attention, MLP and norms)."""
    return sum(p.numel() for p in get_adapter(model).layers(model)[index].parameters())


def mlp_parameters(model: nn.Module, index: int) -> int:
    return sum(p.numel() for p in get_adapter(model).mlp(model, index).parameters())


def _sliced(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new nn.Linear keeping only `index` along the weight's `dim` (0: output rows, 1: input columns)."""
    w = linear.weight.detach()
    out_f, in_f = w.shape
    n = len(index)
    with warnings.catch_warnings():  # a removed MLP is a 0-channel Linear: "initializing zero-element tensors"
        warnings.simplefilter("ignore", UserWarning)
        new = nn.Linear(in_f if dim == 0 else n, n if dim == 0 else out_f, bias=linear.bias is not None,
                        device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w.index_select(dim, index))
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach() if dim == 1 else linear.bias.detach().index_select(0, index))
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


@torch.no_grad()
def keep_mlp_channels(model: nn.Module, index: int, keep: torch.Tensor | list[int]) -> None:
    """Narrow layer `index`'s MLP to the channels in `keep` (sorted; may be empty = MLP removed)."""
    adapter = get_adapter(model)
    mlp = adapter.mlp(model, index)
    width = mlp_width(model, index)
    keep = torch.as_tensor(sorted(int(k) for k in keep), dtype=torch.long)
    if len(keep) and (keep.min() < 0 or keep.max() >= width):
        raise RuntimeError(f"channel index out of range for layer {index} (width {width})")
    keep = keep.to(getattr(mlp, adapter.mlp_projs[-1]).weight.device)
    *inputs, down = adapter.mlp_projs
    for name in inputs:
        proj = getattr(mlp, name)
        rows = torch.cat([keep, keep + width]) if is_fused(model) else keep
        setattr(mlp, name, _sliced(proj, rows, 0))
    setattr(mlp, down, _sliced(getattr(mlp, down), keep, 1))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


def drop_mlps(model: nn.Module, indices: list[int]) -> None:
    """Remove the MLPs of layers `indices` (attention kept): their width becomes 0, their output exactly 0."""
    for i in indices:
        keep_mlp_channels(model, i, [])


def drop_layers(model: nn.Module, indices: list[int]) -> None:
    """Remove whole decoder layers; the rest are re-indexed so the result is a plain shallower model."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    n = len(layers)
    drop = set(indices)
    if not drop <= set(range(n)):
        raise SharpError(f"cannot drop layers {sorted(drop - set(range(n)))}: the model has layers 0-{n - 1}")
    if len(drop) >= n:
        raise SharpError(f"cannot drop all {n} layers; lower the budget")
    kept = [layer for i, layer in enumerate(layers) if i not in drop]
    parent_name, _, attr = adapter.layers_path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList(kept))
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n:
        config.layer_types = [t for i, t in enumerate(layer_types) if i not in drop]
    config.num_hidden_layers = len(kept)
