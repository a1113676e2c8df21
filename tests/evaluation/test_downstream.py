"""Offline lm-eval downstream evaluation: argument checks, data loading, and scores we recompute by hand."""

from __future__ import annotations

import bz2
import copy
import os
import socket
from pathlib import Path

import pytest
import torch

from sharp.errors import SharpError
from sharp.evaluation.downstream import DOWNSTREAM_TASKS, check_downstream, run_downstream, write_task_configs
from tests.conftest import DOWNSTREAM as DATA_DIR  # the first documents of each task (tests/fixtures/README.md)
from tests.conftest import STORIES

# Documents per task in the splits lm-eval scores (the published sizes; see the assets' SOURCES.md).
FULL_SIZES = {
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "piqa": 1838,
    "boolq": 3270,
    "hellaswag": 10042,
    "winogrande": 1267,
    "openbookqa": 500,
    "commonsense_qa": 1221,
}
# Documents per task in the vendored subsets (the full splits: tests/test_shared_assets.py).
FIXTURE_SIZES = {task: 40 if task in ("arc_easy", "piqa") else 10 for task in FULL_SIZES}


# ---------------------------------------------------------------------------------------- check_downstream


def test_known_tasks_are_the_eight_from_the_issue() -> None:
    assert set(DOWNSTREAM_TASKS) == set(FULL_SIZES)
    assert len(DOWNSTREAM_TASKS) == 8


def test_unknown_task_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(SharpError, match="unknown downstream task 'arc_hard'") as e:
        check_downstream(["arc_easy", "arc_hard"], tmp_path)
    for task in DOWNSTREAM_TASKS:
        assert task in str(e.value)
    assert "\n" not in str(e.value)


def test_empty_task_list_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SharpError, match="no downstream task"):
        check_downstream([], tmp_path)


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(SharpError, match="does not exist"):
        check_downstream(["piqa"], tmp_path / "nope")


def test_missing_task_file_names_the_expected_file(tmp_path: Path) -> None:
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "dev.jsonl").write_text("{}\n")
    check_downstream(["boolq"], tmp_path)  # present: fine
    with pytest.raises(SharpError, match=r"'openbookqa'.*openbookqa/test\.jsonl"):
        check_downstream(["boolq", "openbookqa"], tmp_path)
    with pytest.raises(SharpError, match=r"hellaswag_val_full\.txt\.bz2 or .*hellaswag_val_full\.txt"):
        check_downstream(["hellaswag"], tmp_path)


def test_piqa_needs_its_labels_file(tmp_path: Path) -> None:
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text("{}\n")
    with pytest.raises(SharpError, match=r"valid-labels\.lst"):
        check_downstream(["piqa"], tmp_path)


def test_task_files_pass_the_check() -> None:
    check_downstream(list(DOWNSTREAM_TASKS), DATA_DIR)


# ---------------------------------------------------------------------------------------- data loading


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The task data with HellaSwag decompressed once (the .bz2 of the full split costs seconds per load)."""
    out = tmp_path_factory.mktemp("downstream")
    for task in DOWNSTREAM_TASKS:
        if task != "hellaswag":
            (out / task).symlink_to(DATA_DIR / task, target_is_directory=True)
    (out / "hellaswag").mkdir()
    with bz2.open(DATA_DIR / "hellaswag" / "hellaswag_val_full.txt.bz2", "rb") as src:
        (out / "hellaswag" / "hellaswag_val_full.txt").write_bytes(src.read())
    return out


@pytest.fixture(scope="module")
def loaded(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """All 8 tasks as lm-eval builds them from our resolved YAMLs."""
    from lm_eval.tasks import TaskManager

    tmp = tmp_path_factory.mktemp("tasks")
    write_task_configs(list(DOWNSTREAM_TASKS), data_dir, tmp)
    return TaskManager(include_path=str(tmp), include_defaults=False).load(list(DOWNSTREAM_TASKS))["tasks"]


def test_every_task_loads_all_its_documents_with_valid_targets(loaded: dict) -> None:
    """Our loaders + lm-eval's doc_to_* see exactly every document of the files, and every target resolves."""
    assert set(loaded) == set(DOWNSTREAM_TASKS)
    for name, task in loaded.items():
        docs = task.eval_docs
        assert len(docs) == FIXTURE_SIZES[name], name
        if name == "winogrande":  # lm-eval's "multiple inputs" task: the choice is in the context
            continue
        for doc in docs:
            choices = task.doc_to_choice(doc)
            target = task.doc_to_target(doc)
            index = choices.index(target) if isinstance(target, str) else target
            assert 0 <= index < len(choices), (name, doc)
            assert all(isinstance(c, str) and c for c in choices), (name, doc)


