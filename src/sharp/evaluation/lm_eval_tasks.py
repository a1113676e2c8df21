"""Which lm-eval tasks `--lm-eval NAME,...` means, and loading them (data included) before any model loads.

A name is looked up in this order, first match wins:

1. the user's own task folders (`include_path`, lm-eval's convention `TaskManager(include_path=...)`): any
   YAML task or group lm-eval can read, e.g. `dataset_path: json` with local `data_files`;
2. sharp's offline copies of eight common tasks (`DOWNSTREAM_TASKS`), when `data_dir` is given: lm-eval's
   prompts, choices, targets and metrics verbatim (YAMLs under `tasks/`), data from local files in the
   datasets' original release formats (loaded by `tasks/utils.py`), never from the Hub. With a `data_dir`
   these win over lm-eval's tasks of the same names; without one, those names are lm-eval's like any other;
3. lm-eval's own registry, as `lm_eval --tasks` sees it (tasks, groups such as `mmlu`, tags); their data
   comes from the Hugging Face Hub or its local cache.

Indexing lm-eval's registry parses ~14k YAML files (10-30 s on 2 cores), so it is done only when a name is
not found in 1-2, and once per process.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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

INCLUDE, OFFLINE, REGISTRY = "include", "offline", "registry"  # where a name comes from, in lookup order


def _resolve_data_file(task: str, data_dir: Path) -> Path:
    for rel in _DATA_FILES[task]:
        if (data_dir / rel).is_file():
            return data_dir / rel
    expected = " or ".join(str(data_dir / rel) for rel in _DATA_FILES[task])
    raise SharpError(f"no data file for task {task!r}: expected {expected}; see the assets' SOURCES.md")


def _has_files(task: str, data_dir: Path) -> bool:
    found = any((data_dir / rel).is_file() for rel in _DATA_FILES[task])
    return found and all((data_dir / rel).is_file() for rel in _EXTRA_FILES.get(task, ()))


def write_task_configs(tasks: list[str], data_dir: Path, out_dir: Path) -> None:
    """Write sharp's offline task YAMLs (data file filled in) and their `utils.py` into `out_dir`.

    The YAMLs under `tasks/` are templates; lm-eval reads the resolved copies through `TaskManager`.
    """
    src = _TASKS_DIR
    for task in tasks:
        data_file = _resolve_data_file(task, Path(data_dir)).resolve()
        # The placeholder sits inside a double-quoted YAML scalar: escape as a JSON string would.
        quoted = str(data_file).replace("\\", "\\\\").replace('"', '\\"')
        text = (src / f"{task}.yaml").read_text(encoding="utf-8").replace(_PLACEHOLDER, quoted)
        (out_dir / f"{task}.yaml").write_text(text, encoding="utf-8")
    (out_dir / "utils.py").write_text((src / "utils.py").read_text(encoding="utf-8"), encoding="utf-8")


@functools.cache
def _registry() -> Any:
    """lm-eval's built-in tasks, as `lm_eval --tasks` sees them (indexed once per process: it is slow)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _local_manager(paths: Sequence[Path]) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in paths], include_defaults=False)


@dataclass(frozen=True)
class TaskPlan:
    """The requested names (order kept, repeats dropped) and where each comes from: INCLUDE, OFFLINE or
    REGISTRY."""

    names: tuple[str, ...]
    sources: dict[str, str]
    data_dir: Path | None
    include_dirs: tuple[Path, ...]

    def named(self, source: str) -> list[str]:
        return [n for n in self.names if self.sources[n] == source]


def _include_dirs(include_path: Path | str | Sequence[Path | str] | None) -> tuple[Path, ...]:
    if include_path is None:
        return ()
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    for p in map(Path, paths):
        if not p.is_dir():
            raise SharpError(f"--include-path {p} is not a folder; give the folder holding your task YAMLs")
    return tuple(Path(p) for p in paths)


def _unknown_message(unknown: list[str], known: set[str]) -> str:
    close = list(dict.fromkeys(c for name in unknown for c in difflib.get_close_matches(name, known, n=3)))
    hint = f" (close names: {', '.join(close)})" if close else ""
    return (
        f"unknown downstream task {', '.join(map(repr, unknown))}{hint}; sharp's offline tasks (with --data-dir): "
        f"{', '.join(DOWNSTREAM_TASKS)}; `lm-eval ls tasks` lists lm-eval's own, and --include-path DIR adds "
        "your task YAMLs"
    )


def plan_tasks(
    tasks: Sequence[str],
    data_dir: Path | str | None = None,
    include_path: Path | str | Sequence[Path | str] | None = None,
) -> TaskPlan:
    """Check the names, folders and sharp's offline data files, without loading any data or model.

    Fails with one line for an unknown name (suggesting close ones), a missing folder or a missing file.
    """
    names = tuple(dict.fromkeys(tasks))
    if not names:
        raise SharpError(
            f"no downstream task given; e.g. {', '.join(DOWNSTREAM_TASKS)} (offline with --data-dir) "
            "or any lm-eval task"
        )
    dirs = _include_dirs(include_path)
    if data_dir is not None and not Path(data_dir).is_dir():
        what = "is a file, not a folder" if Path(data_dir).exists() else "does not exist"
        raise SharpError(f"downstream data dir {data_dir} {what}; pass --data-dir DIR with the task files")
    user = set(_local_manager(dirs).all_tasks) if dirs else set()
    sources = {}
    for name in names:
        if name in user:
            sources[name] = INCLUDE
        elif data_dir is not None and name in DOWNSTREAM_TASKS:
            sources[name] = OFFLINE
        else:
            sources[name] = REGISTRY
    if REGISTRY in sources.values():
        registry = set(_registry().all_tasks)
        unknown = [n for n in names if sources[n] == REGISTRY and n not in registry]
        if unknown:
            raise SharpError(_unknown_message(unknown, registry | user | set(DOWNSTREAM_TASKS)))
    plan = TaskPlan(names, sources, Path(data_dir) if data_dir is not None else None, dirs)
    for task in plan.named(OFFLINE):
        _resolve_data_file(task, Path(data_dir))
        for rel in _EXTRA_FILES.get(task, ()):
            if not (Path(data_dir) / rel).is_file():
                raise SharpError(f"task {task!r} needs {Path(data_dir) / rel}, which is missing")
    return plan


