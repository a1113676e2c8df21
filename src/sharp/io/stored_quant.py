"""Tensors of a quantized sharp checkpoint that are stored in 8 or 4 bits and dequantized at load
(`sharp quantize --recovery-bits`, `--embedding-bits`).

At 4 bits the 16-bit recovery eats most of what sharing saves (SmolLM2 `next:6-29` `lora:64`: 9.7 MB of LoRA
against 15.9 MB of removed 4-bit MLP weights), and the 16-bit embedding (tied to the LM head) is half of a 4-bit
SmolLM2. Both can be stored smaller: symmetric absmax integers in groups of up to 64 along each row, one 16-bit
scale per group, 4-bit values packed two per byte.

    recovery matrices lora_A (r, in), lora_B (out, r)   --recovery-bits 8|4
    the input embedding (vocab, dim), tied LM head too    --embedding-bits 8|4
        NAME  ->  NAME.qweight (int8, or uint8 holding two 4-bit values) + NAME.qscale (rows, groups)

Vectors (scale recoveries), norms and the quantized linears are unchanged. Stored tensors are dequantized to the
model's dtype at load: the saving is on disk and in what a load reads; in memory they are 16-bit again. A loaded
model's outputs equal those of the model `quantize_model` rounded in place (`round_stored`), which is what
`sharp quantize` evaluates and saves. Quantizing a dequantized 16-bit value again need not give the same integers
and scales back, so the integers each rounding (or load) produced are kept on the model
(`SharpState.stored_packs`) and saved as they are while the parameter still holds their value.
"""

from __future__ import annotations

import torch
from torch import nn

from sharp.errors import SharpError
from sharp.sharing.shared import recoveries
from sharp.sharing.state import ensure_state

STORED_BITS = (4, 8, 16)
GROUP = 64
_Q, _S = ".qweight", ".qscale"


def _group(cols: int) -> int:
    """The largest group of at most GROUP columns that divides the row (a rank-48 B gets groups of 48)."""
    return next(g for g in range(min(GROUP, cols), 0, -1) if cols % g == 0)


def quantize(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(integers, scales) of a 2-D tensor: symmetric absmax per group of columns; 4-bit values packed in pairs."""
    qmax = 2 ** (bits - 1) - 1
    rows, cols = t.shape
    g = _group(cols)
    x = t.detach().float().reshape(rows, cols // g, g)
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax  # (rows, groups, 1)
    q = torch.clamp(torch.round(x / scale), -qmax - 1, qmax).to(torch.int8).reshape(rows, cols)
    if bits == 4:
        if cols % 2:
            raise SharpError(f"a {rows}x{cols} matrix has an odd row length; store it in 8 bits")
        u = (q + 8).to(torch.uint8)  # 0..15
        q = u[:, 0::2] | (u[:, 1::2] << 4)  # (rows, cols / 2)
    return q, scale.squeeze(-1).to(t.dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if q.dtype == torch.uint8:  # packed 4-bit
        lo, hi = (q & 0xF).to(torch.int8) - 8, (q >> 4).to(torch.int8) - 8
        q = torch.stack([lo, hi], dim=-1).reshape(q.shape[0], -1)
    rows, cols = q.shape
    groups = scale.shape[1]
    x = q.float().reshape(rows, groups, cols // groups) * scale.float()[..., None]
    return x.reshape(rows, cols).to(dtype)


def check_bits(bits: int, flag: str) -> None:
    if bits not in STORED_BITS:
        raise SharpError(f"{flag} {bits}: choose one of {', '.join(map(str, STORED_BITS))}")


def stored_bits(model: nn.Module, recovery_bits: int, embedding_bits: int) -> dict[str, int]:
    """{state-dict name: bits} of every tensor of `model` stored below 16 bits."""
    out = {}
    if recovery_bits < 16:
        for name, rec in recoveries(model):
            for pname, p in rec.named_parameters():
                if p.dim() == 2 and p.dtype.is_floating_point:
                    out[f"{name}.{pname}"] = recovery_bits
    if embedding_bits < 16:
        emb = model.get_input_embeddings().weight
        name = next(n for n, p in model.named_parameters() if p is emb)
        out[name] = embedding_bits
    return out


@torch.no_grad()
def round_stored(model: nn.Module, bits: dict[str, int]) -> int:
    """Set every tensor named in `bits` to its stored value (what a load gives back); returns how many."""
    params = dict(model.named_parameters(remove_duplicate=False))
    packs = {}
    for name, b in bits.items():
        p = params[name]
        q, scale = quantize(p, b)
        p.copy_(dequantize(q, scale, p.dtype))
        packs[name] = (q, scale, p.detach().clone())
    ensure_state(model).stored_packs = packs
    return len(packs)


def pack(tensors: dict[str, torch.Tensor], bits: dict[str, int], packs: dict | None = None) -> dict[str, torch.Tensor]:
    """`tensors` as saved: those named in `bits` as integers + scales (the entry of `packs` when the tensor still
    equals it), the others unchanged."""
    packs = packs or {}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name not in bits:
            out[name] = t
            continue
        q, scale, value = packs.get(name, (None, None, None))
        if value is None or value.shape != t.shape or not torch.equal(value, t) or _bits(q, t) != bits[name]:
            q, scale = quantize(t, bits[name])
        out[name + _Q], out[name + _S] = q, scale
    return out


def _bits(q: torch.Tensor, t: torch.Tensor) -> int:
    return 4 if q.numel() * 2 == t.numel() else 8


def unpack(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """Replace every packed tensor in `state` by its dequantized tensor, in place; returns the packs."""
    packs = {}
    for key in [k for k in state if k.endswith(_Q)]:
        name = key.removesuffix(_Q)
        if name + _S not in state:
            raise SharpError(f"the scales of {name} are missing from the checkpoint; re-create it")
        q, scale = state.pop(key), state.pop(name + _S)
        state[name] = dequantize(q, scale, dtype)
        packs[name] = (q, scale, state[name].clone())  # the parameter itself may change later
    return packs
