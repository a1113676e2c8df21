"""`sharp info`, `sharp share`, `sharp merge`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from sharp.cli import options as opt
from sharp.cli.app import add_counts, app, console, err_console, facts_table


def _validate_share(model: str, strategy: str, recovery: str, modules: str) -> None:
    """Everything `share` needs checked, on an empty (meta) model: no weights are read."""
    import torch
    from transformers import AutoModelForCausalLM

    from sharp.arch import get_adapter, num_layers
    from sharp.io.models import load_config, refuse_sharp_checkpoint
    from sharp.sharing.recovery import parse_recovery
    from sharp.sharing.shared import apply_sharing
    from sharp.sharing.strategy import parse_strategy

    strat, rec = parse_strategy(strategy), parse_recovery(recovery)
    refuse_sharp_checkpoint(model, "share")
    config = load_config(model)
    get_adapter(config)
    sharing = strat.resolve(num_layers(config))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    apply_sharing(skeleton, sharing, rec, modules)


def print_info(info: dict, title: str) -> None:
    table = facts_table(title)
    table.add_row("architecture", info["architecture"])
    table.add_row("layers", str(info["layers"]))
    table.add_row("dtype", info["dtype"])
    add_counts(table, info["params_original"], info["mlp_params_original"], info["params_removed"],
               info["params_recovery"], info["params_stored"])
    table.add_row("MLP reduction", f"{info['mlp_reduction']:.1%}")
    if info["sharing"]:
        pairs = ", ".join(f"{t}←{r}" for t, r in info["sharing"].items())
        table.add_row("shared MLPs", f"{info['shared_mlps']} of {info['layers']}")
        table.add_row("strategy / recovery / modules", f"{info['strategy']} / {info['recovery']} / {info['modules']}")
        table.add_row("sharing (target←reference)", pairs)
    if info["bytes_on_disk"] is not None:
        table.add_row("bytes on disk", f"{info['bytes_on_disk']:,} ({info['bytes_on_disk'] / 2**20:.1f} MiB)")
    console.print(table)


@app.command()
def info(
    model: str = opt.ANY_MODEL,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Architecture, layers, total / MLP / stored parameters, sharing map and bytes on disk."""
    from sharp.inspect import describe
    from sharp.io.models import load_model, resolve_model_path

    path = resolve_model_path(model)
    loaded, _ = load_model(model)
    facts = describe(loaded, path if Path(path).exists() else None)
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
    else:
        print_info(facts, title=model)


@app.command()
def share(
    model: str = opt.MODEL,
    strategy: str = typer.Option(..., "--strategy", "-s", help="next:A-B, group:K:A-B or map:T=R,..."),
    recovery: str = opt.RECOVERY,
    modules: str = typer.Option("mlp", "--modules", help="mlp (default), attn or all"),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    adapter_only: bool = typer.Option(False, "--adapter-only", help="Write only the recovery parameters and "
                                      "configs (load with sharp.load(DIR, base=MODEL))."),
    dtype: str = opt.OUT_DTYPE,
) -> None:
    """Build and save an untrained SHARP model (recovery initialized to Direct Sharing)."""
    import sharp
    from sharp.inspect import describe
    from sharp.io.atomic import check_output_dir
    from sharp.io.dtypes import parse_dtype

    check_output_dir(out, overwrite)
    storage = parse_dtype(dtype) or "auto"
    _validate_share(model, strategy, recovery, modules)
    with err_console.status(f"loading {model}"):
        loaded, tokenizer = sharp.load_model(model, dtype=storage)
    sharp.share(loaded, strategy, recovery, modules, source=model)
    with err_console.status(f"saving {out}"):
        sharp.save(loaded, out, tokenizer=tokenizer, overwrite=overwrite, adapter_only=adapter_only)
    print_info(describe(loaded, out), title=str(out))


@app.command()
def merge(
    checkpoint: Path = typer.Argument(..., help="A sharp checkpoint folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Output: a plain Hugging Face model folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    dtype: str = opt.OUT_DTYPE,
) -> None:
    """Materialize every target weight and write a plain HF folder that vanilla transformers loads."""
    from sharp.io.atomic import atomic_dir, check_output_dir
    from sharp.io.dtypes import parse_dtype
    from sharp.io.formats import is_sharp_checkpoint
    from sharp.io.models import load_model
    from sharp.sharing.shared import merge_sharing
    from sharp.sharing.state import sharp_state

    check_output_dir(out, overwrite)
    storage = parse_dtype(dtype) or "auto"
    if not is_sharp_checkpoint(checkpoint):
        from sharp.errors import SharpError

        raise SharpError(f"'{checkpoint}' is not a sharp checkpoint (no sharp_config.json)")
    model, tokenizer = load_model(str(checkpoint), dtype=storage)
    merge_sharing(model)
    state = sharp_state(model)
    config, state.config = state.config, None  # a plain model from here on
    if config.dropped_mlps:  # MLPs of width 0: a pruned-model folder, which records the per-layer widths
        from sharp.baselines.methods import PruneReport
        from sharp.io.pruned import save_pruned

        report = PruneReport(method="plan", strategy=config.strategy, dropped_layers=config.dropped_blocks,
                             dropped_mlps=config.dropped_mlps, params_original=config.base_parameters,
                             params_stored=sum(p.numel() for p in model.parameters()))
        save_pruned(model, out, report, tokenizer=tokenizer, overwrite=overwrite)
    else:
        with atomic_dir(out, overwrite) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    console.print(f"merged model written to [bold]{out}[/]")


@app.command()
def verify(
    checkpoint: Path = typer.Argument(..., help="A sharp checkpoint folder."),
    load: bool = typer.Option(True, "--load/--no-load", help="Also load it and check every tensor key."),
    base: str = typer.Option(None, "--base", help="Base model of an adapter-only checkpoint (default: the "
                             "recorded source); its identity is checked."),
) -> None:
    """Check a checkpoint against its manifest (sha256 and size of every file); exit 1 if anything is off."""
    from sharp.io.formats import is_sharp_checkpoint
    from sharp.io.manifest import verify_manifest
    from sharp.sharing.config import SharpConfig

    if not is_sharp_checkpoint(checkpoint):
        from sharp.errors import SharpError

        raise SharpError(f"'{checkpoint}' is not a sharp checkpoint (no sharp_config.json)")
    problems = verify_manifest(checkpoint)
    if not problems:
        try:
            SharpConfig.from_json((checkpoint / "sharp_config.json").read_text())
            if load:
                import sharp

                sharp.load(checkpoint, verify=False, base=base)
        except Exception as e:  # noqa: BLE001 - any failure to load is a verification failure
            problems.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if problems:
        from rich.markup import escape

        for p in problems:  # one line each, as `fail` prints errors
            err_console.print(f"[bold red]FAIL[/] {escape(f'{checkpoint}: {p}')}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)
    console.print(f"[bold green]OK[/] {checkpoint}: every file matches its manifest" + (" and loads" if load else ""))
