"""`describe()`: the facts `sharp info` prints about a model or checkpoint."""

from __future__ import annotations

import os

from torch import nn

from sharp.arch import get_adapter
from sharp.io.manifest import folder_bytes
from sharp.sharing.shared import count_parameters
from sharp.sharing.state import sharp_config


def describe(model: nn.Module, path: str | os.PathLike | None = None) -> dict:
    """Architecture, layer count, parameter counts (original / MLP / stored / recovery), sharing, bytes."""
    adapter = get_adapter(model)
    counts = count_parameters(model)
    config = sharp_config(model)
    sharing = dict(config.sharing) if config else {}
    n_layers = len(adapter.layers(model))
    info = {
        "architecture": adapter.model_type,
        "layers": n_layers,
        "params_original": counts["original"],
        "params_stored": counts["stored"],
        "params_removed": counts["removed"],
        "params_recovery": counts["recovery"],
        "mlp_params_original": counts["mlp_original"],
        "mlp_params_stored": counts["mlp_stored"],
        "mlp_reduction": 1 - counts["mlp_stored"] / counts["mlp_original"],
        "shared_mlps": sum(1 for _ in sharing) if (config and config.modules in ("mlp", "all")) else 0,
        "sharing": {str(t): r for t, r in sorted(sharing.items())},
        "strategy": config.strategy if config else None,
        "recovery": config.recovery if config else None,
        "modules": config.modules if config else None,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "bytes_on_disk": folder_bytes(path) if path and os.path.exists(path) else None,
    }
    return info
