"""Capture the original model's MLP inputs and outputs at the target layers, sharded on disk.

SLW trains each target's recovery to reproduce what the original target MLP computes on real inputs. One
forward pass of the original model with hooks writes, per target layer t,

    x_t: the MLP input (the post-norm hidden state), (N, hidden)
    y_t: the original MLP output,                    (N, hidden)

plus each row's position in its sequence (`p`), for every kept token (padding and the first `skip_positions`
positions of each sequence are dropped). Position 0 is kept by default: in many models (SmolLM2's layer 11)
the MLP writes a massive "attention sink" activation there, which the shared layer must reproduce, so the
trainer fits those rows as their own group rather than letting them dominate, or vanish from, the loss.
Rows are buffered for all layers up to `flush_bytes` and then appended as one safetensors shard per layer,
so RAM holds at most one batch plus that buffer, never all layers' activations. The store is complete once
`meta.json` exists; a capture interrupted before that is redone from scratch.

Layout of `<dir>`:  meta.json, layer_007/shard_00000.safetensors, layer_007/shard_00001.safetensors, ...
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sharp.arch import get_adapter
from sharp.errors import SharpError
from sharp.io.atomic import write_text_atomic

META = "meta.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class _StopForward(Exception):
    """Raised by the last target's hook: later layers and the LM head are not needed."""


