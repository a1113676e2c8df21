"""Sharing strategies: which target layers reuse which reference layer.

    next:A-B          inside layers A..B, layers A+1, A+3, ... each reuse their immediate predecessor
    group:K:A-B       split A..B into consecutive groups of K; the first layer of each group is the
                      reference for the other K-1 (group:2 equals next)
    map:T=R,T=R,...   explicit target=reference pairs

`parse_strategy` checks syntax only (no model needed); `resolve(num_layers)` checks it against a model and
returns the sharing map {target: reference}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sharp.errors import SharpError

_RANGE = r"(\d+)-(\d+)"
_FORMS = "next:A-B, group:K:A-B or map:T=R,T=R,..."


@dataclass(frozen=True)
class Strategy:
    """A parsed strategy. `text` is its canonical spelling."""

    kind: str  # "next" | "group" | "map"
    start: int = 0
    end: int = 0
    group: int = 2
    pairs: tuple[tuple[int, int], ...] = ()

    @property
    def text(self) -> str:
        if self.kind == "next":
            return f"next:{self.start}-{self.end}"
        if self.kind == "group":
            return f"group:{self.group}:{self.start}-{self.end}"
        return "map:" + ",".join(f"{t}={r}" for t, r in self.pairs)

    def resolve(self, num_layers: int) -> dict[int, int]:
        """The sharing map {target: reference} for a model with `num_layers` decoder layers."""
        if self.kind == "map":
            mapping = dict(self.pairs)
        else:
            if self.end >= num_layers:
                raise SharpError(
                    f"strategy '{self.text}': layer {self.end} is out of range; the model has layers "
                    f"0-{num_layers - 1}"
                )
            mapping = {}
            for first in range(self.start, self.end + 1, self.group):
                for target in range(first + 1, min(first + self.group, self.end + 1)):
                    mapping[target] = first
            assert mapping, "a range of two or more layers always yields a target"
        for target, ref in mapping.items():
            for layer in (target, ref):
                if layer >= num_layers:
                    raise SharpError(
                        f"strategy '{self.text}': layer {layer} is out of range; the model has layers "
                        f"0-{num_layers - 1}"
                    )
        return dict(sorted(mapping.items()))


def parse_strategy(text: str) -> Strategy:
    """Parse strategy text; raise `SharpError` with one line on anything malformed."""
    s = text.strip().replace(" ", "")
    if m := re.fullmatch(rf"next:{_RANGE}", s):
        start, end = int(m[1]), int(m[2])
        _check_range(text, start, end)
        return Strategy("next", start, end, 2)
    if m := re.fullmatch(rf"group:(\d+):{_RANGE}", s):
        k, start, end = int(m[1]), int(m[2]), int(m[3])
        if k < 2:
            raise SharpError(f"strategy '{text}': group size must be at least 2 (group:2 equals next)")
        _check_range(text, start, end)
        return Strategy("group", start, end, k)
    if m := re.fullmatch(r"map:(\d+=\d+(?:,\d+=\d+)*)", s):
        pairs = [tuple(int(v) for v in p.split("=")) for p in m[1].split(",")]
        targets = [t for t, _ in pairs]
        refs = {r for _, r in pairs}
        for t, r in pairs:
            if t == r:
                raise SharpError(f"strategy '{text}': layer {t} cannot be its own reference")
        dupes = sorted({t for t in targets if targets.count(t) > 1})
        if dupes:
            raise SharpError(f"strategy '{text}': layer {dupes[0]} is a target more than once")
        chained = sorted(set(targets) & refs)
        if chained:
            raise SharpError(
                f"strategy '{text}': layer {chained[0]} is both a target and a reference; "
                "a target must reuse a layer that keeps its own weights"
            )
        return Strategy("map", pairs=tuple(sorted(pairs)))
    raise SharpError(f"malformed strategy '{text}'; expected {_FORMS} (e.g. next:6-29)")


def _check_range(text: str, start: int, end: int) -> None:
    if start > end:
        raise SharpError(f"strategy '{text}': range start {start} is after its end {end}")
    if start == end:
        raise SharpError(f"strategy '{text}': the range {start}-{end} holds one layer, so nothing can share")
