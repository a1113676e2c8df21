"""`sharp eval`: perplexity tasks and zero-shot benchmarks (lm-eval) of one model."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from sharp.cli import options as opt
from sharp.cli.app import app, console
from sharp.errors import SharpError


def _write_json(path: Path, data: dict) -> None:
    """Write atomically: a killed run leaves the old file or none, never half a file."""
    from sharp.io.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _print_tables(model: str, tasks: dict, downstream: dict) -> None:
    if tasks:
        table = Table(title=f"perplexity of {model}")
        table.add_column("task", overflow="fold")
        table.add_column("ppl", justify="right")
        table.add_column("tokens scored", justify="right")
        for name, r in tasks.items():
            table.add_row(name, f"{r['ppl']:.3f}", f"{r['tokens']:,}")
        console.print(table)
    if downstream:
        table = Table(title=f"lm-eval scores of {model}")
        table.add_column("task", overflow="fold")
        table.add_column("acc", justify="right")
        table.add_column("acc_norm", justify="right")
        other = any(r.get("other") for r in downstream.values())
        if other:  # e.g. generative tasks' exact_match
            table.add_column("other metrics", overflow="fold")
        for name, r in downstream.items():
            label = f"{name} ({r['shots']}-shot)" if r.get("shots") else name
            extra = [", ".join(f"{k} {v:.4f}" for k, v in r.get("other", {}).items())] if other else []
            table.add_row(label, _fmt(r.get("acc")), _fmt(r.get("acc_norm")), *extra)
        console.print(table)


@app.command("eval")
def evaluate(
    model: str = opt.ANY_MODEL,
    tasks: str = typer.Option(None, "--tasks", help="Perplexity tasks: ppl:FORMAT=PATH_OR_ALIAS[,...]; "
                              "FORMAT is alpaca, dolly, dialogsum, openorca, arxiv-math or text; "
                              "a slice such as PATH[-100:] selects records."),
    lm_eval: str = typer.Option(None, "--lm-eval", help="lm-eval tasks, groups or tags, e.g. arc_easy,piqa "
                                "or mmlu (zero-shot unless a task's YAML sets num_fewshot)."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Folder with local files for sharp's offline copies "
                                  "of arc_easy, piqa, hellaswag, ... (README); without it those come from the Hub."),
    include_path: list[Path] = typer.Option(None, "--include-path", help="Folder with your own lm-eval task "
                                            "YAMLs (repeatable); its tasks win over others of the same name."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    max_len: int = typer.Option(512, "--max-len", help="Tokens per example / per text window."),
    stride: int = typer.Option(None, "--stride", help="Tokens between text window starts (default --max-len)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples or windows per forward pass."),
    limit: int = typer.Option(None, "--limit", help="First N examples / windows / benchmark docs per task."),
    template: str = typer.Option("plain", "--template", help="plain (### Instruction/### Response) or chat."),
    eval_fraction: float = typer.Option(None, "--eval-fraction", help="Score only the held-out part of "
                                        "instruction data, split as training splits it."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out split (with --eval-fraction)."),
    device: str = opt.DEVICE,
    dtype: str = opt.DTYPE,
) -> None:
    """Perplexity (response-only for instruction data, sliding windows for text) and lm-eval task scores."""
    from sharp.data import check_chat_template, check_template, load_records, split_examples, text_windows
    from sharp.evaluation.perplexity import evaluate_tasks, parse_tasks
    from sharp.io.device import load_on_device, resolve_device
    from sharp.io.dtypes import parse_dtype
    from sharp.io.models import load_tokenizer

    # Everything the user typed is checked before the (slow) model load.
    if not tasks and not lm_eval:
        raise SharpError("nothing to evaluate; give --tasks ppl:FORMAT=PATH,... and/or --lm-eval TASK,...")
    resolve_device(device)
    parse_dtype(dtype)
    bench = [t.strip() for t in lm_eval.split(",") if t.strip()] if lm_eval else []
    if lm_eval is not None and not bench:
        raise SharpError("--lm-eval needs a task name, e.g. --lm-eval mmlu or --lm-eval arc_easy,piqa")
    if (data_dir is not None or include_path) and not bench:
        raise SharpError("--data-dir and --include-path only apply to --lm-eval TASK,...")
    check_template(template)
    for flag, value in (("--batch-size", batch_size), ("--limit", limit)):
        if value is not None and value < 1:
            raise SharpError(f"{flag} must be at least 1, got {value}")
    text_windows(max_len, max_len, stride)  # validates --max-len and --stride
    if eval_fraction is not None:
        split_examples([0, 1], eval_fraction, seed)  # validates the fraction's range
    ppl_tasks = parse_tasks(tasks) if tasks else []
    for task in ppl_tasks:
        if task.spec.kind != "hub":
            load_records(task.spec)  # a record missing a field fails here, before the model loads
    check_chat_template(template, [task.spec for task in ppl_tasks], lambda: load_tokenizer(model))
    if json_out is not None:
        from sharp.io.atomic import check_output_file

        check_output_file(json_out, "--json")
    loaded_tasks = None
    if bench:  # names, files and the tasks' data: a missing dataset fails before the model loads
        from sharp.evaluation.downstream import load_tasks

        with console.status("loading lm-eval tasks"):
            loaded_tasks = load_tasks(bench, data_dir, include_path or None)

    from sharp.io.models import check_max_len, load_config

    check_max_len(load_config(model), max_len)
    loaded, tokenizer, _ = load_on_device(model, device, dtype)
    results = evaluate_tasks(loaded, tokenizer, ppl_tasks, max_len=max_len, stride=stride, batch_size=batch_size,
                             limit=limit, template=template, eval_fraction=eval_fraction, seed=seed,
                             progress=True)
    downstream = {}
    if loaded_tasks is not None:
        from sharp.evaluation.downstream import score_downstream

        downstream = score_downstream(loaded, tokenizer, loaded_tasks, limit=limit, batch_size=batch_size)
    _print_tables(model, results, downstream)
    if json_out is not None:
        settings = {"max_len": max_len, "stride": stride or max_len, "batch_size": batch_size, "limit": limit,
                    "template": template, "eval_fraction": eval_fraction, "seed": seed,
                    "data_dir": str(data_dir) if data_dir else None,
                    "include_path": [str(p) for p in include_path or []]}
        _write_json(json_out, {"model": model, "tasks": results, "downstream": downstream, "settings": settings})
        console.print(f"wrote {json_out}")
