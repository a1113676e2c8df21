"""What every recipe shares: the settings of a run and how its stages are measured.

`CompressConfig` holds every setting of `sharp compress` and checks them all (`validate`) before any weight
is read; `StageMeter` times each stage and measures its peak resident memory; `prepare_work_dir` keeps the
work folder of a run only while its settings stay the same.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from sharp.errors import SharpError, flag_names
from sharp.io.atomic import refuse_foreign_work_dir, work_dir_of, write_text_atomic

STAGES = ("slw", "sft")
# {SLWConfig / SFTConfig field: the setting (and flag) of compress that sets it}
SLW_FLAGS = {"steps": "slw_steps", "lr": "slw_lr", "batch_tokens": "slw_batch_tokens", "patience": "slw_patience",
             "sink_weight": "slw_sink_weight", "init": "slw_init", "inputs": "slw_inputs", "max_tokens": "slw_tokens",
             "workers": "slw_workers", "seed": "seed", "backend": "slw_backend", "ray_address": "ray_address",
             "task_gpus": "slw_task_gpus"}
SFT_FLAGS = {"steps": "sft_steps", "epochs": "epochs", "lr": "lr", "batch_size": "batch_size",
             "grad_accum": "grad_accum", "eval_steps": "eval_steps", "save_steps": "save_steps", "seed": "seed",
             "loss": "loss", "kd_temperature": "kd_temperature", "kd_hidden": "kd_hidden", "shared_lr": "shared_lr"}


def as_flag(setting: str) -> str:
    return "--" + setting.replace("_", "-")


# settings that do not change the result, so a resumed run may differ in them (Ray reproduces the local SLW
# bit for bit: tests/recovery/test_slw_ray.py)
RUNTIME_ONLY = ("overwrite", "out", "device", "slw_backend", "ray_address", "slw_task_gpus")


@dataclass(kw_only=True)
class RecoverySettings:
    """What `sharp compress` and `sharp compare` share (the CLI flags, one to one): the model, the sharing and
    recovery to train, and the SLW/SFT budget. Compare passes these unchanged to compress and to the healing."""

    model: str
    strategy: str
    recovery: str
    data: str
    out: str
    slw_fraction: float = 0.1  # fraction of the training examples (a random sample) whose activations SLW captures
    slw_tokens: int | None = None  # per-layer token budget of SLW (None: every token of that sample)
    slw_workers: int = 1
    slw_backend: str = "local"  # "local" (processes on this machine) or "ray" (a Ray task per target layer)
    ray_address: str | None = None  # Ray cluster for --slw-backend ray; None: a local Ray instance
    slw_task_gpus: float = 0  # GPUs per Ray task (0: CPU tasks)
    slw_steps: int = 300  # per target layer (early stopping may end sooner)
    slw_lr: float = 1e-2
    slw_batch_tokens: int = 1024
    slw_patience: int = 4
    slw_sink_weight: float = 0.1  # weight of the attention-sink rows' relative loss next to the other tokens'
    slw_init: str = "closed-form"  # closed-form | lstsq | zero (see sharp.recovery.slw)
    slw_inputs: str = "original"  # original | sequential
    plan_actions: str = "share,drop-mlp,drop-block"  # what --strategy auto:BUDGET may choose per layer
    plan_min_shared: float = 0.0  # auto: shared MLPs remove at least this share of the removed parameters
    plan_reach: int = 1  # auto: a shared MLP's reference may be up to this many layers back (1: the layer before)
    plan_cost: str = "residual"  # auto: how the planner scores an action (residual | kl: end to end, slower)
    sft_steps: int = 200  # optimizer steps; 0 = `epochs` instead
    loss: str = "ce"  # SFT (and healing) loss: ce | kd | ce+kd
    kd_temperature: float = 1.0
    kd_hidden: float = 0.0  # weight of the kd losses' hidden-state term (after every layer; 0: logits only)
    lr: float = 1e-3
    shared_lr: float | None = None  # lr of trained shared reference weights (--train ...+shared); None: lr / 10
    batch_size: int = 4
    grad_accum: int = 1
    max_len: int = 512
    eval_fraction: float = 0.1
    seed: int = 0
    template: str = "plain"
    full_lora_rank: int = 8
    device: str = "auto"  # where it runs: auto, cpu, cuda, cuda:N or mps (`sharp.io.device`)
    dtype: str = "auto"  # storage dtype of the checkpoint: auto (the source's), bf16, fp16 or fp32
    overwrite: bool = False

    @property
    def work_dir(self) -> Path:
        return work_dir_of(self.out)

    def slw_config(self):
        from sharp.recovery.slw_config import SLWConfig

        return SLWConfig(**{field: getattr(self, flag) for field, flag in SLW_FLAGS.items()})


@dataclass(kw_only=True)
class CompressConfig(RecoverySettings):
    """Settings of `sharp compress` (the CLI flags, one to one)."""

    eval_data: str | None = None  # held-out data; default: --eval-fraction of --data
    stages: str = "slw,sft"  # "slw,sft", "slw", "sft" or "none" (Direct Sharing)
    epochs: float = 1.0
    train: str = "recovery"  # recovery | full-lora | recovery+shared | full-lora+shared (sharp.recovery.trainable)
    eval_steps: int = 50
    save_steps: int = 50

    @property
    def stage_list(self) -> list[str]:
        return [] if self.stages.strip() == "none" else [s.strip() for s in self.stages.split(",")]

    def sft_config(self, progress: bool = True):
        from sharp.recovery.sft import SFTConfig

        return SFTConfig(**{field: getattr(self, flag) for field, flag in SFT_FLAGS.items()}, progress=progress)

    def validate(self) -> None:
        """Every check that needs no weights: one `SharpError` line on the first problem."""
        from sharp.data import check_chat_template, parse_data_spec
        from sharp.io.atomic import check_output_dir
        from sharp.io.models import load_tokenizer, refuse_sharp_checkpoint

        self.check_flags()
        specs = [parse_data_spec(d) for d in (self.data, self.eval_data) if d]
        check_output_dir(self.out, self.overwrite)
        check_work_dir(self.work_dir, asdict(self), self.overwrite)
        refuse_sharp_checkpoint(self.model, "compress")
        _validate_model(self.model, self.strategy, self.recovery, self.max_len)
        check_chat_template(self.template, specs, lambda: load_tokenizer(self.model))

    def check_flags(self) -> None:
        """The checks of `validate` that need neither the model, the data nor the output folder (`sharp plan`
        runs them too, so it refuses what compress would)."""
        from sharp.data import check_template
        from sharp.io.device import resolve_device
        from sharp.io.dtypes import parse_dtype
        from sharp.recovery.planner import check_plan_settings
        from sharp.recovery.trainable import TRAIN_CHOICES

        stages = self.stage_list
        if not stages and self.stages.strip() != "none" or any(s not in STAGES for s in stages) \
                or len(set(stages)) != len(stages):
            raise SharpError(f"--stages '{self.stages}' is not valid; use slw,sft, slw, sft or none")
        if stages and self.recovery.strip() == "none":
            raise SharpError("--recovery none has nothing to train; pick e.g. lora:32 or use --stages none")
        if self.train not in TRAIN_CHOICES or self.train == "none":
            raise SharpError(f"unknown --train '{self.train}'; choose one of: {', '.join(TRAIN_CHOICES[:-1])}")
        check_template(self.template)
        if not 0 < self.slw_fraction <= 1:
            raise SharpError(f"--slw-fraction must be in (0, 1], got {self.slw_fraction}")
        low = 0.0 if self.eval_data else 1e-9
        if not low <= self.eval_fraction < 1:
            raise SharpError(f"--eval-fraction must be in (0, 1) (or 0 with --eval-data), got {self.eval_fraction}")
        if self.full_lora_rank < 1:
            raise SharpError(f"--full-lora-rank must be at least 1, got {self.full_lora_rank}")
        check_plan_settings(self.plan_actions, self.plan_min_shared, self.plan_reach, self.plan_cost)
        resolve_device(self.device)
        parse_dtype(self.dtype)
        with flag_names({field: as_flag(flag) for field, flag in SLW_FLAGS.items()}):
            self.slw_config()
        with flag_names({field: as_flag(flag) for field, flag in SFT_FLAGS.items()}):
            self.sft_config()


def _validate_model(model: str, strategy: str, recovery: str, max_len: int) -> None:
    """Strategy, recovery ranks and --max-len against the model's config, on an empty (meta) model."""
    import torch
    from transformers import AutoModelForCausalLM

    from sharp.arch import get_adapter, num_layers
    from sharp.io.models import check_max_len, load_config
    from sharp.sharing.build import share
    from sharp.sharing.recovery import parse_recovery
    from sharp.sharing.strategy import parse_strategy

    strat, rec = parse_strategy(strategy), parse_recovery(recovery)
    config = load_config(model)
    get_adapter(config)
    check_max_len(config, max_len)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    if strat.kind == "auto":
        from sharp.recovery.planner import removal_needed

        if not rec.rank:
            raise SharpError(f"--strategy {strategy} allocates recovery ranks; pick a ranked --recovery such as "
                             "lora+gate:64")
        removal_needed(skeleton, strat.budget)
        return
    strat.resolve(num_layers(config))
    share(skeleton, strat, rec)


