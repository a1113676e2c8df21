"""`SharpConfig`: everything needed to rebuild a shared model from its base architecture.

Saved as `sharp_config.json` (sorted keys, versioned). Unknown keys are an error so a newer checkpoint is
never half-understood.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from sharp.errors import SharpError

FORMAT_VERSION = 1


def kept_layers(original_layers: int, dropped: list[int]) -> dict[int, int]:
    """{layer of a model with `dropped` blocks deleted: its index among the original's `original_layers`}."""
    gone = set(dropped)
    return dict(enumerate(i for i in range(original_layers) if i not in gone))


@dataclass
class BaseIdentity:
    """Which base model the recovery parameters belong to."""

    model_type: str
    source: str = ""  # what the user passed (path, alias or hub id)
    config_sha256: str = ""  # hash of the base config (canonical JSON)
    weights_sha256: str = ""  # hash of the base weights (sorted names, raw bytes)


@dataclass
class SharpConfig:
    """The sharing map, recovery spec and base identity of a SHARP model."""

    sharing: dict[int, int]  # target layer -> reference layer
    recovery: str = "none"  # spec text, e.g. "lora:32"
    modules: str = "mlp"
    strategy: str = ""  # the strategy text that produced `sharing`
    base: BaseIdentity = field(default_factory=lambda: BaseIdentity(model_type=""))
    format_version: int = FORMAT_VERSION
    sharp_version: str = ""
    # A plan that also drops (strategy map:...=drop-mlp / drop-block): every index above and below is a layer of
    # the checkpoint's own config.json, i.e. after the dropped blocks are gone.
    ranks: dict[int, int] = field(default_factory=dict)  # target -> its own recovery rank (the spec's family)
    dropped_mlps: list[int] = field(default_factory=list)  # layers whose MLP is deleted (width 0)
    dropped_blocks: list[int] = field(default_factory=list)  # the base model's layers deleted as a whole
    base_parameters: int = 0  # the base model's parameter count (0: derived from the model, nothing dropped)
    base_mlp_parameters: int = 0

    def base_layers(self, num_layers: int) -> dict[int, int]:
        """{layer of this model: the same layer of the base model} (they differ after dropped blocks)."""
        return kept_layers(num_layers + len(self.dropped_blocks), self.dropped_blocks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sharing"] = {str(t): r for t, r in sorted(self.sharing.items())}
        d["ranks"] = {str(t): r for t, r in sorted(self.ranks.items())}
        # a plain sharing map writes the same file as before plans existed, so older sharp-llm versions still
        # read it; a plan's keys make an older version refuse the file with its "newer sharp-llm" line
        for key in ("ranks", "dropped_mlps", "dropped_blocks", "base_parameters", "base_mlp_parameters"):
            if not d[key]:
                del d[key]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> SharpConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SharpError(f"sharp_config.json has unknown keys {unknown}; is it from a newer sharp-llm?")
        if not isinstance(d.get("format_version", FORMAT_VERSION), int):
            raise SharpError("sharp_config.json is malformed (format_version must be a number); re-create it")
        if d.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise SharpError(
                f"sharp_config.json has format {d['format_version']}, this sharp-llm reads up to "
                f"{FORMAT_VERSION}; upgrade sharp-llm"
            )
        d = dict(d)
        try:
            d["sharing"] = {int(t): int(r) for t, r in d["sharing"].items()}
            d["ranks"] = {int(t): int(r) for t, r in d.get("ranks", {}).items()}
            for key in ("dropped_mlps", "dropped_blocks"):
                d[key] = [int(v) for v in d.get(key, [])]
            for key in ("base_parameters", "base_mlp_parameters"):
                d[key] = int(d.get(key, 0))
            d["base"] = BaseIdentity(**d.get("base", {"model_type": ""}))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:  # Overflow: int(Infinity)
            raise SharpError(f"sharp_config.json is malformed ({e}); re-create the checkpoint") from None
        texts = [(k, d.get(k, "")) for k in ("recovery", "modules", "strategy", "sharp_version")]
        texts += [(f"base.{k}", v) for k, v in asdict(d["base"]).items()]
        for key, value in texts:
            if not isinstance(value, str):
                raise SharpError(f"sharp_config.json is malformed ('{key}' must be text, not {value!r}); "
                                 "re-create the checkpoint")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> SharpConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SharpError(f"sharp_config.json is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(d, dict):
            raise SharpError("sharp_config.json must hold a JSON object")
        return cls.from_dict(d)
