"""Perplexity against a direct, naive computation on the real stories260K model (relative error < 1e-4)."""

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sharp.data import IGNORE, load_records, text_token_stream, tokenize_examples
from sharp.errors import SharpError
from sharp.evaluation import evaluate_tasks, parse_tasks, response_perplexity, text_perplexity, text_windows
from tests.conftest import ALPACA, STORIES, WIKI


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(STORIES).eval(), AutoTokenizer.from_pretrained(STORIES)


@pytest.fixture(scope="module")
def wiki_small(tmp_path_factory):
    path = tmp_path_factory.mktemp("wiki") / "wiki.txt"
    path.write_text(WIKI.read_text()[:3000])
    return path


@pytest.fixture(scope="module")
def wiki_ids(stories, wiki_small):
    return text_token_stream(f"text:{wiki_small}", stories[1])[:300]


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of the logits of one unpadded sequence, in float64: (T, V)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


@pytest.mark.parametrize("max_len, stride", [(64, None), (64, 24)])
def test_text_matches_naive_per_token_loop(stories, wiki_ids, max_len, stride):
    model, _ = stories
    ids = wiki_ids.tolist()
    nll, scored = 0.0, set()
    for begin in range(0, len(ids), stride or max_len):  # one window at a time, batch 1, no padding
        window = ids[begin:begin + max_len]
        logprobs = _logprobs(model, window)
        for pos in range(1, len(window)):  # a token is scored once, by the first window giving it context
            if begin + pos not in scored:
                scored.add(begin + pos)
                nll -= float(logprobs[pos - 1, window[pos]])
    if stride is None:  # non-overlapping: every window's first token goes unscored
        assert len(scored) == len(ids) - math.ceil(len(ids) / max_len)
    else:
        assert scored == set(range(1, len(ids)))
    got = text_perplexity(model, wiki_ids, max_len=max_len, stride=stride, batch_size=3)
    assert got["tokens"] == len(scored)
    assert abs(got["nll"] - nll / len(scored)) / (nll / len(scored)) < 1e-4
    assert got["ppl"] == pytest.approx(math.exp(nll / len(scored)), rel=1e-4)


def test_responses_match_naive_per_token_loop(stories):
    model, tokenizer = stories
    records = load_records(f"alpaca:{ALPACA}[-6:]")
    examples = tokenize_examples(records, "alpaca", tokenizer, max_len=160)
    nll, tokens = 0.0, 0
    for ex in examples:
        logprobs = _logprobs(model, ex["input_ids"])
        for pos in range(1, len(ex["input_ids"])):
            if ex["labels"][pos] != IGNORE:
                nll -= float(logprobs[pos - 1, ex["input_ids"][pos]])
                tokens += 1
    got = response_perplexity(model, examples, batch_size=4)  # padded batches of uneven lengths
    assert got["tokens"] == tokens > 0
    assert abs(got["nll"] - nll / tokens) / (nll / tokens) < 1e-4


def test_training_mode_is_restored_and_no_grad_is_kept(stories, wiki_ids):
    model, _ = stories
    model.train()
    try:
        text_perplexity(model, wiki_ids[:40], max_len=16)
        assert model.training
    finally:
        model.eval()
    text_perplexity(model, wiki_ids[:40], max_len=16)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


@given(st.integers(2, 200), st.integers(2, 40), st.integers(1, 40))
def test_windows_score_each_token_once_with_context(n, max_len, stride):
    if stride > max_len:
        with pytest.raises(SharpError, match="--stride"):
            text_windows(n, max_len, stride)
        return
    scored = []
    for begin, end, first in text_windows(n, max_len, stride):
        assert 0 <= begin < first < end <= n and end - begin <= max_len
        scored += range(first, end)
    if stride == max_len:
        assert len(scored) == n - math.ceil(n / max_len) and len(set(scored)) == len(scored)
    else:
        assert scored == list(range(1, n))


def test_parse_tasks(tmp_path):
    tasks = parse_tasks(f"ppl:text={WIKI}, ppl:alpaca={ALPACA}[-100:]")
    assert [t.name for t in tasks] == [f"ppl:text={WIKI}", f"ppl:alpaca={ALPACA}[-100:]"]
    assert tasks[0].is_text and not tasks[1].is_text and tasks[1].spec.start == -100
    for text, fragment in [
        ("arc_easy", "unknown task 'arc_easy'"),
        ("ppl:alpaca", "names no data"),
        ("ppl:banana=x.json", "unknown data format"),
        (f"ppl:alpaca={tmp_path}/missing.json", "does not exist"),
        (f"ppl:text={WIKI},ppl:text={WIKI}", "given twice"),
        (" , ", "no tasks given"),
    ]:
        with pytest.raises(SharpError, match=fragment):
            parse_tasks(text)


def test_evaluate_tasks_limit_and_held_out_split(stories, wiki_small):
    model, tokenizer = stories
    tasks = parse_tasks(f"ppl:alpaca={ALPACA}[:40],ppl:text={wiki_small}")
    out = evaluate_tasks(model, tokenizer, tasks, max_len=256, limit=2, eval_fraction=0.1, seed=None)
    held = load_records(f"alpaca:{ALPACA}[36:38]")  # the last 4 of the first 40 are held out; limit keeps 2
    direct = response_perplexity(model, tokenize_examples(held, "alpaca", tokenizer, max_len=256))
    assert out[tasks[0].name] == pytest.approx(direct)
    assert out[tasks[1].name]["tokens"] == 2 * 255


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=40), st.builds("ppl:{}={}".format, st.text(max_size=12), st.text(max_size=12))))
def test_garbage_task_lists_raise_only_sharp_errors(text):
    with mock.patch("sharp.io.assets.resolve_data_alias", lambda n: None):
        try:
            tasks = parse_tasks(text)
        except SharpError as e:
            assert "\n" not in str(e)
            return
    assert tasks and all(t.name.startswith("ppl:") for t in tasks)


def test_nll_standard_error_is_the_ratio_estimators():
    from sharp.evaluation.perplexity import _result

    same = _result([(2.0, 4), (5.0, 10), (1.0, 2)])  # every example has mean NLL 0.5: no spread
    assert same["nll"] == pytest.approx(0.5) and same["nll_sem"] == pytest.approx(0.0, abs=1e-12)
    assert same["examples"] == 3 and same["tokens"] == 16
    r = _result([(4.0, 4), (2.0, 4)])  # per-example means 1.0 and 0.5, equal weights
    # residuals s - nll*n = 4 - 3 = 1 and 2 - 3 = -1; var = 2 / 1; sem = sqrt(2 / 2) / 4
    assert r["nll"] == pytest.approx(0.75) and r["nll_sem"] == pytest.approx(0.25)
