"""`sharp bench`: every field in the JSON report, ratios against the first model, page-cache eviction.
(Nothing here checks a speed: timings belong in benchmarks/.)"""

import json
import shutil

import pytest
import torch

import sharp
from sharp.bench.measure import measure, unique_bytes, weight_files
from sharp.bench.protocol import evict
from sharp.bench.runner import FIELDS, RATIO_FIELDS, add_ratios, parse_spec
from sharp.errors import SharpError
from tests.conftest import randomize_recovery, run_cli


@pytest.fixture
def models(stories_path, tmp_path):
    """(a private copy of stories260K, a SHARP checkpoint of it sharing 2<-1 and 4<-3)."""
    original = tmp_path / "orig"
    shutil.copytree(stories_path, original)  # a copy nobody else has mapped, so eviction can work
    model, tok = sharp.load_model(str(original))
    sharp.share(model, "next:1-4", "lora:4")
    randomize_recovery(model)
    sharp.save(model, tmp_path / "shared", tokenizer=tok)
    return original, tmp_path / "shared"


def test_bench_json_has_every_field(models, tmp_path, capsys):
    original, _ = models
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    code, stdout, err = run_cli(["bench", original, "--json", out, "--plot", png, "--repeats", "1",
                                 "--tokens", "2", "--prompt-tokens", "4", "--threads", "1"], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert png.stat().st_size > 1000
    assert {"cpu", "cores", "torch_threads"} <= set(report["machine"]) and report["machine"]["torch_threads"] == 1
    assert report["settings"]["repeats"] == 1 and "posix_fadvise" in report["settings"]["cold_load"]
    (r,) = report["models"]
    assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
    assert set(RATIO_FIELDS) <= set(r["ratios"]) and all(v == pytest.approx(1.0) for v in r["ratios"].values())
    assert r["decode_tok_s"] > 0 and r["cold_load_s"] > 0 and r["peak_rss_mib"] > r["model_rss_mib"] > 0
    assert r["resident_after_evict"] == 0.0  # a private copy: eviction worked
    assert "sharp bench" in stdout and "decode" in stdout


def test_rounds_pool_every_run_in_turn(models, monkeypatch):
    """--rounds measures the list A B A B and pools each model's runs (medians over all of them)."""
    import sharp.bench.runner as runner

    original, shared = models
    calls = []
    real = runner.measure_in_subprocess

    def spy(spec, mode, *args, **kwargs):
        calls.append(spec)
        return real(spec, mode, *args, **kwargs)

    monkeypatch.setattr(runner, "measure_in_subprocess", spy)
    report = runner.bench([str(original), str(shared)], tokens=2, repeats=2, prompt_tokens=4, threads=1, rounds=2)
    assert calls == [str(original), str(shared)] * 2
    assert report["settings"]["rounds"] == 2
    for r in report["models"]:
        assert set(FIELDS) <= set(r)
        assert len(r["runs"]["decode_tok_s"]) == 4 and len(r["runs"]["cold_load_s"]) == 4
        assert r["decode_tok_s"] == pytest.approx(sorted(r["runs"]["decode_tok_s"])[1:3][0] / 2
                                                  + sorted(r["runs"]["decode_tok_s"])[1:3][1] / 2)


def test_ratios_and_floors_against_the_first_model(models):
    original, shared = models
    first, second = (measure(str(p), tokens=2, repeats=1, prompt_tokens=4) for p in (original, shared))
    add_ratios([first, second])
    disk = sum(f.stat().st_size for f in weight_files(shared))
    assert second["bytes_on_disk"] == disk
    assert second["ratios"]["bytes_on_disk"] == pytest.approx(disk / first["bytes_on_disk"])
    assert second["floors"]["load_time_ratio"] == second["ratios"]["bytes_on_disk"] < 1
    assert second["ratios"]["decode_speed"] == pytest.approx(second["decode_tok_s"] / first["decode_tok_s"])
    # the shared model reads 2 fewer layers' MLP weights per token (fp32: 4 bytes each) plus its LoRA
    saved = 2 * 3 * 64 * 172 * 4 - 2 * 3 * 4 * (64 + 172) * 4
    assert first["bytes_per_token"] - second["bytes_per_token"] == saved
    assert second["floors"]["decode_speed_ratio"] == pytest.approx(first["bytes_per_token"] / second["bytes_per_token"])


def test_measure_merged_mode_in_process(models):
    _, shared = models
    r = measure(str(shared), mode="merged", tokens=2, repeats=1, prompt_tokens=4)
    s = measure(str(shared), mode="shared", tokens=2, repeats=1, prompt_tokens=4)
    assert r["bytes_on_disk"] == s["bytes_on_disk"]
    # targets materialized, recovery folded in
    assert r["bytes_in_memory"] - s["bytes_in_memory"] == 2 * 3 * 64 * 172 * 4 - 2 * 3 * 4 * (64 + 172) * 4


def test_unique_bytes_counts_shared_weights_once(models):
    original, shared = models
    plain = sharp.load_model(str(original))[0]
    model = sharp.load(shared, dtype=torch.float32)
    n_plain, _ = unique_bytes(plain)
    n_shared, _ = unique_bytes(model)
    assert n_plain - n_shared == 2 * 3 * 64 * 172 * 4 - 2 * 3 * 4 * (64 + 172) * 4


def test_evict_drops_pages(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"x" * (1 << 20))
    f.read_bytes()
    assert evict([f]) == 0.0


def test_parse_spec():
    assert parse_spec("runs/a@merged") == ("runs/a", "merged")
    assert parse_spec("runs/a") == ("runs/a", "shared")
    with pytest.raises(SharpError, match="runtime mode"):
        parse_spec("runs/a@fast")


def test_bench_errors(models, tmp_path, capsys):
    original, _ = models
    code, _, err = run_cli(["bench", tmp_path / "nope"], capsys)
    assert code == 2 and "not found" in err
    code, _, err = run_cli(["bench", f"{original}@merged", "--repeats", "1", "--tokens", "1"], capsys)
    assert code == 2 and "plain model" in err


@pytest.mark.slow
def test_bench_paired_adds_a_ratio_column(models, tmp_path, capsys):
    original, shared = models
    out = tmp_path / "b.json"
    code, stdout, err = run_cli(["bench", original, shared, "--json", out, "--repeats", "1", "--tokens", "2",
                                 "--prompt-tokens", "4", "--threads", "1", "--paired", "3", "--rounds", "2"], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    first, second = report["models"]
    assert report["settings"]["paired_rounds"] == 3
    assert first["decode_paired"]["ratios"] == [1.0] * 6  # 3 rounds in each of 2 processes (one per --rounds)
    p = second["decode_paired"]
    assert len(p["decode_tok_s"]) == 6 and all(s > 0 for s in p["decode_tok_s"]) and len(p["process_medians"]) == 2
    assert p["ratios"] == pytest.approx([s / f for s, f in zip(p["decode_tok_s"], first["decode_paired"]
                                                                ["decode_tok_s"], strict=True)])
    assert p["ratio_ci95"][0] <= p["ratio_median"] <= p["ratio_ci95"][1]
    assert "paired decode" in stdout


def test_bench_paired_refuses_a_negative_count(models, capsys):
    original, _ = models
    code, _, err = run_cli(["bench", original, "--paired", "-1"], capsys)
    assert code != 0 and "--paired" in err and "Traceback" not in err
