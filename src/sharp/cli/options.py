"""CLI options that several commands share, defined once so flags, defaults and help never drift apart.

`sharp compress` and `sharp compare` take every field of `sharp.recipes.RecoverySettings` with these options
(`recovery_options` adds them to a command, so both always take the same flags); `settings_from` turns a
command's arguments into the config dataclass.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

MODEL = typer.Argument(..., help="Model folder, .gguf file, alias (smollm2-135m) or hub id.")
ANY_MODEL = typer.Argument(..., help="Model folder, sharp checkpoint, .gguf file, alias or hub id.")
STRATEGY = typer.Option(..., "--strategy", "-s", help="next:A-B, group:K:A-B, map:T=R,... or auto:BUDGET (the "
                        "planner mixes sharing, MLP-drop and block-drop: auto:40% or auto:107.5M).")
RECOVERY = typer.Option("lora:32", "--recovery", "-r", help="lora:R, lora+gate:R, gate, scale, lora+scale:R or "
                        "none (Direct Sharing); ranked forms take ,alpha=A for PEFT's LoRA scaling A/R.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace a non-empty --out; discard an unfinished run with other "
                       "settings in OUT.work (without it, that run is kept: resumed up to SFT when only SFT "
                       "settings changed, else the command is refused).")
TEMPLATE = typer.Option("plain", "--template", help="plain or chat (the model's chat template).")
SEED = typer.Option(0, "--seed", help="Seed of the split, the recovery init and the data order.")

SLW_FRACTION = typer.Option(0.1, "--slw-fraction", help="Share of training examples SLW captures (a random sample).")
SLW_TOKENS = typer.Option(None, "--slw-tokens", help="Per-layer token budget of SLW (default: every token of the "
                          "SLW sample; the summary reports what was used).")
SLW_WORKERS = typer.Option(1, "--slw-workers", help="Target layers trained in parallel processes.")
SLW_BACKEND = typer.Option("local", "--slw-backend", help="local (processes here) or ray (a Ray task per layer).")
RAY_ADDRESS = typer.Option(None, "--ray-address", help="Ray cluster for --slw-backend ray (default: a local one).")
SLW_TASK_GPUS = typer.Option(0.0, "--slw-task-gpus", help="GPUs per Ray SLW task (0: CPU tasks).")
SLW_STEPS = typer.Option(300, "--slw-steps", help="SLW optimizer steps per target layer (at most).")
SLW_LR = typer.Option(1e-2, "--slw-lr", help="SLW peak learning rate (AdamW, warmup + cosine).")
SLW_BATCH_TOKENS = typer.Option(1024, "--slw-batch-tokens", help="Captured tokens per SLW step.")
SLW_PATIENCE = typer.Option(4, "--slw-patience", help="SLW evaluations without improvement before stopping early.")
SLW_SINK_WEIGHT = typer.Option(0.1, "--slw-sink-weight", help="Weight of the attention-sink rows (position 0) in "
                               "SLW's loss and early-stopping score, next to the other tokens' (each a relative "
                               "error).")
SLW_INIT = typer.Option("closed-form", "--slw-init", help="closed-form (every shared projection fitted in closed "
                        "form first; lstsq's fit kept where it scores better), lstsq (the output projection only) "
                        "or zero.")
SLW_INPUTS = typer.Option("original", "--slw-inputs", help="original (layers fitted in parallel on the original "
                          "model's activations) or sequential (in layer order, on the partly shared model's).")
PLAN_ACTIONS = typer.Option("share,drop-mlp,drop-block", "--plan-actions", help="What the planner (--strategy "
                            "auto:BUDGET, analyze --plan) may do per layer: share (with a recovery rank), drop-mlp, "
                            "drop-block.")
PLAN_MIN_SHARED = typer.Option(0.0, "--plan-min-shared", help="Planner: shared MLPs must remove at least this "
                               "share of the removed parameters (0.5: sharing does most of the work).")
PLAN_REACH = typer.Option(1, "--plan-reach", help="Planner: a shared MLP's reference is the nearest earlier layer "
                          "that keeps its own MLP and block, at most this many layers back (1: always the layer "
                          "before; 2-3 let a run of layers share one MLP, or share across a dropped block).")
PLAN_COST = typer.Option("residual", "--plan-cost", help="Planner: how an action is scored: residual (the "
                         "closed-form perturbation of the residual stream at that layer, one pass) or kl (the KL "
                         "divergence of the final next-token distribution with the action applied alone: after "
                         "the residual pass, one forward pass per layer and action, on the first calibration "
                         "sequences holding 1,024 tokens).")
SFT_STEPS = typer.Option(200, "--sft-steps", help="SFT optimizer steps (0: use --epochs).")
LOSS = typer.Option("ce", "--loss", help="SFT / healing loss: ce (labels), kd (distill the original model) or ce+kd.")
KD_TEMPERATURE = typer.Option(1.0, "--kd-temperature", help="Softmax temperature of the kd loss.")
KD_HIDDEN = typer.Option(0.0, "--kd-hidden", help="Weight of a hidden-state term added to --loss kd / ce+kd: the "
                         "residual stream after every layer against the original's (relative squared error per "
                         "token, averaged over layers); 0 = off.")
LR = typer.Option(1e-3, "--lr", help="SFT peak learning rate (AdamW, warmup + cosine).")
SHARED_LR = typer.Option(None, "--shared-lr", help="SFT peak learning rate of the shared reference weights when "
                         "--train ...+shared trains them (default: --lr / 10).")
BATCH_SIZE = typer.Option(4, "--batch-size", help="Examples per micro-batch (SFT, SLW capture, eval).")
GRAD_ACCUM = typer.Option(1, "--grad-accum", help="Micro-batches per SFT optimizer step.")
MAX_LEN = typer.Option(512, "--max-len", help="Tokens per training example (longer ones are cut).")
EVAL_FRACTION = typer.Option(0.1, "--eval-fraction", help="Share of --data held out for evaluation.")
FULL_LORA_RANK = typer.Option(8, "--full-lora-rank", help="LoRA rank on every other linear (--train full-lora).")

DEVICE = typer.Option("auto", "--device", help="Where it runs: auto (a CUDA GPU, else Apple MPS, else the CPU), "
                      "cpu, cuda, cuda:N or mps.")
DTYPE = typer.Option("auto", "--dtype", help="Storage dtype, what the weights are loaded and written as: auto (the "
                     "source's; bf16 for a GGUF), bf16, fp16 or fp32. GPUs compute in it; CPUs compute in fp32 "
                     "(bf16 math is slow on most CPUs); trained tensors are fp32 while they train.")
OUT_DTYPE = typer.Option("auto", "--dtype", help="Dtype of the weights written: auto (the source's; bf16 for a "
                         "GGUF), bf16, fp16 or fp32.")


LEADING_OPTIONS = {"model": MODEL, "strategy": STRATEGY, "recovery": RECOVERY}  # first in --help
RECOVERY_OPTIONS = {  # the other RecoverySettings fields (data and out are the commands' own: their help differs);
    # tests/cli/test_options.py checks the defaults against the dataclass
    "slw_fraction": SLW_FRACTION, "slw_tokens": SLW_TOKENS, "slw_workers": SLW_WORKERS, "slw_backend": SLW_BACKEND,
    "ray_address": RAY_ADDRESS, "slw_task_gpus": SLW_TASK_GPUS, "slw_steps": SLW_STEPS, "slw_lr": SLW_LR,
    "slw_batch_tokens": SLW_BATCH_TOKENS, "slw_patience": SLW_PATIENCE,
    "slw_sink_weight": SLW_SINK_WEIGHT, "slw_init": SLW_INIT, "slw_inputs": SLW_INPUTS,
    "plan_actions": PLAN_ACTIONS, "plan_min_shared": PLAN_MIN_SHARED, "plan_reach": PLAN_REACH,
    "plan_cost": PLAN_COST,
    "sft_steps": SFT_STEPS, "loss": LOSS, "kd_temperature": KD_TEMPERATURE, "kd_hidden": KD_HIDDEN,
    "lr": LR, "shared_lr": SHARED_LR, "batch_size": BATCH_SIZE,
    "grad_accum": GRAD_ACCUM, "max_len": MAX_LEN, "eval_fraction": EVAL_FRACTION, "seed": SEED, "template": TEMPLATE,
    "full_lora_rank": FULL_LORA_RANK, "device": DEVICE, "dtype": DTYPE, "overwrite": OVERWRITE,
}


def recovery_options(command: Callable) -> Callable:
    """Give `command` (which takes `**settings`) the model argument, --strategy and --recovery before its own
    parameters and every option of `RECOVERY_OPTIONS` after them: `sharp compress` and `sharp compare` take the
    same flags. Typer reads a command's parameters from its signature (`__signature__` where set) and calls it with
    keywords, so the added ones arrive in `**settings`."""
    keyword = inspect.Parameter.KEYWORD_ONLY

    def added(options: dict) -> list[inspect.Parameter]:
        return [inspect.Parameter(name, keyword, default=option, annotation=option_type(name, option))
                for name, option in options.items()]

    own = [p.replace(kind=keyword) for p in inspect.signature(command).parameters.values()
           if p.kind is not p.VAR_KEYWORD]
    command.__signature__ = inspect.Signature(added(LEADING_OPTIONS) + own + added(RECOVERY_OPTIONS))
    return command


def option_type(name: str, option: Any) -> type:
    """The type typer parses an option's value as: its default's, or the declared one where the default is None
    (`sharp.recipes` is not imported here: it loads torch, and `sharp --help` must not)."""
    if option.default is None or option.default is ...:
        return OPTIONAL_TYPES[name]
    return type(option.default)


OPTIONAL_TYPES = {"model": str, "strategy": str, "slw_tokens": int, "ray_address": str, "shared_lr": float}


def settings_from(cls: type, arguments: dict[str, Any], **overrides: Any) -> Any:
    """`cls(...)` from a command's `locals()`: every dataclass field found there (Paths as strings), including
    those in its `**settings` (`recovery_options`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    arguments = {**arguments, **arguments.get("settings", {})}
    values = {k: str(v) if isinstance(v, Path) else v for k, v in arguments.items() if k in names}
    return cls(**{**values, **overrides})
