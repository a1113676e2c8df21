"""The work folder of an SFT run: its checkpoints (the trainable tensors alone, `TRAINABLE`, next to the Trainer's
optimizer, scheduler, RNG and state files), the newest complete one to resume from, and the JSON-lines log that a
resumed run rewinds to its checkpoint's step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from sharp.errors import SharpError
from sharp.io.atomic import append_json_line

TRAINABLE = "trainable.safetensors"
STATE = "trainer_state.json"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors being trained, by (deduplicated) parameter name."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def last_checkpoint(work_dir: str | Path) -> Path | None:
    """The newest *complete* Trainer checkpoint (its state file, written last, parses)."""
    complete = []
    for d in Path(work_dir).glob("checkpoint-*"):
        try:
            step = int(d.name.rpartition("-")[2])
            json.loads((d / STATE).read_text())
        except (ValueError, OSError):
            continue
        if (d / TRAINABLE).is_file():
            complete.append((step, d))
    return max(complete)[1] if complete else None


def save_trainable(model: nn.Module, folder: str | Path, gathered: dict[str, torch.Tensor] | None = None) -> None:
    """Write `model`'s trainable tensors to `folder`/TRAINABLE, taking their values from `gathered` when given
    (DeepSpeed ZeRO-3's gathered state dict: the model itself then holds only this rank's shards)."""
    tensors = trainable_state(model)
    if gathered is not None:
        missing = sorted(set(tensors) - set(gathered))
        if missing:
            raise RuntimeError(f"the gathered state dict lacks trainable tensor {missing[0]}")
        tensors = {n: gathered[n].detach().cpu().contiguous() for n in tensors}
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file(tensors, Path(folder) / TRAINABLE, metadata={"format": "pt"})


def load_trainable(model: nn.Module, checkpoint: str | Path) -> None:
    """Copy a checkpoint's trainable tensors into `model`, which must train exactly those parameters."""
    saved = load_file(Path(checkpoint) / TRAINABLE)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        raise SharpError(
            f"checkpoint {checkpoint} was made with other trainable parameters; rerun with the "
            "same flags or delete the work folder to start over"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


class JsonlLogCallback(TrainerCallback):
    """Append every Trainer log (loss, lr, grad norm, eval loss) as one JSON line tagged `stage: sft`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if not logs:
            return
        row = {"stage": "sft", "step": state.global_step, **{k: _plain(v) for k, v in logs.items()}}
        append_json_line(self.path, row)


def _plain(v):
    return v.item() if isinstance(v, torch.Tensor) else v


def step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.rpartition("-")[2]) if checkpoint else 0


def drop_incomplete(work_dir: Path, keep: Path | None) -> None:
    """Remove checkpoint folders newer than `keep` (a run killed while writing them)."""
    for d in work_dir.glob("checkpoint-*"):
        try:
            newer = int(d.name.rpartition("-")[2]) > step_of(keep)
        except ValueError:
            continue
        if newer:
            shutil.rmtree(d, ignore_errors=True)


def truncate_log(path: Path, step: int) -> None:
    """Forget SFT log lines past `step`: the resumed run logs those steps again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the crash
        if row.get("stage") != "sft" or row.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(k + "\n" for k in kept))
