"""Markdown + PNG renderings: the `sharp analyze` folder, and side-by-side reports of runs (`sharp report`).

Plots use matplotlib's Agg backend (no display needed). Run reports are tolerant: a run folder contributes
whatever it has among `summary.json` (from `sharp compress`), `sharp_config.json` / `sharp_prune.json`
(checkpoint identity) and eval JSONs (`sharp eval --json`: {"model", "tasks": {name: {"ppl", ...}},
"downstream": {task: {"acc", "acc_norm"}}}); missing keys show as "–".
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sharp.errors import SharpError

DASH = "–"
FIRST_TOKEN_RATIO = 5.0  # an MLP writing this many times its usual norm at position 0 is called out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}" if abs(value) < 1e4 else f"{value:,.0f}"


def _save(fig, folder: Path, name: str, names: list[str]) -> None:
    """Write `fig` to folder/name, close it, and add the name to `names`."""
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    _pyplot().close(fig)
    names.append(name)


# ---------------------------------------------------------------------------------------------- sharp analyze


def analysis_markdown(analysis: dict, images: list[str] = ()) -> str:
    """The analysis as a markdown page: settings, one row per layer, first-position note, suggestion."""
    settings = analysis.get("settings", {})
    rep = analysis.get("replacement")
    lines = [f"# Layer similarity of {analysis.get('model') or 'the model'}", ""]
    first = "excluded" if analysis.get("skip_first", 1) else "included"
    lines.append(f"Data `{analysis.get('data')}`: {analysis['tokens']:,} tokens measured (position 0 of every "
                 f"sequence {first}; see below). MLP columns compare MLP_{{t-1}}(x) with MLP_t(x) at layer t's "
                 "real MLP input x; residual cos compares the residual stream entering and leaving layer t.")
    if rep:
        lines.append(f"Single-layer replacement (only t's MLP replaced by t-1's, no recovery): response "
                     f"perplexity on {rep.get('examples', '?')} examples ({_num(rep.get('tokens'))} tokens), "
                     f"original {_num(rep['base'])}.")
    lines += ["", "| layer t | rel. L2 MLP_{t-1} vs MLP_t | cosine | residual cos | ppl with t←t-1 | Δ ppl |",
              "|---:|---:|---:|---:|---:|---:|"]
    pairs = {p["target"]: p for p in analysis["pairs"]}
    resid = {r["layer"]: r["cosine"] for r in analysis["residual"]}
    repl = {r["target"]: r for r in (rep or {}).get("layers", [])}
    for t in range(analysis["layers"]):
        p, r = pairs.get(t, {}), repl.get(t, {})
        inc = f"{r['increase']:+.1%}" if r else DASH
        lines.append(f"| {t} | {_num(p.get('rel_l2'))} | {_num(p.get('cosine'))} | {_num(resid.get(t))} | "
                     f"{_num(r.get('ppl'))} | {inc} |")
    lines += ["", *[f"![{Path(i).stem}]({i})" for i in images], ""]
    lines += _first_token_section(analysis)
    if settings:
        lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())) + "."]
    if sug := analysis.get("suggestion"):
        lines += ["", f"## Suggested strategy for a {sug['budget']:.0%} MLP reduction", "",
                  f"`{sug['strategy']}`", "", *[f"- {r}" for r in sug["reasons"]]]
    return "\n".join(lines).rstrip() + "\n"


def _first_token_section(analysis: dict) -> list[str]:
    norms = analysis.get("mlp_norm") or []
    loud = [n for n in norms if n["mean"] > 0 and n["first_token"] > FIRST_TOKEN_RATIO * n["mean"]]
    lines = ["## Position 0", ""]
    what = ("left out of every statistic above" if analysis.get("skip_first", 1)
            else "included in the statistics above (--include-first-token)")
    lines.append(f"The first position of every sequence is {what}: attention-sink models write huge activations "
                 "there, which would dominate the sums.")
    if loud:
        lines.append("MLP output norm at position 0 vs its mean elsewhere: " + ", ".join(
            f"layer {n['layer']} {n['first_token'] / n['mean']:.1f}× (residual norm there "
            f"{n['first_token_residual']:.0f})" for n in loud) + ".")
    else:
        lines.append(f"No layer's MLP writes more than {FIRST_TOKEN_RATIO:.0f}× its usual norm there.")
    return lines


def analysis_plots(analysis: dict, out: Path, prefix: str = "") -> list[str]:
    """mlp_similarity.png, residual_cosine.png and (if measured) replacement.png in `out` (names prefixed by
    `prefix`); their names."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    names = []
    targets = [p["target"] for p in analysis["pairs"]]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    ax1.plot(targets, [p["rel_l2"] for p in analysis["pairs"]], "o-")
    ax1.set_ylabel("rel. L2 error")
    ax1.set_title("MLP_{t-1}(x) vs MLP_t(x) at layer t's MLP input")
    ax2.plot(targets, [p["cosine"] for p in analysis["pairs"]], "o-", color="tab:orange", label="MLP outputs")
    ax2.plot([r["layer"] for r in analysis["residual"]], [r["cosine"] for r in analysis["residual"]], "s--",
             color="tab:green", label="residual in → out")
    ax2.set_ylabel("cosine")
    ax2.set_xlabel("layer t")
    ax2.legend()
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, out, f"{prefix}mlp_similarity.png", names)

    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(analysis["residual_matrix"], cmap="viridis", vmin=-1 if _has_negative(analysis) else 0, vmax=1)
    ax.set_title("residual stream cosine (h_0 = embeddings, h_i = after layer i-1)")
    ax.set_xlabel("h_j")
    ax.set_ylabel("h_i")
    fig.colorbar(im, ax=ax)
    _save(fig, out, f"{prefix}residual_cosine.png", names)

    rep = analysis.get("replacement")
    if rep and rep.get("layers"):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        rows = rep["layers"]
        ax.bar([r["target"] for r in rows], [r["ppl"] for r in rows], color="tab:red")
        ax.axhline(rep["base"], color="black", linestyle="--", label=f"original {rep['base']:.2f}")
        ax.set_yscale("log")
        ax.set_xlabel("layer t (its MLP replaced by layer t-1's)")
        ax.set_ylabel("perplexity")
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _save(fig, out, f"{prefix}replacement.png", names)
    return names


