"""4-bit weight quantization of (shared) models, stored in sharp checkpoints.

Each *unique* weight is quantized once: a target's `SharedLinear.base_layer` is re-pointed at the reference's
quantized module (`relink_shared`), so sharing survives quantization in memory and on disk. Recovery parameters
(LoRA, scales) are not `nn.Linear`s and stay in 16-bit; so do embeddings, norms and the (usually tied) LM head,
unless `recovery_bits` / `embedding_bits` store the recovery matrices / the embedding in 8 or 4 bits on disk
(`sharp.io.stored_quant`; dequantized at load).

Methods (one small class each, `METHODS` maps the CLI name to it):
    quanto   optimum-quanto qint4, asymmetric, groups of up to 128 along the input; bf16 models whose input
             size is a multiple of 128 get torch's packed CPU int4 matmul (`_weight_int4pack_mm_for_cpu`),
             the others dequantize on the fly.
    nf4      bitsandbytes NF4 (QLoRA's 4-bit NormalFloat), blocks of 64 with double-quantized absmax; runs on
             the CPU through bitsandbytes' CPU backend, dequantize + matmul on every CPU (`BnbNF4` says why
             its AVX512-BF16 kernel is turned off).

A quantized checkpoint is an ordinary sharp checkpoint (or plain model folder) plus `quantization.json` (method,
bits, dtype and the list of quantized modules). `sharp.load_model` reads it back as a quantized model with the
same sharing (`sharp.io.assign`); `sharp.recipes.quantize.quantize_checkpoint` is `sharp quantize`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from sharp.errors import SharpError
from sharp.io.formats import QUANT_CONFIG
from sharp.io.stored_quant import check_bits, pack, round_stored, stored_bits
from sharp.sharing.shared import merge_sharing, relink_shared, shared_linears
from sharp.sharing.state import ensure_state, sharp_state

BITS = (4,)


class QuantoInt4:
    """optimum-quanto qint4 (`QLinear`); its modules load through `load_state_dict(assign=True)`."""

    def quantize(self, linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
        from optimum.quanto import qtypes
        from optimum.quanto.nn import quantize_module

        return quantize_module(linear, weights=qtypes["qint4"])

    def shell(self, linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
        return self.quantize(linear, dtype)  # on a meta linear quanto builds an empty QLinear

    def assign(self, module: nn.Module, name: str, state: dict[str, torch.Tensor]) -> list[str]:
        return []  # the generic load_state_dict fills QLinear's weight._data / weight._scale / ...

    def freeze(self, model: nn.Module) -> None:
        from optimum.quanto import freeze

        freeze(model)

    def is_quantized(self, module: nn.Module) -> bool:
        from optimum.quanto.nn import QModuleMixin

        return isinstance(module, QModuleMixin)


class BnbNF4:
    """bitsandbytes NF4 (`Linear4bit`). Its packed weight and quantization state are not ordinary
    parameters, so loading rebuilds each weight with `Params4bit.from_prequantized`.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) rewrites a `Linear4bit`'s weight in place into the layout of
    its fused CPU kernel at the first no-grad eval forward. That rewrite needs out_features % 32 == 0 and
    in_features a multiple of the block size (stories260K's 172-wide MLP fails them), turns the double-quantized
    block scales into bf16, and saving afterwards re-quantizes them, so the same model saved before and after a
    forward wrote different bytes. Our modules keep bitsandbytes' portable path on every CPU: any layer shape
    runs, saves are exact, and no CPU takes a code path that the others do not."""

    def quantize(self, linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
        from bitsandbytes.nn import Params4bit

        module = self._empty(linear, dtype)
        module.weight = Params4bit(linear.weight.data.to(dtype), requires_grad=False, quant_type="nf4",
                                   module=module)
        return module.to(linear.weight.device)  # Params4bit quantizes when moved to a real device

    def shell(self, linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
        return self._empty(linear, dtype)

    def _empty(self, linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
        from bitsandbytes.nn import Linear4bit

        module = Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            compute_dtype=dtype, quant_type="nf4", device="meta")
        if linear.bias is not None:
            module.bias = linear.bias
        module.support_avx512bf16_for_cpu = False  # the in-place repacking the class docstring describes
        return module

    def assign(self, module: nn.Module, name: str, state: dict[str, torch.Tensor]) -> list[str]:
        """Take `name`'s packed weight and its quantization state out of `state`; return the keys filled."""
        from bitsandbytes.nn import Params4bit

        prefix = f"{name}.weight."
        # looked up by key: scanning all of `state` once per module made loading quadratic
        stats = {k: state.pop(prefix + k) for k in _NF4_STATE_KEYS if prefix + k in state}
        if f"{name}.weight" not in state or not stats:
            raise SharpError(f"the NF4 weight of {name} is missing from the checkpoint; re-create it")
        module.weight = Params4bit.from_prequantized(state.pop(f"{name}.weight"), stats, device="cpu", module=module)
        return [f"{name}.weight"]

    def freeze(self, model: nn.Module) -> None:
        pass

    def is_quantized(self, module: nn.Module) -> bool:
        from bitsandbytes.nn import Linear4bit

        return isinstance(module, Linear4bit)


METHODS = {"quanto": QuantoInt4, "nf4": BnbNF4}
# what `QuantState.as_dict(packed=True)` writes beside an NF4 weight (the nested_* pair with double quantization)
_NF4_STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


@dataclass
class QuantConfig:
    """How a checkpoint's weights were quantized (`quantization.json`)."""

    method: str = "quanto"
    bits: int = 4
    dtype: str = "bfloat16"  # the dtype of everything that is not quantized (and of quantization scales)
    modules: list[str] = field(default_factory=list)  # quantized modules, under their first (reference) name
    recovery_bits: int = 16  # LoRA matrices stored in 8 or 4 bits (`sharp.io.stored_quant`), or 16: as they are
    embedding_bits: int = 16  # the input embedding (and a tied LM head) stored in 8 or 4 bits, or 16

    def __post_init__(self) -> None:
        check_bits(self.recovery_bits, "--recovery-bits")
        check_bits(self.embedding_bits, "--embedding-bits")
        if self.method not in METHODS:
            raise SharpError(f"unknown quantization method '{self.method}'; choose one of: {', '.join(METHODS)}")
        if self.bits not in BITS:
            raise SharpError(f"--bits {self.bits} is not supported; choose one of: {', '.join(map(str, BITS))}")
        if self.method == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
            raise SharpError("--method nf4 needs bitsandbytes: pip install -c constraints.txt 'sharp-llm[nf4]'")

    @property
    def backend(self) -> QuantoInt4 | BnbNF4:
        return METHODS[self.method]()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        try:
            d = json.loads(text)
            return cls(**d)
        except (json.JSONDecodeError, TypeError) as e:
            raise SharpError(f"{QUANT_CONFIG} is malformed ({e}); re-run `sharp quantize`") from None


def quant_config(model: nn.Module) -> QuantConfig | None:
    """How `model` was quantized by `sharp quantize`, or None for a 16-bit model."""
    state = sharp_state(model)
    return state.quantization if state is not None else None


def is_quantized(model: nn.Module) -> bool:
    return quant_config(model) is not None


def quantizable_modules(model: nn.Module) -> list[str]:
    """Names of the unique linear layers to quantize: every nn.Linear except the LM head and except the
    second names of shared ones (a `SharedLinear.base_layer` is the reference's module, reached first)."""
    shared = tuple(name + "." for name, _ in shared_linears(model))
    head = model.get_output_embeddings()
    names = []
    for name, module in model.named_modules():  # unique modules, each under its first name
        if isinstance(module, nn.Linear) and module is not head and not (name + ".").startswith(shared):
            names.append(name)
    return names


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int = 4, method: str = "quanto", recovery_bits: int = 16,
                   embedding_bits: int = 16) -> nn.Module:
    """Quantize every unique linear weight of `model` in place; shared weights stay shared. With
    `recovery_bits` / `embedding_bits` < 16 the recovery matrices / the embedding are rounded to what the
    checkpoint will store (`sharp.io.stored_quant`)."""
    if is_quantized(model):
        raise SharpError("this model is already quantized; quantize the 16-bit checkpoint instead")
    dtype = _float_dtype(model)
    names = quantizable_modules(model)
    config = QuantConfig(method=method, bits=bits, dtype=str(dtype).removeprefix("torch."), modules=names,
                         recovery_bits=recovery_bits, embedding_bits=embedding_bits)
    replace_modules(model, names, config.backend.quantize, dtype)
    config.backend.freeze(model)
    round_stored(model, stored_bits(model, recovery_bits, embedding_bits))
    ensure_state(model).quantization = config
    return model


