"""How alike are adjacent decoder layers? Measurements on real inputs that explain (and predict) what sharing costs.

For every adjacent pair (reference i, target i+1), at layer i+1's real MLP input x (all tokens of the data):

    rel_l2  = sqrt(sum_tokens ||MLP_i(x) - MLP_{i+1}(x)||^2 / sum_tokens ||MLP_{i+1}(x)||^2)
              (the error Direct Sharing makes in the MLP's output, relative to what the target wrote)
    cosine  = mean over tokens of cos(MLP_i(x), MLP_{i+1}(x))

For every layer i, the residual stream h_i entering it and h_{i+1} leaving it: mean per-token cos(h_i, h_{i+1}),
and the full (L+1) x (L+1) matrix of mean per-token cosines between all residual streams (the heatmap).

Position 0 is excluded by default (`skip_first=1`): some models (SmolLM2: layer 11) write a massive activation
there (an attention sink), which would dominate every sum; `mlp_norm` reports that position's MLP output norm
separately so it stays visible.

Single-layer replacement robustness (`replacement_costs`): the perplexity when only target t's MLP is replaced
by t-1's (Direct Sharing of that one layer), for each t. Swapping the MLP module is exactly
`sharp.share(model, f"map:{t}={t-1}", "none")` without copying the model (tests check this).

Everything streams: hooks compute one batch's statistics as the forward pass runs and add them to float64
sums; no activation outlives its batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from sharp.arch import get_adapter, layer_hidden
from sharp.recovery.closed_form import float64
from sharp.sharing.state import sharp_state


@dataclass
class _Sums:
    """Running float64 sums over tokens for one analysis."""

    n_layers: int
    tokens: int = 0
    first_tokens: int = 0
    diff_sq: list[float] = field(default_factory=list)  # per pair (i, i+1)
    target_sq: list[float] = field(default_factory=list)
    mlp_cos: list[float] = field(default_factory=list)
    mlp_norm: list[float] = field(default_factory=list)  # per layer, statistics tokens
    mlp_norm_first: list[float] = field(default_factory=list)  # per layer, position-0 tokens
    resid_norm_first: list[float] = field(default_factory=list)
    resid_cos: torch.Tensor | None = None  # (L+1, L+1)

    def __post_init__(self) -> None:
        n = self.n_layers
        self.diff_sq, self.target_sq, self.mlp_cos = [0.0] * (n - 1), [0.0] * (n - 1), [0.0] * (n - 1)
        self.mlp_norm, self.mlp_norm_first, self.resid_norm_first = [0.0] * n, [0.0] * n, [0.0] * n
        self.resid_cos = torch.zeros(n + 1, n + 1, dtype=torch.float64)


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row cosine of (N, d) tensors, in float64."""
    return torch.nn.functional.cosine_similarity(float64(a), float64(b), dim=-1, eps=1e-12)


