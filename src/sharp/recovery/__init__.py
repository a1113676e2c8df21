"""Recovery training: single-layer warmup (`slw`, with its closed-form init) and supervised fine-tuning (`sft`)."""

from __future__ import annotations

from sharp.recovery.activations import ActivationStore
from sharp.recovery.capture import capture_activations
from sharp.recovery.slw import SLWConfig, run_slw, target_mlps, train_slw

__all__ = ["ActivationStore", "SLWConfig", "capture_activations", "run_slw", "target_mlps", "train_slw"]