def test_prompts_match_lm_eval_renderings(loaded: dict) -> None:
    """First items as lm-eval renders them from the Hub copies (HellaSwag: ctx_b capitalized)."""
    hs = loaded["hellaswag"]
    doc = hs.eval_docs[0]
    assert hs.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.doc_to_target(doc) == 3
    assert hs.doc_to_choice(doc)[3] == "starts pulling up roofing on a roof."
    wg = loaded["winogrande"]
    doc = wg.eval_docs[0]
    assert wg.doc_to_text(doc) == 1  # answer "2" -> second option
    assert wg.doc_to_choice(doc) == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert wg.doc_to_target(doc) == "always got the easier cases."
    cs = loaded["commonsense_qa"]
    assert cs.doc_to_text(cs.eval_docs[0]).endswith("D. mall\nE. new york\nAnswer:")
    assert cs.doc_to_target(cs.eval_docs[0]) == "A"  # bank


def _gold_choice(task, doc) -> str:
    target = task.doc_to_target(doc)
    return target if isinstance(target, str) else task.doc_to_choice(doc)[target]


def test_gold_answers_are_the_right_ones(loaded: dict) -> None:
    """Labels survive the format conversions: facts about the data that the loaders do not see."""
    first_gold = {  # first item of each split, answers checked by reading them
        "arc_easy": "Sunlight is the source of energy for nearly all ecosystems.",
        "arc_challenge": "Planetary days will become shorter.",
        "piqa": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, "
        "you will also need to supply it with a water bottle and a food dish.",
        "boolq": "no",  # "does ethanol take more energy make that produces": false
        "openbookqa": "quit eating lunch out",
        "hellaswag": "starts pulling up roofing on a roof.",
    }
    for name, gold in first_gold.items():
        assert _gold_choice(loaded[name], loaded[name].eval_docs[0]) == gold, name
    boolq = loaded["boolq"]
    assert sum(boolq.doc_to_target(d) for d in boolq.eval_docs) == 8  # the fixture's first 10: 8 true / 2 false
    wg = loaded["winogrande"]  # the side file dev-labels.lst (1/2) must agree with the jsonl's answers
    side = (DATA_DIR / "winogrande" / "dev-labels.lst").read_text().split()
    assert [wg.doc_to_text(d) for d in wg.eval_docs] == [int(y) - 1 for y in side]


def test_hellaswag_bz2_records_are_parsed(tmp_path: Path) -> None:
    """6-line records from a .bz2, lm-eval's cleanup and ctx_b capitalization applied."""
    (tmp_path / "hellaswag").mkdir()
    records = [
        "Welding: A man is seated inside a workshop. he",
        "0",
        "welds.",
        "eats [step] soup.",
        "runs.",
        "sits.",
        "Home: How to cook. Boil water.",
        "2",
        "a",
        "b",
        "c",
        "d",
    ]
    path = tmp_path / "hellaswag" / "hellaswag_val_full.txt.bz2"
    path.write_bytes(bz2.compress(("\n".join(records) + "\n").encode()))
    out = tmp_path / "tasks"
    out.mkdir()
    write_task_configs(["hellaswag"], tmp_path, out)
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=str(out), include_defaults=False).load(["hellaswag"])["tasks"]["hellaswag"]
    docs = task.eval_docs
    assert len(docs) == 2
    assert task.doc_to_text(docs[0]) == "Welding: A man is seated inside a workshop. He"
    assert task.doc_to_choice(docs[0]) == ["welds.", "eats soup.", "runs.", "sits."]
    assert task.doc_to_text(docs[1]) == "Home: How to cook. Boil water."
    assert task.doc_to_target(docs[1]) == 2


def test_data_file_with_quotes_in_its_path_survives_yaml(tmp_path: Path) -> None:
    """The data path is pasted into YAML: odd characters must not break the config."""
    from lm_eval.tasks import TaskManager

    data_dir = tmp_path / 'we"ird \\dir'
    (data_dir / "boolq").mkdir(parents=True)
    row = '{"question": "is it", "title": "t", "answer": true, "passage": "It is."}\n'
    (data_dir / "boolq" / "dev.jsonl").write_text(row * 3)
    out = tmp_path / "tasks"
    out.mkdir()
    write_task_configs(["boolq"], data_dir, out)
    task = TaskManager(include_path=str(out), include_defaults=False).load(["boolq"])["tasks"]["boolq"]
    assert len(task.eval_docs) == 3
    assert task.doc_to_text(task.eval_docs[0]) == "It is.\nQuestion: is it?\nAnswer:"
    assert task.doc_to_target(task.eval_docs[0]) == 1  # "yes"


