"""Shared layers: a target projection that *is* its reference's module plus a small recovery.

`apply_sharing` swaps each target projection for a `SharedLinear` whose `base_layer` is the reference
layer's own module object (not a copy), so the weight exists once in memory, on disk and in the optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sharp.arch import MODULE_CHOICES, get_adapter
from sharp.errors import SharpError
from sharp.sharing.recovery import Recovery, RecoveryConfig
from sharp.sharing.state import sharp_config


class SharedLinear(nn.Module):
    """y = recovery(x, base_layer): the reference's projection, turned into the target's by `recovery`."""

    def __init__(self, base_layer: nn.Module, recovery: Recovery, reference: int) -> None:
        super().__init__()
        self.base_layer = base_layer  # the reference layer's module itself
        self.recovery = recovery
        self.reference = reference

    @property
    def in_features(self) -> int:
        return self.recovery.in_features

    @property
    def out_features(self) -> int:
        return self.recovery.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The reference weight (shared); use `merged()` for the target's dense weight."""
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.recovery(x, self.base_layer)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding the target's materialized weight W_t."""
        weight = dense_weight(self.base_layer)
        bias = getattr(self.base_layer, "bias", None)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(self.recovery.merged_weight(weight))
        if bias is not None:
            linear.bias.copy_(self.recovery.merged_bias(bias))
        return linear

    def extra_repr(self) -> str:
        return f"reference={self.reference}, recovery={type(self.recovery).__name__}"


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A projection's weight as a plain dense tensor (quantized weights dequantized)."""
    w = module.weight
    if getattr(w, "quant_state", None) is not None:  # bitsandbytes Params4bit (nf4)
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(w.data, w.quant_state).to(w.quant_state.dtype)
    # quantized tensors (optimum-quanto) carry a qtype; a plain tensor's own .dequantize() would cast to fp32
    return w.dequantize() if hasattr(w, "qtype") or w.is_quantized else w


def shared_linears(model: nn.Module) -> list[tuple[str, SharedLinear]]:
    return [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, SharedLinear)]


def recoveries(model: nn.Module) -> list[tuple[str, Recovery]]:
    """Every recovery module with its qualified name (found by type, not by name matching)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Recovery)]


def apply_sharing(
    model: nn.Module,
    sharing: dict[int, int],
    recovery: RecoveryConfig | Mapping[int, RecoveryConfig],
    modules: str = "mlp",
) -> nn.Module:
    """Make each target layer reuse its reference layer's projections (in place) and attach recovery (one spec
    for every target, or one per target)."""
    if modules not in MODULE_CHOICES:
        raise SharpError(f"unknown --modules '{modules}'; choose one of: {', '.join(MODULE_CHOICES)}")
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    if shared_linears(model):
        raise RuntimeError("apply_sharing called on a model that already shares layers")
    for target, ref in sorted(sharing.items()):
        for block_attr, proj in adapter.projections(modules):
            ref_proj = getattr(getattr(layers[ref], block_attr), proj)
            target_block = getattr(layers[target], block_attr)
            spec = recovery[target] if isinstance(recovery, Mapping) else recovery
            rec = spec.build(ref_proj.in_features, ref_proj.out_features)
            rec.to(device=ref_proj.weight.device, dtype=_param_dtype(ref_proj))
            setattr(target_block, proj, SharedLinear(ref_proj, rec, reference=ref))
    return model


def _param_dtype(module: nn.Module) -> torch.dtype:
    dtype = module.weight.dtype
    return dtype if dtype.is_floating_point else torch.float32


@torch.no_grad()
def merge_sharing(model: nn.Module) -> nn.Module:
    """Materialize every target weight (W_t) in place: the result is a plain model of the base architecture."""
    for name, shared in shared_linears(model):
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, shared.merged())
    return model


def relink_shared(model: nn.Module) -> None:
    """Point every `SharedLinear` at its reference's *current* module (after a pass that replaced modules,
    e.g. quantization)."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    for name, shared in shared_linears(model):
        parent_name, _, proj = name.rpartition(".")
        block_attr = parent_name.rsplit(".", 1)[-1]
        shared.base_layer = getattr(getattr(layers[shared.reference], block_attr), proj)


def unique_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters counted once each, whatever the number of names they have."""
    seen: set[int] = set()
    out = []
    for name, t in list(model.named_parameters(remove_duplicate=False)):
        key = id(t)
        if key not in seen:
            seen.add(key)
            out.append((name, t))
    return out


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts of a (possibly shared) model: stored = unique tensors' elements."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    stored = sum(_numel(t) for _, t in unique_parameters(model))
    recovery = sum(_numel(p) for _, r in recoveries(model) for p in r.parameters())
    mlp_kept = 0
    mlp_original = 0
    for layer in layers:
        for proj in adapter.mlp_projs:
            mod = getattr(getattr(layer, adapter.mlp_attr), proj)
            base = mod.base_layer if isinstance(mod, SharedLinear) else mod
            n = _numel(base.weight) + (_numel(base.bias) if getattr(base, "bias", None) is not None else 0)
            mlp_original += n
            mlp_kept += 0 if isinstance(mod, SharedLinear) else n
    removed = 0
    for _, shared in shared_linears(model):
        base = shared.base_layer
        removed += _numel(base.weight) + (_numel(base.bias) if getattr(base, "bias", None) is not None else 0)
    original = stored - recovery + removed
    config = sharp_config(model)
    if config is not None and config.base_parameters:  # a plan that dropped MLPs or blocks: counted before
        original, mlp_original = config.base_parameters, config.base_mlp_parameters
    return {
        "original": original,
        "stored": stored,
        "removed": original - stored + recovery,
        "recovery": recovery,
        "mlp_original": mlp_original,
        "mlp_stored": mlp_kept,
    }


def _numel(t: torch.Tensor) -> int:
    # quantized tensors (optimum-quanto) report their logical shape, which is what we count
    return int(torch.Size(t.shape).numel())
