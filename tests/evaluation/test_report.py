"""Rendering: the `sharp analyze` page and plots, and `sharp report` over tolerant run folders."""

from __future__ import annotations

import json

import pytest

from sharp.errors import SharpError
from sharp.evaluation.report import analysis_markdown, collect_run, write_analysis, write_report
from tests.conftest import run_cli

PNG = b"\x89PNG\r\n\x1a\n"


def _analysis(n=4, replacement=True):
    a = {
        "model": "tiny", "data": "alpaca:x.json", "layers": n, "tokens": 1234, "skip_first": 1,
        "settings": {"max_tokens": 2000},
        "pairs": [{"reference": t - 1, "target": t, "rel_l2": 1.0 + t / 10, "cosine": 0.05 * t} for t in range(1, n)],
        "residual": [{"layer": i, "cosine": 0.9 + i / 100} for i in range(n)],
        "residual_matrix": [[1.0 - abs(i - j) / 10 for j in range(n + 1)] for i in range(n + 1)],
        "mlp_norm": [{"layer": i, "mean": 2.0, "first_token": 30.0 if i == 2 else 2.5, "first_token_residual": 90.0}
                     for i in range(n)],
    }
    if replacement:
        a["replacement"] = {"base": 5.0, "examples": 3, "tokens": 40, "layers": [
            {"target": t, "reference": t - 1, "ppl": 5.0 * (1 + t), "increase": float(t), "delta_nll": 0.1 * t}
            for t in range(1, n)]}
    return a