def run_identity(settings: dict) -> dict:
    """The settings that make a run what it is (`RUNTIME_ONLY` left out). Also applied to settings recorded by
    older versions, which kept some runtime-only ones and predate settings that had one fixed value then."""
    return {k: v for k, v in {**SETTINGS_BEFORE_THEIR_FLAG, **settings}.items() if k not in RUNTIME_ONLY}


# what runs recorded before a setting existed used
SETTINGS_BEFORE_THEIR_FLAG = {"slw_sink_weight": 1.0, "plan_reach": 1, "plan_cost": "residual", "kd_hidden": 0.0}


# what only SFT (and the evaluation after it) depends on: a rerun that changes only these keeps the stages before
# SFT (the plan, SLW's layers, the evaluations so far) and starts SFT over. (`loss` too: SLW fits to the same
# original weights whether the run distills, from memory, or not, from the folder rounded alike: `compress._original`.)
SFT_ONLY = frozenset({"sft_steps", "epochs", "lr", "shared_lr", "grad_accum", "loss", "kd_temperature", "kd_hidden",
                      "train", "full_lora_rank", "eval_steps", "save_steps"})


def check_work_dir(work: Path, settings: dict | None = None, overwrite: bool = False) -> None:
    """Refuse an `OUT.work` that sharp did not make (no run.json, not empty), and, given this run's `settings`, one
    holding an unfinished run with other settings (beyond SFT's) unless `overwrite`: starting over would discard
    its work."""
    refuse_foreign_work_dir(work)
    if settings is None or overwrite:
        return
    if (recorded := _recorded_settings(work)) is None:
        raise SharpError(f"'{work}' holds a run whose run.json cannot be read, so it cannot be resumed; add "
                         "--overwrite to discard it and start over")
    changed = _changed(recorded, run_identity(settings))
    if not changed.keys() <= SFT_ONLY:
        raise SharpError(f"'{work}' holds an unfinished run with other settings ({changed_text(changed)}); rerun "
                         "with those to resume it, or add --overwrite to discard it")


