"""ExecuTorch export: a (SHARP) model as an XNNPACK-delegated program with a static KV cache.

`export_executorch` writes three files into a folder:

    model.pte           the program: the graph, the XNNPACK delegate blobs, the KV cache layout
    weights.ptd         every constant tensor, stored once by content (ExecuTorch's program-data separation)
    sharp_export.json   what was exported (source, dtype, quantization, cache length, special token ids)
    + the tokenizer files, so a runner can turn text into ids

Why a separate .ptd: ExecuTorch keeps the constants of ops that run outside a delegate (here the embedding
gather) in the program, and the XNNPACK delegate keeps its own copy of each weight it uses, keyed by the sha256
of its bytes. A tied embedding / LM head is both, so a single-file .pte stores it twice (+108 MiB for
SmolLM2 in fp32). Tagging every constant for one external file puts both kinds into one named-data store, which
keeps one copy of each distinct byte string: the tied matrix is stored once, and so is every shared reference
weight (a target's `SharedLinear.base_layer` is the reference's module, one Parameter in the exported graph).

Recovery at decode time (`executorch_lora.lora_modules`): a LoRA target projection becomes
`base(x) + B(A(x))` with A and B as `nn.Linear`s holding the recovery's own Parameters, so XNNPACK runs them as
fully-connected ops with static weights (a plain `x @ A.T @ B.T` left transposes and matmuls outside the
delegate). In a target MLP whose gate and up projections read the same input, their A matrices are concatenated
into one (2r × in) matmul.

Quantization (`--quant 8da4w`): torchao's 8-bit dynamic activation, 4-bit grouped weight scheme, the one
ExecuTorch's XNNPACK delegate runs on CPU; recovery matrices get their own bit width (`recovery_bits`, 8 or 4).
The tied embedding / LM head is quantized once to 8-bit per row: the LM head runs as an XNNPACK 8da8w
fully-connected op and the embedding gather (`quantized_decomposed.embedding_byte`) reads the same int8 tensor
and scales, so it is still stored once.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from sharp.errors import SharpError
from sharp.io.executorch_lora import lora_modules
from sharp.io.executorch_quant import quantize_for_executorch
from sharp.io.formats import is_quantized_folder
from sharp.io.models import load_model, resolve_model_path
from sharp.sharing.state import sharp_config

PTE, PTD_TAG, META = "model.pte", "weights", "sharp_export.json"
PTD = PTD_TAG + ".ptd"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANTS = ("none", "8da4w")
RECOVERY_BITS = (4, 8, 16)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")


def require_executorch() -> None:
    import importlib.util

    if importlib.util.find_spec("executorch") is None:
        raise SharpError("ExecuTorch is not installed: pip install -c constraints.txt -e '.[executorch]'")


@dataclass
class ExportConfig:
    """How a model is exported (`sharp_export.json` records it next to the program)."""

    dtype: str = "fp32"  # fp32 | fp16 | bf16: the dtype of everything not quantized
    quant: str = "none"  # none | 8da4w
    group_size: int = 32  # 8da4w weight group along the input
    recovery_bits: int = 8  # LoRA A/B under --quant 8da4w: 8 (8da8w per row), 4 (8da4w) or 16 (not quantized)
    max_cache_len: int = 256  # KV cache positions: prompt + generated tokens
    fuse: bool = True  # one A matmul for a target MLP's gate and up recovery

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise SharpError(f"unknown --dtype '{self.dtype}'; choose one of: {', '.join(DTYPES)}")
        if self.quant not in QUANTS:
            raise SharpError(f"unknown --quant '{self.quant}'; choose one of: {', '.join(QUANTS)}")
        if self.recovery_bits not in RECOVERY_BITS:
            raise SharpError(f"--recovery-bits {self.recovery_bits}: choose one of "
                             f"{', '.join(map(str, RECOVERY_BITS))}")
        if self.group_size < 32 or self.group_size % 32:
            raise SharpError(f"--group-size {self.group_size}: XNNPACK needs a multiple of 32")
        if self.max_cache_len < 2:
            raise SharpError(f"--max-cache-len {self.max_cache_len} must be at least 2")


ATTENTION = "sharp_executorch"  # transformers attention implementation registered by `_register_attention`
SUPPORTED = ("llama", "mistral", "qwen2")  # one attention layout; others are untested


def _register_attention() -> None:
    """ExecuTorch's fused attention kernel as a transformers attention implementation. It reads the whole cache
    (batch, positions, kv_heads, head_dim), handles grouped KV heads itself and applies the causal mask from
    `start_pos`, so no mask, head repeat or cache slicing ops are exported (each such op outside XNNPACK splits
    the delegated graph, which costs both lowering time and a delegate call per piece at run time)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (defines torch.ops.llama.*)
    from transformers import AttentionInterface

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sharp_start_pos=None,
                  **kwargs):
        # query (batch, heads, seq, head_dim) -> ExecuTorch's (batch, seq, heads, head_dim)
        out = torch.ops.llama.custom_sdpa(query.transpose(1, 2), key, value, sharp_start_pos, None, 0.0, True,
                                          scaling)
        return out, None

    AttentionInterface.register(ATTENTION, attention)


