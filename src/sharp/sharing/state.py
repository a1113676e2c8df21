"""`SharpState`: what SHARP knows about a loaded model that no module can hold, in one attribute.

Sharing itself lives in modules (`SharedLinear`, `Recovery`); the facts below do not, so they ride on the model
as `model.sharp_state` (absent on a plain transformers model). `sharp_state(model)` reads it (None for a plain
model), `ensure_state(model)` creates it on first write. Each field is set by the one place that knows it:

    config        `share()` / `sharp.load`: sharing map, recovery spec, base identity (`sharp_config.json`)
    quantization  `sharp quantize` / loading a quantized folder: the `sharp.io.quantize.QuantConfig`
    stored_packs  integers of tensors stored in 8 or 4 bits, saved again as loaded (`sharp.io.stored_quant`)
    prune         a pruned baseline's `sharp_prune.json` (`sharp.io.pruned`)
    source        the spec the model was loaded from (`sharp.load_model`)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from sharp.sharing.config import SharpConfig

ATTRIBUTE = "sharp_state"


@dataclass
class SharpState:
    """SHARP's state on one model. Runtime only: each part is saved by its own file format, never as a whole."""

    config: SharpConfig | None = None  # None: not a shared model
    quantization: Any = None  # a `sharp.io.quantize.QuantConfig` (io sits above this layer), or None: 16-bit
    stored_packs: dict = field(default_factory=dict)  # {state-dict name: (integers, scales, dequantized value)}
    prune: dict | None = None  # the pruned baseline's report, as read from `sharp_prune.json`
    source: str | None = None  # what the user passed to `sharp.load_model` (path, alias, hub id)


def sharp_state(model: nn.Module) -> SharpState | None:
    """The model's `SharpState`, or None for a plain model."""
    return getattr(model, ATTRIBUTE, None)


def ensure_state(model: nn.Module) -> SharpState:
    """The model's `SharpState`, attached empty on first use."""
    state = sharp_state(model)
    if state is None:
        state = SharpState()
        setattr(model, ATTRIBUTE, state)
    return state


def sharp_config(model: nn.Module) -> SharpConfig | None:
    """The model's `SharpConfig`, or None when it shares nothing."""
    state = sharp_state(model)
    return state.config if state is not None else None
