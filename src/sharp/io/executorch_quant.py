"""4-bit quantization of a model in export form (`sharp.io.executorch.prepare`) for ExecuTorch's XNNPACK delegate.

    decoder linears    8da4w: int8 dynamic per-token activations, int4 weights in groups along the input
                       (torchao `Int8DynamicActivationIntxWeightConfig`, HQQ scales as in ExecuTorch's llama
                       export). Each unique module is quantized once, so a shared reference weight stays shared.
    recovery (LoRA)    its own bit width: 8 (8da8w, one scale per row), 4 (8da4w) or 16 (left in float)
    LM head            8da8w, one scale per row
    embedding          `quantized_decomposed.embedding_byte` on the LM head's own int8 matrix and scales when the
                       two are tied, so the tied matrix is still stored once (at 8 bits)
"""

from __future__ import annotations

import torch
from torch import nn

from sharp.errors import SharpError
from sharp.io.executorch_lora import FusedLoRAMLP, LoRALinear


class Int8Embedding(nn.Module):
    """Embedding gather from an int8 matrix (vocab, dim) with one scale per row: ExecuTorch runs it with its
    quantized kernel library, without dequantizing the table."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (defines the op)

        self.register_buffer("qdata", qdata)  # (vocab, dim) int8
        self.register_buffer("scale", scale.reshape(-1, 1))  # (vocab, 1)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_byte.dtype(self.qdata, self.scale, None, -128, 127, ids,
                                                                   dtype=self.dtype)


def _recovery_linears(model: nn.Module) -> set[int]:

    out: set[int] = set()
    for m in model.modules():
        if isinstance(m, LoRALinear):
            out |= {id(m.lora_a), id(m.lora_b)}
        elif isinstance(m, FusedLoRAMLP):
            out |= {id(m.lora_a), id(m.lora_b_gate), id(m.lora_b_up)}
    return out


def _config(bits: int, group_size: int, hqq: bool):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=getattr(torch, f"int{bits}"),
        weight_granularity=PerGroup(group_size) if bits < 8 else PerAxis(0),
        intx_choose_qparams_algorithm="hqq_scale_only" if hqq else "affine",
    )


@torch.no_grad()
def quantize_for_executorch(model: nn.Module, group_size: int = 32, recovery_bits: int = 8) -> None:
    """Quantize `model` (export form) in place as the module docstring says."""
    from torchao.quantization import quantize_
    from torchao.utils import unwrap_tensor_subclass

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is emb.weight
    recovery = _recovery_linears(model)

    seen: set[int] = set()  # torchao walks children, so it meets a shared module once per parent

    def once(m: nn.Module) -> bool:
        new = id(m) not in seen
        seen.add(id(m))
        return new

    def decoder(m: nn.Module, fqn: str) -> bool:
        return isinstance(m, nn.Linear) and m is not head and id(m) not in recovery

    skipped = [n for n, m in model.named_modules() if decoder(m, n) and m.in_features % group_size]
    if skipped:
        raise SharpError(f"--group-size {group_size} does not divide the input size of {skipped[0]} "
                         f"({model.get_submodule(skipped[0]).in_features}); pick a divisor")
    quantize_(model, _config(4, group_size, hqq=True), filter_fn=lambda m, fqn: decoder(m, fqn) and once(m))
    if recovery_bits < 16:
        def rec(m: nn.Module, fqn: str) -> bool:
            return id(m) in recovery and once(m)

        bad = [m.in_features for m in model.modules() if id(m) in recovery and m.in_features % group_size]
        if recovery_bits == 4 and bad:
            raise SharpError(f"--group-size {group_size} does not divide the recovery rank {bad[0]}; "
                             "pick a divisor or --recovery-bits 8")
        quantize_(model, _config(recovery_bits, group_size, hqq=recovery_bits == 4), filter_fn=rec)
    if head is not None:
        quantize_(model, _config(8, group_size, hqq=False), filter_fn=lambda m, fqn: m is head)
        if tied:
            w = head.weight  # torchao IntxUnpackedToInt8Tensor: qdata (vocab, dim) int8, scale (vocab, 1)
            model.set_input_embeddings(Int8Embedding(w.qdata, w.scale, w.dtype))
    unwrap_tensor_subclass(model)
