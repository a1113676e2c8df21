"""`sharp compress`: share layers, then recover them (SLW, SFT), evaluate and save; a thin shell over
`sharp.recipes.compress`."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.table import Table

from sharp.cli.app import app, console

ROWS = (("original", "Original"), ("direct", "Direct Sharing"), ("slw", "after SLW"), ("sft", "after SFT"))


def print_summary(summary: dict) -> None:
    """The before/after table: sizes, held-out perplexity per stage, wall time and peak RSS per stage."""
    p = summary["params"]
    sizes = Table(title=f"{summary['model']}  {summary['strategy']}  {summary['recovery']}", show_header=False)
    sizes.add_column(style="bold")
    sizes.add_column(justify="right")
    sizes.add_row("parameters (original → stored)", f"{p['original']:,} → {p['stored']:,}")
    sizes.add_row("MLP reduction", f"{summary['mlp_reduction']:.1%}")
    sizes.add_row("recovery parameters", f"{p['recovery']:,}")
    console.print(sizes)
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


@app.command()
def compress(
    model: str = typer.Argument(..., help="Model folder, .gguf file, alias (smollm2-135m) or hub id."),
    strategy: str = typer.Option(..., "--strategy", "-s", help="next:A-B, group:K:A-B or map:T=R,..."),
    recovery: str = typer.Option("lora:32", "--recovery", "-r", help="lora:R, scale or lora+scale:R"),
    data: str = typer.Option(..., "--data", help="FORMAT:PATH_OR_HUB_ID or an alias (alpaca-demo)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint folder (written atomically)."),
    eval_data: str = typer.Option(None, "--eval-data", help="Held-out data (default: part of --data)."),
    stages: str = typer.Option("slw,sft", "--stages", help="slw,sft | slw | sft | none (Direct Sharing)."),
    slw_fraction: float = typer.Option(0.1, "--slw-fraction", help="Share of training examples SLW captures."),
    slw_workers: int = typer.Option(1, "--slw-workers", help="Target layers trained in parallel processes."),
    slw_steps: int = typer.Option(300, "--slw-steps", help="SLW optimizer steps per target layer (at most)."),
    sft_steps: int = typer.Option(200, "--sft-steps", help="SFT optimizer steps (0: use --epochs)."),
    epochs: float = typer.Option(1.0, "--epochs", help="SFT epochs, used when --sft-steps is 0."),
    lr: float = typer.Option(2e-4, "--lr", help="SFT peak learning rate (AdamW, warmup + cosine)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Examples per micro-batch (SFT, SLW capture, eval)."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per SFT optimizer step."),
    max_len: int = typer.Option(512, "--max-len", help="Tokens per example (longer ones are cut)."),
    eval_fraction: float = typer.Option(0.1, "--eval-fraction", help="Share of --data held out for evaluation."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, the recovery init and the data order."),
    template: str = typer.Option("plain", "--template", help="plain or chat (the model's chat template)."),
    train: str = typer.Option("recovery", "--train", help="recovery, or full-lora (+ LoRA on every layer)."),
    eval_steps: int = typer.Option(50, "--eval-steps", help="SFT eval loss every N steps (0: at the end)."),
    save_steps: int = typer.Option(50, "--save-steps", help="SFT checkpoint every N steps."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
) -> None:
    """Share layers, train the recovery (SLW then SFT), evaluate, save. Rerun the same command to resume."""
    from sharp.recipes import CompressConfig
    from sharp.recipes.compress import compress as run

    cfg = CompressConfig(
        model=model, strategy=strategy, recovery=recovery, data=data, out=str(out), eval_data=eval_data,
        stages=stages, slw_fraction=slw_fraction, slw_workers=slw_workers, slw_steps=slw_steps,
        sft_steps=sft_steps, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_len=max_len,
        eval_fraction=eval_fraction, seed=seed, template=template, train=train, eval_steps=eval_steps,
        save_steps=save_steps, overwrite=overwrite,
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = run(cfg)
    print_summary(summary)
    console.print(f"checkpoint written to [bold]{out}[/] (summary.json, train_log.jsonl)")
