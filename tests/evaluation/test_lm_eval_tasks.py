"""`--lm-eval` names beyond sharp's eight: the user's own YAML tasks (--include-path), lm-eval's registry, and
one-line errors for unknown names and unreachable data.

Tests that need lm-eval's registry index it once per process (10-30 s on 2 cores, in the first such test).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sharp.errors import SharpError
from sharp.evaluation.downstream import run_downstream
from sharp.evaluation.lm_eval_tasks import (
    INCLUDE,
    OFFLINE,
    REGISTRY,
    _local_manager,
    _needs_registry,
    load_tasks,
    plan_tasks,
)
from tests.conftest import run_cli
from tests.evaluation.test_downstream import DATA_DIR, _loglikelihood

ROWS = [  # stories-like prompts so the tiny model has preferences, some right and some wrong
    {"question": "Once upon a time, there was a little", "choices": ["girl", "table", "seven"], "answer": 0},
    {"question": "Lily wanted to play in the", "choices": ["park", "sun is", "blue"], "answer": 0},
    {"question": "The dog was very", "choices": ["happy", "seventeen", "under"], "answer": 1},
    {"question": "Tom and his mom went to the", "choices": ["store", "because", "red ball"], "answer": 2},
    {"question": "She said, \"Thank", "choices": ["you", "car", "jumped"], "answer": 0},
    {"question": "The bird flew up into the", "choices": ["sky", "spoon", "and"], "answer": 1},
    # likelier in total, less likely per character: acc and acc_norm disagree here
    {"question": "The cat sat on the", "choices": ["mat", "very big soft bed in the room", "of"], "answer": 1},
]

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{data}"
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _write_task(folder: Path, name: str, rows: list[dict], tag: str | None = None) -> Path:
    """A multiple-choice task over a local jsonl file, the way a user writes one for lm-eval."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = TASK_YAML.format(name=name, data=data.resolve())
    (folder / f"{name}.yaml").write_text(text + (f"tag: {tag}\n" if tag else ""))
    return folder


def _hand_hits(model, tok, rows: list[dict]) -> tuple[list[bool], list[bool]]:
    """Per row: is the gold choice the most likely one (acc), and per character of the choice (acc_norm)?"""
    hits, hits_norm = [], []
    for row in rows:
        lls = [_loglikelihood(model, tok, row["question"], " " + c) for c in row["choices"]]
        norm = [ll / len(c) for ll, c in zip(lls, row["choices"], strict=True)]
        hits.append(max(range(len(lls)), key=lls.__getitem__) == row["answer"])
        hits_norm.append(max(range(len(norm)), key=norm.__getitem__) == row["answer"])
    return hits, hits_norm


