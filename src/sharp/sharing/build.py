"""`share()`: the one call that turns a pretrained model into a SHARP model (untrained recovery)."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from sharp.arch import get_adapter, num_layers
from sharp.sharing.config import BaseIdentity, SharpConfig
from sharp.sharing.recovery import RecoveryConfig, parse_recovery
from sharp.sharing.shared import apply_sharing
from sharp.sharing.strategy import Strategy, parse_strategy


def share(
    model: nn.Module,
    strategy: str | Strategy,
    recovery: str | RecoveryConfig = "none",
    modules: str = "mlp",
    source: str = "",
) -> nn.Module:
    """Share layers of `model` in place per `strategy`, attach `recovery`, record a `SharpConfig` on it."""
    adapter = get_adapter(model)
    strategy = parse_strategy(strategy) if isinstance(strategy, str) else strategy
    recovery = parse_recovery(recovery) if isinstance(recovery, str) else recovery
    sharing = strategy.resolve(num_layers(model.config))
    identity = base_identity(model, source)
    apply_sharing(model, sharing, recovery, modules)
    from sharp import __version__

    model.sharp_config = SharpConfig(
        sharing=sharing,
        recovery=recovery.text,
        modules=modules,
        strategy=strategy.text,
        base=identity,
        sharp_version=__version__,
    )
    assert adapter.model_type == identity.model_type
    return model


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