def _recorded_settings(work: Path) -> dict | None:
    """The settings recorded in `work`/run.json ({} when there is none), None when it cannot be read."""
    run_file = work / "run.json"
    if not run_file.is_file():
        return {}
    try:
        return run_identity(json.loads(run_file.read_text()))
    except (OSError, ValueError, TypeError):  # ValueError: bad JSON, bytes that are not UTF-8
        return None


def _changed(recorded: dict, settings: dict) -> dict[str, tuple]:
    """{setting: (recorded value, new value)} where they differ (nothing when no run is recorded)."""
    if not recorded:
        return {}
    return {k: (recorded.get(k), settings.get(k)) for k in sorted(recorded.keys() | settings.keys())
            if recorded.get(k) != settings.get(k)}


def changed_text(changed: dict[str, tuple]) -> str:
    parts = [f"{'MODEL' if k == 'model' else as_flag(k)} {old} -> {new}" for k, (old, new) in changed.items()]
    return ", ".join(parts[:3]) + (f" and {len(parts) - 3} more" if len(parts) > 3 else "")


def prepare_work_dir(cfg: CompressConfig) -> Path:
    """`OUT.work/`, kept from an earlier run with the same settings (to resume); when only SFT settings changed,
    kept up to SFT (`restart_sft`) unless --overwrite; else started afresh (`validate` refuses to discard an
    unfinished run with other settings without --overwrite)."""
    work = cfg.work_dir
    check_work_dir(work)
    settings = run_identity(asdict(cfg))
    run_file = work / "run.json"
    if work.exists():
        recorded = _recorded_settings(work)
        changed = _changed(recorded, settings) if recorded else None
        if changed == {} or (changed and changed.keys() <= SFT_ONLY and not cfg.overwrite):
            if changed:
                restart_sft(work)
                warnings.warn(f"'{work}': only SFT settings changed ({changed_text(changed)}); keeping the stages "
                              "before SFT, SFT starts over", stacklevel=2)
                write_text_atomic(run_file, json.dumps(settings, indent=2, sort_keys=True) + "\n")
            return work
        if run_file.is_file():
            warnings.warn(f"'{work}' holds a run with other settings; starting over", stacklevel=2)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    write_text_atomic(run_file, json.dumps(settings, indent=2, sort_keys=True) + "\n")  # other ranks read it
    return work