def _has_negative(analysis: dict) -> bool:
    return any(v < 0 for row in analysis["residual_matrix"] for v in row)


def write_analysis(analysis: dict, out: Path) -> None:
    """analysis.json, analysis.md and the PNGs into folder `out` (the caller makes it atomic)."""
    out = Path(out)
    (out / "analysis.json").write_text(json.dumps(analysis, indent=2, sort_keys=True) + "\n")
    images = analysis_plots(analysis, out)
    (out / "analysis.md").write_text(analysis_markdown(analysis, images))


# ---------------------------------------------------------------------------------------------- sharp report


@dataclass
class Run:
    """What one run folder (or one eval JSON file) holds."""

    name: str
    info: dict = field(default_factory=dict)  # flattened scalars of summary / config files
    ppl: dict = field(default_factory=dict)  # task -> ppl
    downstream: dict = field(default_factory=dict)  # task -> {"acc", "acc_norm"}
    stages: dict = field(default_factory=dict)  # summary.json: held-out ppl after each compress stage
    sources: list = field(default_factory=list)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        elif isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value) and len(value) <= 8:
            out[name] = ",".join(map(str, value))
        elif value is None or isinstance(value, (str, int, float, bool)):
            out[name] = value
    return out


# summary.json (`sharp compress`) keys shown first, in this order; `config` repeats the settings and is left out
SUMMARY_FIRST = ("model", "strategy", "recovery", "train", "data", "stages", "mlp_reduction", "params.stored",
                 "params.recovery", "params.removed", "eval_examples", "train_examples")
SUMMARY_SKIP = ("config", "tasks", "downstream", "perplexity")  # perplexity: its own table
STAGES = ("original", "direct", "slw", "sft")  # summary["perplexity"] keys, in pipeline order


