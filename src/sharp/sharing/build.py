"""`share()`: the one call that turns a pretrained model into a SHARP model (untrained recovery).

A strategy that also drops (a planner's `map:` with `drop-mlp` / `drop-block` items) is applied in this order:
whole blocks first (the model gets shallower and its layers are renumbered), then MLPs (width 0), then the
sharing. `SharpConfig` records everything in the new numbering, so `apply_layout` rebuilds the same structure
on a skeleton made from the checkpoint's own config.json."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from sharp._version import __version__
from sharp.arch import get_adapter, num_layers
from sharp.sharing import surgery
from sharp.sharing.config import BaseIdentity, SharpConfig
from sharp.sharing.recovery import RecoveryConfig, parse_recovery
from sharp.sharing.shared import apply_sharing
from sharp.sharing.state import ensure_state
from sharp.sharing.strategy import Strategy, parse_strategy


def share(
    model: nn.Module,
    strategy: str | Strategy,
    recovery: str | RecoveryConfig = "none",
    modules: str = "mlp",
    source: str = "",
) -> nn.Module:
    """Share layers of `model` in place per `strategy`, attach `recovery`, record a `SharpConfig` on it
    (`sharp_state(model).config`)."""
    adapter = get_adapter(model)
    strategy = parse_strategy(strategy) if isinstance(strategy, str) else strategy
    recovery = parse_recovery(recovery) if isinstance(recovery, str) else recovery
    sharing = strategy.resolve(num_layers(model.config))
    identity = base_identity(model, source)
    total, mlp = _parameter_counts(model) if strategy.drops else (0, 0)
    new = _renumbering(num_layers(model.config), strategy.block_drops)
    if strategy.block_drops:
        surgery.drop_layers(model, list(strategy.block_drops))
    config = SharpConfig(
        sharing={new[t]: new[r] for t, r in sharing.items()},
        recovery=recovery.text,
        modules=modules,
        strategy=strategy.text,
        base=identity,
        sharp_version=__version__,
        ranks={new[t]: k for t, k in strategy.ranks},
        dropped_mlps=[new[t] for t in strategy.mlp_drops],
        dropped_blocks=list(strategy.block_drops),
        base_parameters=total,
        base_mlp_parameters=mlp,
    )
    ensure_state(model).config = config
    apply_layout(model, config)
    assert adapter.model_type == identity.model_type
    return model


def apply_layout(model: nn.Module, config: SharpConfig) -> nn.Module:
    """Delete the recorded MLPs and share the recorded pairs (each target with its own rank where recorded), in
    place; `model` already has the checkpoint's number of layers."""
    if config.dropped_mlps:
        surgery.drop_mlps(model, config.dropped_mlps)
    recovery = parse_recovery(config.recovery)
    per_target = {t: recovery.with_rank(config.ranks[t]) if t in config.ranks else recovery for t in config.sharing}
    apply_sharing(model, config.sharing, per_target, config.modules)
    return model


def _renumbering(n: int, dropped: tuple[int, ...]) -> dict[int, int]:
    kept = [i for i in range(n) if i not in set(dropped)]
    return {old: new for new, old in enumerate(kept)}


def _parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(all parameters, MLP parameters) of an unshared model, each tensor once."""
    adapter = get_adapter(model)
    total = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for i in range(num_layers(model.config)) for p in adapter.mlp(model, i).parameters())
    return total, mlp


def config_sha256(config) -> str:
    d = config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures", "use_cache"):
        d.pop(volatile, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def weights_sha256(model: nn.Module) -> str:
    """Hash of the base weights: sorted names, dtypes, shapes and raw bytes (tied tensors once)."""
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, t in sorted(model.state_dict().items()):
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.device.type == "meta":
            continue
        seen.add(ptr)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def base_identity(model: nn.Module, source: str = "") -> BaseIdentity:
    return BaseIdentity(
        model_type=model.config.model_type,
        source=source,
        config_sha256=config_sha256(model.config),
        weights_sha256=weights_sha256(model),
    )
