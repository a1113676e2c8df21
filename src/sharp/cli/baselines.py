"""`sharp prune` (baselines at a stored-parameter budget) and `sharp compare` (every row of the comparison)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from sharp.cli import options as opt
from sharp.cli.app import app, console, err_console, facts_table

_SFT_HELP = "SFT settings for --heal (the same as sharp compress)."


def _sft(steps: int, lr: float, batch_size: int, grad_accum: int) -> dict:
    return {"steps": steps, "lr": lr, "batch_size": batch_size, "grad_accum": grad_accum}


@app.command()
def prune(
    model: str = opt.MODEL,
    method: str = typer.Option(..., "--method", "-m", help="layer-drop, layer-drop-adapted, mlp-drop or width."),
    budget: str = typer.Option(None, "--budget", "-b", help="Stored-parameter budget: 40% or 0.4 (a share of the "
                               "MLP weights to remove), a count to keep (107.5M) or match:DIR (a checkpoint's size)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
    strategy: str = typer.Option(None, "--strategy", "-s", help="SHARP targets for layer-drop-adapted / mlp-drop."),
    allocation: str = typer.Option("even", "--allocation", help="width: even (same channels per layer) or global."),
    data: str = typer.Option(None, "--data", help="Calibration (and --heal training) data, FORMAT:PATH or alias."),
    calib_samples: int = typer.Option(32, "--calib-samples", help="Calibration examples / text windows."),
    max_len: int = typer.Option(256, "--max-len", help="Tokens per example / text window."),
    template: str = typer.Option("plain", "--template", help="plain or chat (instruction data)."),
    heal: bool = typer.Option(False, "--heal", help="Fine-tune with LoRA on the remaining layers, then merge."),
    lora_rank: int = typer.Option(8, "--lora-rank", help="Rank of the healing LoRA (compress's --train full-lora)."),
    steps: int = typer.Option(200, "--steps", help=_SFT_HELP),
    lr: float = typer.Option(1e-3, "--lr", help=_SFT_HELP),
    batch_size: int = typer.Option(4, "--batch-size", help=_SFT_HELP),
    grad_accum: int = typer.Option(1, "--grad-accum", help=_SFT_HELP),
    eval_fraction: float = typer.Option(0.1, "--eval-fraction", help="Held-out fraction of --data (healing)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out split and of training."),
    device: str = opt.DEVICE,
    dtype: str = opt.DTYPE,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out; discard an unfinished "
                                   "--heal with other settings in OUT.work (without it, that heal is resumed when "
                                   "the settings match, else the command is refused)."),
) -> None:
    """Prune a model to a stored-parameter budget with a baseline method; save a smaller HF model folder. --heal
    checkpoints to OUT.work: the same command after a kill resumes it."""
    from sharp.baselines.run import PruneOptions, prune_model
    from sharp.io.atomic import check_output_dir

    check_output_dir(out, overwrite)
    options = PruneOptions(method=method, budget=budget, strategy=strategy, allocation=allocation, data=data,
                           calib_samples=calib_samples, max_len=max_len, template=template, heal=heal,
                           lora_rank=lora_rank, eval_fraction=eval_fraction, seed=seed,
                           sft=dict(_sft(steps, lr, batch_size, grad_accum), seed=seed), device=device, dtype=dtype)
    options.validate()
    if data:
        from sharp.data import check_chat_template, parse_data_spec
        from sharp.io.models import check_max_len, load_config, load_tokenizer

        check_max_len(load_config(model), max_len)
        check_chat_template(template, [parse_data_spec(data)], lambda: load_tokenizer(model))
    with err_console.status(f"pruning {model} ({method})"):
        report = prune_model(model, out, options, overwrite=overwrite)
    table = facts_table(str(out))
    table.add_row("method", method + (f" ({allocation})" if method == "width" else ""))
    table.add_row("budget", report.budget or f"all targets of {strategy}")
    table.add_row("parameters (original)", f"{report.params_original:,}")
    if report.params_target:
        table.add_row("parameters (target)", f"{report.params_target:,}")
    table.add_row("parameters stored", f"{report.params_stored:,}")
    if report.dropped_layers:
        table.add_row("layers dropped", ", ".join(map(str, report.dropped_layers)))
    if report.dropped_mlps:
        table.add_row("MLPs dropped", ", ".join(map(str, report.dropped_mlps)))
    if report.fill_channels:
        table.add_row("fill: channels removed per MLP", str(report.fill_channels))
    table.add_row("MLP widths", ", ".join(map(str, report.intermediate_sizes)))
    if report.healed:
        loss = report.heal["eval_loss"]
        table.add_row("healed", f"{report.heal['steps']} steps, eval loss "
                      + (f"{loss:.4f}" if loss is not None else "– (no held-out examples)"))
    console.print(table)


@app.command()
@opt.recovery_options
def compare(
    data: str = typer.Option(..., "--data", help="Training / calibration data, FORMAT:PATH or alias."),
    eval_tasks: str = typer.Option(..., "--eval", help="Perplexity tasks, as sharp eval --tasks."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: comparison.md and comparison.json."),
    reference_model: str = typer.Option(None, "--reference-model", help="A native smaller model to add as a row."),
    methods: str = typer.Option("layer-drop,layer-drop-adapted,mlp-drop,width", "--methods", help="Baselines."),
    heal: bool = typer.Option(True, "--heal/--no-heal", help="Also fine-tune every baseline (same SFT as SHARP)."),
    allocation: str = typer.Option("even", "--allocation", help="width: even or global."),
    calib_samples: int = typer.Option(32, "--calib-samples", help="Calibration examples for the baselines."),
    eval_max_len: int = typer.Option(512, "--eval-max-len", help="Tokens per evaluation example / window."),
    eval_limit: int = typer.Option(None, "--eval-limit", help="First N examples / windows per task."),
    tolerance: float = typer.Option(0.01, "--tolerance", help="Allowed stored-parameter spread of the rows."),
    train: str = typer.Option("full-lora", "--train", help="What SHARP's SFT trains, as sharp compress --train."),
    match_trainable: bool = typer.Option(False, "--match-trainable", help="Heal each baseline with the LoRA rank "
                                         "whose trainable parameter count is nearest SHARP's."),
    planned: bool = typer.Option(False, "--planned", help="Add a row planned by --strategy auto:BUDGET (share, drop "
                                 "MLPs or blocks per layer) at SHARP's stored size; see --plan-min-shared."),
    only: str = typer.Option("", "--only", help="Build only these rows (keys as in comparison.json, e.g. "
                             "sharp-plan,width+heal); the others come from OUT's cache or are left out. Runs split "
                             "this way, each with its own --out, can pool their OUT.work/rows.json afterwards."),
    **settings: Any,
) -> None:
    """Every baseline, Direct Sharing and SHARP at the same stored size, evaluated on the same tasks."""
    from sharp.recipes.compare import CompareConfig
    from sharp.recipes.compare import compare as run_compare

    cfg = opt.settings_from(CompareConfig, locals(), eval=eval_tasks)
    cfg.validate()
    run_compare(cfg, progress=True, log=lambda msg: err_console.print(msg, highlight=False))
    console.print((out / "comparison.md").read_text(), markup=False, highlight=False)
