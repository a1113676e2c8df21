"""Calibration data and the two scores baselines rank structures by.

- Angular distance (Gromov et al., "The unreasonable ineffectiveness of the deeper layers", eq. 7):
  d(x, y) = arccos(cos(x, y)) / pi between the residual stream before and after a span of layers, averaged
  over tokens. A span that barely turns the residual stream is the cheapest to delete. Position 0 is left out:
  some models write a massive activation there (RESEARCH.md: SmolLM2's layer 11) that dominates any average.
- First-order Taylor importance (LLM-Pruner, "element-wise" with sum aggregation): a channel's importance is
  sum |w * dL/dw| over its weights (gate row, up row, down column), with the gradient of the calibration loss
  accumulated over all samples.

Why not torch-pruning's `MetaPruner` for `width`: on a Llama-style MLP it works (gate/up/down grouped per layer
when attention and embeddings are in `ignored_layers`, `forward_fn` returning logits with `use_cache=False`), and
`tests/baselines/test_methods.py` checks that our scores keep exactly the channels its `TaylorImportance("sum",
normalizer=None)` keeps. But (1) the budget must be met to one channel and the same scores also drive the "fill"
of the block-dropping methods, outside any pruner; (2) on Phi-3's fused `gate_up_proj` (split by `chunk` in the
forward) `MetaPruner` at ratio 0.5 left 14-20 of 96 rows instead of 48. So we compute the importance on the
modules the architecture adapter names and slice the channels ourselves (`surgery.keep_mlp_channels`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sharp.arch import get_adapter, layer_hidden
from sharp.errors import SharpError
from sharp.sharing.surgery import is_fused, mlp_projections, mlp_width


def calibration_examples(data: str, tokenizer, n_samples: int = 32, max_len: int = 256,
                         template: str = "plain") -> list[dict[str, list[int]]]:
    """Up to `n_samples` examples {input_ids, labels}: instruction records (response-only labels) or
    `max_len`-token windows of plain text (every token a label). The first records are used: deterministic."""
    from sharp.data import load_records, parse_data_spec, text_token_stream, tokenize_examples

    spec = parse_data_spec(data)
    if spec.format == "text":
        ids = text_token_stream(spec, tokenizer)[: n_samples * max_len].tolist()
        windows = [ids[i: i + max_len] for i in range(0, len(ids), max_len)]
        return [{"input_ids": w, "labels": list(w)} for w in windows if len(w) >= 2]
    records = load_records(spec)[:n_samples]
    return tokenize_examples(records, spec.format, tokenizer, template, max_len)


def _forward(model: nn.Module, example: dict) -> torch.Tensor:
    device = next(model.parameters()).device
    ids = torch.as_tensor(example["input_ids"], device=device)[None]  # (1, T)
    labels = torch.as_tensor(example["labels"], device=device)[None]
    return model(input_ids=ids, labels=labels, use_cache=False).loss


@torch.no_grad()
def residual_streams(model: nn.Module, examples: list[dict]) -> list[torch.Tensor]:
    """Per example, the residual stream at every layer boundary: (L + 1, T - 1, H), position 0 left out.
    Row l is the input of layer l; row L is the last layer's output (before the final norm)."""
    layers = get_adapter(model).layers(model)
    captured: list[torch.Tensor] = []

    def pre_hook(_module, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        captured.append(hs[0, 1:].float().cpu())  # (T - 1, H)

    def post_hook(_module, _args, out):
        captured.append(layer_hidden(out)[0, 1:].float().cpu())

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(post_hook))
    streams = []
    try:
        for example in examples:
            captured.clear()
            device = next(model.parameters()).device
            model(input_ids=torch.as_tensor(example["input_ids"], device=device)[None], use_cache=False)
            streams.append(torch.stack(captured))
    finally:
        for h in handles:
            h.remove()
    return streams


def _angular(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token arccos(cos(x, y)) / pi; x, y: (T, H) -> (T,)."""
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).clamp(-1.0, 1.0)
    return torch.arccos(cos) / math.pi


def block_distances(streams: list[torch.Tensor], n: int) -> list[float]:
    """Mean angular distance between the input of layer l and the output of layer l + n - 1, for every l."""
    n_layers = streams[0].shape[0] - 1
    if not 1 <= n < n_layers + 1:
        raise SharpError(f"cannot drop {n} contiguous layers of {n_layers}; lower the budget")
    out = []
    for start in range(n_layers - n + 1):
        d = torch.cat([_angular(s[start], s[start + n]) for s in streams])
        out.append(float(d.mean()))
    return out


@torch.no_grad()
def mlp_distances(model: nn.Module, examples: list[dict]) -> list[float]:
    """Per layer, the mean angular distance between the residual stream just before its MLP's contribution is
    added and just after (the MLP sub-block's own Gromov distance)."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    mlp_out: dict[int, torch.Tensor] = {}
    sums = [0.0] * len(layers)
    count = 0

    def mlp_hook(index):
        def hook(_module, _args, out):
            mlp_out[index] = layer_hidden(out)[0, 1:].float()
        return hook

    def layer_hook(index):
        def hook(_module, _args, out):
            after = layer_hidden(out)[0, 1:].float()
            before = after - mlp_out[index]  # pre-norm blocks: out = h_mid + mlp(norm(h_mid))
            sums[index] += float(_angular(before, after).sum())
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(getattr(layer, adapter.mlp_attr).register_forward_hook(mlp_hook(i)))
        handles.append(layer.register_forward_hook(layer_hook(i)))
    try:
        for example in examples:
            device = next(model.parameters()).device
            model(input_ids=torch.as_tensor(example["input_ids"], device=device)[None], use_cache=False)
            count += len(example["input_ids"]) - 1
    finally:
        for h in handles:
            h.remove()
    return [s / max(count, 1) for s in sums]


def taylor_importance(model: nn.Module, examples: list[dict], progress=None) -> list[torch.Tensor]:
    """Per layer, a (width,) tensor of channel importances sum |w * grad| over the channel's weights."""
    n_layers = len(get_adapter(model).layers(model))
    projections = [mlp_projections(model, i) for i in range(n_layers)]
    params = [p.weight for inputs, down in projections for p in (*inputs, down)]
    previous = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for w in params:
        w.requires_grad_(True)
        w.grad = None
    try:
        with torch.enable_grad():
            for example in examples:
                loss = _forward(model, example)
                if not torch.isfinite(loss):
                    raise SharpError("the calibration loss is not finite; check the model and the --data")
                loss.backward()
                if progress is not None:
                    progress(1)
        scores = []
        for i, (inputs, down) in enumerate(projections):
            width = mlp_width(model, i)
            score = (down.weight * down.weight.grad).abs().sum(0).detach().float()  # (I,)
            for proj in inputs:
                rows = (proj.weight * proj.weight.grad).abs().sum(1).detach().float()  # (I,) or (2I,)
                score = score + (rows[:width] + rows[width:] if is_fused(model) else rows)
            scores.append(score.cpu())
    finally:
        for w in params:
            w.grad = None
        for p, flag in previous.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return scores