class _CacheLayer:
    """One layer's keys and values in ExecuTorch's layout, written in place by its `update_cache` kernel."""

    is_sliding = False
    is_compileable = True
    is_initialized = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, kwargs=None, **_):
        start = kwargs["sharp_start_pos"]
        torch.ops.llama.update_cache(key_states.transpose(1, 2).contiguous(), self.keys, start)
        torch.ops.llama.update_cache(value_states.transpose(1, 2).contiguous(), self.values, start)
        return self.keys, self.values


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x²) + eps) (Llama-style, computed in float32) with its mean written as XNNPACK
    lowers it: a 4-D average over the two innermost dims (a 3-D mean stays outside the delegate and splits the
    delegated graph twice per layer)."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, h = x.dtype, x.float()
        var = (h * h).reshape(*h.shape[:-1], 1, h.shape[-1]).mean((-2, -1), keepdim=True)  # (..., 1, 1)
        return self.weight * (h * torch.rsqrt(var.reshape(*h.shape[:-1], 1) + self.eps)).to(dtype)


_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def delegated_norms(model: nn.Module) -> int:
    """Swap the Llama-style RMSNorm modules for `RMSNorm` (same weight Parameter), in place; returns how many."""
    swaps = [(n, m) for n, m in model.named_modules() if type(m).__name__ in _RMS_NORMS]
    for name, norm in swaps:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, RMSNorm(norm.weight, norm.variance_epsilon))
    return len(swaps)


