"""Stage 2, supervised fine-tuning: end-to-end next-token loss on the response tokens, transformers `Trainer`.

Only what `mark_trainable` unfroze is trained (the recovery parameters by default), with AdamW, linear warmup then
cosine decay, gradient accumulation, an eval loss every `eval_steps` and a checkpoint every `save_steps`.

Training runs on the model's device (or `device`). The trainable tensors are float32 during training whatever the
model's dtype, and go back to it afterwards; the frozen base weights stay as they are (bf16 on a GPU), with
autocast in the model's 16-bit dtype on CUDA. Why float32 masters: AdamW moves an entry by about the lr per step
(1e-3 by default), often below bf16's resolution (8 bits of mantissa) for the entry's size, so bf16 trainable tensors
lose part of their updates to rounding; float32 copies cost nothing next to the base weights (the recovery is ~1% of
them). Measured on stories260K (`docs/results/dtype_cpu.md`).

Loss (`loss`, over the response tokens): "ce" next-token cross-entropy on the data, or the distillation losses
"kd" and "ce+kd" of `sharp.recovery.distill` (the original model as teacher), optionally with its hidden-state
term (`kd_hidden`).

Checkpoints hold the *trainable* tensors only (`trainable.safetensors`) plus the Trainer's optimizer, scheduler,
RNG and state files. Saving the whole model the Hugging Face way would fail or duplicate data: a shared model
reaches each reference weight under two names. Rerunning `run_sft` with the same `work_dir` resumes from the
newest complete checkpoint and, with the same seed, ends where an uninterrupted run ends (the Trainer restores
the data order, the optimizer and the RNG). A non-finite training loss stops the run before the optimizer step,
so the newest checkpoint on disk stays the last good one.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn
from transformers import (
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)

from sharp.errors import SettingError, SharpError
from sharp.recovery.distill import kd_loss
from sharp.recovery.sft_workdir import (
    STATE,
    JsonlLogCallback,
    drop_incomplete,
    last_checkpoint,
    load_trainable,
    save_trainable,
    step_of,
    truncate_log,
)
from sharp.recovery.trainable import shared_reference_parameters

log = logging.getLogger(__name__)

LOSSES = ("ce", "kd", "ce+kd")


class NonFiniteLossError(SharpError):
    """Training produced a NaN/inf loss; the newest checkpoint is the last good one."""


@dataclass
class SFTConfig:
    """Budget and optimizer settings of the SFT stage."""

    steps: int = 200  # optimizer steps; 0 = train for `epochs` instead
    epochs: float = 1.0  # used only when steps == 0
    lr: float = 1e-3  # peak learning rate (AdamW); the CLI default of compress and prune --heal
    batch_size: int = 4  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup: float = 0.05  # fraction of the steps spent warming up linearly
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_steps: int = 50  # eval loss every N steps (0 = only at the end)
    save_steps: int = 50  # checkpoint every N steps
    logging_steps: int = 10
    save_total_limit: int = 2
    seed: int = 0
    progress: bool = True  # show a progress bar (SFTProgress)
    loss: str = "ce"  # "ce", "kd" or "ce+kd" (see the module docstring); kd needs a teacher
    kd_temperature: float = 1.0
    kd_hidden: float = 0.0  # weight of the hidden-state term of the kd losses (0: logits only)
    shared_lr: float | None = None  # peak lr of trained shared reference weights (None: lr / 10; full weights take
    # smaller steps than adapters, and they serve two layers at once)

    def __post_init__(self) -> None:
        for name in ("steps", "eval_steps"):
            if getattr(self, name) < 0:
                raise SettingError("SFT", name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum", "save_steps", "logging_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise SettingError("SFT", name, f"must be >= 1, got {getattr(self, name)}")
        positive = ("epochs", "lr", "kd_temperature") + (("shared_lr",) if self.shared_lr is not None else ())
        for name in positive:
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise SettingError("SFT", name, f"must be a positive number, got {getattr(self, name)}")
        if not 0 <= self.warmup < 1:
            raise SettingError("SFT", "warmup", f"is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.loss not in LOSSES:
            raise SettingError("SFT", "loss", f"'{self.loss}' is unknown; choose one of: {', '.join(LOSSES)}")
        if not (math.isfinite(self.kd_hidden) and self.kd_hidden >= 0):
            raise SettingError("SFT", "kd_hidden", f"must be a number >= 0, got {self.kd_hidden}")
        if self.kd_hidden and self.loss == "ce":
            raise SharpError("--kd-hidden weighs a term of the distillation loss; use it with --loss kd or ce+kd")


def run_sft(
    model: nn.Module,
    train: Sequence[dict],
    eval_examples: Sequence[dict],
    config: SFTConfig,
    work_dir: str | Path,
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    log_file: str | Path | None = None,
    callbacks: Sequence = (),
    device: torch.device | str | None = None,
    teacher: nn.Module | None = None,
    teacher_layers: dict[int, int] | None = None,
) -> dict:
    """Train `model`'s trainable parameters in place, on `device` (default: where the model is); resume from
    `work_dir` if it holds a checkpoint.

    `train`/`eval_examples` are tokenized examples ({"input_ids", "labels"}, labels -100 off the response);
    `collate` pads a list of them into a batch; `teacher` (frozen, same tokenizer) is needed by the kd losses;
    `teacher_layers` maps the model's layers to the teacher's for `config.kd_hidden` (needed after dropped blocks).
    Returns {"steps", "train_tokens" (non-padding input tokens seen), "trainable" (parameters), "train_loss",
    "eval_loss", "resumed_from"}.
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise RuntimeError("run_sft: nothing is trainable; call mark_trainable(model, 'recovery') first")
    if config.loss != "ce" and teacher is None:
        raise RuntimeError(f"run_sft: loss '{config.loss}' needs the teacher model (teacher=...)")
    if not train:
        raise SharpError("SFT has no training examples; use more data or a smaller --eval-fraction")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    resume = last_checkpoint(work_dir)
    if _is_main_process():  # under torchrun rank 0 owns the work folder (the Trainer saves from it alone too)
        drop_incomplete(work_dir, resume)
        if log_file is not None:
            truncate_log(Path(log_file), step_of(resume))
    if resume is not None:
        log.info("SFT resumes from %s", resume)

    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    autocast = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    args = _OneDeviceArguments(
        sharp_device=str(device),
        output_dir=str(work_dir),
        max_steps=config.steps or -1,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim="adamw_torch",
        eval_strategy="steps" if eval_examples and config.eval_steps else "no",
        eval_steps=config.eval_steps or None,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        seed=config.seed,
        data_seed=config.seed,
        bf16=autocast and dtype == torch.bfloat16,
        fp16=autocast and dtype == torch.float16,
        use_cpu=device.type == "cpu",
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        disable_tqdm=True,  # SFTProgress shows the run instead (see _train)
        include_num_input_tokens_seen="non_padding",  # reported: the training tokens behind a result
    )
    cbs = [JsonlLogCallback(log_file)] if log_file is not None else []
    use_cache = getattr(model.config, "use_cache", None)  # Trainer turns it off; the saved config must not change
    masters = _float32_masters(model)
    try:
        return _train(model, args, train, eval_examples, collate, [*cbs, *callbacks], resume, config, teacher,
                      teacher_layers)
    finally:
        for p, original in masters:
            p.data = p.data.to(original)
        if use_cache is not None:
            model.config.use_cache = use_cache


