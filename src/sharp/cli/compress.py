"""`sharp compress`: share layers, then recover them (SLW, SFT), evaluate and save; a thin shell over
`sharp.recipes.compress`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from sharp.cli import options as opt
from sharp.cli.app import app, console, facts_table

ROWS = (("original", "Original"), ("direct", "Direct Sharing"), ("slw", "after SLW"), ("sft", "after SFT"))


def print_summary(summary: dict) -> None:
    """The before/after table: sizes, held-out perplexity per stage, wall time and peak RSS per stage."""
    p = summary["params"]
    sizes = facts_table(f"{summary['model']}  {summary['strategy']}  {summary['recovery']}")
    sizes.add_row("parameters (original → stored)", f"{p['original']:,} → {p['stored']:,}")
    sizes.add_row("MLP reduction", f"{summary['mlp_reduction']:.1%}")
    sizes.add_row("recovery parameters", f"{p['recovery']:,}")
    sft = summary.get("sft") or {}
    if sft.get("trainable"):
        sizes.add_row("trained in SFT", f"{sft['trainable']:,} parameters, {sft['train_tokens']:,} tokens")
    console.print(sizes)
    if summary.get("slw"):
        console.print(slw_table(summary["slw"]))
    ppl = Table(title=f"held-out perplexity ({summary['eval_examples']} examples)")
    ppl.add_column("model")
    ppl.add_column("perplexity", justify="right")
    ppl.add_column("× original", justify="right")
    base = summary["perplexity"]["original"]
    for key, label in ROWS:
        if key in summary["perplexity"]:
            value = summary["perplexity"][key]
            ppl.add_row(label, f"{value:,.3f}", f"{value / base:,.2f}")
    console.print(ppl)
    cost = Table(title="cost per stage")
    cost.add_column("stage")
    cost.add_column("wall time", justify="right")
    cost.add_column("peak RSS", justify="right")
    for stage, t in summary["timing"].items():
        rss = "–" if t.get("peak_rss_mib") is None else f"{t['peak_rss_mib']:,.0f} MiB"
        cost.add_row(stage, f"{t['seconds']:,.1f} s", rss)
    console.print(cost)


def slw_table(layers: dict) -> Table:
    """Per target: held-out relative error before (Direct Sharing), after the init and after SLW (1.0 = the MLP
    deleted), the attention-sink rows' after SLW, and how much of each projection's whitened correction the
    recovery rank captures."""
    table = Table(title="SLW per target (held-out relative error; 1.0 = MLP deleted)")
    for col in ("layer", "shared", "init", "after SLW", "sink", "init kept", "rank captures (energy)", "tokens"):
        table.add_column(col, justify="right" if col not in ("init kept", "rank captures (energy)") else "left")
    for layer, r in sorted(layers.items(), key=lambda kv: int(kv[0])):
        init = r.get("init") or {}
        energy = ", ".join(f"{p.removesuffix('_proj')} {v['energy']:.2f}" for p, v in (init.get("fit") or {}).items())
        table.add_row(str(layer), f"{r['rel_err_before']:.3f}", f"{r['rel_err_init']:.3f}",
                      f"{r['rel_err_after']:.3f}", "–" if r.get("sink_rel_err_after") is None
                      else f"{r['sink_rel_err_after']:.3f}", str(init.get("chosen", "–")), energy or "–",
                      f"{r.get('train_tokens', 0):,}")
    return table


@app.command()
@opt.recovery_options
def compress(
    data: str = typer.Option(..., "--data", help="FORMAT:PATH_OR_HUB_ID or an alias (alpaca-demo)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint folder (written atomically)."),
    eval_data: str = typer.Option(None, "--eval-data", help="Held-out data (default: part of --data)."),
    stages: str = typer.Option("slw,sft", "--stages", help="slw,sft | slw | sft | none (Direct Sharing)."),
    epochs: float = typer.Option(1.0, "--epochs", help="SFT epochs (> 0), used when --sft-steps is 0."),
    train: str = typer.Option("recovery", "--train", help="recovery, full-lora (+ LoRA on every other linear), "
                              "recovery+shared or full-lora+shared (+ the shared reference weights: no storage cost)."),
    eval_steps: int = typer.Option(50, "--eval-steps", help="SFT eval loss every N steps (0: at the end)."),
    save_steps: int = typer.Option(50, "--save-steps", help="SFT checkpoint every N steps."),
    **settings: Any,
) -> None:
    """Share layers, train the recovery (SLW then SFT), evaluate, save. Rerun the same command to resume; a rerun
    that changes only SFT settings (--lr, --sft-steps, --loss, ...) keeps the finished SLW and starts SFT over."""
    from sharp.recipes import CompressConfig
    from sharp.recipes.compress import compress as run

    cfg = opt.settings_from(CompressConfig, locals())
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = run(cfg)
    from sharp.recipes.distributed import is_main

    if not is_main():  # under torchrun rank 0 reports
        return
    print_summary(summary)
    console.print(f"checkpoint written to [bold]{out}[/] (summary.json, train_log.jsonl)")
