"""Optional larger checks on the full data sets in ../shared/assets, where a developer's machine has them beside
the checkout: every document of each published downstream split loads with a valid target, label counts match
SOURCES.md, and each vendored fixture is an unchanged prefix of its full file.

tests/conftest.py does not collect this file when ../shared/assets is absent (a user's clone): the default suite
runs the same code on the vendored subsets in tests/fixtures/, so nothing there skips."""

from __future__ import annotations

import bz2
import json

import pytest

from sharp.evaluation.downstream import DOWNSTREAM_TASKS, check_downstream, write_task_configs
from tests.conftest import FIXTURES, SHARED_ASSETS
from tests.evaluation.test_downstream import FULL_SIZES

DATA_DIR = SHARED_ASSETS / "downstream"
# fixture file -> its full file under ../shared/assets (downstream files keep their relative paths)
FULL_FILES = {
    "models/stories260K": "models/stories260K",
    "text/c4_sample.jsonl": "text/c4_demo.jsonl",
    "text/wikitext2_test_excerpt.txt": "text/wikitext2_test.txt",
    "instruct/alpaca_sample.json": "instruct/alpaca_en_demo.json",
    "instruct/dialogsum_dev_sample.jsonl": "instruct/dialogsum_dev.jsonl",
    "downstream": "downstream",
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """All 8 full tasks as lm-eval builds them from our resolved YAMLs (HellaSwag decompressed once)."""
    from lm_eval.tasks import TaskManager

    data = tmp_path_factory.mktemp("downstream")
    for task in DOWNSTREAM_TASKS:
        if task != "hellaswag":
            (data / task).symlink_to(DATA_DIR / task, target_is_directory=True)
    (data / "hellaswag").mkdir()
    with bz2.open(DATA_DIR / "hellaswag" / "hellaswag_val_full.txt.bz2", "rb") as src:
        (data / "hellaswag" / "hellaswag_val_full.txt").write_bytes(src.read())
    tasks = tmp_path_factory.mktemp("tasks")
    write_task_configs(list(DOWNSTREAM_TASKS), data, tasks)
    return TaskManager(include_path=str(tasks), include_defaults=False).load(list(DOWNSTREAM_TASKS))["tasks"]


def test_full_downstream_data_passes_the_check() -> None:
    check_downstream(list(DOWNSTREAM_TASKS), DATA_DIR)


def test_every_task_loads_the_published_split_with_valid_targets(loaded: dict) -> None:
    assert set(loaded) == set(DOWNSTREAM_TASKS)
    for name, task in loaded.items():
        docs = task.eval_docs
        assert len(docs) == FULL_SIZES[name], name
        if name == "winogrande":  # lm-eval's "multiple inputs" task: the choice is in the context
            continue
        for doc in docs.select(range(0, len(docs), 97)):  # a spread-out sample keeps this fast
            choices = task.doc_to_choice(doc)
            target = task.doc_to_target(doc)
            index = choices.index(target) if isinstance(target, str) else target
            assert 0 <= index < len(choices), (name, doc)
            assert all(isinstance(c, str) and c for c in choices), (name, doc)


def test_label_counts_match_the_sources(loaded: dict) -> None:
    boolq = loaded["boolq"]
    assert sum(boolq.doc_to_target(d) for d in boolq.eval_docs) == 2033  # SOURCES.md: 2033 true / 1237 false
    wg = loaded["winogrande"]  # the side file dev-labels.lst (1/2) must agree with the jsonl's answers
    side = (DATA_DIR / "winogrande" / "dev-labels.lst").read_text().split()
    assert [wg.doc_to_text(d) for d in wg.eval_docs] == [int(y) - 1 for y in side]


def _content(path) -> bytes:
    return bz2.decompress(path.read_bytes()) if path.suffix == ".bz2" else path.read_bytes()


@pytest.mark.parametrize("fixture", sorted(FULL_FILES))
def test_each_fixture_is_an_unchanged_prefix_of_its_full_file(fixture: str) -> None:
    """The vendored files hold the first records of the real data, as tests/fixtures/README.md says."""
    root = FIXTURES / fixture
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    assert files, fixture
    for path in files:
        full = SHARED_ASSETS / FULL_FILES[fixture] / path.relative_to(root) if root.is_dir() else \
            SHARED_ASSETS / FULL_FILES[fixture]
        small, big = _content(path), _content(full)
        if fixture.startswith("models"):
            assert small == big, path  # the model is vendored whole
        elif path.suffix == ".json":  # a JSON array: its first records, written out again
            records = json.loads(small)
            assert len(records) > 0 and records == json.loads(big)[: len(records)], path
        else:
            assert 0 < len(small) < len(big) and big.startswith(small), path