def _summary_info(name: str, data: dict) -> dict:
    if name == "summary.json":
        flat = _flatten({k: v for k, v in data.items() if k not in SUMMARY_SKIP})
        first = {k: flat.pop(k) for k in SUMMARY_FIRST if k in flat}
        return {**first, **{k: v for k, v in flat.items() if not k.endswith(".logged")}}  # resume bookkeeping
    if name == "sharp_config.json":  # a sharp checkpoint: what was shared, how
        return {f"checkpoint.{k}": data[k] for k in ("strategy", "recovery", "modules") if k in data}
    return {f"prune.{k}": v for k, v in _flatten(data).items() if k != "format_version"}  # sharp_prune.json


def _is_eval(data: dict) -> bool:
    """An eval JSON (`sharp eval --json`): its tasks or downstream scores are objects (a file that only shares
    the key names is not one)."""
    return any(isinstance(data.get(key), dict) for key in ("tasks", "downstream"))


def _section(data: dict, key: str) -> dict:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _add_eval(run: Run, data: dict) -> None:
    for task, r in _section(data, "tasks").items():
        if isinstance(r, dict) and isinstance(r.get("ppl"), (int, float)):
            run.ppl.setdefault(task, float(r["ppl"]))
    for task, r in _section(data, "downstream").items():
        if task != "mean" and isinstance(r, dict):
            run.downstream.setdefault(task, {k: r.get(k) for k in ("acc", "acc_norm")})


def collect_run(path: str | os.PathLike) -> Run:
    """One run: a folder (summary.json, checkpoint configs, eval JSONs inside it or in eval/) or an eval JSON."""
    p = Path(path)
    if not p.exists():
        raise SharpError(f"run '{p}' does not exist; pass run folders or eval JSON files")
    files = [p] if p.is_file() else sorted([*p.glob("*.json"), *p.glob("eval/*.json")],
                                           key=lambda f: (f.name != "summary.json", str(f)))  # its keys first
    run = Run(name=p.stem if p.is_file() else p.name)
    for f in files:
        data = _read_json(f)
        if data is None:
            continue
        if _is_eval(data):
            _add_eval(run, data)
            if "summary" not in f.name:
                run.sources.append(f.name)
                continue
        if f.name in ("summary.json", "sharp_config.json", "sharp_prune.json"):
            for key, value in _summary_info(f.name, data).items():
                run.info.setdefault(key, value)
            if f.name == "summary.json" and isinstance(data.get("perplexity"), dict):
                run.stages = {k: v for k, v in data["perplexity"].items() if isinstance(v, (int, float))}
            run.sources.append(f.name)
    if not run.sources:
        raise SharpError(f"run '{p}' holds no summary.json, sharp_config.json or eval JSON (`sharp eval --json`)")
    return run