@torch.no_grad()
def layer_similarity(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    skip_first: int = 1,
) -> dict:
    """Adjacent-MLP and residual-stream similarity of `model` on `batches` of {input_ids, attention_mask}.

    `skip_first` leading positions of every sequence are left out of the statistics (see the module doc).
    Returns plain JSON-ready data: `pairs`, `residual`, `residual_matrix`, `mlp_norm`, `tokens`.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    n = len(layers)
    mlps = [adapter.mlp(model, i) for i in range(n)]
    sums = _Sums(n)
    state: dict = {}  # the current batch: token masks and the residual streams seen so far
    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)  # the decoder without its LM head: no logits needed here

    def mlp_hook(index: int):
        def hook(module, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))
            keep, first = state["keep"], state["first"]
            out = layer_hidden(output)
            sums.mlp_norm[index] += float(float64(out[keep]).norm(dim=-1).sum())
            sums.mlp_norm_first[index] += float(float64(out[first]).norm(dim=-1).sum())
            if index == 0:
                return
            target = out[keep]  # (N, d): what layer `index` itself writes
            shared = mlps[index - 1].forward(x[keep])  # .forward: the previous MLP, without firing its hook
            sums.diff_sq[index - 1] += float((float64(shared) - float64(target)).pow(2).sum())
            sums.target_sq[index - 1] += float(float64(target).pow(2).sum())
            sums.mlp_cos[index - 1] += float(_cos_rows(shared, target).sum())
        return hook

    def layer_pre_hook(index: int):
        def hook(module, args, kwargs):
            if index == 0:
                h = args[0] if args else kwargs["hidden_states"]
                state["streams"].append(_unit(h[state["keep"]]))
        return hook

    def layer_hook(index: int):
        def hook(module, args, kwargs, output):
            h = layer_hidden(output)
            sums.resid_norm_first[index] += float(float64(h[state["first"]]).norm(dim=-1).sum())
            state["streams"].append(_unit(h[state["keep"]]))
        return hook

    handles = []
    try:
        for i in range(n):
            handles.append(mlps[i].register_forward_hook(mlp_hook(i), with_kwargs=True))
            handles.append(layers[i].register_forward_pre_hook(layer_pre_hook(i), with_kwargs=True))
            handles.append(layers[i].register_forward_hook(layer_hook(i), with_kwargs=True))
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                ids = batch["input_ids"].to(device)  # (B, T)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                position = mask.long().cumsum(dim=1) - 1  # (B, T): position inside each sequence
                state["keep"] = mask.bool() & (position >= skip_first)
                state["first"] = mask.bool() & (position == 0)
                state["streams"] = []
                body(input_ids=ids, attention_mask=mask, use_cache=False)
                streams = torch.stack(state.pop("streams"))  # (L+1, N, d), unit rows
                # sum over tokens of cos(h_a, h_b) for every pair of residual streams
                sums.resid_cos += torch.einsum("and,bnd->ab", streams, streams).cpu().double()
                sums.tokens += int(state["keep"].sum())
                sums.first_tokens += int(state["first"].sum())
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return _summarize(sums, skip_first)


def _unit(h: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length, float32 (the (L+1, N, d) stack of one batch stays small)."""
    h = h.float()
    return h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _summarize(sums: _Sums, skip_first: int) -> dict:
    n, t = sums.n_layers, sums.tokens
    if t == 0:
        from sharp.errors import SharpError

        raise SharpError("no tokens left to measure after skipping the first positions; give longer or more "
                         "examples (or --include-first-token)")
    pairs = [
        {
            "reference": i,
            "target": i + 1,
            "rel_l2": math.sqrt(sums.diff_sq[i] / sums.target_sq[i]) if sums.target_sq[i] > 0 else float("nan"),
            "cosine": sums.mlp_cos[i] / t,
        }
        for i in range(n - 1)
    ]
    matrix = (sums.resid_cos / t).tolist()
    residual = [{"layer": i, "cosine": matrix[i][i + 1]} for i in range(n)]
    f = max(sums.first_tokens, 1)
    mlp_norm = [
        {"layer": i, "mean": sums.mlp_norm[i] / t, "first_token": sums.mlp_norm_first[i] / f,
         "first_token_residual": sums.resid_norm_first[i] / f}
        for i in range(n)
    ]
    return {
        "layers": n,
        "tokens": t,
        "skip_first": skip_first,
        "pairs": pairs,
        "residual": residual,
        "residual_matrix": matrix,
        "mlp_norm": mlp_norm,
    }