def _float32_masters(model: nn.Module) -> list[tuple[nn.Parameter, torch.dtype]]:
    """Turn every trainable 16-bit tensor into float32 (see the module docstring); returns what to turn back."""
    changed = []
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            changed.append((p, p.dtype))
            p.data = p.data.float()
    return changed


class SFTProgress(TrainerCallback):
    """One rich progress bar for an SFT run: optimizer steps, the latest training and eval loss, elapsed time."""

    def __init__(self) -> None:
        self.bar = None
        self.losses = {"loss": "-", "eval": "-"}

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.close()  # a Trainer that restarts training (auto_find_batch_size) begins again
        if not state.is_world_process_zero:
            return
        self.bar = Progress(TextColumn("SFT"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]} eval {task.fields[eval]}"), TimeElapsedColumn())
        self.task = self.bar.add_task("sft", total=state.max_steps, completed=state.global_step, **self.losses)
        self.bar.start()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if self.bar is not None and logs:
            for key, name in (("loss", "loss"), ("eval_loss", "eval")):
                if isinstance(logs.get(key), (int, float)):
                    self.losses[name] = f"{logs[key]:.3f}"
            self.bar.update(self.task, **self.losses)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


@dataclass
class _OneDeviceArguments(TrainingArguments):
    """`TrainingArguments` on exactly `sharp_device`. The Trainer alone would take cuda:0 (or MPS) whatever the
    user chose, and wrap the model in DataParallel over every visible GPU."""

    sharp_device: str = "cpu"

    @cached_property  # private: TrainingArguments has no public way to choose the device
    def _setup_devices(self) -> torch.device:
        TrainingArguments._setup_devices.func(self)  # accelerate's state, as the Trainer expects it
        device = torch.device(self.sharp_device)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
            torch.cuda.set_device(device)  # accelerate places the model on the *current* GPU
            self._n_gpu = 1
        return device