# ---------------------------------------------------------------------------------------- run_downstream


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    return model, AutoTokenizer.from_pretrained(STORIES)


@pytest.fixture(scope="module")
def all_tasks_result(stories, data_dir: Path):
    """One run over all 8 tasks (5 docs each) with every outgoing connection refused and recorded."""
    attempts: list[object] = []

    def refuse(self, address):  # noqa: ANN001
        attempts.append(address)
        raise OSError("network disabled in test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        result = run_downstream(*stories, list(DOWNSTREAM_TASKS), data_dir, limit=5, batch_size=8)
        env_after = os.environ.get("HF_HUB_OFFLINE")
    return result, attempts, env_after


def test_run_all_tasks_result_structure(all_tasks_result) -> None:
    result, _, _ = all_tasks_result
    assert set(result) == set(DOWNSTREAM_TASKS) | {"mean"}
    no_norm = {"boolq", "winogrande", "commonsense_qa"}  # lm-eval defines acc only for these
    for task in DOWNSTREAM_TASKS:
        r = result[task]
        assert set(r) == {"acc", "acc_norm", "n"}
        assert r["n"] == 5
        assert 0.0 <= r["acc"] <= 1.0
        assert (r["acc_norm"] is None) == (task in no_norm), task
        if r["acc_norm"] is not None:
            assert 0.0 <= r["acc_norm"] <= 1.0
    accs = [result[t]["acc"] for t in DOWNSTREAM_TASKS]
    norms = [result[t]["acc_norm"] for t in DOWNSTREAM_TASKS if t not in no_norm]
    assert result["mean"]["acc"] == pytest.approx(sum(accs) / len(accs))
    assert result["mean"]["acc_norm"] == pytest.approx(sum(norms) / len(norms))


def test_run_never_touches_the_network(all_tasks_result) -> None:
    _, attempts, env_after = all_tasks_result
    assert attempts == []
    assert env_after is None  # the offline switch is undone after the run


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized the way lm-eval does (split the joint encoding)."""
    whole = tok(context + continuation).input_ids
    n_ctx = len(tok(context).input_ids)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)  # (T-1, V)
    targets = ids[0, n_ctx:]
    return logprobs[n_ctx - 1 :].gather(1, targets[:, None]).sum().item()


@pytest.mark.parametrize(("task", "shared"), [("arc_easy", False), ("piqa", False), ("piqa", True)])
def test_scores_match_a_hand_computation(stories, loaded: dict, task: str, shared: bool) -> None:
    """acc / acc_norm recomputed from raw model log-probs agree with what run_downstream reports.

    `shared`: a SHARP model (custom modules in place of MLP weights) is scored as is, not merged.
    """
    model, tok = stories
    if shared:
        import sharp
        from sharp.sharing.shared import shared_linears

        model = sharp.share(copy.deepcopy(model), "next:1-4", "lora:2")
        n_shared = len(shared_linears(model))
        assert n_shared > 0
    limit = 40
    t = loaded[task]
    hits = hits_norm = 0
    for doc in list(t.eval_docs)[:limit]:
        context, choices, gold = t.doc_to_text(doc), t.doc_to_choice(doc), t.doc_to_target(doc)
        lls = [_loglikelihood(model, tok, context, " " + c) for c in choices]
        norm = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
        hits += max(range(len(lls)), key=lls.__getitem__) == gold
        hits_norm += max(range(len(norm)), key=norm.__getitem__) == gold

    model.train()
    result = run_downstream(model, tok, [task], DATA_DIR, limit=limit, batch_size=4)
    assert model.training  # handed back in the mode we gave it
    model.eval()
    assert result[task]["n"] == limit
    assert result[task]["acc"] == pytest.approx(hits / limit)
    assert result[task]["acc_norm"] == pytest.approx(hits_norm / limit)
    if shared:
        assert len(shared_linears(model)) == n_shared  # still shared after the run


def test_run_checks_arguments_before_loading_anything(tmp_path: Path) -> None:
    with pytest.raises(SharpError, match="unknown downstream task"):
        run_downstream(None, None, ["nope"], tmp_path)
    with pytest.raises(SharpError, match="--limit"):
        run_downstream(None, None, ["piqa"], DATA_DIR, limit=0)


def test_shipped_task_templates_cover_every_task() -> None:
    import sharp.evaluation.downstream as ds

    tasks_dir = Path(ds.__file__).parent / "tasks"
    for task in DOWNSTREAM_TASKS:
        text = (tasks_dir / f"{task}.yaml").read_text()
        assert f"task: {task}\n" in text
        assert "@DATA_FILE@" in text
    assert (tasks_dir / "utils.py").is_file()
