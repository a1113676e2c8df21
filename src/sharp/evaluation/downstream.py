"""Zero-shot downstream accuracy through lm-evaluation-harness, fully offline.

Why this exists: sharp checkpoints contain custom modules (shared MLPs + recovery params), so they are
evaluated *in memory* (`HFLM(pretrained=model, tokenizer=tok)`), with their sharing, never merged first.
The task definitions are lm-eval's own (prompts, choices, targets, metrics copied verbatim into the YAMLs
under `tasks/`) so numbers compare with published ones; only the data source differs: local files in
the datasets' original release formats under a data dir (loaded by `tasks/utils.py`), never the Hub.

The YAMLs are templates: `run_downstream` fills each task's data file in, writes them with `utils.py`
into a temporary folder and hands that folder alone to `lm_eval.tasks.TaskManager`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sharp.errors import SharpError

DOWNSTREAM_TASKS: tuple[str, ...] = (
    "arc_easy",
    "arc_challenge",
    "piqa",
    "boolq",
    "hellaswag",
    "winogrande",
    "openbookqa",
    "commonsense_qa",
)

# Files each task needs under the data dir. A tuple lists interchangeable formats of the *same split*
# (first found wins); splits are the ones lm-eval scores, so numbers compare with published ones.
_DATA_FILES: dict[str, tuple[str, ...]] = {
    "arc_easy": ("arc_easy/test.json", "arc_easy/ARC-Easy-Test.jsonl"),  # test, 2376
    "arc_challenge": ("arc_challenge/ARC-Challenge-Test.jsonl", "arc_challenge/test.json"),  # test, 1172
    "piqa": ("piqa/valid.jsonl",),  # validation, 1838 (+ valid-labels.lst)
    "boolq": ("boolq/dev.jsonl",),  # validation, 3270
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2", "hellaswag/hellaswag_val_full.txt"),  # 10042
    "winogrande": ("winogrande/dev.jsonl",),  # winogrande_xl validation, 1267
    "openbookqa": ("openbookqa/test.jsonl",),  # main test, 500
    "commonsense_qa": ("commonsense_qa/dev_rand_split.jsonl",),  # validation, 1221
}
_EXTRA_FILES: dict[str, tuple[str, ...]] = {"piqa": ("piqa/valid-labels.lst",)}
_TASKS_DIR = Path(__file__).parent / "tasks"  # package data (pyproject: evaluation/tasks/**)
_PLACEHOLDER = "@DATA_FILE@"


def _resolve_data_file(task: str, data_dir: Path) -> Path:
    for rel in _DATA_FILES[task]:
        if (data_dir / rel).is_file():
            return data_dir / rel
    expected = " or ".join(str(data_dir / rel) for rel in _DATA_FILES[task])
    raise SharpError(f"no data file for task {task!r}: expected {expected}; see the assets' SOURCES.md")


def check_downstream(tasks: list[str], data_dir: Path) -> None:
    """Validate task names and that `data_dir` holds every task's file, without loading a model.

    Called by the CLI before the (slow) model load, so a typo fails in a second, not after minutes.
    """
    if not tasks:
        raise SharpError(f"no downstream task given; choose from {', '.join(DOWNSTREAM_TASKS)}")
    unknown = [t for t in tasks if t not in DOWNSTREAM_TASKS]
    if unknown:
        raise SharpError(
            f"unknown downstream task {', '.join(map(repr, unknown))}; choose from {', '.join(DOWNSTREAM_TASKS)}"
        )
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SharpError(f"downstream data dir {data_dir} does not exist; pass --data-dir DIR with the task files")
    for task in tasks:
        _resolve_data_file(task, data_dir)
        for rel in _EXTRA_FILES.get(task, ()):
            if not (data_dir / rel).is_file():
                raise SharpError(f"task {task!r} needs {data_dir / rel}, which is missing")


def write_task_configs(tasks: list[str], data_dir: Path, out_dir: Path) -> None:
    """Write the resolved task YAMLs (data file filled in) and their `utils.py` into `out_dir`."""
    src = _TASKS_DIR
    for task in tasks:
        data_file = _resolve_data_file(task, Path(data_dir)).resolve()
        # The placeholder sits inside a double-quoted YAML scalar: escape as a JSON string would.
        quoted = str(data_file).replace("\\", "\\\\").replace('"', '\\"')
        text = (src / f"{task}.yaml").read_text(encoding="utf-8").replace(_PLACEHOLDER, quoted)
        (out_dir / f"{task}.yaml").write_text(text, encoding="utf-8")
    (out_dir / "utils.py").write_text((src / "utils.py").read_text(encoding="utf-8"), encoding="utf-8")


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Forbid Hub access for the run (env vars for subprocesses/late imports, flags for loaded modules)."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    flags: list[tuple[Any, str, Any]] = []
    for module_name, names in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        with contextlib.suppress(ImportError):
            module = importlib.import_module(module_name)
            flags += [(module, n, getattr(module, n)) for n in names if hasattr(module, n)]
    for module, name, _ in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in flags:
            setattr(module, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _DropBenignNotices(logging.Filter):
    """Hide lm-eval warnings that are expected here and would only confuse a user."""

    _PREFIXES = (
        "`pretrained` model kwarg is not of type `str`",  # passing the model in memory is the point
        "Passed an already-initialized model",
    )
    _FRAGMENTS = ("Custom kwargs can be passed to `--metadata`",)  # our custom_dataset loaders need none

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith(self._PREFIXES) or any(f in msg for f in self._FRAGMENTS))


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("lm_eval.api.task", "lm_eval.models.huggingface")]
    notice_filter = _DropBenignNotices()
    for lg in loggers:
        lg.addFilter(notice_filter)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(notice_filter)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def run_downstream(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    data_dir: Path,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 1234,
) -> dict[str, Any]:
    """Zero-shot lm-eval accuracy of an in-memory model on local copies of the tasks.

    Returns `{task: {"acc", "acc_norm" (None where lm-eval defines none), "n"}, ..., "mean": {"acc",
    "acc_norm"}}`; the means are over the tasks that have the metric. `limit` takes the first N docs of
    each task (quick checks only: published numbers use all of them). `seed` seeds python/numpy/torch.
    """
    check_downstream(tasks, data_dir)
    if limit is not None and limit < 1:
        raise SharpError(f"--limit must be a positive number of documents per task, got {limit}")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = list(dict.fromkeys(tasks))  # keep order, drop repeats
    was_training = getattr(model, "training", False)
    with _offline(), _quiet_lm_eval(), tempfile.TemporaryDirectory(prefix="sharp-lm-eval-") as tmp:
        write_task_configs(tasks, Path(data_dir), Path(tmp))
        manager = TaskManager(include_path=tmp, include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            bootstrap_iters=0,  # no stderr: it costs time and we report point estimates
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if was_training:  # HFLM switched the model to eval mode; give it back as we got it
        model.train()
    assert out is not None  # only None on non-zero ranks of a distributed run
    result: dict[str, Any] = {}
    for task in tasks:
        metrics = out["results"][task]
        result[task] = {
            "acc": float(metrics["acc,none"]),
            "acc_norm": float(metrics["acc_norm,none"]) if "acc_norm,none" in metrics else None,
            "n": int(out["n-samples"][task]["effective"]),
        }
    result["mean"] = {
        "acc": _mean([result[t]["acc"] for t in tasks]),
        "acc_norm": _mean([result[t]["acc_norm"] for t in tasks]),
    }
    return result