def restart_sft(work: Path) -> None:
    """Forget a work folder's SFT: its checkpoints, its evaluation, its timing and its log lines. What came before
    (the plan, SLW's layers, the other evaluations) stays and is resumed."""
    shutil.rmtree(work / "sft", ignore_errors=True)
    log = work / "train_log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    rows = [_row(line) for line in lines]
    sft_eval = sum(r.get("seconds", 0.0) for r in rows if r.get("stage") == "eval" and r.get("model") == "sft")
    for name, key in (("evals.json", "sft"), ("stages.json", "sft")):
        if (path := work / name).is_file():
            saved = json.loads(path.read_text())
            saved.pop(key, None)
            if name == "stages.json" and "eval" in saved:  # the evaluations' time adds up over the stages
                saved["eval"]["seconds"] = max(0.0, saved["eval"]["seconds"] - sft_eval)
            write_text_atomic(path, json.dumps(saved, indent=2, sort_keys=True))
    if lines:
        write_text_atomic(log, "".join(line + "\n" for line, row in zip(lines, rows, strict=True)
                                       if not _is_sft_row(row)))


def _row(line: str) -> dict:
    """A log line's record ({} for one that a kill cut off)."""
    try:
        row = json.loads(line)
    except ValueError:
        return {}
    return row if isinstance(row, dict) else {}


def _is_sft_row(row: dict) -> bool:
    """An SFT log record (its training or its evaluation), or an empty one: a line a kill cut off (dropped too, as
    `sft_workdir.truncate_log` does)."""
    return not row or row.get("stage") == "sft" or (row.get("stage") == "eval" and row.get("model") == "sft")


class StageMeter:
    """Wall time and peak RSS of each stage, persisted so a resumed run reports the finished stages' numbers."""

    def __init__(self, path: Path, write: bool = True) -> None:
        self.path = path
        self.write = write  # False on the ranks of a distributed run other than 0 (rank 0 writes the file)
        self.stages: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}

    def done(self, name: str) -> bool:
        return name in self.stages

    def logged(self, name: str) -> bool:
        return self.stages.get(name, {}).get("logged", False)

    def mark_logged(self, name: str) -> None:
        self.stages[name]["logged"] = True
        self._write()

    @contextlib.contextmanager
    def __call__(self, name: str, accumulate: bool = False) -> Iterator[None]:
        finished = name in self.stages and not accumulate
        _reset_peak_rss()
        children = _children_peak_mib()
        start = time.perf_counter()
        yield
        if finished:
            return  # a resumed run redid (or skipped) this stage: keep the original measurement
        entry = self.stages.setdefault(name, {"seconds": 0.0, "peak_rss_mib": 0.0})
        entry["seconds"] += time.perf_counter() - start
        workers = _children_peak_mib()  # worker processes (SLW) finished during this stage count too
        peak = max(_peak_rss_mib(), workers if workers > children else 0.0)
        entry["peak_rss_mib"] = round(max(entry["peak_rss_mib"], peak), 1)
        self._write()

    def _write(self) -> None:
        if self.write:
            write_text_atomic(self.path, json.dumps(self.stages, indent=2, sort_keys=True))


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM), so each stage gets its own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mib() -> float:
    """This process's peak RSS since the last reset (or since it started, where the reset is unsupported)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _children_peak_mib() -> float:
    """The largest peak RSS of any finished child process so far."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
