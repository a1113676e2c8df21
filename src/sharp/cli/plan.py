"""`sharp plan`: parameters, memory per stage and device, SLW disk and time of a compress run, before running it;
a thin shell over `sharp.recipes.plan.plan`."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from sharp.cli import options as opt
from sharp.cli.app import add_counts, app, console, err_console, facts_table


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:,.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds / 3600:,.1f} h"


def print_plan(p: dict) -> None:
    c = p["params"]
    s = p["settings"]
    sizes = facts_table(f"{p['model']}  {s['strategy']}  {s['recovery']}  ({p['architecture']}, {p['layers']} layers)")
    add_counts(sizes, c["original"], c["mlp_original"], c["removed"], c["recovery"], c["stored"])
    sizes.add_row("trainable in SFT", f"{c['trainable']:,} ({s['train']})")
    sizes.add_row("MLP reduction", f"{c['mlp_reduction']:.1%}")
    b = p["bytes"]
    sizes.add_row(f"bytes ({b['dtype']})", f"{_gib(b['original'])} → {_gib(b['stored'])}")
    if "slw_disk" in p:
        d = p["slw_disk"]
        sizes.add_row("SLW activations on disk", f"{_gib(d['bytes'])} ({len(p['targets'])} targets × "
                                                 f"{d['tokens_per_target']:,} tokens, {d['dtype']})")
    console.print(sizes)
    stages = Table(title=f"per stage: memory per device in GiB, {s['devices']} device(s)")
    for name in ("stage", "weights", "activ.", "grad+opt", "total", "devices", "TFLOP", "time"):
        stages.add_column(name, justify="left" if name == "stage" else "right")
    for name, st in p["stages"].items():
        m = st["memory"]
        stages.add_row(name, *(f"{m[k] / 2**30:,.2f}" for k in ("weights", "activations", "optimizer", "total")),
                       str(st["devices"]), f"{st['flops'] / 1e12:,.0f}", _duration(st["seconds"]))
    stages.add_row("all", "", "", "", "", "", f"{sum(st['flops'] for st in p['stages'].values()) / 1e12:,.0f}",
                   _duration(p["total_seconds"]))
    console.print(stages)
    for name, st in p["stages"].items():
        console.print(f"  {name}: {st['note']}", highlight=False)
    t = p["throughput"]
    if t["forward"] is not None:
        console.print(f"throughput per device: forward {t['forward'] / 1e12:.3g}, SFT step {t['train'] / 1e12:.3g}, "
                      f"SLW step {t['slw'] / 1e12:.3g} TFLOP/s")
    console.print("assumptions:")
    for line in p["assumptions"]:
        console.print(f"  - {line}", highlight=False)


@app.command()
def plan(
    model: str = typer.Argument(..., help="Model folder, alias, hub id, .gguf, or a bare config.json (no weights)."),
    strategy: str = opt.STRATEGY,
    recovery: str = opt.RECOVERY,
    data_size: int = typer.Option(..., "--data-size", help="Examples in --data (before the held-out split)."),
    devices: int = typer.Option(1, "--devices", help="Devices SLW tasks and SFT ranks spread over."),
    sft_parallel: str = typer.Option("ddp", "--sft-parallel", help="ddp, fsdp, zero2 or zero3 (SFT over devices)."),
    slw_backend: str = typer.Option("local", "--slw-backend", help="local (processes) or ray (a task per device)."),
    dtype: str = typer.Option("fp32", "--dtype", help="Weights and compute dtype of the run: fp32 (what sharp "
                              "compress computes in on a CPU), bf16, fp16, or auto (the source's, as compress stores "
                              "it and a GPU computes in it; a bare config.json's declared dtype)."),
    example_tokens: int = typer.Option(None, "--example-tokens", help="Average tokens per example (default: "
                                                                      "--max-len, an upper bound)."),
    slw_fraction: float = opt.SLW_FRACTION,
    slw_workers: int = opt.SLW_WORKERS,
    slw_tokens: int = opt.SLW_TOKENS,
    slw_steps: int = opt.SLW_STEPS,
    sft_steps: int = opt.SFT_STEPS,
    epochs: float = typer.Option(1.0, "--epochs", help="SFT epochs (> 0), used when --sft-steps is 0."),
    batch_size: int = opt.BATCH_SIZE,
    grad_accum: int = opt.GRAD_ACCUM,
    max_len: int = opt.MAX_LEN,
    eval_fraction: float = opt.EVAL_FRACTION,
    stages: str = typer.Option("slw,sft", "--stages", help="slw,sft | slw | sft | none."),
    train: str = typer.Option("recovery", "--train", help="recovery, full-lora, recovery+shared or full-lora+shared."),
    full_lora_rank: int = opt.FULL_LORA_RANK,
    tflops: float = typer.Option(None, "--tflops", help="Sustained TFLOP/s per device; skips the probe."),
    probe: bool = typer.Option(True, "--probe/--no-probe", help="Time 2 layers of this shape (random weights)."),
    probe_device: str = typer.Option("cpu", "--probe-device", help="Where the probe runs: cpu, cuda, cuda:1, ..."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """What a `sharp compress` run stores, needs per stage and device, writes for SLW, and takes (estimate)."""
    from sharp.recipes.plan import PlanSettings
    from sharp.recipes.plan import plan as run

    settings = opt.settings_from(PlanSettings, locals())
    if settings.probe and settings.tflops is None and not as_json:
        with err_console.status("probing throughput (2 decoder layers of this shape)"):
            result = run(settings)
    else:
        result = run(settings)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        print_plan(result)
