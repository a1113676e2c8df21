"""Data specs (`FORMAT:SOURCE`), the formats SHARP's paper used, and record loading.

    alpaca:path/to/data.json           a local .json / .jsonl / .txt / .csv / .parquet file or a folder
    dolly:databricks/databricks-dolly-15k          a Hugging Face Hub dataset (split "train")
    dialogsum:knkarthick/dialogsum@validation      ... another split
    alpaca:data.json[-100:]            a Python slice of the records (here: the last 100)
    alpaca-demo                        a built-in alias (`sharp assets fetch` downloads it)

`parse_data_spec` only checks the text (format name, local path exists, alias known); `load_records` reads the
records and checks that each one has the fields its format needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sharp.errors import SharpError


@dataclass(frozen=True)
class Format:
    """A record layout. `parts` maps a record to (system, instruction, input, output) for the templates."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    instruction: str | None = None  # fixed instruction when the records carry none (DialogSum)
    mapping: tuple[str | None, str | None, str | None, str | None] = (None, None, None, None)
    # mapping: record fields feeding (system, instruction, input, output); None = empty / fixed

    def check(self, record: object, index: int) -> dict:
        """The record itself when it has every required field as text; else one clear line."""
        if not isinstance(record, dict):
            raise SharpError(f"record {index} is a {type(record).__name__}, not an object with fields "
                             f"{', '.join(self.required)} (format '{self.name}')")
        for field in self.required:
            if record.get(field) is None:
                raise SharpError(f"record {index} has no '{field}' field; format '{self.name}' needs "
                                 f"{', '.join(self.required)} (pick another format or fix the data)")
        for field in self.required + self.optional:
            value = record.get(field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, str | int | float)):
                raise SharpError(f"record {index}: field '{field}' is a {type(value).__name__}, not text")
        return record

    def parts(self, record: dict, index: int) -> tuple[str, str, str, str]:
        """(system, instruction, input, output) of one record."""
        self.check(record, index)
        out = [str(record.get(f) if record.get(f) is not None else "") if f else "" for f in self.mapping]
        if self.instruction is not None:
            out[1] = self.instruction
        return out[0], out[1], out[2], out[3]


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("alpaca", ("instruction", "output"), ("input",),
               mapping=(None, "instruction", "input", "output")),
        Format("dolly", ("instruction", "response"), ("context",),
               mapping=(None, "instruction", "context", "response")),
        Format("dialogsum", ("dialogue", "summary"), instruction="Summarize the following dialogue.",
               mapping=(None, None, "dialogue", "summary")),
        Format("openorca", ("question", "response"), ("system_prompt",),
               mapping=("system_prompt", "question", None, "response")),
        Format("arxiv-math", ("question", "answer"), mapping=(None, "question", None, "answer")),
        Format("text", ("text",)),
    )
}
INSTRUCTION_FORMATS = tuple(name for name in FORMATS if name != "text")

