"""Settings of single-layer warmup (`SLWConfig`); what each choice means is in `slw.py`'s docstring."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

from sharp.errors import SettingError, SharpError
from sharp.recovery.activations import DTYPES

LOSSES = ("relative", "token")
INITS = ("closed-form", "lstsq", "zero")
INPUTS = ("original", "sequential")
BACKENDS = ("local", "ray")


@dataclass
class SLWConfig:
    """Budget and optimizer of single-layer warmup (all per target layer unless said otherwise)."""

    steps: int = 300  # optimizer steps per layer (upper bound: early stopping may end sooner)
    lr: float = 1e-2  # peak AdamW lr; on SmolLM2 layer 19, 150 steps: 2e-3 -> rel-err 0.76, 5e-3 0.71, 1e-2 0.69
    batch_tokens: int = 1024  # captured tokens per step (sampled with replacement)
    warmup_steps: int = 10  # linear warmup, then cosine decay to lr * min_lr_ratio at `steps`
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    loss: str = "relative"  # see module docstring
    init: str = "closed-form"  # see module docstring
    inputs: str = "original"  # see module docstring
    damping: float = 1e-4  # ridge of the closed-form fit, relative to the mean input energy
    fit_iters: int = 6  # alternations of the gate and low-rank steps of the closed-form fit
    eval_every: int = 25  # steps between held-out evaluations (early stopping looks at these)
    patience: int = 4  # evaluations without a relative improvement > min_delta before stopping
    min_delta: float = 1e-3
    eval_tokens: int = 2048  # captured tokens held out per layer, drawn at random (at most a fifth of the rows)
    checkpoint_every: int = 50  # steps between saved states (resumption granularity)
    seed: int = 0
    workers: int = 1  # parallel layer trainers (processes); 1 trains in this process
    threads: int | None = None  # total torch threads across workers (default: the CPUs we may use)
    max_tokens: int | None = None  # per-layer token budget of the capture (None: every token of the SLW data)
    skip_positions: int = 0  # drop the first positions of each sequence entirely (not recommended, see sink_*)
    sink_positions: int = 1  # rows at positions < this (attention-sink tokens) are fitted as a separate group
    sink_weight: float = 0.1  # weight of the sink group's relative loss next to the other tokens' (see slw.py)
    sink_batch: int = 32  # sink rows per step
    dtype: str = "float16"  # stored activations (float16/bfloat16 halve the disk of float32)
    keep_activations: bool = False  # keep the captured shards once every layer is trained
    device: str | None = None  # where the fits run (None: where the shared model is); see the module docstring
    backend: str = "local"  # "local": this process or `workers` processes; "ray": one Ray task per layer
    ray_address: str | None = None  # Ray cluster to join ("auto", "ray://host:10001"); None: a local instance
    task_gpus: float = 0  # GPUs per Ray task (0: CPU tasks with threads = CPUs / workers)

    def __post_init__(self) -> None:
        positive = ("steps", "batch_tokens", "eval_every", "eval_tokens", "checkpoint_every", "workers", "patience",
                    "fit_iters")
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingError("SLW", name, f"must be at least 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise SettingError("SLW", "lr", f"must be positive (got {self.lr})")
        if not self.damping > 0:
            raise SettingError("SLW", "damping", f"must be positive (got {self.damping})")
        for name, choices in (("loss", LOSSES), ("init", INITS), ("inputs", INPUTS), ("dtype", DTYPES),
                              ("backend", BACKENDS)):
            if getattr(self, name) not in choices:
                raise SettingError("SLW", name, f"'{getattr(self, name)}' is unknown; choose one of: "
                                   f"{', '.join(choices)}")
        if not (math.isfinite(self.sink_weight) and self.sink_weight >= 0):
            raise SettingError("SLW", "sink_weight", f"must be a finite number >= 0 (got {self.sink_weight})")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise SettingError("SLW", "max_tokens", f"must be at least 2 (got {self.max_tokens})")
        if self.task_gpus < 0:
            raise SettingError("SLW", "task_gpus", f"must be >= 0 (got {self.task_gpus})")

    @classmethod
    def from_dict(cls, d: Mapping) -> SLWConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise SharpError(f"unknown SLW setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)