def replace_modules(model: nn.Module, names: list[str], make, dtype: torch.dtype) -> None:
    """Swap each named nn.Linear for `make(linear, dtype)` (a quantized module, or an empty one to load into)."""
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        linear = model.get_submodule(name)
        qmodule = make(linear, dtype)
        assert qmodule is not None, name
        qmodule.train(linear.training)  # a new module starts in training mode; an eval model stays in eval
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, qmodule)
    relink_shared(model)  # SharedLinear.base_layer -> the reference's new quantized module


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def quantized_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    config = quant_config(model)
    if config is None:
        return []
    backend = config.backend
    return [(n, m) for n, m in model.named_modules() if backend.is_quantized(m)]


@torch.no_grad()
def merge_quantized(model: nn.Module) -> nn.Module:
    """`merged` runtime for a quantized model: materialize each target weight (dequantized reference + recovery)
    and quantize it again, so every layer runs the same int4 kernel and owns its weight."""
    config = quant_config(model)
    targets = [name for name, _ in shared_linears(model)]
    merge_sharing(model)
    replace_modules(model, targets, config.backend.quantize, getattr(torch, config.dtype))
    config.backend.freeze(model)
    return model


def stored_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Called by `sharp.io.checkpoint.save` for quantized models: `tensors` as stored."""
    state = sharp_state(model)
    config = state.quantization
    bits = stored_bits(model, config.recovery_bits, config.embedding_bits)
    return pack(tensors, bits, state.stored_packs)


def write_quant_config(model: nn.Module, folder: str | os.PathLike) -> None:
    """Called by `sharp.io.checkpoint.save` for quantized models."""
    (Path(folder) / QUANT_CONFIG).write_text(quant_config(model).to_json())