def test_analysis_page_has_one_row_per_layer_and_calls_out_position_0(tmp_path):
    write_analysis(_analysis(), tmp_path)
    for name in ("mlp_similarity.png", "residual_cosine.png", "replacement.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)
    md = (tmp_path / "analysis.md").read_text()
    assert "| 2 | 1.200 | 0.100 | 0.920 | 15.000 | +200.0% |" in md
    assert "| 0 | – | – | 0.900 | – | – |" in md
    assert "layer 2 15.0×" in md and "layer 1 " not in md.split("## Position 0")[1]
    assert "![replacement](replacement.png)" in md
    assert json.loads((tmp_path / "analysis.json").read_text())["tokens"] == 1234


def test_analysis_without_replacement_writes_no_replacement_plot(tmp_path):
    write_analysis(_analysis(replacement=False), tmp_path)
    assert not (tmp_path / "replacement.png").exists()
    assert "ppl with" in analysis_markdown(_analysis(replacement=False))


def _eval_json(path, tasks, downstream=None, model="m"):
    data = {"model": model, "tasks": {k: {"ppl": v, "nll": 1.0, "tokens": 10} for k, v in tasks.items()}}
    if downstream is not None:
        data["downstream"] = downstream
    path.write_text(json.dumps(data))
    return path


def _runs(tmp_path):
    a = tmp_path / "base"
    a.mkdir()
    _eval_json(a / "eval.json", {"alpaca": 5.1, "wiki": 36.1},
               {"arc_easy": {"acc": 0.5, "acc_norm": 0.45, "n": 10}, "piqa": {"acc": 0.7, "acc_norm": None},
                "mean": {"acc": 0.6, "acc_norm": 0.45}})
    b = tmp_path / "shared"
    b.mkdir()
    (b / "summary.json").write_text(json.dumps({  # the shape `sharp compress` writes
        "model": "smollm2-135m", "strategy": "next:16-29", "recovery": "lora:32", "stages": ["slw", "sft"],
        "mlp_reduction": 0.233, "params": {"stored": 120, "recovery": 7}, "perplexity": {"original": 5.1,
        "direct": 674.6, "slw": 32.4, "sft": 7.9}, "timing": {"slw": {"seconds": 12.5, "peak_rss_mib": None}},
        "config": {"lr": 1e-4}, "eval_examples": 100}))
    (b / "sharp_config.json").write_text(json.dumps({"recovery": "lora:32", "sharing": {"17": 16}}))
    _eval_json(b / "eval_sft.json", {"alpaca": 7.5}, {"arc_easy": {"acc": 0.4, "acc_norm": 0.42}})
    (b / "broken.json").write_text("{not json")
    c = _eval_json(tmp_path / "solo.json", {"wiki": 40.0})
    return [a, b, c]


def test_report_puts_runs_side_by_side_tolerating_missing_keys(tmp_path):
    out = tmp_path / "out" / "report.md"
    runs = write_report(_runs(tmp_path), out)
    assert [r.name for r in runs] == ["base", "shared", "solo"]
    md = out.read_text()
    assert "| task | base | shared | solo |" in md
    assert "| alpaca | 5.100 | 7.500 | – |" in md
    assert "| wiki | 36.100 | – | 40.000 |" in md
    assert "| arc_easy | 0.5000 / 0.4500 | 0.4000 / 0.4200 | – |" in md
    assert "| piqa | 0.7000 / – | – | – |" in md
    assert "| **mean** | 0.6000 / 0.4500 | 0.4000 / 0.4200 | – |" in md  # means over the tasks with the metric
    assert "| strategy | – | next:16-29 | – |" in md
    assert "| stages | – | slw,sft | – |" in md
    assert "| params.stored | – | 120 | – |" in md
    assert "| timing.slw.seconds | – | 12.5 | – |" in md
    assert "| mlp_reduction | – | 0.233 | – |" in md
    assert "| checkpoint.recovery | – | lora:32 | – |" in md
    assert "| direct | – | 674.600 | – |" in md and "| sft | – | 7.900 | – |" in md
    assert "config.lr" not in md and "perplexity.sft" not in md  # settings noise / shown in its own table
    assert md.index("| strategy |") < md.index("| params.stored |") < md.index("| timing.slw.seconds |") \
        < md.index("| checkpoint.recovery |")  # summary.json's keys first, whatever the file order
    for name in ("report_ppl.png", "report_downstream.png", "report_stages.png"):
        assert (out.parent / name).read_bytes().startswith(PNG)
        assert f"]({name})" in md
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_same_named_runs_stay_apart(tmp_path):
    for d in ("x/run", "y/run"):
        (tmp_path / d).mkdir(parents=True)
        _eval_json(tmp_path / d / "e.json", {"t": 1.0})
    runs = write_report([tmp_path / "x/run", tmp_path / "y/run"], tmp_path / "r.md")
    assert [r.name for r in runs] == ["run", "run (2)"]


def test_collect_run_rejects_folders_without_results(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SharpError, match="holds no summary.json"):
        collect_run(tmp_path / "empty")
    with pytest.raises(SharpError, match="does not exist"):
        collect_run(tmp_path / "nope")


def test_collect_run_skips_the_malformed_parts_of_an_eval_json(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"tasks": {"t": {"ppl": 2.0}, "u": 3}, "downstream": [1, 2]}))
    assert collect_run(path).ppl == {"t": 2.0}


def test_report_cli(tmp_path, capsys):
    runs = _runs(tmp_path)
    code, out, err = run_cli(["report", *runs, "--out", tmp_path / "r.md"], capsys)
    assert code == 0, err
    assert (tmp_path / "r.md").is_file() and "3 runs" in out


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda p: [p / "missing"], "does not exist"),
    (lambda p: [(p / "e").mkdir() or p / "e"], "holds no summary.json"),
    (lambda p: [(p / "e.json").write_text('{"tasks": 5}') and p / "e.json"], "holds no summary.json"),
    (lambda p: [(p / "e.json").write_text('{"downstream": ["acc"]}') and p / "e.json"], "holds no summary.json"),
])
def test_report_cli_bad_runs_exit_2_with_one_line(tmp_path, capsys, make, fragment):
    code, _, err = run_cli(["report", *make(tmp_path), "--out", tmp_path / "r.md"], capsys)
    assert code == 2
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_report_cli_needs_a_markdown_out(tmp_path, capsys):
    run = _eval_json(tmp_path / "e.json", {"t": 1.0})
    code, _, err = run_cli(["report", run, "--out", tmp_path / "r.txt"], capsys)
    assert code == 2 and ".md" in err
