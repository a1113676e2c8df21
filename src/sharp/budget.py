"""`--budget`: one grammar for every command that takes one (`sharp prune`, `sharp analyze`).

    40%   0.4          a share of the model's MLP weights to remove (SHARP's "MLP reduction"), above 0 and below 1
    107.5M   107500000 a count of stored parameters to keep (also 250K, 1.2B; `_` separates digits)
    match:DIR          as many stored parameters as the checkpoint (or pruned model) in DIR

A bare number below 1 is a share, anything from 1 up a count: a share of 1 (every MLP weight) is never a budget,
and nor is keeping less than one parameter. Parsing reads no model; what a budget means for a given model (the
stored-parameter target) is `sharp.baselines.budget.target_stored`. A command that cannot use every form passes
the ones it takes as `forms`, and other forms fail in one line that names them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

from sharp.errors import SharpError

SHARE, COUNT, MATCH = "mlp_fraction", "count", "match"
FORMS: dict[str, str] = {
    SHARE: "a share of the MLP weights to remove (40% or 0.4)",
    COUNT: "a stored-parameter count to keep (107.5M or 107500000)",
    MATCH: "match:DIR (the stored size of the checkpoint in DIR)",
}
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


@dataclass(frozen=True)
class Budget:
    """A parsed budget: `kind` is "mlp_fraction" (`value` in (0, 1)), "count" (`value` a whole number >= 1)
    or "match" (`path` a folder)."""

    kind: str
    value: float = 0.0
    path: str = ""

    @property
    def text(self) -> str:
        """The budget written back in the grammar (`parse_budget(b.text) == b`)."""
        if self.kind == SHARE:
            percent = f"{self.value * 100:.15g}%"
            if "e" not in percent and float(percent[:-1]) / 100 == self.value:  # 40% reads best
                return percent
            return format(Decimal(repr(self.value)), "f")  # the shortest exact decimal, never 1e-07
        if self.kind == MATCH:
            return f"match:{self.path}"
        return str(int(self.value))


def describe_forms(forms: tuple[str, ...]) -> str:
    return ", ".join(FORMS[f] for f in forms[:-1]) + (" or " if len(forms) > 1 else "") + FORMS[forms[-1]]


def parse_budget(text: str, forms: tuple[str, ...] = (SHARE, COUNT, MATCH), flag: str = "--budget") -> Budget:
    """Parse a budget (see the module doc); a `match:` folder must exist. Anything else, or a form not in
    `forms`, is one `SharpError` line naming what `flag` accepts."""
    budget = _parse(text, flag)
    if budget.kind not in forms:
        raise SharpError(f"{flag} '{text}' is {FORMS[budget.kind].split(' (')[0]}; this command's {flag} takes "
                         f"{describe_forms(forms)}")
    return budget


def _parse(text: str, flag: str) -> Budget:
    raw = text.strip()
    if raw.startswith("match:"):
        path = raw[len("match:"):]
        if not path or not Path(path).is_dir():
            raise SharpError(f"{flag} '{text}': '{path}' is not a folder; write match:DIR with DIR a sharp "
                             "checkpoint")
        return Budget(MATCH, path=path)
    s = raw.replace(" ", "").replace("_", "").upper()
    if m := re.fullmatch(_NUMBER + "%", s):
        return _share(float(m[1]) / 100, text, flag)
    if m := re.fullmatch(_NUMBER + "([KMB]?)", s):
        if not m[2] and Fraction(m[1]) < 1:
            return _share(float(m[1]), text, flag)
        count = Fraction(m[1]) * _SUFFIX[m[2]]  # exact: 4611686019B is 4611686019 * 10**9, not a float near it
        if count.denominator != 1 or count < 1:
            raise SharpError(f"{flag} '{text}' is not a whole number of parameters of at least 1; write "
                             f"{describe_forms((SHARE, COUNT, MATCH))}")
        return Budget(COUNT, int(count))
    raise SharpError(f"malformed {flag} '{text}'; write {describe_forms((SHARE, COUNT, MATCH))}")


def _share(value: float, text: str, flag: str) -> Budget:
    if not 0 < value < 1:
        raise SharpError(f"{flag} '{text}' is out of range: a share of the MLP weights to remove lies above 0% "
                         "and below 100% (e.g. 40% or 0.4)")
    return Budget(SHARE, value)
