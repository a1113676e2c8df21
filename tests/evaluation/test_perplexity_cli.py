"""`sharp eval`: the must-show run on stories260K, JSON output, and one-line errors before any model load."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sharp.data import load_records, parse_data_spec, text_token_stream, tokenize_examples
from tests.conftest import ALPACA, WIKI, run_cli


def _hf_nll(model, input_ids, labels) -> float:
    """Summed next-token NLL of the labelled tokens, from the model's own loss (a mean) times their number."""
    ids, lab = torch.as_tensor(input_ids)[None], torch.as_tensor(labels)[None]
    with torch.no_grad():
        return float(model(input_ids=ids, labels=lab).loss) * int((lab[:, 1:] != -100).sum())


def test_eval_text_and_alpaca_writes_json(stories_path, tmp_path, capsys):
    out = tmp_path / "sub" / "e.json"
    tasks = f"ppl:text={WIKI},ppl:alpaca={ALPACA}[-3:]"
    code, stdout, err = run_cli(["eval", stories_path, "--tasks", tasks, "--json", out, "--limit", "2",
                                 "--max-len", "256", "--batch-size", "2"], capsys)
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["model"] == str(stories_path) and data["downstream"] == {}
    text, alpaca = data["tasks"][f"ppl:text={WIKI}"], data["tasks"][f"ppl:alpaca={ALPACA}[-3:]"]
    assert text["tokens"] == 2 * 255  # two non-overlapping windows, each scoring all tokens but its first
    assert text["ppl"] == pytest.approx(2.718281828 ** text["nll"])
    # the numbers are the model's own next-token losses (Hugging Face's mean over the labelled tokens), per window
    # and per example, weighted by their scored tokens
    model, tok = AutoModelForCausalLM.from_pretrained(stories_path), AutoTokenizer.from_pretrained(stories_path)
    ids = text_token_stream(f"text:{WIKI}", tok)
    assert text["nll"] == pytest.approx(sum(_hf_nll(model, ids[i : i + 256], ids[i : i + 256]) for i in (0, 256))
                                        / text["tokens"], rel=1e-5)
    spec = parse_data_spec(f"alpaca:{ALPACA}[-3:]")
    examples = tokenize_examples(load_records(spec)[:2], spec.format, tok, "plain", 256)  # --limit 2
    tokens = sum(sum(x != -100 for x in e["labels"][1:]) for e in examples)
    assert alpaca["tokens"] == tokens > 0
    assert alpaca["nll"] == pytest.approx(sum(_hf_nll(model, e["input_ids"], e["labels"]) for e in examples)
                                          / tokens, rel=1e-5)
    assert "ppl" in stdout and "tokens scored" in stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--tasks", "arc_easy"], "unknown task 'arc_easy'"),
        (["--tasks", "ppl:alpaca=/no/such.json"], "does not exist"),
        (["--tasks", "ppl:banana=x.json"], "unknown data format"),
        ([], "nothing to evaluate"),
        (["--tasks", f"ppl:text={WIKI}", "--stride", "600"], "--stride"),
        (["--tasks", f"ppl:text={WIKI}", "--template", "fancy"], "--template"),
        (["--tasks", f"ppl:text={WIKI}", "--batch-size", "0"], "--batch-size"),
        (["--tasks", f"ppl:text={WIKI}", "--eval-fraction", "1.5"], "--eval-fraction"),
        (["--lm-eval", "arc_easy"], "--data-dir"),
        (["--lm-eval", "arc_easy", "--data-dir", "{tmp}"], "arc_easy"),
        (["--lm-eval", "no_such_bench", "--data-dir", "{tmp}"], "no_such_bench"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_loading_the_model(tmp_path, capsys, args, fragment):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, stdout, err = run_cli(["eval", "/no/such/model", *args, "--json", tmp_path / "e.json"], capsys)
    assert code == 2
    assert fragment in err and "/no/such/model" not in err  # the arguments fail first, not the model
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "e.json").exists()


def test_missing_model_is_reported_after_the_arguments_check(tmp_path, capsys):
    code, _, err = run_cli(["eval", tmp_path / "nothing", "--tasks", f"ppl:text={WIKI}"], capsys)
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1
