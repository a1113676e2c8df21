"""`sharp analyze` (layer similarity, strategy suggestion) and `sharp report` (side-by-side run tables)."""

from __future__ import annotations

from pathlib import Path

import typer

from sharp.cli import options as opt
from sharp.cli.app import app, console, err_console
from sharp.errors import SharpError


@app.command()
def analyze(
    model: str = opt.ANY_MODEL,
    data: str = typer.Option(..., "--data", help="FORMAT:PATH_OR_HUB_ID or alias (alpaca-demo); text:PATH for "
                             "plain text; a slice such as [-100:] selects records."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
    max_tokens: int = typer.Option(16384, "--max-tokens", help="Tokens for the similarity statistics."),
    ppl_examples: int = typer.Option(30, "--ppl-examples", help="Examples (or text windows) scored for each "
                                     "single-layer replacement; 0 skips that measurement (one perplexity run "
                                     "per layer)."),
    replace_layers: str = typer.Option(None, "--replace-layers", help="Measure only targets A-B (faster)."),
    budget: str = typer.Option(None, "--budget", help="Also suggest a strategy removing this share of the MLP "
                               "parameters: 40% or 0.4 (among the --replace-layers targets, if given)."),
    plan: str = typer.Option(None, "--plan", help="With --budget: also run the planner for this recovery (e.g. "
                             "lora+gate:64): per layer share (rank R/4..2R), drop the MLP, drop the block or keep, "
                             "from closed-form costs; prints the plan as a map: strategy for compress."),
    plan_actions: str = opt.PLAN_ACTIONS,
    plan_min_shared: float = opt.PLAN_MIN_SHARED,
    plan_reach: int = opt.PLAN_REACH,
    plan_cost: str = opt.PLAN_COST,
    max_len: int = typer.Option(512, "--max-len", help="Tokens per example / text window."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per forward pass."),
    template: str = typer.Option("plain", "--template", help="plain (### Instruction/### Response) or chat."),
    include_first_token: bool = typer.Option(False, "--include-first-token", help="Count position 0 in the "
                                             "statistics (left out by default: attention sinks dominate it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    device: str = opt.DEVICE,
    dtype: str = opt.DTYPE,
) -> None:
    """How alike adjacent layers are (MLP outputs, residual stream) and what sharing each single layer costs."""
    from sharp.arch import get_adapter, num_layers
    from sharp.budget import SHARE, parse_budget
    from sharp.data import check_chat_template, check_template, load_records, parse_data_spec
    from sharp.evaluation.report import write_analysis
    from sharp.evaluation.similarity import analyze_model, parse_layer_range
    from sharp.evaluation.suggest import check_budget, cost_table, suggest_strategy
    from sharp.io.atomic import atomic_dir, check_output_dir
    from sharp.io.device import load_on_device, resolve_device
    from sharp.io.dtypes import parse_dtype
    from sharp.io.models import check_max_len, load_config, load_tokenizer

    # Everything the user typed is checked before the (slow) model load.
    check_output_dir(out, overwrite)
    resolve_device(device)
    parse_dtype(dtype)
    # a share is all a layer-by-layer suggestion can meet: counts and match:DIR fail here, in one line
    fraction = parse_budget(budget, forms=(SHARE,)).value if budget is not None else None
    if plan is not None:
        from sharp.recovery.planner import check_plan_settings
        from sharp.sharing.recovery import parse_recovery

        if budget is None:
            raise SharpError("--plan needs --budget (the share of MLP parameters the plan removes)")
        recovery = parse_recovery(plan)
        check_plan_settings(plan_actions, plan_min_shared, plan_reach, plan_cost)
    check_template(template)
    for flag, value, least in (("--max-tokens", max_tokens, 1), ("--ppl-examples", ppl_examples, 0),
                               ("--batch-size", batch_size, 1), ("--max-len", max_len, 2)):
        if value < least:
            raise SharpError(f"{flag} must be at least {least}, got {value}")
    if (spec := parse_data_spec(data)).kind != "hub":
        load_records(spec)  # a record missing a field fails here, before the model loads
    check_chat_template(template, [spec], lambda: load_tokenizer(model))
    config = load_config(model)
    get_adapter(config)
    check_max_len(config, max_len)
    if num_layers(config) < 2:
        raise SharpError(f"model '{model}' has a single decoder layer; there is no adjacent pair to analyze")
    span = parse_layer_range(replace_layers, num_layers(config)) if replace_layers else None
    if fraction is not None:
        candidates = range(span[0], span[1] + 1) if span and ppl_examples else None
        check_budget(fraction, num_layers(config), candidates)

    with err_console.status(f"loading {model}"):
        loaded, tokenizer, _ = load_on_device(model, device, dtype)
    analysis = analyze_model(loaded, tokenizer, data, max_tokens=max_tokens, ppl_examples=ppl_examples,
                             max_len=max_len, batch_size=batch_size, skip_first=0 if include_first_token else 1,
                             template=template, replace_layers=span, progress=True)
    analysis["model"] = model
    if fraction is not None:
        costs, source = cost_table(analysis)
        analysis["suggestion"] = suggest_strategy(costs, analysis["layers"], fraction, source).to_dict()
    if plan is not None:
        analysis["plan"] = _plan(loaded, tokenizer, data, recovery, budget, plan_actions, plan_min_shared, plan_reach,
                                 plan_cost, max_tokens, max_len, batch_size, template)
    with atomic_dir(out, overwrite) as tmp:
        write_analysis(analysis, tmp)
    _print_summary(analysis, out)


def _plan(model, tokenizer, data: str, recovery, budget: str, actions: str, min_shared: float, reach: int,
          cost: str, max_tokens: int, max_len: int, batch_size: int, template: str) -> dict:
    """The planner's mixed strategy for `budget`, measured on up to `max_tokens` tokens of `data`."""
    from sharp.baselines.calibration import calibration_examples
    from sharp.data import collate_examples, pad_id
    from sharp.recovery.planner import plan_strategy

    examples = calibration_examples(data, tokenizer, max(1, max_tokens // max_len + 1), max_len, template)
    pad = pad_id(tokenizer)
    batches = [collate_examples(examples[i : i + batch_size], pad) for i in range(0, len(examples), batch_size)]
    with err_console.status("planning"):
        text, chosen, _ = plan_strategy(model, batches, recovery, budget, [a.strip() for a in actions.split(",")],
                                        min_shared, max_tokens=max_tokens, reach=reach, cost=cost)
    return {"strategy": text, "recovery": recovery.text, "budget": budget, **chosen.to_dict()}


def _print_summary(analysis: dict, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"adjacent layers of {analysis['model']} ({analysis['tokens']:,} tokens)")
    for name in ("layer t", "rel. L2 MLP t-1 vs t", "cosine", "residual cos", "ppl t←t-1"):
        table.add_column(name, justify="right")
    pairs = {p["target"]: p for p in analysis["pairs"]}
    repl = {r["target"]: r for r in (analysis.get("replacement") or {}).get("layers", [])}
    for r in analysis["residual"]:
        t = r["layer"]
        p, q = pairs.get(t), repl.get(t)
        table.add_row(str(t), f"{p['rel_l2']:.3f}" if p else "–", f"{p['cosine']:.3f}" if p else "–",
                      f"{r['cosine']:.3f}", f"{q['ppl']:.2f} ({q['increase']:+.0%})" if q else "–")
    console.print(table)
    if rep := analysis.get("replacement"):
        console.print(f"original perplexity: {rep['base']:.3f} ({rep['examples']} examples)")
    if sug := analysis.get("suggestion"):
        console.print(f"suggested strategy for {sug['budget']:.0%}: [bold]{sug['strategy']}[/]", highlight=False)
        for reason in sug["reasons"]:
            console.print(f"  - {reason}", highlight=False)
    if plan := analysis.get("plan"):
        console.print(f"planned strategy for {plan['budget']} with {plan['recovery']}: [bold]{plan['strategy']}[/] "
                      f"({len(plan['shares'])} shared, {len(plan['mlp_drops'])} MLPs and {len(plan['block_drops'])} "
                      f"blocks dropped; sharing removes {plan['shared_fraction']:.0%})", highlight=False)
    console.print(f"wrote {out}/analysis.md, analysis.json and plots")


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run folders (summary.json, eval JSONs) or eval JSON files."),
    out: Path = typer.Option(..., "--out", "-o", help="Markdown file; plots are written next to it."),
) -> None:
    """Side-by-side tables and plots of several runs' perplexities, zero-shot accuracies and settings."""
    from sharp.evaluation.report import write_report

    collected = write_report(runs, out)
    console.print(f"wrote {out} ({len(collected)} runs)")
