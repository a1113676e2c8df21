"""Sharing strategies: which target layers reuse which reference layer.

    next:A-B          inside layers A..B, layers A+1, A+3, ... each reuse their immediate predecessor
    group:K:A-B       split A..B into consecutive groups of K; the first layer of each group is the
                      reference for the other K-1 (group:2 equals next)
    map:T=R,T=R,...   explicit target=reference pairs; an item may also be
                        T=R@K         the pair, with recovery rank K for this target (the --recovery family)
                        T=drop-mlp    layer T's MLP deleted (attention kept)
                        T=drop-block  layer T deleted as a whole
                      (what the planner writes: sharing where it fits, dropping where it does not)
    auto:BUDGET       the planner chooses (`sharp.recovery.planner`; needs calibration data: `sharp compress`
                      and `sharp analyze` resolve it into a `map:` before anything is shared)

`parse_strategy` checks syntax only (no model needed); `resolve(num_layers)` checks it against a model and
returns the sharing map {target: reference} (original layer numbers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sharp.errors import SharpError

_RANGE = r"(\d+)-(\d+)"
_FORMS = "next:A-B, group:K:A-B, map:T=R,T=R,... or auto:BUDGET"
_ITEM = re.compile(r"(\d+)=(?:(\d+)(?:@(\d+))?|(drop-mlp)|(drop-block))")


@dataclass(frozen=True)
class Strategy:
    """A parsed strategy. `text` is its canonical spelling."""

    kind: str  # "next" | "group" | "map" | "auto"
    start: int = 0
    end: int = 0
    group: int = 2
    pairs: tuple[tuple[int, int], ...] = ()
    ranks: tuple[tuple[int, int], ...] = ()  # (target, recovery rank) overrides
    mlp_drops: tuple[int, ...] = ()
    block_drops: tuple[int, ...] = ()
    budget: str = ""  # auto: the planner's budget, as written

    @property
    def text(self) -> str:
        if self.kind == "next":
            return f"next:{self.start}-{self.end}"
        if self.kind == "group":
            return f"group:{self.group}:{self.start}-{self.end}"
        if self.kind == "auto":
            return f"auto:{self.budget}"
        ranks = dict(self.ranks)
        items = {t: f"{t}={r}" + (f"@{ranks[t]}" if t in ranks else "") for t, r in self.pairs}
        items |= {t: f"{t}=drop-mlp" for t in self.mlp_drops} | {t: f"{t}=drop-block" for t in self.block_drops}
        return "map:" + ",".join(items[t] for t in sorted(items))

    @property
    def drops(self) -> bool:
        return bool(self.mlp_drops or self.block_drops)

    def resolve(self, num_layers: int) -> dict[int, int]:
        """The sharing map {target: reference} for a model with `num_layers` decoder layers."""
        if self.kind == "auto":
            raise SharpError(f"strategy '{self.text}' is chosen by the planner from data; run it through "
                             "`sharp compress` or `sharp analyze`, which resolve it into a map: strategy")
        for layer in (*self.mlp_drops, *self.block_drops):
            if layer >= num_layers:
                raise SharpError(f"strategy '{self.text}': layer {layer} is out of range; the model has layers "
                                 f"0-{num_layers - 1}")
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
        if not mapping and not self.drops:
            raise SharpError(f"strategy '{self.text}' changes no layer")
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
    if m := re.fullmatch(r"auto:(.+)", s):
        return Strategy("auto", budget=m[1])
    if s.startswith("map:") and s[4:] and all(_ITEM.fullmatch(item) for item in s[4:].split(",")):
        items = [_ITEM.fullmatch(item) for item in s[4:].split(",")]
        pairs = [(int(i[1]), int(i[2])) for i in items if i[2]]
        ranks = [(int(i[1]), int(i[3])) for i in items if i[3]]
        mlp_drops = sorted(int(i[1]) for i in items if i[4])
        block_drops = sorted(int(i[1]) for i in items if i[5])
        for t, k in ranks:
            if k < 1:
                raise SharpError(f"strategy '{text}': layer {t}'s recovery rank must be at least 1")
        targets = [int(i[1]) for i in items]
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
        return Strategy("map", pairs=tuple(sorted(pairs)), ranks=tuple(sorted(ranks)), mlp_drops=tuple(mlp_drops),
                        block_drops=tuple(block_drops))
    raise SharpError(f"malformed strategy '{text}'; expected {_FORMS} (e.g. next:6-29)")


def _check_range(text: str, start: int, end: int) -> None:
    if start > end:
        raise SharpError(f"strategy '{text}': range start {start} is after its end {end}")
    if start == end:
        raise SharpError(f"strategy '{text}': the range {start}-{end} holds one layer, so nothing can share")
