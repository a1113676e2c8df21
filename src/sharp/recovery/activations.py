"""The store of captured MLP activations (`capture.py` writes it): per target layer, sharded on disk.

SLW trains each target's recovery to reproduce what the original target MLP computes on real inputs. A capture
writes, per target layer t,

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
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sharp.errors import SharpError

META = "meta.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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


def keep_mask(attention_mask: torch.Tensor, skip_positions: int) -> torch.Tensor:
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


class ShardWriter:
    """Rows of one layer, appended to shards of about `flush_bytes` (the layout `ActivationStore` reads)."""

    def __init__(self, folder: Path, dtype: torch.dtype, flush_bytes: int) -> None:
        self.folder, self.dtype, self.flush_bytes = folder, dtype, flush_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows: tuple[list, list, list] = ([], [], [])
        self.bytes = self.shard = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, p: torch.Tensor) -> int:
        x, y = x.to("cpu", self.dtype), y.to("cpu", self.dtype)
        for buf, t in zip(self.rows, (x, y, p.cpu()), strict=True):
            buf.append(t)
        self.bytes += 2 * x.numel() * x.element_size()
        if self.bytes >= self.flush_bytes:
            self.flush()
        return x.shape[0]

    def flush(self) -> None:
        xs, ys, ps = self.rows
        if xs:
            save_file({"x": torch.cat(xs).contiguous(), "y": torch.cat(ys).contiguous(),
                       "p": torch.cat(ps).to(torch.int32)}, self.folder / f"shard_{self.shard:05d}.safetensors")
            self.shard += 1
        self.rows = ([], [], [])
        self.bytes = 0



def progress_bar(enabled: bool, unit: str):
    """A capture's rich progress bar, counting `unit`s (tokens, layers)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                    TimeElapsedColumn(), disable=not enabled, transient=False)