class Exportable(nn.Module):
    """`model` with a static KV cache as buffers, one token per call: forward(token (1, 1), position (1,)) -> its
    logits (1, vocab). Static shapes let XNNPACK take every reshape and slice of the layer (with a dynamic
    sequence length those stay outside and split each layer into several delegate calls), so a prompt is
    prefilled one token at a time, as ExecuTorch's llama runner does for programs without dynamic shapes."""

    def __init__(self, model: nn.Module, max_cache_len: int) -> None:
        from transformers.cache_utils import Cache

        super().__init__()
        config = model.config
        if config.model_type not in SUPPORTED:
            raise SharpError(f"ExecuTorch export supports {', '.join(SUPPORTED)} models, not '{config.model_type}'")
        window = getattr(config, "sliding_window", None)
        if window is not None and window < max_cache_len:
            raise SharpError(f"this model attends over a sliding window of {window}; export with --max-cache-len "
                             f"{window} or less")
        _register_attention()
        model.set_attn_implementation(ATTENTION)
        self.model, self.max_cache_len = model, max_cache_len
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = next(p for p in model.parameters() if p.dtype.is_floating_point).dtype
        layers = []
        for i in range(config.num_hidden_layers):
            shape = (1, max_cache_len, config.num_key_value_heads, head_dim)
            self.register_buffer(f"keys_{i}", torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer(f"values_{i}", torch.zeros(shape, dtype=dtype), persistent=False)
            layers.append(_CacheLayer(getattr(self, f"keys_{i}"), getattr(self, f"values_{i}")))
        self.cache = Cache(layers=layers)

    def forward(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        start = position[0].item()
        torch._check_is_size(start)
        torch._check(start < self.max_cache_len)
        out = self.model(input_ids=token, position_ids=position[None], cache=self.cache, use_cache=True,
                         sharp_start_pos=start)
        return out.logits[:, -1, :]


def _tag_constants(ep) -> None:
    """Mark every constant the XNNPACK delegate will serialize for the external file (see module docstring)."""
    sig = ep.graph_signature
    constants = {*sig.inputs_to_parameters, *sig.inputs_to_lifted_tensor_constants,
                 *(k for k, v in sig.inputs_to_buffers.items() if v not in sig.buffers_to_mutate.values())}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in constants:
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = PTD_TAG


def lower(model: nn.Module, max_cache_len: int, bf16: bool = False):
    """torch.export (one token per call) -> XNNPACK -> an ExecuTorch program manager."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    wrapper = Exportable(model, max_cache_len)
    with torch.no_grad():
        ep = torch.export.export(wrapper, args=(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)),
                                 strict=True)
    _tag_constants(ep)
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner(enable_bf16=bf16)],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    return edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True,
        external_constants=lambda node: PTD_TAG,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
    ))


def load_source(source: str | os.PathLike, dtype: torch.dtype) -> tuple[nn.Module, Path]:
    """The model to export: a sharp checkpoint in shared mode (one module per unique weight) or a plain
    Hugging Face folder / alias."""
    path = Path(resolve_model_path(str(source)))
    if is_quantized_folder(path):
        raise SharpError(f"'{source}' is already quantized; export the 16-bit checkpoint with --quant 8da4w")
    model, _ = load_model(str(source), dtype=dtype, verify=False, tokenizer=False)
    return model, path


def export_executorch(source: str | os.PathLike, out: str | os.PathLike, config: ExportConfig | None = None,
                      overwrite: bool = False) -> dict[str, Path]:
    """`sharp export --format executorch`: write model.pte + weights.ptd + sharp_export.json (+ tokenizer)."""
    from sharp.io.atomic import atomic_dir, check_output_dir

    config = config or ExportConfig()
    require_executorch()
    check_output_dir(out, overwrite)
    model, path = load_source(source, DTYPES[config.dtype])
    fused = prepare(model, config)
    program = lower(model, config.max_cache_len, bf16=config.dtype == "bf16")
    with atomic_dir(out, overwrite) as tmp:
        with open(tmp / PTE, "wb") as f:
            program.write_to_file(f)
        program.write_tensor_data_to_file(str(tmp))
        meta = {"source": str(source), "config": asdict(config), "fused_mlps": fused,
                "model_type": model.config.model_type, "vocab_size": int(model.config.vocab_size),
                "sharp": sharp_config(model) is not None,
                "bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name in TOKENIZER_FILES:
            if path.is_dir() and (path / name).is_file():
                shutil.copy2(path / name, tmp / name)
    return {"program": Path(out) / PTE, "data": Path(out) / PTD}


def prepare(model: nn.Module, config: ExportConfig) -> int:
    """Export form of `model`, in place: LoRA recovery as linear modules, quantized per `config`. Returns the
    number of fused target MLPs."""
    model.eval().requires_grad_(False)
    fused = lora_modules(model, fuse=config.fuse)
    delegated_norms(model)
    if config.quant == "8da4w":

        quantize_for_executorch(model, config.group_size, config.recovery_bits)
    return fused