def _train(model, args, train, eval_examples, collate, callbacks, resume, config, teacher, teacher_layers) -> dict:
    if teacher is not None and config.loss != "ce":
        teacher.eval().requires_grad_(False)
    shared = [p for p in shared_reference_parameters(model) if p.requires_grad]
    trainer = SharpTrainer(
        slow_params=shared,
        slow_lr=config.shared_lr if config.shared_lr is not None else config.lr / 10,
        loss_kind=config.loss,
        teacher=teacher if config.loss != "ce" else None,
        kd_temperature=config.kd_temperature,
        kd_hidden=config.kd_hidden,
        teacher_layers=teacher_layers,
        model=model,
        args=args,
        train_dataset=list(train),
        eval_dataset=list(eval_examples) or None,
        data_collator=collate,
        callbacks=list(callbacks),
    )
    # The Trainer prints each log as a raw dict (PrinterCallback) or beside tqdm bars (ProgressCallback); the
    # numbers go to train_log.jsonl, and the screen gets one rich bar like SLW's.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    progress = SFTProgress() if config.progress else None
    if progress is not None:
        trainer.add_callback(progress)
    if trainer.is_fsdp_enabled:
        raise SharpError(
            "SFT cannot run under FSDP: FSDP gathers each wrapped layer's weights only around that layer's own "
            "forward, but a SHARP target runs its reference layer's weights; use DeepSpeed ZeRO-3 "
            "(configs/accelerate/zero3-8gpu.yaml) or DDP"
        )
    saved = TrainerState.load_from_json(str(resume / STATE)) if resume is not None else None
    finished = saved is not None and 0 < saved.max_steps <= saved.global_step
    try:
        if finished:  # a rerun after the last checkpoint (`train` would take one more step): load it, train nothing
            trainer._load_from_checkpoint(str(resume))
            trainer.state = saved
        else:
            out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:  # a failed run (a non-finite loss, Ctrl-C) must not leave the live bar drawing
        if progress is not None:
            progress.close()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if evals and evals[-1].get("step") == trainer.state.global_step:
        eval_loss = evals[-1]["eval_loss"]  # the periodic eval already ran at the last step
    else:
        eval_loss = trainer.evaluate()["eval_loss"] if eval_examples else None
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        _leave_zero3(model, trainer.deepspeed or trainer.model_wrapped)
    model.eval()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": trainer.state.global_step,
        "train_tokens": int(trainer.state.num_input_tokens_seen),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),  # each shared tensor once
        "train_loss": losses[-1] if losses else (None if finished else out.training_loss),
        "eval_loss": eval_loss,
        "resumed_from": str(resume) if resume else None,
        "config": asdict(config),
    }


# What DeepSpeed ZeRO-3 sets on each parameter it partitions (deepspeed/runtime/zero/partition_parameters.py)
_ZERO3_METHODS = ("all_gather", "all_gather_coalesced", "partition", "reduce_gradients_at_owner",
                  "partition_gradients", "aligned_size", "padding_size", "partition_numel",
                  "convert_to_zero_parameters", "is_external_param", "nvme_swapper")