def _unique_names(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        n = seen.get(run.name, 0)
        seen[run.name] = n + 1
        if n:
            run.name = f"{run.name} ({n + 1})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows]]


def report_markdown(runs: list[Run], images: list[str] = ()) -> str:
    names = [r.name for r in runs]
    lines = ["# sharp report", "", "Runs: " + ", ".join(f"`{r.name}` ({', '.join(r.sources)})" for r in runs), ""]
    ppl_tasks = sorted({t for r in runs for t in r.ppl})
    if ppl_tasks:
        lines += ["## Perplexity (lower is better)", ""]
        lines += _table(["task", *names], [[t, *[_num(r.ppl.get(t)) for r in runs]] for t in ppl_tasks])
        lines.append("")
    tasks = sorted({t for r in runs for t in r.downstream})
    if tasks:
        lines += ["## Zero-shot accuracy (acc / acc_norm)", ""]
        rows = [[t, *[_acc(r.downstream.get(t, {})) for r in runs]] for t in tasks]
        rows.append(["**mean**", *[_acc(_mean(r.downstream)) for r in runs]])
        lines += _table(["task", *names], rows)
        lines.append("")
    stages = [s for s in STAGES if any(s in r.stages for r in runs)]
    stages += sorted({s for r in runs for s in r.stages} - set(stages))
    if stages:
        lines += ["## Held-out perplexity after each `sharp compress` stage (summary.json)", ""]
        lines += _table(["stage", *names], [[s, *[_num(r.stages.get(s)) for r in runs]] for s in stages])
        lines.append("")
    keys = [k for k in dict.fromkeys(k for r in runs for k in r.info)]
    if keys:
        lines += ["## Run details", ""]
        lines += _table(["", *names], [[k, *[_detail(r.info.get(k)) for r in runs]] for k in keys])
        lines.append("")
    lines += [f"![{Path(i).stem}]({i})" for i in images]
    return "\n".join(lines).rstrip() + "\n"


def _detail(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else _num(value)


def _acc(r: dict) -> str:
    return f"{_num(r.get('acc'), 4)} / {_num(r.get('acc_norm'), 4)}" if r else DASH


def _mean(downstream: dict) -> dict:
    out = {}
    for key in ("acc", "acc_norm"):
        values = [r[key] for r in downstream.values() if isinstance(r.get(key), (int, float))]
        out[key] = sum(values) / len(values) if values else None
    return out if downstream else {}


def report_plots(runs: list[Run], out_md: Path) -> list[str]:
    """`<stem>_stages.png` (compress summaries), `<stem>_ppl.png` and `<stem>_downstream.png` (eval JSONs) next
    to the report; their names."""
    plt = _pyplot()
    names = []
    staged = [r for r in runs if r.stages]
    if staged:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        order = [s for s in STAGES if any(s in r.stages for r in staged)]
        order += sorted({s for r in staged for s in r.stages} - set(order))
        for run in staged:
            xs = [i for i, s in enumerate(order) if s in run.stages]
            ax.plot(xs, [run.stages[order[i]] for i in xs], "o-", label=run.name)
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order)
        ax.set_yscale("log")
        ax.set_ylabel("held-out perplexity")
        ax.set_title("perplexity after each stage of sharp compress")
        ax.legend(fontsize="small")
        name = f"{out_md.stem}_stages.png"
        _save(fig, out_md.parent, name, names)
    for kind, tasks, value, ylabel, log in (
        ("ppl", sorted({t for r in runs for t in r.ppl}), lambda r, t: r.ppl.get(t), "perplexity", True),
        ("downstream", sorted({t for r in runs for t in r.downstream}),
         lambda r, t: r.downstream.get(t, {}).get("acc"), "accuracy (acc)", False),
    ):
        if not tasks:
            continue
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(tasks) * max(1, len(runs)) ** 0.5), 3.8))
        width = 0.8 / len(runs)
        for k, run in enumerate(runs):
            xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(tasks))]
            ys = [value(run, t) for t in tasks]
            ax.bar(xs, [y if isinstance(y, (int, float)) else 0 for y in ys], width, label=run.name)
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels([t if len(t) <= 24 else "…" + t[-22:] for t in tasks], rotation=20, ha="right")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize="small")
        name = f"{out_md.stem}_{kind}.png"
        _save(fig, out_md.parent, name, names)
    return names


def write_report(run_paths: list[str | os.PathLike], out: str | os.PathLike) -> list[Run]:
    """Collect the runs and write `out` (markdown) with its PNGs beside it; each file replaced atomically."""
    from sharp.io.atomic import check_output_file

    out = Path(out)
    if not run_paths:
        raise SharpError("no runs given; pass one or more run folders or eval JSON files")
    if out.suffix.lower() != ".md":
        raise SharpError(f"--out '{out}' must be a markdown file name ending in .md")
    if out.is_dir():
        raise SharpError(f"--out '{out}' is a folder; give a file name such as report.md")
    check_output_file(out, "--out")
    runs = [collect_run(p) for p in run_paths]
    _unique_names(runs)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.absolute().parent, prefix=f".{out.name}.tmp-") as tmp:
        tmp_md = Path(tmp) / out.name
        images = report_plots(runs, tmp_md)
        tmp_md.write_text(report_markdown(runs, images))
        for name in [*images, out.name]:  # the markdown last: it only appears once its images exist
            os.replace(Path(tmp) / name, out.parent / name)
    return runs