def _needs_registry(index: dict[str, Any], name: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a group from the user's folders lists a task that only lm-eval's registry has.

    Such a group is loaded by a manager that indexes lm-eval's tasks too (slow), the others without.
    """
    entry = index.get(name)
    if entry is None:
        return True
    cfg = entry.cfg or {}
    if "group" not in cfg:
        return False  # a task (its `include:`s are already merged into cfg) or a tag of local tasks
    children = cfg.get("task") or []
    for child in children if isinstance(children, list) else [children]:
        ref = child if isinstance(child, str) else child.get("group") or child.get("task")
        if isinstance(ref, str) and ref not in seen and _needs_registry(index, ref, seen | {name}):
            return True
    return False


@dataclass
class LoadedTasks:
    """lm-eval Task/Group objects with their data loaded, ready for `simple_evaluate`."""

    names: tuple[str, ...]  # as requested
    parts: dict[str, list[Any]]  # name -> [Task] or [Group], or a tag's [Task, ...]
    manager: Any  # a cheap TaskManager for simple_evaluate (objects pass through it unchanged)
    offline: bool  # every task is one of sharp's offline copies: the run needs no network at all

    @property
    def objects(self) -> list[Any]:
        return [obj for objs in self.parts.values() for obj in objs]


def _load_failure(name: str, source: str, error: BaseException) -> SharpError:
    if isinstance(error, ImportError):
        package = getattr(error, "name", None) or str(error)
        return SharpError(f"task {name!r} needs the Python package {package!r}; install it (pip install ...)")
    if isinstance(error, ConnectionError) or source == REGISTRY:  # datasets: "Couldn't reach ... on the Hub"
        where = ("its data comes from the Hugging Face Hub: run once online (the data is then cached; gated "
                 "datasets need `hf auth login`), or point a task YAML at local files with --include-path DIR")
        if name in DOWNSTREAM_TASKS and source == REGISTRY:
            where += f"; sharp reads its own copy of {name!r} from local files with --data-dir DIR"
    elif source == OFFLINE:
        where = "check the files under --data-dir"
    else:
        where = "check the dataset_path / data_files in its YAML"
    reason = " ".join(str(error).split()) or type(error).__name__
    return SharpError(f"cannot load the data of task {name!r}: {reason}; {where}")


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """Forbid Hub access (env vars for subprocesses/late imports, flags for loaded modules)."""
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
def quiet_lm_eval() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("lm_eval.api.task", "lm_eval.models.huggingface")]
    notice_filter = _DropBenignNotices()
    for lg in loggers:
        lg.addFilter(notice_filter)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(notice_filter)


def load_tasks(
    tasks: Sequence[str],
    data_dir: Path | str | None = None,
    include_path: Path | str | Sequence[Path | str] | None = None,
) -> LoadedTasks:
    """Resolve the names (`plan_tasks`) and build lm-eval's tasks with their data, one line on failure.

    A task whose data cannot be reached (Hub offline, dataset or file missing) fails here, before the (slow)
    model load, naming the task.
    """
    plan = plan_tasks(tasks, data_dir, include_path)
    offline = all(s == OFFLINE for s in plan.sources.values())
    with (
        offline_hub() if offline else contextlib.nullcontext(),
        quiet_lm_eval(),
        tempfile.TemporaryDirectory(prefix="sharp-lm-eval-") as tmp,
    ):
        if plan.data_dir is not None:  # every copy whose files are there: the user's groups may list them too
            shipped = [t for t in DOWNSTREAM_TASKS if t in plan.named(OFFLINE) or _has_files(t, plan.data_dir)]
            write_task_configs(shipped, plan.data_dir, Path(tmp))
        # Later paths win in lm-eval's index: the user's folders over sharp's copies.
        paths = [Path(tmp), *plan.include_dirs]
        local = _local_manager(paths)
        combined = None
        parts: dict[str, list[Any]] = {}
        for name in plan.names:
            source = plan.sources[name]
            if source == REGISTRY:
                manager = _registry()
            elif source == INCLUDE and _needs_registry(local.task_index, name):
                if combined is None:  # defaults + our folders, as `lm_eval --include_path` builds it
                    from lm_eval.tasks import TaskManager

                    combined = TaskManager(include_path=[str(p) for p in paths])
                manager = combined
            else:
                manager = local
            try:
                got = manager.load([name])
            except (OSError, ImportError) as e:  # ConnectionError, FileNotFoundError, DatasetNotFoundError
                raise _load_failure(name, source, e) from e
            if name in got.get("groups", {}):
                parts[name] = [got["groups"][name]]
            elif name in got["tasks"]:
                parts[name] = [got["tasks"][name]]
            else:  # a tag: its tasks
                parts[name] = list(got["tasks"].values())
        loaded = LoadedTasks(plan.names, parts, local, offline)
        try:
            local.load(loaded.objects)  # lm-eval refuses a task asked for twice (e.g. mmlu + one of its parts)
        except ValueError as e:
            raise SharpError(f"{e}; ask for each task once") from e
    return loaded