def _leave_zero3(model: nn.Module, engine) -> None:
    """Make a model that DeepSpeed ZeRO-3 trained a plain module again, on every rank.

    ZeRO-3 leaves each parameter as this rank's shard (an empty `data`, the values in `ds_tensor`), marked "not
    available", and swaps each module's parameter dict for its own. Everything after SFT that reads or writes
    weights directly then goes wrong: found by running configs/README.md's ZeRO-3 line on a GPU, compress saved
    0-element weights, and with the weights gathered back but still marked "not available", a `--train full-lora`
    merge was undone at the next forward (DeepSpeed's module hooks and parameter dicts gather such a parameter
    from its shard, which holds the unmerged values). So: gather each parameter (one at a time: the model whole
    once, as before training, plus one parameter), remove the engine's hooks, give each parameter its whole data
    and strip DeepSpeed's state from it (a later ZeRO-3 run then partitions it afresh), and put plain parameter
    dicts back. Every rank must hold the whole model, as it did before training (the configs load it whole:
    `zero3_init_flag: false`). Collective: every rank calls this, in the same parameter order."""
    import deepspeed

    params = list(model.parameters())  # a shared weight once (`parameters` skips repeats)
    whole = []
    for p in params:
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            whole.append(p.data.clone())
    if hasattr(engine, "destroy"):  # the DeepSpeed engine: removes its gather / release hooks
        engine.destroy()
    for p, data in zip(params, whole, strict=True):
        p.data = data
        for attr in [a for a in vars(p) if a.startswith(("ds_", "_ds_")) or a in _ZERO3_METHODS]:
            delattr(p, attr)
    for module in model.modules():  # torch's own dict type again
        if type(module._parameters) is not dict:
            module._parameters = dict(module._parameters.items())
        module.__dict__.pop("_original_parameters", None)


class SharpTrainer(Trainer):
    """`Trainer` that checkpoints only trainable tensors, stops on a non-finite loss and can distill."""

    def __init__(self, *args, loss_kind: str = "ce", teacher: nn.Module | None = None, kd_temperature: float = 1.0,
                 kd_hidden: float = 0.0, teacher_layers: dict[int, int] | None = None,
                 slow_params: Sequence[nn.Parameter] = (), slow_lr: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_kind, self.teacher, self.kd_temperature = loss_kind, teacher, kd_temperature
        self.kd_hidden, self.teacher_layers = kd_hidden, teacher_layers
        self.slow_params, self.slow_lr = list(slow_params), slow_lr
        if loss_kind != "ce":
            self.loss_is_scaled_for_ga = True  # compute_loss divides by the tokens of the whole accumulated batch

    def create_optimizer(self, model=None):
        """AdamW as the Trainer builds it, with `slow_params` (trained shared weights) in a group of their own at
        `slow_lr`; the scheduler scales both groups alike."""
        if self.optimizer is None and self.slow_params:
            slow = {id(p) for p in self.slow_params}
            params = [p for p in self.model.parameters() if p.requires_grad]
            groups = [{"params": [p for p in params if id(p) not in slow], "lr": self.args.learning_rate},
                      {"params": [p for p in params if id(p) in slow], "lr": self.slow_lr}]
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate, weight_decay=self.args.weight_decay,
                                               betas=(self.args.adam_beta1, self.args.adam_beta2),
                                               eps=self.args.adam_epsilon)
        return super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_kind == "ce":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = kd_loss(model, self.teacher, inputs, self.loss_kind, self.kd_temperature, num_items_in_batch,
                                self.kd_hidden, self.teacher_layers)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            good = last_checkpoint(self.args.output_dir)
            where = f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"SFT loss became {loss.item()} at step {self.state.global_step + 1}; training stopped and "
                f"{where}; lower --lr or check the data"
            )
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the trainable tensors alone (`save_trainable`) from the main process; every rank calls this."""
        gathered = None
        if self.is_deepspeed_enabled:  # ZeRO-3: `self.model` holds this rank's shards; the gather needs every rank
            try:
                gathered = self.accelerator.get_state_dict(self.deepspeed)
            except ValueError as e:  # accelerate's refusal to gather
                raise SharpError("SFT checkpoints under DeepSpeed ZeRO-3 need stage3_gather_16bit_weights_on_model_save"
                                 ": true in the DeepSpeed config (configs/deepspeed/zero3.json has it)") from e
        if not self.args.should_save:
            return
        save_trainable(self.model, output_dir or self.args.output_dir, gathered)

    # private: Trainer.train calls it on resume before any callback, and it accepts only Hugging Face weight files
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_trainable(model or self.model, resume_from_checkpoint)


def _is_main_process() -> bool:
    """Rank 0 of a `torchrun` / `accelerate launch` run, or a single process (the launcher sets RANK)."""
    return int(os.environ.get("RANK", "0")) == 0
