"""On-device export: llama.cpp GGUF files for a (SHARP) Llama-architecture model.

Two forms, written side by side by `export_gguf`:

    model.gguf          the merged model: every target weight materialized (W_t = recovery(W_ref)). Any GGUF
                        runtime loads it; it is as large as the original model.
    base.gguf +         the Direct-Sharing model (each target's projections are *copies* of its reference's) plus
    recovery.lora.gguf  a llama.cpp LoRA adapter holding the recovery parameters (lora:R recoveries only):
                        `llama-cli -m base.gguf --lora recovery.lora.gguf`.

Honest caveat: GGUF has no tensor aliasing. llama.cpp's loader rejects two tensor infos at one file offset and
its graph builder creates one tensor per layer, so a shared reference weight is written (and loaded) once per
layer that uses it: `base.gguf` is as big as `model.gguf`. Avoiding that needs a loader change in llama.cpp
(an alias table `blk.T.ffn_* -> blk.R.ffn_*` in the metadata, resolved by `create_tensor` to the same
`ggml_tensor`) — the GGUF format itself could carry it as a metadata key.

Tensors follow llama.cpp's convert_hf_to_gguf.py: names from `gguf.get_tensor_name_map`, q/k rows permuted for
its rotary layout, norms in f32, tied LM head omitted.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sharp.errors import SharpError
from sharp.io.formats import is_quantized_folder
from sharp.io.models import load_model, resolve_model_path
from sharp.sharing.state import sharp_config

OUTTYPES = ("f16", "f32")
MERGED, BASE, LORA = "model.gguf", "base.gguf", "recovery.lora.gguf"


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved rotary halves), as in convert_hf_to_gguf.py."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _writer(path: Path, config, name: str, outtype: str):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
    return w


def _add_vocab(w, folder: Path | None) -> bool:
    """Tokenizer metadata from the model folder (SentencePiece, Llama-style HF BPE or GPT-2 BPE); False if none
    could be read."""
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab

    if folder is None:
        return False
    if folder.suffix == ".gguf":  # a GGUF source: its tokenizer metadata as it is
        return _copy_gguf_vocab(w, folder)
    for cls in (SentencePieceVocab, LlamaHfVocab, BpeVocab):  # tokenizer.model, Llama tokenizer.json, GPT-2 BPE
        try:
            vocab = cls(folder)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError):
            continue
        tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
        w.add_tokenizer_model(vocab.tokenizer_model)
        w.add_tokenizer_pre("default")
        w.add_token_list(list(tokens))
        w.add_token_scores(list(scores))
        w.add_token_types([int(t) for t in types])
        SpecialVocab(folder, load_merges=cls is BpeVocab, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
        return True
    return False


def _copy_gguf_vocab(w, source: Path) -> bool:
    """Copy every `tokenizer.*` key of the GGUF file `source` into the writer `w`."""
    from gguf import GGUFReader, GGUFValueType

    fields = [f for f in GGUFReader(source).fields.values() if f.name.startswith("tokenizer.")]
    for f in fields:
        sub_type = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub_type)
    return bool(fields)


def _tensors(model: nn.Module, outtype: str):
    """(gguf name, numpy array) for every tensor of a plain (merged or Direct-Sharing) Llama model."""
    import gguf

    config = model.config
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise SharpError(f"cannot map tensor '{name}' to a GGUF name; only Llama-style models export")
        data = t.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, config.num_attention_heads, config.num_key_value_heads)
        if outtype == "f16" and data.ndim == 2:
            data = data.astype(np.float16)
        yield gname, np.ascontiguousarray(data)


def _write_model(model: nn.Module, path: Path, folder: Path | None, outtype: str, name: str) -> None:
    w = _writer(path, model.config, name, outtype)
    if not _add_vocab(w, folder):
        warnings.warn(f"no tokenizer found beside the model ({folder}): {path.name} has no vocabulary, which "
                      "llama.cpp needs to run it", stacklevel=2)
    for gname, data in _tensors(model, outtype):
        w.add_tensor(gname, data)
    _finish(w)


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_lora(model: nn.Module, path: Path, name: str) -> int:
    """llama.cpp LoRA adapter with every target's s·B A (s folded into B, adapter scale 1: alpha = rank). Returns
    the number of pairs."""
    import gguf

    from sharp.sharing.recovery import LoRARecovery
    from sharp.sharing.shared import shared_linears

    config = model.config
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    rank = None
    pairs = 0
    for sname, shared in shared_linears(model):
        rec = shared.recovery
        if type(rec) is not LoRARecovery:
            raise SharpError(f"recovery {type(rec).__name__} has no LoRA form; export the merged model.gguf only")
        rank = rec.rank
        gname = tmap.get_name(sname + ".weight", try_suffixes=(".weight",))
        a = rec.lora_A.detach().float().numpy()  # (r, in)
        b = (rec.lora_B.detach().float() * rec.scaling).numpy()  # (out, r); PEFT's alpha/R folded into B
        if sname.endswith("q_proj"):
            b = _permute(b, config.num_attention_heads, config.num_attention_heads)
        elif sname.endswith("k_proj"):
            b = _permute(b, config.num_attention_heads, config.num_key_value_heads)
        w.add_tensor(gname + ".lora_a", np.ascontiguousarray(a))
        w.add_tensor(gname + ".lora_b", np.ascontiguousarray(b))
        pairs += 1
    w.add_name(name)
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank or 1))
    _finish(w)
    return pairs


@torch.no_grad()
def direct_sharing_copy(model: nn.Module) -> nn.Module:
    """A plain copy of a shared model where each target projection is a copy of its reference (no recovery)."""
    import copy

    from sharp.sharing.shared import shared_linears

    plain = copy.deepcopy(model)
    for name, shared in shared_linears(plain):
        parent, _, attr = name.rpartition(".")
        clone = nn.Linear(shared.in_features, shared.out_features, bias=getattr(shared.base_layer, "bias", None)
                          is not None, dtype=shared.base_layer.weight.dtype)
        clone.load_state_dict(shared.base_layer.state_dict())
        setattr(plain.get_submodule(parent), attr, clone)
    return plain


def export_gguf(source: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16",
                overwrite: bool = False) -> dict[str, Path]:
    """Write `model.gguf` (merged) and, for LoRA recoveries, `base.gguf` + `recovery.lora.gguf` into `out`."""
    from sharp.io.atomic import atomic_dir, check_output_dir
    from sharp.sharing.shared import merge_sharing, shared_linears

    if outtype not in OUTTYPES:
        raise SharpError(f"unknown --outtype '{outtype}'; choose one of: {', '.join(OUTTYPES)}")
    check_output_dir(out, overwrite)
    path = Path(resolve_model_path(str(source)))
    if is_quantized_folder(path):
        raise SharpError(f"'{source}' is quantized; export the 16-bit checkpoint (llama-quantize then makes Q4)")
    # a sharp checkpoint, model folder, alias or .gguf file (dequantized on load)
    model, _ = load_model(str(source), dtype=torch.float32, tokenizer=False)
    if model.config.model_type not in ("llama", "mistral"):
        raise SharpError(f"GGUF export supports Llama-style models, not '{model.config.model_type}'")
    plan = sharp_config(model)
    if plan is not None and plan.dropped_mlps:
        raise SharpError(f"'{source}' deletes the MLPs of layers {plan.dropped_mlps}; GGUF holds one MLP width for "
                         "every layer, so it cannot carry that (export a plan without drop-mlp)")
    name = path.stem if path.is_file() else path.name
    files: dict[str, Path] = {}
    with atomic_dir(out, overwrite) as tmp:
        shared = shared_linears(model)
        if shared and all(type(s.recovery).__name__ == "LoRARecovery" for _, s in shared):
            _write_model(direct_sharing_copy(model), tmp / BASE, path, outtype, name + " (Direct Sharing base)")
            _write_lora(model, tmp / LORA, name + " recovery")
            files.update(base=Path(out) / BASE, lora=Path(out) / LORA)
        merge_sharing(model)
        _write_model(model, tmp / MERGED, path, outtype, name)
        files["merged"] = Path(out) / MERGED
    return files


@torch.no_grad()
def compare_logits(reference: nn.Module, gguf_file: str | os.PathLike, input_ids: torch.Tensor) -> float:
    """Max |logit difference| between `reference` and the GGUF file re-read by transformers' GGUF loader
    (which undoes the q/k permutation and dequantizes to f32)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    p = Path(gguf_file)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        reread = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    a = reference(input_ids=input_ids).logits.float()
    b = reread(input_ids=input_ids).logits.float()
    return float((a - b).abs().max())
