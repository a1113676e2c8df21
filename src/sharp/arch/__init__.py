"""Per-architecture adapters: where the decoder layers are and what their MLP / attention projections are called.

One table keyed by `config.model_type`. Adding an architecture is one entry here plus a tiny-config test.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sharp.errors import SharpError


@dataclass(frozen=True)
class ArchAdapter:
    """Names inside one architecture's decoder layer."""

    model_type: str
    layers_path: str  # dotted path from the CausalLM to the nn.ModuleList of decoder layers
    mlp_attr: str  # attribute of a decoder layer holding the MLP
    mlp_projs: tuple[str, ...]  # nn.Linear attributes of the MLP
    attn_attr: str
    attn_projs: tuple[str, ...]
    mlp_post_norm_attr: str | None = None  # a norm applied to the MLP's output before the residual add (Gemma3)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def mlp(self, model: nn.Module, index: int) -> nn.Module:
        return getattr(self.layers(model)[index], self.mlp_attr)

    def mlp_post_norm(self, layer: nn.Module) -> nn.Module | None:
        """The decoder layer's norm on the MLP output, if the architecture has one: what the layer adds to the
        residual is then norm(mlp(x)), and that is what fitting and ranking must look at."""
        return getattr(layer, self.mlp_post_norm_attr) if self.mlp_post_norm_attr else None

    def projections(self, modules: str) -> list[tuple[str, str]]:
        """(block attribute, projection name) pairs shared under `--modules mlp|attn|all`."""
        mlp = [(self.mlp_attr, p) for p in self.mlp_projs]
        attn = [(self.attn_attr, p) for p in self.attn_projs]
        return {"mlp": mlp, "attn": attn, "all": attn + mlp}[modules]


_GATED = ("gate_proj", "up_proj", "down_proj")
_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")

ADAPTERS: dict[str, ArchAdapter] = {
    "llama": ArchAdapter("llama", "model.layers", "mlp", _GATED, "self_attn", _QKVO),
    "mistral": ArchAdapter("mistral", "model.layers", "mlp", _GATED, "self_attn", _QKVO),
    "qwen2": ArchAdapter("qwen2", "model.layers", "mlp", _GATED, "self_attn", _QKVO),
    "gemma3_text": ArchAdapter("gemma3_text", "model.layers", "mlp", _GATED, "self_attn", _QKVO,
                               mlp_post_norm_attr="post_feedforward_layernorm"),
    # Phi-3 fuses gate and up into one matrix, and q/k/v into another.
    "phi3": ArchAdapter("phi3", "model.layers", "mlp", ("gate_up_proj", "down_proj"), "self_attn",
                        ("qkv_proj", "o_proj")),
}

MODULE_CHOICES = ("mlp", "attn", "all")


def get_adapter(model_or_config) -> ArchAdapter:
    """The adapter for a model (or its config); unsupported architectures get one clear line."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise SharpError(
            f"architecture '{model_type}' is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def num_layers(config) -> int:
    return int(config.num_hidden_layers)


def layer_hidden(output):
    """The hidden state a decoder layer returns: Llama layers in transformers 5 return the tensor itself, other
    layers (and older versions) a tuple whose first item it is."""
    return output[0] if isinstance(output, tuple | list) else output
