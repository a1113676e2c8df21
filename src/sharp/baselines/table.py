"""The comparison table: rows of (name, stored parameters, perplexity per task), as markdown and JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from sharp.baselines.budget import spread


@dataclass
class Row:
    """One line of the comparison. `compressed` rows are held to the same stored-parameter budget."""

    key: str  # stable id, e.g. "layer-drop+heal"
    name: str  # what the table shows
    stored: int
    ppl: dict[str, float]
    compressed: bool = True
    healed: bool = False
    seconds: float = 0.0  # building + training (evaluation excluded)
    details: dict = field(default_factory=dict)
    nll_sem: dict[str, float] = field(default_factory=dict)  # standard error of the mean NLL per task
    examples: dict[str, int] = field(default_factory=dict)  # examples scored per task
    trainable: int = 0  # parameters trained (SFT / heal), shared tensors once
    train_tokens: int = 0  # non-padding tokens the training saw


def compressed_spread(rows: list[Row]) -> float:
    return spread({r.key: r.stored for r in rows if r.compressed})


def best_compressed(rows: list[Row], task: str) -> str | None:
    values = {r.key: r.ppl.get(task, math.inf) for r in rows if r.compressed}
    return min(values, key=values.__getitem__) if values else None


def _fmt(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:,.0f}" if x >= 1000 else f"{x:.2f}"


def short_label(task: str) -> str:
    """`ppl:alpaca=/long/path/data.json[-100:]` -> `alpaca: data.json[-100:]` (column headings)."""
    kind, _, source = task.removeprefix("ppl:").partition("=")
    return f"{kind}: {source.rsplit('/', 1)[-1]}" if source else kind


def to_markdown(rows: list[Row], tasks: list[str], header: dict[str, str]) -> str:
    """A rebuttal-Table-A2-style table; the best compressed row per task is in bold."""
    best = {t: best_compressed(rows, t) for t in tasks}
    original = next((r.stored for r in rows if r.key == "original"), None)
    lines = [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["", "| model | stored params | vs original | trained params | train tokens | time | "
              + " | ".join(map(short_label, tasks)) + " |", "|---|---:|---:|---:|---:|---:|" + "---:|" * len(tasks)]
    for r in rows:
        ratio = f"{r.stored / original:.1%}" if original else "–"
        cells = []
        for t in tasks:
            sem = r.nll_sem.get(t)
            value = _fmt(r.ppl.get(t)) + (f" ±{sem:.3f}" if sem is not None and math.isfinite(sem) else "")
            cells.append(f"**{value}**" if best[t] == r.key else value)
        trained = f"{r.trainable:,}" if r.trainable else "–"
        tokens = f"{r.train_tokens:,}" if r.train_tokens else "–"
        lines.append(f"| {r.name} | {r.stored:,} | {ratio} | {trained} | {tokens} | {r.seconds:,.0f} s | "
                     + " | ".join(cells) + " |")
    examples = sorted({n for r in rows for n in r.examples.values()})
    lines += ["", f"Perplexity (lower is better) ± the standard error of the mean NLL per token (nats, over "
              f"{'/'.join(map(str, examples)) or '?'} examples per task): two rows differ beyond noise where their "
              f"log-perplexities differ by more than about twice it. Bold: the best compressed row per task. Time: "
              f"building and training a row (evaluation excluded). Stored parameters of the compressed rows are "
              f"within {compressed_spread(rows):.2%} of each other (max − min over min)."]
    return "\n".join(lines) + "\n"


def to_json(rows: list[Row], tasks: list[str], header: dict) -> str:
    data = {"tasks": tasks, "header": header, "spread": compressed_spread(rows), "rows": [asdict(r) for r in rows],
            "best": {t: best_compressed(rows, t) for t in tasks}}
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