_LOCAL_EXTS = (".json", ".jsonl", ".txt", ".csv", ".parquet")
_SLICE = re.compile(r"^(.*)\[(-?\d+)?:(-?\d+)?\]$", re.S)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?$")
_BRACKETS = re.compile(r"^(.+)(\[[^\[\]]*\])$", re.S)  # what a source with a slice that `_SLICE` refused looks like
_ALIAS = re.compile(r"^[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class DataSpec:
    """Where records come from. `kind`: "file", "dir" (a local dataset folder) or "hub"."""

    format: str
    source: str
    kind: str = "file"
    split: str = "train"
    start: int | None = None  # Python slice of the records; both None = all
    stop: int | None = None

    @property
    def text(self) -> str:
        src = self.source + (f"@{self.split}" if self.kind == "hub" and self.split != "train" else "")
        if self.start is not None or self.stop is not None:
            src += f"[{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}]"
        return f"{self.format}:{src}"


def _alias(name: str) -> tuple[str, Path] | None:
    if not _ALIAS.match(name):
        return None
    try:
        from sharp.io.assets import resolve_data_alias
    except ImportError:  # the asset module is optional for the data layer
        return None
    return resolve_data_alias(name)


def _format(name: str, spec: str) -> str:
    if name not in FORMATS:
        raise SharpError(f"unknown data format '{name}' in '{spec}'; formats: {', '.join(FORMATS)} "
                         "(write FORMAT:PATH_OR_HUB_ID or a built-in alias like alpaca-demo)")
    return name


def parse_data_spec(text: str) -> DataSpec:
    """Check a data spec without loading anything: format name, slice, local path or alias or hub id."""
    spec = text.strip()
    if not spec:
        raise SharpError("empty data spec; write FORMAT:PATH_OR_HUB_ID (e.g. alpaca:data.json) or an alias")
    start = stop = None
    if m := _SLICE.match(spec):
        spec = m.group(1)
        start = int(m.group(2)) if m.group(2) else None
        stop = int(m.group(3)) if m.group(3) else None
    fmt_name, colon, source = spec.partition(":")
    if not colon:  # a bare alias
        hit = _alias(spec)
        if hit is None:
            raise SharpError(f"unknown data '{spec}': not a built-in alias; write FORMAT:PATH_OR_HUB_ID "
                             f"with FORMAT one of {', '.join(FORMATS)}")
        return _from_alias(spec, hit, hit[0], start, stop)
    fmt = _format(fmt_name, text)
    if not source:
        raise SharpError(f"data spec '{text}' names no source; write {fmt}:PATH_OR_HUB_ID")
    if source.startswith("~"):
        source = os.path.expanduser(source)
    if os.path.exists(source):
        kind = "dir" if os.path.isdir(source) else "file"
        if kind == "file" and not source.lower().endswith(_LOCAL_EXTS):
            raise SharpError(f"'{source}' has an unsupported extension; use one of {', '.join(_LOCAL_EXTS)}")
        return DataSpec(fmt, source, kind, start=start, stop=stop)
    hit = _alias(source)
    if hit is not None:
        return _from_alias(source, hit, fmt, start, stop)
    if (m := _BRACKETS.match(source)) and (os.path.exists(m.group(1)) or _HUB_ID.match(m.group(1))
                                           or _alias(m.group(1))):
        raise SharpError(f"malformed slice '{m.group(2)}' in '{text}'; write [START:STOP] with whole numbers, "
                         "either may be left out (e.g. [-100:] or [:500]); steps are not supported")
    looks_local = source.startswith((".", "/", "~")) or source.lower().endswith(_LOCAL_EXTS)
    if looks_local or not _HUB_ID.match(source):
        raise SharpError(f"data file '{source}' does not exist (and it is not an alias or a Hub id "
                         "like owner/name); check the path")
    hub_id, _, split = source.partition("@")
    return DataSpec(fmt, hub_id, "hub", split or "train", start, stop)


def _from_alias(name: str, hit: tuple[str, Path], fmt: str, start, stop) -> DataSpec:
    alias_fmt, path = hit
    if fmt != alias_fmt:
        raise SharpError(f"data alias '{name}' holds '{alias_fmt}' data, not '{fmt}'; write {alias_fmt}:{name}")
    if not Path(path).exists():
        raise SharpError(f"data alias '{name}' is not downloaded yet; run `sharp assets fetch` first")
    return DataSpec(alias_fmt, str(path), "file", start=start, stop=stop)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bar and no log line from `datasets` while it reads a local file: a damaged file is reported
    once, in our own error line."""
    import datasets

    logger = logging.getLogger("datasets")
    level, bars_off = logger.level, datasets.are_progress_bars_disabled()
    logger.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if not bars_off:
            datasets.enable_progress_bars()


def _read_local(path: Path, fmt: str):
    ext = path.suffix.lower()
    if ext == ".txt":
        if fmt != "text":
            raise SharpError(f"'{path}' is plain text; load it as text:{path}")
        return [{"text": path.read_text(encoding="utf-8")}]
    if ext == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SharpError(f"'{path}' line {lineno} is not valid JSON ({e.msg})") from None
        return records
    if ext == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SharpError(f"'{path}' is not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, list):
            raise SharpError(f"'{path}' must hold a JSON list of records (or use .jsonl, one record a line)")
        return data
    import datasets  # .csv / .parquet

    try:
        with _quiet_datasets():
            return datasets.load_dataset(ext[1:], data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - pyarrow's and datasets' errors for a damaged file: all user-facing here
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SharpError(f"cannot read '{path}' as {ext[1:]}: {type(e).__name__}: {first[:200]}") from None


def load_records(spec: DataSpec | str) -> list[dict]:
    """All records of a spec (its slice applied), each checked against its format."""
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    fmt = FORMATS[spec.format]
    if spec.kind == "file":
        try:
            records = _read_local(Path(spec.source), spec.format)
        except UnicodeDecodeError as e:
            raise SharpError(f"'{spec.source}' is not UTF-8 text (byte {e.start}); check the file") from None
    else:
        import datasets

        try:
            records = datasets.load_dataset(spec.source, split=spec.split)  # rows read on demand below
        except Exception as e:  # network, unknown id, unknown split: all user-facing here
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise SharpError(f"cannot load dataset '{spec.source}' (split {spec.split}): "
                             f"{type(e).__name__}: {first[:200]}") from None
    indices = range(len(records))[slice(spec.start, spec.stop)]
    if not indices:
        raise SharpError(f"data '{spec.text}' holds no records (after its slice); check the file or slice")
    return [fmt.check(records[i], i) for i in indices]