class ActivationStore:
    """Read side of a capture: per-layer (x, y) rows, streamed shard by shard or loaded for one layer."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta_path = self.root / META
        if not meta_path.is_file():
            raise SharpError(f"'{self.root}' holds no finished activation capture (no {META}); capture again")
        self.meta = json.loads(meta_path.read_text())
        self.layers: list[int] = [int(t) for t in self.meta["layers"]]
        self.hidden_size: int = int(self.meta["hidden_size"])

    @staticmethod
    def is_complete(root: str | Path) -> bool:
        return (Path(root) / META).is_file()

    def num_tokens(self, layer: int) -> int:
        return int(self.meta["tokens"][str(layer)])

    def layer_dir(self, layer: int) -> Path:
        return self.root / f"layer_{layer:03d}"

    def shards(self, layer: int) -> list[Path]:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not captured (captured: {self.layers})")
        return sorted(self.layer_dir(layer).glob("shard_*.safetensors"))

    def iter_chunks(self, layer: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) of one layer, one shard at a time, in capture order (stored dtype)."""
        for shard in self.shards(layer):
            with safe_open(shard, framework="pt") as f:
                yield f.get_tensor("x"), f.get_tensor("y")

    def load(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All rows of one layer: (x, y), each (N, hidden) in the stored dtype."""
        xs, ys = zip(*self.iter_chunks(layer), strict=True)
        return torch.cat(xs), torch.cat(ys)

    def positions(self, layer: int) -> torch.Tensor:
        """(N,) position in its sequence of every row of one layer."""
        out = []
        for shard in self.shards(layer):
            with safe_open(shard, framework="pt") as f:
                n = f.get_slice("x").get_shape()[0]
                out.append(f.get_tensor("p") if "p" in f.keys() else torch.full((n,), -1))
        return torch.cat(out).long()


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (saves the vocab projection, the largest matmul of small models)."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if isinstance(decoder, nn.Module) else model


def _keep_mask(attention_mask: torch.Tensor, skip_positions: int) -> torch.Tensor:
    """(B, T) bool: real tokens at position >= skip_positions (positions counted per sequence, so left
    padding is handled)."""
    mask = attention_mask.bool()
    positions = attention_mask.long().cumsum(-1) - 1
    return mask & (positions >= skip_positions)


def finished_capture(root: Path, dtype: str, targets: list[int]) -> ActivationStore | None:
    """The finished capture in `root` (a resumed run reuses it), else None once the settings are checked."""
    if ActivationStore.is_complete(root):
        return ActivationStore(root)
    if dtype not in DTYPES:
        raise SharpError(f"unknown activation dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
    if not targets:
        raise SharpError("no target layers to capture; the sharing strategy selects none")
    return None


@torch.no_grad()
def capture_activations(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    targets: list[int],
    work_dir: str | Path,
    max_tokens: int | None = None,
    skip_positions: int = 0,
    dtype: str = "float16",
    flush_bytes: int = 64 << 20,
    progress: bool = True,
    outputs: Mapping[int, nn.Module] | None = None,
) -> ActivationStore:
    """One forward pass of `model` over `batches`, storing each target MLP's input and output.

    `batches` yields dicts with `input_ids` (B, T) and optionally `attention_mask` (B, T); other keys (labels,
    ...) are ignored. Stops once `max_tokens` kept tokens are stored per layer. `outputs` maps a target to the
    module whose output on the captured input is stored instead of the model's own MLP output (sequential SLW:
    the shared model's inputs, the original MLP's outputs). Returns the finished store; if `work_dir` already
    holds a finished capture it is reused as is (resumption).
    """
    root = Path(work_dir)
    if (finished := finished_capture(root, dtype, targets)) is not None:
        return finished
    if root.exists():
        shutil.rmtree(root)  # an unfinished capture: start over (cheap compared with training)
    root.mkdir(parents=True)
    store_dtype = DTYPES[dtype]
    adapter = get_adapter(model)
    targets = sorted(set(targets))
    device = next(model.parameters()).device
    buffers: dict[int, tuple[list[torch.Tensor], ...]] = {t: ([], [], []) for t in targets}
    counts = dict.fromkeys(targets, 0)
    shard_ids = dict.fromkeys(targets, 0)
    state: dict[str, torch.Tensor | int] = {"keep": None, "buffered": 0}

    def flush() -> None:
        for t, (xs, ys, ps) in buffers.items():
            if xs:
                d = root / f"layer_{t:03d}"
                d.mkdir(exist_ok=True)
                save_file({"x": torch.cat(xs).contiguous(), "y": torch.cat(ys).contiguous(),
                           "p": torch.cat(ps).to(torch.int32)},
                          d / f"shard_{shard_ids[t]:05d}.safetensors")
                shard_ids[t] += 1
                xs.clear()
                ys.clear()
                ps.clear()
        state["buffered"] = 0

    def make_hook(t: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            keep = state["keep"]
            room = None if max_tokens is None else max_tokens - counts[t]
            if outputs is not None and t in outputs:
                output = outputs[t](args[0])
            x = args[0][keep][:room].to("cpu", store_dtype)  # (n, hidden)
            y = output[keep][:room].to("cpu", store_dtype)
            buffers[t][0].append(x)
            buffers[t][1].append(y)
            buffers[t][2].append(state["pos"][keep][:room].cpu())
            counts[t] += x.shape[0]
            state["buffered"] += 2 * x.numel() * x.element_size()
            if t == targets[-1]:
                raise _StopForward

        return hook

    handles = [adapter.mlp(model, t).register_forward_hook(make_hook(t)) for t in targets]
    decoder = _decoder(model)
    was_training = model.training
    model.eval()
    bar = _progress_bar(progress, max_tokens)
    try:
        with bar:
            task = bar.add_task("SLW capture", total=max_tokens)
            for batch in batches:
                input_ids = batch["input_ids"].to(device)
                attention_mask = batch.get("attention_mask")
                attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
                state["keep"] = _keep_mask(attention_mask, skip_positions)
                state["pos"] = attention_mask.long().cumsum(-1) - 1  # (B, T)
                before = counts[targets[0]]
                try:
                    decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                except _StopForward:
                    pass
                bar.update(task, advance=counts[targets[0]] - before)
                if state["buffered"] >= flush_bytes:
                    flush()
                if max_tokens is not None and counts[targets[0]] >= max_tokens:
                    break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    flush()
    if counts[targets[0]] == 0:
        shutil.rmtree(root)
        raise SharpError("the SLW data gave no tokens to capture (empty data, or every sequence shorter than "
                         f"skip_positions={skip_positions}); give more data")
    meta = {
        "layers": targets,
        "hidden_size": _hidden(model),
        "dtype": dtype,
        "skip_positions": skip_positions,
        "tokens": {str(t): counts[t] for t in targets},
    }
    write_text_atomic(root / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")  # marks the capture finished
    return ActivationStore(root)


def _hidden(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def _progress_bar(enabled: bool, total: int | None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                    TimeElapsedColumn(), disable=not enabled, transient=False)
