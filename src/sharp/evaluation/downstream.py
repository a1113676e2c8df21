"""Downstream accuracy through lm-evaluation-harness: any lm-eval task, sharp's offline copies, or the user's own.

Why this exists: sharp checkpoints contain custom modules (shared MLPs + recovery params), so they are
evaluated *in memory* (`HFLM(pretrained=model, tokenizer=tok)`), with their sharing, never merged first.
Which task a name means and where its data comes from is `sharp.evaluation.lm_eval_tasks`: the user's
`include_path` folders first, then sharp's offline copies of eight tasks (with `data_dir`; lm-eval's own
definitions over local files, so numbers compare with published ones), then lm-eval's registry (Hub data).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sharp.errors import SharpError
from sharp.evaluation.lm_eval_tasks import (
    DOWNSTREAM_TASKS,
    LoadedTasks,
    load_tasks,
    offline_hub,
    plan_tasks,
    quiet_lm_eval,
    write_task_configs,
)

__all__ = ["DOWNSTREAM_TASKS", "check_downstream", "load_tasks", "run_downstream", "score_downstream",
           "write_task_configs"]

IncludePath = Path | str | Sequence[Path | str] | None


def check_downstream(tasks: list[str], data_dir: Path | None = None, include_path: IncludePath = None) -> None:
    """Validate task names, folders and sharp's offline data files, without loading data or a model.

    A name that is neither in `include_path`, nor one of sharp's offline tasks (with `data_dir`), makes
    this index lm-eval's registry (10-30 s, once per process).
    """
    plan_tasks(tasks, data_dir, include_path)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _row(metrics: dict[str, Any], n: int, shots: int) -> dict[str, Any]:
    """`{"acc", "acc_norm" (None where the task has none), "n"}`, plus `other` metrics and `shots` if any."""
    row: dict[str, Any] = {
        "acc": float(metrics["acc,none"]) if "acc,none" in metrics else None,
        "acc_norm": float(metrics["acc_norm,none"]) if "acc_norm,none" in metrics else None,
        "n": n,
    }
    other = {
        key: float(value)
        for key, value in metrics.items()
        if "," in key and key not in ("acc,none", "acc_norm,none") and "_stderr," not in key
        and isinstance(value, (int, float)) and not isinstance(value, bool)
    }  # e.g. generative tasks' "exact_match,strict-match"
    if other:
        row["other"] = other
    if shots:
        row["shots"] = shots
    return row


def _rows(loaded: LoadedTasks, out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One row per requested task; a group lm-eval aggregates is one row, a tag (or a group without an
    aggregate) one row per task in it."""
    results, n_samples, n_shot = out["results"], out["n-samples"], out.get("n-shot", {})

    def leaves(obj: Any) -> list[str]:
        return [t.task_name for t in obj.get_all_tasks()] if hasattr(obj, "get_all_tasks") else [obj.task_name]

    def has_metric(name: str) -> bool:
        return any("," in k and "_stderr," not in k for k in results.get(name, {}))

    rows: dict[str, dict[str, Any]] = {}
    for name in loaded.names:
        objs = loaded.parts[name]
        if len(objs) == 1 and has_metric(name):
            tasks = leaves(objs[0])
            n = sum(int(n_samples[t]["effective"]) for t in tasks)
            rows[name] = _row(results[name], n, max((int(n_shot.get(t, 0)) for t in tasks), default=0))
        else:
            for obj in objs:
                for task in leaves(obj):
                    rows[task] = _row(results[task], int(n_samples[task]["effective"]), int(n_shot.get(task, 0)))
    return rows


def score_downstream(
    model: Any,
    tokenizer: Any,
    loaded: LoadedTasks,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 1234,
) -> dict[str, Any]:
    """lm-eval scores of an in-memory model on tasks from `load_tasks` (see `run_downstream`)."""
    if limit is not None and limit < 1:
        raise SharpError(f"--limit must be a positive number of documents per task, got {limit}")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = getattr(model, "training", False)
    with offline_hub() if loaded.offline else contextlib.nullcontext(), quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm,
            tasks=loaded.objects,
            task_manager=loaded.manager,  # the objects pass through it; no registry indexed again
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
    result: dict[str, Any] = _rows(loaded, out)
    result["mean"] = {
        "acc": _mean([r["acc"] for r in result.values()]),
        "acc_norm": _mean([r["acc_norm"] for r in result.values()]),
    }
    return result


def run_downstream(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    data_dir: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 1234,
    include_path: IncludePath = None,
) -> dict[str, Any]:
    """lm-eval accuracy of an in-memory model (zero-shot unless a task's YAML sets `num_fewshot`).

    `tasks`: lm-eval task/group/tag names; `data_dir` makes sharp's eight offline tasks read local files;
    `include_path`: folder(s) with the user's own task YAMLs (they win over any other task of that name).
    Returns `{task: {"acc", "acc_norm" (None where the task defines none), "n"[, "other", "shots"]}, ...,
    "mean": {"acc", "acc_norm"}}`; the means are over the tasks that have the metric. `limit` takes the
    first N docs of each task (quick checks only: published numbers use all of them). `seed` seeds
    python/numpy/torch and few-shot sampling.
    """
    if limit is not None and limit < 1:
        raise SharpError(f"--limit must be a positive number of documents per task, got {limit}")
    loaded = load_tasks(tasks, data_dir, include_path)
    return score_downstream(model, tokenizer, loaded, limit=limit, batch_size=batch_size, seed=seed)
