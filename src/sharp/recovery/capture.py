"""Capture the original model's MLP inputs and outputs at the target layers into an `ActivationStore`.

`capture_activations` takes the original model loaded, or its folder (plain safetensors), read one decoder layer
at a time so that no copy of the model is held in memory:

 1. the model is built on the meta device (nothing allocated); only the token embedding is read from disk;
 2. one forward pass per batch runs with every decoder layer replaced by a stub that records the arguments the
    model hands that layer (attention mask, rotary position embeddings, ...: each architecture's own code
    builds them, so nothing here is per-model) and returns its input;
 3. then layer by layer: read layer i's tensors from disk (safetensors memory-maps the file and copies out just
    those tensors), run every batch's hidden states through it, hook the targets' MLPs to store their inputs
    and outputs, and free the layer before reading the next.

Peak memory from a folder is the embedding, one decoder layer, and the hidden states of the captured batches
(tokens × hidden × 4 bytes in float32), whatever the depth of the model. Both paths store the same rows, in the
same order, with the same values.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from sharp.arch import get_adapter
from sharp.errors import SharpError
from sharp.io.atomic import write_text_atomic
from sharp.recovery.activations import (
    DTYPES,
    META,
    ActivationStore,
    ShardWriter,
    finished_capture,
    keep_mask,
    progress_bar,
)
from sharp.recovery.lazy import SafetensorsWeights, meta_model


class _StopForward(Exception):
    """Raised after the last target layer: later layers and the LM head are not needed."""


@torch.no_grad()
def capture_activations(
    model: nn.Module | str | Path,
    batches: Iterable[Mapping[str, torch.Tensor]],
    targets: list[int],
    work_dir: str | Path,
    max_tokens: int | None = None,
    skip_positions: int = 0,
    dtype: str = "float16",
    flush_bytes: int = 64 << 20,
    progress: bool = True,
    outputs: Mapping[int, nn.Module] | None = None,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    storage_dtype: torch.dtype | None = None,
) -> ActivationStore:
    """One forward pass of `model` (loaded, or its folder: see the module docstring) over `batches`, storing
    each target MLP's input and output.

    `batches` yields dicts with `input_ids` (B, T) and optionally `attention_mask` (B, T); other keys (labels,
    ...) are ignored. Stops once `max_tokens` kept tokens are stored per layer; rows are buffered up to
    `flush_bytes` in all before they go to disk. `outputs` maps a target to the module whose output on the
    captured input is stored instead of the model's own MLP output (sequential SLW: the shared model's inputs,
    the original MLP's outputs). A folder is computed in `compute_dtype` on `device`, its weights rounded to
    `storage_dtype` first when given, as a model loaded in that dtype would hold them (a loaded model computes
    where and as it is). Returns the finished store; if `work_dir` already holds a finished capture it is reused as is.
    """
    root = Path(work_dir)
    if (finished := finished_capture(root, dtype, targets)) is not None:
        return finished
    targets = sorted(set(targets))
    if isinstance(model, str | Path):
        if outputs:
            raise SharpError("capture with replaced outputs needs the loaded model, not its folder")
        return _capture_from_folder(Path(model), batches, targets, root, max_tokens, skip_positions, dtype,
                                    flush_bytes, progress, compute_dtype, device, storage_dtype)
    return _capture_loaded(model, batches, targets, root, max_tokens, skip_positions, dtype, flush_bytes,
                           progress, outputs or {})


def _capture_loaded(model: nn.Module, batches, targets: list[int], root: Path, max_tokens: int | None,
                    skip_positions: int, dtype: str, flush_bytes: int, progress: bool,
                    outputs: Mapping[int, nn.Module]) -> ActivationStore:
    _fresh(root)
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    writers = {t: ShardWriter(root / f"layer_{t:03d}", DTYPES[dtype], max(1, flush_bytes // len(targets)))
               for t in targets}
    counts = dict.fromkeys(targets, 0)
    state: dict[str, torch.Tensor] = {}

    def make_hook(t: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            room = None if max_tokens is None else max_tokens - counts[t]
            if t in outputs:
                output = outputs[t](args[0])
            keep = state["keep"]
            counts[t] += writers[t].add(args[0][keep][:room], output[keep][:room], state["pos"][keep][:room])
            if t == targets[-1]:
                raise _StopForward

        return hook

    handles = [adapter.mlp(model, t).register_forward_hook(make_hook(t)) for t in targets]
    decoder = _decoder(model)
    was_training = model.training
    model.eval()
    bar = progress_bar(progress, "tokens")
    try:
        with bar:
            task = bar.add_task("SLW capture", total=max_tokens)
            for batch in batches:
                input_ids, attention_mask = _inputs(batch, device)
                state["keep"] = keep_mask(attention_mask, skip_positions)
                state["pos"] = attention_mask.long().cumsum(-1) - 1  # (B, T)
                before = counts[targets[0]]
                try:
                    decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                except _StopForward:
                    pass
                bar.update(task, advance=counts[targets[0]] - before)
                if max_tokens is not None and counts[targets[0]] >= max_tokens:
                    break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for w in writers.values():
        w.flush()
    if counts[targets[0]] == 0:
        shutil.rmtree(root)
        _no_tokens(skip_positions)
    return _finish(root, targets, counts, int(model.config.hidden_size), dtype, skip_positions)


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (saves the vocab projection, the largest matmul of small models)."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if isinstance(decoder, nn.Module) else model


class _Stub(nn.Module):
    """Stands in for decoder layer `index` during the recording pass: keeps its arguments, returns its input."""

    def __init__(self, index: int, last: int, calls: list) -> None:
        super().__init__()
        self.index, self.last, self.calls = index, last, calls

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.index == 0:
            self.calls[-1]["input"] = hidden_states  # what the model hands its first layer (embedded, scaled)
        self.calls[-1][self.index] = (args, kwargs)
        if self.index == self.last:
            raise _StopForward
        return hidden_states


def _capture_from_folder(model_path: Path, batches, targets: list[int], root: Path, max_tokens: int | None,
                         skip_positions: int, dtype: str, flush_bytes: int, progress: bool,
                         compute_dtype: torch.dtype, device: str | torch.device,
                         storage_dtype: torch.dtype | None) -> ActivationStore:
    weights = SafetensorsWeights(model_path)
    last = targets[-1]
    model = meta_model(model_path, compute_dtype, device)
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    prefix = adapter.layers_path + "."
    decoder = model.get_decoder()
    embed = model.get_input_embeddings()  # the only weights read before the layers
    embed_name = next(n for n, m in model.named_modules() if m is embed)
    weights.load_into(embed, embed_name + ".", compute_dtype, device, storage_dtype)
    real = list(layers)
    calls: list[dict[int, tuple]] = []
    for i in range(last + 1):
        layers[i] = _Stub(i, last, calls)

    # 1. record each batch's per-layer arguments and its embedded input; keep batches until max_tokens is met
    hidden, keeps, positions = [], [], []
    seen = 0
    for batch in batches:
        ids, mask = _inputs(batch, device)
        calls.append({})
        try:
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        except _StopForward:
            pass
        hidden.append(calls[-1].pop("input"))
        keeps.append(keep_mask(mask, skip_positions))
        positions.append(mask.long().cumsum(-1) - 1)
        seen += int(keeps[-1].sum())
        if max_tokens is not None and seen >= max_tokens:
            break
    if seen == 0:
        _no_tokens(skip_positions)

    # 2. layer by layer: read it, run every batch through it, store the targets' MLP rows, free it
    _fresh(root)
    counts = dict.fromkeys(targets, 0)
    bar = progress_bar(progress, "layers")
    task = bar.add_task("SLW capture, layer by layer from disk", total=last + 1)
    bar.start()
    for i in range(last + 1):
        layer = real[i]
        weights.load_into(layer, f"{prefix}{i}.", compute_dtype, device, storage_dtype)
        writer = ShardWriter(root / f"layer_{i:03d}", DTYPES[dtype], flush_bytes) if i in targets else None
        for b in range(len(hidden)):
            handle = None
            if writer is not None:
                room = None if max_tokens is None else max_tokens - counts[i]
                hook = _store_hook(writer, counts, i, keeps[b], positions[b], room)
                handle = getattr(layer, adapter.mlp_attr).register_forward_hook(hook)
            args, kwargs = calls[b][i]
            try:
                hidden[b] = layer(hidden[b], *args, **kwargs)
            finally:
                if handle is not None:
                    handle.remove()
        if writer is not None:
            writer.flush()
        layers[i] = layer.to("meta")  # frees the weights; the next layer is read next
        bar.update(task, advance=1)
    bar.stop()
    return _finish(root, targets, counts, int(model.config.hidden_size), dtype, skip_positions)


def _inputs(batch: Mapping[str, torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    return ids, torch.ones_like(ids) if mask is None else mask.to(device)


def _fresh(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)  # an unfinished capture: start over (cheap compared with training)
    root.mkdir(parents=True)


def _no_tokens(skip_positions: int):
    raise SharpError("the SLW data gave no tokens to capture (empty data, or every sequence shorter than "
                     f"skip_positions={skip_positions}); give more data")


def _finish(root: Path, targets: list[int], counts: dict[int, int], hidden_size: int, dtype: str,
            skip_positions: int) -> ActivationStore:
    meta = {"layers": targets, "hidden_size": hidden_size, "dtype": dtype, "skip_positions": skip_positions,
            "tokens": {str(t): counts[t] for t in targets}}
    write_text_atomic(root / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")  # marks the capture finished
    return ActivationStore(root)


def _store_hook(writer: ShardWriter, counts: dict, layer: int, keep: torch.Tensor, pos: torch.Tensor,
                room: int | None):
    """Forward hook on a target's MLP: store its kept input/output rows (at most `room` more)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        counts[layer] += writer.add(args[0][keep][:room], output[keep][:room], pos[keep][:room])

    return hook


