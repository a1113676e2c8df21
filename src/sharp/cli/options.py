"""CLI options that several commands share, defined once so flags, defaults and help never drift apart.

`sharp compress` and `sharp compare` take every field of `sharp.recipes.RecoverySettings` with these options;
`settings_from` turns a command's arguments into the config dataclass.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer

MODEL = typer.Argument(..., help="Model folder, .gguf file, alias (smollm2-135m) or hub id.")
STRATEGY = typer.Option(..., "--strategy", "-s", help="next:A-B, group:K:A-B or map:T=R,...")
RECOVERY = typer.Option("lora:32", "--recovery", "-r", help="lora:R, scale or lora+scale:R")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace a non-empty --out.")
TEMPLATE = typer.Option("plain", "--template", help="plain or chat (the model's chat template).")
SEED = typer.Option(0, "--seed", help="Seed of the split, the recovery init and the data order.")

SLW_FRACTION = typer.Option(0.1, "--slw-fraction", help="Share of training examples SLW captures.")
SLW_WORKERS = typer.Option(1, "--slw-workers", help="Target layers trained in parallel processes.")
SLW_BACKEND = typer.Option("local", "--slw-backend", help="local (processes here) or ray (a Ray task per layer).")
RAY_ADDRESS = typer.Option(None, "--ray-address", help="Ray cluster for --slw-backend ray (default: a local one).")
SLW_TASK_GPUS = typer.Option(0.0, "--slw-task-gpus", help="GPUs per Ray SLW task (0: CPU tasks).")
SLW_STEPS = typer.Option(300, "--slw-steps", help="SLW optimizer steps per target layer (at most).")
SFT_STEPS = typer.Option(200, "--sft-steps", help="SFT optimizer steps (0: use --epochs).")
LR = typer.Option(2e-4, "--lr", help="SFT peak learning rate (AdamW, warmup + cosine).")
BATCH_SIZE = typer.Option(4, "--batch-size", help="Examples per micro-batch (SFT, SLW capture, eval).")
GRAD_ACCUM = typer.Option(1, "--grad-accum", help="Micro-batches per SFT optimizer step.")
MAX_LEN = typer.Option(512, "--max-len", help="Tokens per training example (longer ones are cut).")
EVAL_FRACTION = typer.Option(0.1, "--eval-fraction", help="Share of --data held out for evaluation.")
FULL_LORA_RANK = typer.Option(8, "--full-lora-rank", help="LoRA rank on every other linear (--train full-lora).")


def settings_from(cls: type, arguments: dict[str, Any], **overrides: Any) -> Any:
    """`cls(...)` from a command's `locals()`: every dataclass field found there (Paths as strings)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: str(v) if isinstance(v, Path) else v for k, v in arguments.items() if k in names}
    return cls(**{**values, **overrides})
