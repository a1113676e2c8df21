"""Offline loaders for sharp's lm-eval task YAMLs.

lm-eval's own task definitions load their data from the Hugging Face Hub. Ours keep lm-eval's prompts,
choices, targets and metrics unchanged, but read local files in the datasets' *original* release
formats (see the assets' SOURCES.md) through `custom_dataset:` functions. Each loader returns the docs
in the schema of the Hub dataset lm-eval uses, so the YAML's `doc_to_*` lines are copied verbatim.

lm-eval calls `custom_dataset(**metadata, **dataset_kwargs)`; the YAML's `dataset_kwargs` carries
`data_file` (filled in by `sharp.evaluation.lm_eval_tasks`), everything else is ignored.

This file is loaded by lm-eval from a temporary task folder (next to the resolved YAMLs), not imported
as part of the `sharp` package.
"""

from __future__ import annotations

import bz2
import json
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

# lm-eval's own helpers, reused so our prompts cannot drift from the harness's.
from lm_eval.tasks.hellaswag.utils import preprocess as _hellaswag_preprocess
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401  (used by winogrande.yaml)
    doc_to_choice,
    doc_to_target,
    doc_to_text,
)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_json_or_jsonl(path: Path) -> list[dict[str, Any]]:
    """A JSON array (HF dumps) or JSON lines (original releases), whichever the file holds."""
    text = path.read_text(encoding="utf-8").lstrip()
    if text.startswith("["):
        return json.loads(text)
    return _read_jsonl(path)


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _split(name: str, rows: list[dict[str, Any]]) -> DatasetDict:
    return DatasetDict({name: Dataset.from_list(rows)})


def _flatten_choices(choices: list[dict[str, str]]) -> dict[str, list[str]]:
    """Original ARC/OBQA/CSQA `[{label, text}, ...]` -> HF `{"text": [...], "label": [...]}`."""
    return {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}


def _arc_doc(raw: dict[str, Any]) -> dict[str, Any]:
    """Original ARC (`question: {stem, choices}`) or HF `allenai/ai2_arc` rows -> HF schema."""
    q = raw["question"]
    if isinstance(q, dict):  # original ARC-V1-Feb2018 format
        return {
            "id": raw["id"],
            "question": q["stem"],
            "choices": _flatten_choices(q["choices"]),
            "answerKey": raw["answerKey"],
        }
    return {"id": raw["id"], "question": q, "choices": raw["choices"], "answerKey": raw["answerKey"]}


def load_arc(data_file: str, **_: Any) -> DatasetDict:
    """ARC-Easy/Challenge test split (lm-eval scores `test`)."""
    return _split("test", [_arc_doc(r) for r in _read_json_or_jsonl(Path(data_file))])


def piqa_labels_file(data_file: str | Path) -> Path:
    """PIQA ships labels in a line-aligned side file: `valid.jsonl` -> `valid-labels.lst`."""
    p = Path(data_file)
    return p.with_name(p.name.removesuffix(".jsonl") + "-labels.lst")


def load_piqa(data_file: str, **_: Any) -> DatasetDict:
    """PIQA validation (`goal, sol1, sol2` + labels file) -> `baber/piqa` schema."""
    rows = _read_jsonl(Path(data_file))
    labels = _read_lines(piqa_labels_file(data_file))
    if len(labels) != len(rows):
        raise ValueError(f"{piqa_labels_file(data_file)} has {len(labels)} labels for {len(rows)} PIQA rows")
    docs = [
        {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
        for r, y in zip(rows, labels, strict=True)
    ]
    return _split("validation", docs)


def load_boolq(data_file: str, **_: Any) -> DatasetDict:
    """Original BoolQ dev (`answer` bool) -> `super_glue/boolq` schema (`label` 0=no, 1=yes)."""
    docs = [
        {"idx": i, "question": r["question"], "passage": r["passage"], "label": int(bool(r["answer"]))}
        for i, r in enumerate(_read_jsonl(Path(data_file)))
    ]
    return _split("validation", docs)


def _recapitalize(query: str) -> str:
    """Undo one difference between the klosax text dump and lm-eval's HellaSwag prompt.

    lm-eval builds `ctx_a + " " + ctx_b.capitalize()`; the dump kept the raw `ctx`, where ctx_b (the
    start of ActivityNet's next sentence, e.g. "he") is lower case. ctx_b is the tail after the last
    ". ", so capitalize that tail when it starts in lower case (WikiHow contexts end in full sentences).
    """
    head, sep, tail = query.rpartition(". ")
    if sep and tail[:1].islower():
        return head + sep + tail.capitalize()
    return query


def _read_text(path: Path) -> str:
    if path.suffix == ".bz2":
        with bz2.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def load_hellaswag(data_file: str, **_: Any) -> DatasetDict:
    """HellaSwag validation as 6-line text records (query, label, 4 endings), `.txt` or `.txt.bz2`.

    Produces lm-eval's processed docs directly (`query`, `choices`, `gold`, `label`), so the YAML has no
    `process_docs`. lm-eval's `preprocess` is applied again: it is idempotent on already-cleaned text and
    also drops bracketed artifacts the dump's narrower cleaning kept.
    """
    lines = _read_text(Path(data_file)).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{data_file}: {len(lines)} lines is not a multiple of 6 (query, label, 4 endings)")
    docs = []
    for i in range(0, len(lines), 6):
        query, label, *endings = lines[i : i + 6]
        docs.append(
            {
                "query": _hellaswag_preprocess(_recapitalize(query)),
                "choices": [_hellaswag_preprocess(e) for e in endings],
                "gold": int(label),
                "label": label.strip(),
            }
        )
    return _split("validation", docs)


def load_winogrande(data_file: str, **_: Any) -> DatasetDict:
    """WinoGrande dev (`sentence, option1, option2, answer` "1"/"2"): already `winogrande_xl` schema."""
    keys = ("sentence", "option1", "option2", "answer")
    docs = [{k: str(r[k]) for k in keys} for r in _read_jsonl(Path(data_file))]
    return _split("validation", docs)


def load_openbookqa(data_file: str, **_: Any) -> DatasetDict:
    """Original OBQA (`question: {stem, choices}`) -> `allenai/openbookqa` main schema, test split."""
    docs = [
        {
            "id": r["id"],
            "question_stem": r["question"]["stem"],
            "choices": _flatten_choices(r["question"]["choices"]),
            "answerKey": r["answerKey"],
        }
        for r in _read_jsonl(Path(data_file))
    ]
    return _split("test", docs)


def load_commonsense_qa(data_file: str, **_: Any) -> DatasetDict:
    """Original CSQA v1.11 dev (`question: {stem, choices, question_concept}`) -> `tau/commonsense_qa`."""
    docs = [
        {
            "id": r["id"],
            "question": r["question"]["stem"],
            "question_concept": r["question"].get("question_concept", ""),
            "choices": _flatten_choices(r["question"]["choices"]),
            "answerKey": r["answerKey"],
        }
        for r in _read_jsonl(Path(data_file))
    ]
    return _split("validation", docs)