@pytest.fixture
def stories(stories_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(stories_path).eval(), AutoTokenizer.from_pretrained(stories_path)


# ---------------------------------------------------------------------------------------- the user's own tasks


def test_include_path_task_runs_offline_through_the_cli(stories_path, stories, tmp_path, capsys) -> None:
    """The must-show: `sharp eval MODEL --lm-eval my_task --include-path DIR`, scores as computed by hand."""
    tasks = _write_task(tmp_path / "tasks", "my_task", ROWS)
    out = tmp_path / "e.json"
    code, stdout, err = run_cli(["eval", stories_path, "--lm-eval", "my_task", "--include-path", tasks,
                                 "--json", out, "--batch-size", "4"], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["settings"]["include_path"] == [str(tasks)]
    got = report["downstream"]
    hits, hits_norm = _hand_hits(*stories, ROWS)
    acc, acc_norm = sum(hits) / len(ROWS), sum(hits_norm) / len(ROWS)
    assert got["my_task"]["n"] == len(ROWS)
    assert got["my_task"]["acc"] == pytest.approx(acc)
    assert got["my_task"]["acc_norm"] == pytest.approx(acc_norm)
    assert 0 < acc < acc_norm < 1  # the data tells a right scorer from a wrong one, and acc from acc_norm
    assert "my_task" in stdout


def test_group_is_one_row_and_tag_one_row_per_task(stories, tmp_path) -> None:
    """A group lm-eval aggregates (weighted by size) is one row; a tag lists its tasks."""
    folder = _write_task(tmp_path, "part_a", ROWS[:4])
    _write_task(folder, "part_b", ROWS[4:])
    _write_task(folder, "part_c", ROWS[:1], tag="my_tag")
    _write_task(folder, "part_d", ROWS[1:3], tag="my_tag")
    (folder / "my_group.yaml").write_text(
        "group: my_group\ntask: [part_a, part_b]\naggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
    )
    result = run_downstream(*stories, ["my_group", "my_tag"], include_path=folder, batch_size=4)
    assert set(result) == {"my_group", "part_c", "part_d", "mean"}
    hits, _ = _hand_hits(*stories, ROWS)
    assert result["my_group"]["n"] == len(ROWS)
    assert result["my_group"]["acc"] == pytest.approx(sum(hits) / len(ROWS))  # = (4 acc_a + 3 acc_b) / 7
    assert result["part_c"]["acc"] == pytest.approx(float(hits[0]))
    assert result["part_d"]["n"] == 2 and result["part_d"]["acc"] == pytest.approx(sum(hits[1:3]) / 2)
    assert result["mean"]["acc"] == pytest.approx((sum(hits) / len(ROWS) + hits[0] + sum(hits[1:3]) / 2) / 3)


def test_include_path_wins_over_sharps_offline_copy(tmp_path) -> None:
    """Precedence: the user's folder, then sharp's offline copies (with --data-dir), then lm-eval's registry."""
    folder = _write_task(tmp_path, "arc_easy", ROWS)
    plan = plan_tasks(["arc_easy", "piqa"], DATA_DIR, folder)
    assert plan.sources == {"arc_easy": INCLUDE, "piqa": OFFLINE}
    loaded = load_tasks(["arc_easy"], DATA_DIR, folder)
    assert len(loaded.parts["arc_easy"][0].eval_docs) == len(ROWS)  # ours, not the ARC file's 40


def test_group_listing_a_registry_task_is_detected(tmp_path) -> None:
    """Such a group needs lm-eval's tasks indexed too; a group of local tasks does not (and stays fast)."""
    folder = _write_task(tmp_path, "part_a", ROWS)
    (folder / "local_group.yaml").write_text("group: local_group\ntask: [part_a]\n")
    (folder / "mixed_group.yaml").write_text("group: mixed_group\ntask:\n  - part_a\n  - task: arc_easy\n")
    (folder / "outer.yaml").write_text("group: outer\ntask: [local_group, mixed_group]\n")
    index = _local_manager([folder]).task_index
    assert not _needs_registry(index, "part_a")
    assert not _needs_registry(index, "local_group")
    assert _needs_registry(index, "mixed_group")
    assert _needs_registry(index, "outer")  # through its subgroup


def test_missing_data_file_of_a_user_task_is_one_line(tmp_path) -> None:
    folder = _write_task(tmp_path, "my_task", ROWS)
    (folder / "my_task.jsonl").unlink()
    with pytest.raises(SharpError, match=r"cannot load the data of task 'my_task'.*my_task\.jsonl") as e:
        load_tasks(["my_task"], include_path=folder)
    assert "\n" not in str(e.value)


def test_a_task_asked_for_twice_is_one_line(tmp_path) -> None:
    folder = _write_task(tmp_path, "part_a", ROWS)
    (folder / "my_group.yaml").write_text("group: my_group\ntask: [part_a]\n")
    with pytest.raises(SharpError, match="Duplicate task 'part_a'.*once"):
        load_tasks(["my_group", "part_a"], include_path=folder)


def test_include_path_must_be_a_folder(tmp_path) -> None:
    with pytest.raises(SharpError, match="--include-path .*nope is not a folder"):
        plan_tasks(["my_task"], include_path=tmp_path / "nope")


def test_data_dir_without_lm_eval_is_refused(tmp_path, capsys) -> None:
    code, _, err = run_cli(["eval", "/no/such/model", "--tasks", "ppl:text=x.txt", "--data-dir", tmp_path], capsys)
    assert code == 2 and "only apply to --lm-eval" in err
    code, _, err = run_cli(["eval", "/no/such/model", "--lm-eval", " , "], capsys)
    assert code == 2 and "--lm-eval needs a task name" in err


# ---------------------------------------------------------------------------------------- lm-eval's registry


def _one_line_failure(capsys, args: list) -> str:
    code, _, err = run_cli(["eval", "/no/such/model", *args], capsys)
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "/no/such/model" not in err  # the tasks fail before the model is looked at
    return err


def test_unknown_task_is_one_line_with_close_names(capsys) -> None:
    err = _one_line_failure(capsys, ["--lm-eval", "mmlu_abstract_algebr"])
    assert "unknown downstream task 'mmlu_abstract_algebr'" in err
    assert "close names: mmlu_abstract_algebra" in err  # the best match first


def test_registry_task_needing_the_hub_is_one_line_offline(capsys) -> None:
    """lm-eval's own tasks are accepted by name (mmlu's too); offline, their Hub data fails in one line."""
    plan = plan_tasks(["mmlu", "mmlu_abstract_algebra", "hellaswag"])
    assert set(plan.sources.values()) == {REGISTRY}  # without --data-dir, hellaswag is lm-eval's
    err = _one_line_failure(capsys, ["--lm-eval", "mmlu_abstract_algebra"])
    assert "cannot load the data of task 'mmlu_abstract_algebra'" in err and "Hub" in err
    err = _one_line_failure(capsys, ["--lm-eval", "hellaswag"])
    assert "'hellaswag'" in err and "--data-dir" in err  # points at sharp's offline copy
