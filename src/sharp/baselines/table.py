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
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


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
    lines += ["", "| model | stored params | vs original | " + " | ".join(map(short_label, tasks)) + " |",
              "|---|---:|---:|" + "---:|" * len(tasks)]
    for r in rows:
        ratio = f"{r.stored / original:.1%}" if original else "–"
        cells = [f"**{_fmt(r.ppl.get(t))}**" if best[t] == r.key else _fmt(r.ppl.get(t)) for t in tasks]
        lines.append(f"| {r.name} | {r.stored:,} | {ratio} | " + " | ".join(cells) + " |")
    lines += ["", f"Perplexity (lower is better); bold: the best compressed row per task. Stored parameters of the "
              f"compressed rows are within {compressed_spread(rows):.2%} of each other (max − min over min)."]
    return "\n".join(lines) + "\n"


def to_json(rows: list[Row], tasks: list[str], header: dict) -> str:
    data = {"tasks": tasks, "header": header, "spread": compressed_spread(rows), "rows": [asdict(r) for r in rows],
            "best": {t: best_compressed(rows, t) for t in tasks}}
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
