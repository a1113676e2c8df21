"""`prune_model`: what `sharp prune` does, as one call: load → calibrate → prune → (heal) → save.

The data for healing is split and tokenized by the function `sharp compress` uses (`sharp.data.split_tokenized`:
the same held-out split, template and `--max-len`), so a healed baseline and a SHARP model see the same training
examples. Healing keeps its checkpoints in `OUT.work/` (as compress does): the same command after a kill resumes
it; the folder is removed once `OUT` is saved.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from sharp.baselines.budget import Budget, parse_budget
from sharp.baselines.methods import METHODS, PruneReport, prune
from sharp.errors import SharpError, flag_names
from sharp.sharing.state import sharp_config


@dataclass
class PruneOptions:
    """Everything `sharp prune` takes besides the model and the output folder."""

    method: str
    budget: str | None = None
    strategy: str | None = None
    allocation: str = "even"
    data: str | None = None  # calibration (and healing) data spec
    calib_samples: int = 32
    max_len: int = 256
    template: str = "plain"
    heal: bool = False
    lora_rank: int = 8  # rank of the healing LoRA (as compress's --train full-lora)
    eval_fraction: float = 0.1
    seed: int = 0
    sft: dict = field(default_factory=dict)  # SFTConfig fields
    device: str = "auto"  # where calibration and healing run (`sharp.io.device`)
    dtype: str = "auto"  # storage dtype of the pruned model: auto (the source's), bf16, fp16 or fp32

    def validate(self) -> Budget | None:
        """Check every option before a model is loaded; returns the parsed budget."""
        from sharp.data import check_template, parse_data_spec
        from sharp.io.device import resolve_device
        from sharp.io.dtypes import parse_dtype
        from sharp.sharing.strategy import parse_strategy

        resolve_device(self.device)
        parse_dtype(self.dtype)
        check_template(self.template)
        if self.method not in METHODS:
            raise SharpError(f"unknown --method '{self.method}'; choose one of: {', '.join(METHODS)}")
        budget = parse_budget(self.budget) if self.budget else None
        if self.strategy:
            parse_strategy(self.strategy)
        if self.method in ("layer-drop-adapted", "mlp-drop") and not self.strategy:
            raise SharpError(f"--method {self.method} needs --strategy (the SHARP targets, e.g. next:6-29)")
        if self.method in ("layer-drop", "width") and budget is None:
            raise SharpError(f"--method {self.method} needs --budget (40%, 107.5M or match:DIR)")
        if (budget is not None or self.heal) and not self.data:
            raise SharpError("pass --data: pruning to a budget ranks layers/channels on it, and --heal trains on it")
        if self.data:
            parse_data_spec(self.data)
        if self.calib_samples < 1 or self.max_len < 2:
            raise SharpError("--calib-samples must be >= 1 and --max-len >= 2")
        if self.heal:
            from sharp.recovery.sft import SFTConfig

            flags = {"steps": "--steps", "lr": "--lr", "batch_size": "--batch-size", "grad_accum": "--grad-accum"}
            with flag_names(flags):
                SFTConfig(**self.sft)
        return budget


def prune_loaded(model: nn.Module, tokenizer, options: PruneOptions, work_dir: str | Path | None = None
                 ) -> PruneReport:
    """Prune (and heal) an already loaded model in place; healing checkpoints to (and resumes from) `work_dir`
    when given, else a temporary folder."""
    from sharp.baselines.calibration import calibration_examples

    budget = options.validate()
    examples = None
    if budget is not None:
        examples = calibration_examples(options.data, tokenizer, options.calib_samples, options.max_len,
                                        options.template)
    report = prune(model, options.method, budget, examples, options.strategy, options.allocation)
    if options.heal:
        from sharp.baselines.heal import heal
        from sharp.data import pad_id, split_tokenized
        from sharp.recovery.sft import SFTConfig

        train, held = split_tokenized(options.data, tokenizer, options.max_len, options.template,
                                      options.eval_fraction, options.seed)
        pad = pad_id(tokenizer)
        where = {} if work_dir is None else {"work_dir": Path(work_dir) / "heal",
                                             "log_file": Path(work_dir) / "train_log.jsonl"}
        report.heal = heal(model, train, held, SFTConfig(**options.sft), options.lora_rank, pad_id=pad,
                           seed=options.seed, **where)
        report.healed = True
    return report


def prune_model(model_spec: str, out: str | os.PathLike, options: PruneOptions, overwrite: bool = False
                ) -> PruneReport:
    """Load `model_spec`, prune it per `options`, save a pruned model folder to `out`."""
    from sharp.io.atomic import check_output_dir, work_dir_of
    from sharp.io.device import load_on_device
    from sharp.io.dtypes import cast_to
    from sharp.io.lock import output_lock
    from sharp.io.pruned import save_pruned

    check_output_dir(out, overwrite)
    options.validate()
    work = work_dir_of(out)
    with output_lock(work):
        if options.heal:
            settings = {k: v for k, v in asdict(options).items() if k not in ("sft", "device")}  # device: runtime
            _open_work_dir(work, {"MODEL": model_spec, **settings, **options.sft}, overwrite)
        try:
            model, tokenizer, storage = load_on_device(model_spec, options.device, options.dtype)
            if sharp_config(model) is not None:
                raise SharpError(f"'{model_spec}' is a sharp checkpoint; prune the original model instead")
            report = prune_loaded(model, tokenizer, options, work if options.heal else None)
        except BaseException:
            if options.heal and not any((work / "heal").glob("checkpoint-*")):  # nothing to resume: a corrected
                shutil.rmtree(work, ignore_errors=True)  # rerun must not be refused for the settings that failed
            raise
        save_pruned(cast_to(model, storage), out, report, tokenizer, overwrite=overwrite)
        if options.heal or (work / "run.json").is_file():  # a killed heal's folder is stale once OUT exists
            shutil.rmtree(work, ignore_errors=True)
    return report


def _open_work_dir(work: Path, identity: dict, overwrite: bool) -> None:
    """Keep `work` when it holds a heal of these settings (it resumes); refuse one with other settings unless
    `overwrite` (then it starts afresh), and a folder sharp did not make."""
    from sharp.io.atomic import refuse_foreign_work_dir, write_text_atomic

    refuse_foreign_work_dir(work)
    run_file = work / "run.json"
    if work.exists():
        try:
            recorded = json.loads(run_file.read_text()) if run_file.is_file() else identity
        except (OSError, ValueError):
            recorded = None
        if recorded != identity and not overwrite:
            if not isinstance(recorded, dict):
                raise SharpError(f"'{run_file}' is damaged, so the unfinished heal in '{work}' cannot be matched to "
                                 "this command; add --overwrite to discard it")
            changed = [k if k == "MODEL" else "--" + k.replace("_", "-") for k in identity
                       if recorded.get(k) != identity[k]]
            raise SharpError(f"'{work}' holds an unfinished heal with other settings ({', '.join(changed)}); rerun "
                             "with those to resume it, or add --overwrite to discard it")
        if recorded != identity:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_file, json.dumps(identity, indent=2, sort_keys=True) + "\n")
