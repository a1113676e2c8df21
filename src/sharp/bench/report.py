"""Render a `sharp bench` report: a rich table for the terminal, a Markdown table for docs, a PNG of the ratios."""

from __future__ import annotations

import os
from pathlib import Path

from rich.table import Table

from sharp.io.atomic import replaced_file

COLUMNS = (  # (header, field, format, ratio key or None, floor key or None)
    ("MiB on disk", "bytes_on_disk", "{:.1f}", "bytes_on_disk", None),
    ("cold load s", "cold_load_s", "{:.3f}", "cold_load", "load_time_ratio"),
    ("warm load s", "warm_load_s", "{:.3f}", "warm_load", None),
    ("TTFT s", "ttft_s", "{:.3f}", "ttft", None),
    ("decode tok/s", "decode_tok_s", "{:.1f}", "decode_speed", "decode_speed_ratio"),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}", "peak_rss", None),
    ("MiB read/token", "bytes_per_token", "{:.1f}", "bytes_per_token", None),
)


def _value(r: dict, field: str, fmt: str) -> str:
    v = r[field]
    if field.startswith("bytes"):
        v = v / 2**20
    return fmt.format(v)


def _cell(r: dict, field: str, fmt: str, ratio: str | None, floor: str | None, first: bool) -> str:
    text = _value(r, field, fmt)
    if ratio and not first and r["ratios"].get(ratio) is not None:
        text += f" ({r['ratios'][ratio]:.2f}×"
        if floor and r["floors"].get(floor) is not None:
            text += f", floor {r['floors'][floor]:.2f}×"
        text += ")"
    return text


def _paired_cell(r: dict, first: bool) -> str:
    p = r["decode_paired"]
    lo, hi = p["ratio_ci95"]
    if first:
        return "–"
    medians = p.get("process_medians", [])
    spread = f", processes {min(medians):.3f}–{max(medians):.3f}" if len(medians) > 1 else ""
    few = f", only {p['ci_coverage']:.0%} sure: too few rounds" if p.get("ci_coverage", 1.0) < 0.95 else ""
    return f"{p['ratio_median']:.3f}× [{lo:.3f}–{hi:.3f}{few}{spread}]"


def _paired(report: dict) -> bool:
    return all("decode_paired" in r for r in report["models"])


def header_lines(report: dict) -> list[str]:
    m, s = report["machine"], report["settings"]
    return [
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads, "
        f"L3 {m['l3_cache']}, load average {m['load_average_1m']:.2f} at start",
        f"settings: batch {s['batch']}, {s['decoding']}, prompt {s['prompt_tokens']} tokens, decode {s['tokens']} "
        f"tokens, {s['statistic']} of {s['repeats']} decode runs and {s.get('load_repeats', s['repeats'])} loads"
        + (f" per round × {s['rounds']} rounds (models measured in turn each round)" if s.get("rounds", 1) > 1
           else "")
        + (", torch.compile" if s.get("compile") else ""),
        s["cold_load"],
        "ratios are against the first model; decode speed ratio > 1 = faster; floors: load time ratio ≥ stored "
        "bytes ratio, decode speed ratio ≤ 1 / (bytes read per token ratio) when memory-bound",
        *([f"paired decode: after each bench round, every model loaded into one fresh process, decoding in turn for "
           f"{s['paired_rounds']} rounds; median of the per-round speed ratios against the first model [95% interval "
           "of that median, and the range of the processes' medians: rounds in one process share its load, so read "
           "the interval beside that range]"]
          if _paired(report) else []),
    ]


def rich_table(report: dict) -> Table:
    table = Table(title="sharp bench", caption="\n".join(header_lines(report)), caption_justify="left")
    table.add_column("model", overflow="fold")
    for header, *_ in COLUMNS:
        table.add_column(header, justify="right")
    paired = _paired(report)
    if paired:
        table.add_column("paired decode ratio", justify="right")
    for i, r in enumerate(report["models"]):
        table.add_row(r["model"], *(_cell(r, f, fmt, ra, fl, i == 0) for _, f, fmt, ra, fl in COLUMNS),
                      *([_paired_cell(r, i == 0)] if paired else []))
    return table


def markdown_table(report: dict, names: list[str] | None = None) -> str:
    names = names or [r["model"] for r in report["models"]]
    paired = _paired(report)
    headers = [h for h, *_ in COLUMNS] + (["paired decode ratio"] if paired else [])
    lines = ["| model | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
    for i, (name, r) in enumerate(zip(names, report["models"], strict=True)):
        cells = [_cell(r, f, fmt, ra, fl, i == 0) for _, f, fmt, ra, fl in COLUMNS]
        cells += [_paired_cell(r, i == 0)] if paired else []
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, out: str | os.PathLike, names: list[str] | None = None) -> None:
    """Grouped bars: each metric's ratio against the first model, with its floor as a black tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = names or [r["model"] for r in report["models"]]
    metrics = [(h, ra, fl) for h, _, _, ra, fl in COLUMNS if ra]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(metrics)), 4.5))
    width = 0.8 / len(report["models"])
    for i, (name, r) in enumerate(zip(names, report["models"], strict=True)):
        xs = [j + i * width for j in range(len(metrics))]
        ys = [r["ratios"].get(ra) or 0 for _, ra, _ in metrics]
        ax.bar(xs, ys, width, label=name)
        for x, (_, _, fl) in zip(xs, metrics, strict=True):
            if fl and r["floors"].get(fl):
                ax.plot([x - width / 2, x + width / 2], [r["floors"][fl]] * 2, color="black", lw=2)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], [h for h, _, _ in metrics], rotation=15)
    ax.set_ylabel(f"ratio vs {names[0]}")
    ax.set_title("sharp bench (black ticks: physical floors)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with replaced_file(out) as tmp:
        fig.savefig(tmp, dpi=120, format=Path(out).suffix.lstrip(".") or "png")
    plt.close(fig)
