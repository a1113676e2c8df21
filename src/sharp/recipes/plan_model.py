"""The shape facts `sharp plan` needs, read off an empty (meta) model built from the config alone.

Counts come from the same code that shares a real model (`apply_sharing` + `count_parameters` on a skeleton
whose tensors live on the meta device), so they are exact for every supported architecture, with no per-model
formula to keep in step. Compute is counted per token as 2 FLOPs per weight of every matmul the forward pass
runs (targets still run their reference's projections) plus causal attention, 2·T·q_dim per layer (QKᵀ and AV
over an average context of T/2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sharp.errors import SharpError
from sharp.sharing.state import sharp_config


@dataclass(frozen=True)
class ModelShape:
    """Everything the plan computes from: parameter counts and per-layer matmul sizes."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    q_dim: int  # heads × head_dim
    kv_dim: int  # kv heads × head_dim
    counts: dict[str, int]  # count_parameters of the shared skeleton (original, stored, removed, recovery, mlp_*)
    trainable: int  # parameters SFT trains (recovery, or recovery + full-model LoRA)
    targets: list[int]
    layer_matmul: list[int]  # weights of every matmul in layer i (the original model's)
    layer_params: list[int]  # every parameter of layer i (norms included)
    mlp_matmul: list[int]  # weights of the MLP projections of layer i
    recovery_per_layer: dict[int, int]  # recovery parameters of each target
    head_matmul: int  # LM head weights (vocab × hidden), tied or not
    embed_params: int

    def forward_flops(self, tokens: int, context: int, upto: int | None = None, head: bool = True,
                      shared: bool = False) -> float:
        """FLOPs of a forward pass over `tokens` tokens in sequences of `context`, through layers [0, upto)."""
        n = self.layers if upto is None else upto
        weights = sum(self.layer_matmul[:n]) + (self.head_matmul if head else 0)
        if shared:
            weights += sum(r for t, r in self.recovery_per_layer.items() if t < n)
        attention = n * 2 * context * self.q_dim
        return float(tokens) * (2 * weights + attention)

    def mlp_flops(self, tokens: int, layer: int) -> float:
        """Forward FLOPs of one target's shared MLP (reference projections + recovery) over `tokens` rows."""
        return 2.0 * tokens * (self.mlp_matmul[layer] + self.recovery_per_layer.get(layer, 0))


def read_config(spec: str):
    """The transformers config of a model folder, alias, hub id, .gguf file or a bare config.json file."""
    from transformers import AutoConfig

    from sharp.io.models import load_config

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json":
        try:
            return AutoConfig.for_model(**json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SharpError(f"cannot read config '{spec}': {str(e).splitlines()[0] if str(e) else e}") from None
    return load_config(spec)


def run_dtype(text: str, spec: str) -> torch.dtype:
    """The dtype a compress run of `spec` holds its weights in for `--dtype text`: `auto` keeps the source's
    (`io.models.source_dtype`; a bare config.json's declared one)."""
    from sharp.io.dtypes import resolve_dtype
    from sharp.io.models import resolve_model_path, source_dtype

    path = Path(spec).expanduser()
    return resolve_dtype(text, source_dtype(path if path.suffix == ".json" else resolve_model_path(spec)))


def model_shape(config, strategy: str, recovery: str, modules: str = "mlp", train: str = "recovery",
                full_lora_rank: int = 8) -> ModelShape:
    """Build the model on the meta device, share it as `strategy`/`recovery` would (`sharp.share`: per-target
    ranks, dropped MLPs and blocks included), and measure it. Per-layer lists and `targets` are in the original
    model's numbering (what SLW captures)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from sharp.arch import get_adapter
    from sharp.recovery.trainable import add_full_lora, mark_trainable
    from sharp.sharing.build import share
    from sharp.sharing.shared import count_parameters, recoveries

    adapter = get_adapter(config)
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # a tied LM head is the embedding, counted once (this fails inside the context)
    layers = adapter.layers(model)
    layer_matmul = [_matmul_weights(layer) for layer in layers]
    layer_params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    mlp_matmul = [_matmul_weights(getattr(layer, adapter.mlp_attr)) for layer in layers]
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    with init_empty_weights(include_buffers=False), no_init_weights():
        share(model, strategy, recovery, modules)
        shared = sharp_config(model)
        base = shared.base_layers(len(adapter.layers(model)))  # shared model's layer -> original layer
        counts = count_parameters(model)
        recovery_per_layer = {base[t]: 0 for t in shared.sharing}
        for name, module in recoveries(model):
            index = base[_layer_index(name, adapter.layers_path)]
            recovery_per_layer[index] = recovery_per_layer.get(index, 0) + sum(p.numel() for p in module.parameters())
        trainable = counts["recovery"]
        if train != "recovery":  # full-lora adds LoRA everywhere; "+shared" trains the reference weights too
            if train.startswith("full-lora"):
                add_full_lora(model, rank=full_lora_rank)
            trainable = _quiet(mark_trainable, model, train)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return ModelShape(
        model_type=adapter.model_type, layers=len(layers), hidden=int(config.hidden_size),
        intermediate=int(config.intermediate_size), vocab=int(config.vocab_size),
        q_dim=int(config.num_attention_heads * head_dim), kv_dim=int(kv_heads * head_dim), counts=counts,
        trainable=int(trainable), targets=sorted(base[t] for t in shared.sharing), layer_matmul=layer_matmul,
        layer_params=layer_params,
        mlp_matmul=mlp_matmul, recovery_per_layer=recovery_per_layer,
        head_matmul=int(head.weight.shape[0] * head.weight.shape[1]), embed_params=int(embed.weight.numel()),
    )


def _quiet(mark_trainable, model: nn.Module, stage: str) -> int:
    import logging

    logger = logging.getLogger("sharp.recovery.trainable")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        return mark_trainable(model, stage)["trainable"]
    finally:
        logger.setLevel(level)


def _matmul_weights(module: nn.Module) -> int:
    """Weights of every nn.Linear under `module` (each once: what one forward pass multiplies by)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _layer_index(name: str, layers_path: str) -> int:
    """`model.layers.7.mlp.up_proj.recovery` → 7."""
    rest = name.removeprefix(layers_path + ".")
    return int(rest.split(".", 1)[0])