@contextlib.contextmanager
def replaced_mlp(model: nn.Module, target: int, reference: int) -> Iterator[nn.Module]:
    """Layer `target` runs layer `reference`'s MLP inside the block (Direct Sharing of one layer), then is restored."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    original = getattr(layers[target], adapter.mlp_attr)
    setattr(layers[target], adapter.mlp_attr, getattr(layers[reference], adapter.mlp_attr))
    try:
        yield model
    finally:
        setattr(layers[target], adapter.mlp_attr, original)


def replacement_costs(
    model: nn.Module,
    score: Callable[[nn.Module], float],
    targets: Iterable[int] | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> dict:
    """Perplexity (`score(model)`) of the model, and with each single target t's MLP replaced by t-1's.

    `targets` defaults to every layer but the first. Returns {"base": ppl, "layers": [{target, reference, ppl,
    increase, delta_nll}]}: `increase` is ppl / base - 1; `delta_nll` is log(ppl / base), the additive cost
    `sharp.evaluation.suggest` works with.
    """
    n = len(get_adapter(model).layers(model))
    targets = list(range(1, n)) if targets is None else list(targets)
    base = score(model)
    rows = []
    for t in (progress or iter)(targets):
        with replaced_mlp(model, t, t - 1):
            ppl = score(model)
        rows.append({"target": t, "reference": t - 1, "ppl": ppl, "increase": ppl / base - 1,
                     "delta_nll": math.log(ppl / base)})
    return {"base": base, "layers": rows}


def parse_layer_range(text: str, num_layers: int) -> tuple[int, int]:
    """'A-B' (or one layer 'A') → (A, B), checked against the model; one clear line otherwise."""
    import re

    from sharp.errors import SharpError

    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", text)
    if not m:
        raise SharpError(f"malformed layer range '{text}'; write A-B, e.g. 14-29")
    first, last = int(m[1]), int(m[2] or m[1])
    if not 1 <= first <= last < num_layers:
        raise SharpError(f"layer range '{text}' must lie within 1-{num_layers - 1} (layer 0 has no predecessor) "
                         "and start before it ends")
    return first, last


def _track(items: list, description: str, show: bool) -> Iterable:
    if not show:
        return items
    from rich.console import Console
    from rich.progress import track

    return track(items, description=description, console=Console(stderr=True), transient=True)


def analysis_examples(tokenizer, data: str, max_len: int = 512, needed_tokens: int = 0, needed_examples: int = 0,
                      template: str = "plain") -> tuple[list[dict], str]:
    """Tokenized {input_ids, labels} examples of a data spec, enough for both measurements, and the spec text.

    Instruction data: response-only labels (`sharp.data.tokenize_examples`), records tokenized in chunks until
    `needed_tokens` tokens and `needed_examples` examples are there. Text: non-overlapping `max_len` windows
    of the token stream, each scoring every token but its first (as `sharp eval` does).
    """
    from sharp.data import load_records, parse_data_spec, text_examples, text_token_stream, tokenize_examples
    from sharp.errors import SharpError

    spec = parse_data_spec(data)
    examples: list[dict] = []
    if spec.format == "text":
        tokens = 0
        for e in text_examples(text_token_stream(spec, tokenizer), max_len):
            if tokens >= needed_tokens and len(examples) >= needed_examples:
                break
            examples.append(e)
            tokens += len(e["input_ids"])
        return examples, spec.text
    records = load_records(spec)
    tokens, chunk, error = 0, 32, None
    for start in range(0, len(records), chunk):
        try:
            new = tokenize_examples(records[start:start + chunk], spec.format, tokenizer, template, max_len)
        except SharpError as e:  # e.g. every prompt of this chunk fills max_len; later ones may not
            new, error = [], e
        examples += new
        tokens += sum(len(e["input_ids"]) for e in new)
        if tokens >= needed_tokens and len(examples) >= needed_examples:
            break
    if not examples:
        raise error or SharpError(f"data '{spec.text}' gave no examples")
    return examples, spec.text


def similarity_batches(examples: list[dict], max_tokens: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Padded batches of the first examples holding `max_tokens` tokens (the last one cut to fit)."""
    from sharp.data import collate_examples

    chosen, total = [], 0
    for e in examples:
        if total >= max_tokens:
            break
        ids = e["input_ids"][: max_tokens - total]
        chosen.append({"input_ids": ids, "labels": ids})
        total += len(ids)
    return [collate_examples(chosen[i:i + batch_size]) for i in range(0, len(chosen), batch_size)]


def analyze_model(
    model: nn.Module,
    tokenizer,
    data: str,
    max_tokens: int = 16384,
    ppl_examples: int = 30,
    max_len: int = 512,
    batch_size: int = 4,
    skip_first: int = 1,
    template: str = "plain",
    replace_layers: tuple[int, int] | None = None,
    progress: bool = False,
) -> dict:
    """Everything `sharp analyze` measures, as JSON-ready data (see the module doc).

    The similarity statistics use the first `max_tokens` tokens of `data`; single-layer replacement scores
    the first `ppl_examples` examples (0 skips it: it costs one perplexity run per layer) for every target in
    `replace_layers` (first, last; default every layer but 0).
    """
    from sharp.errors import SharpError
    from sharp.evaluation.perplexity import response_perplexity

    for flag, value, least in (("--max-tokens", max_tokens, 1), ("--ppl-examples", ppl_examples, 0),
                               ("--batch-size", batch_size, 1), ("--max-len", max_len, 2)):
        if value < least:
            raise SharpError(f"{flag} must be at least {least}, got {value}")
    examples, data_text = analysis_examples(tokenizer, data, max_len, max_tokens, ppl_examples, template)
    batches = similarity_batches(examples, max_tokens, batch_size)
    result = {
        "model": state.source if (state := sharp_state(model)) is not None else None,
        "data": data_text,
        "settings": {"max_tokens": max_tokens, "ppl_examples": ppl_examples, "max_len": max_len,
                     "batch_size": batch_size, "skip_first": skip_first, "template": template},
    }
    result.update(layer_similarity(model, _track(batches, "layer similarity", progress), skip_first))
    if ppl_examples:
        scored = examples[:ppl_examples]
        n = len(get_adapter(model).layers(model))
        result["replacement"] = replacement_costs(
            model,
            lambda m: response_perplexity(m, scored, batch_size)["ppl"],
            targets=range(max(1, replace_layers[0]), replace_layers[1] + 1) if replace_layers else None,
            progress=lambda targets: _track(list(targets), f"replacing 1 of {n} MLPs", progress),
        )
        result["replacement"]["examples"] = len(scored)
        result["replacement"]["tokens"] = sum(sum(x != -100 for x in e["labels"][1:]) for e in scored)
    return result
