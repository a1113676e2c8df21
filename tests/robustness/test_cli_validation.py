"""Every command refuses a bad argument in one line, exit code 2, before any model weights are read.

Each case runs the real `sharp` entry point in-process with `from_pretrained` patched to fail the test, so a
command that loads the model before checking what the user typed is caught, and so is a traceback or a
message that spans several lines.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ALPACA, C4, STORIES, run_cli

M = str(STORIES)
TEXT = f"text:{C4}"
OK_COMPRESS = ["--strategy", "next:1-4", "--recovery", "lora:4", "--data", TEXT]


def _cases(tmp: Path, ckpt: Path, bad_alpaca: Path) -> dict[str, tuple[list, str]]:
    """name -> (argv, a fragment the one-line error must contain)."""
    full = tmp / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    a_file = tmp / "a_file"
    a_file.write_text("x")
    no_config = tmp / "no_config"
    no_config.mkdir()
    out = tmp / "out"
    return {
        # info
        "info/missing-model": (["info", tmp / "nope"], "not found"),
        "info/folder-without-config": (["info", no_config], "config.json"),
        # share
        "share/malformed-strategy": (["share", M, "--strategy", "nxt:1-2", "--out", out], "malformed strategy"),
        "share/one-layer-range": (["share", M, "--strategy", "next:3-3", "--out", out], "one layer"),
        "share/layer-out-of-range": (["share", M, "--strategy", "next:1-9", "--out", out], "out of range"),
        "share/self-reference": (["share", M, "--strategy", "map:2=2", "--out", out], "own reference"),
        "share/unknown-recovery": (["share", M, "-s", "next:1-4", "-r", "lorax:4", "--out", out], "unknown recovery"),
        "share/rank-too-large": (["share", M, "-s", "next:1-4", "-r", "lora:999", "--out", out], "rank 999"),
        "share/rank-missing": (["share", M, "-s", "next:1-4", "-r", "lora", "--out", out], "needs a rank"),
        "share/unknown-modules": (["share", M, "-s", "next:1-4", "--modules", "ffn", "--out", out], "--modules"),
        "share/non-empty-out": (["share", M, "-s", "next:1-4", "--out", full], "--overwrite"),
        "share/out-under-a-file": (["share", M, "-s", "next:1-4", "--out", a_file / "x"], "is a file"),
        "share/unwritable-out": (["share", M, "-s", "next:1-4", "--out", "/proc/sharp-out"], "cannot write"),
        "share/missing-model": (["share", tmp / "nope", "-s", "next:1-4", "--out", out], "not found"),
        "share/from-checkpoint": (["share", ckpt, "-s", "next:1-4", "--out", out], "already a sharp checkpoint"),
        "plan/from-checkpoint": (["plan", ckpt, "-s", "next:1-4", "--data-size", "100", "--no-probe"],
                                 "already a sharp checkpoint"),
        # merge / verify
        "merge/not-a-checkpoint": (["merge", M, "--out", out], "not a sharp checkpoint"),
        "merge/non-empty-out": (["merge", ckpt, "--out", full], "--overwrite"),
        "verify/not-a-checkpoint": (["verify", M], "not a sharp checkpoint"),
        # compress
        "compress/bad-stages": (["compress", M, *OK_COMPRESS, "--stages", "sft,slw,x", "--out", out], "--stages"),
        "compress/recovery-none": (["compress", M, "-s", "next:1-4", "-r", "none", "--data", TEXT, "--out", out],
                                   "nothing to train"),
        "compress/unknown-format": (["compress", M, *OK_COMPRESS[:4], "--data", f"alpacca:{ALPACA}", "--out", out],
                                    "unknown data format"),
        "compress/prompts-fill-max-len": (["compress", M, *OK_COMPRESS[:4], "--data", f"alpaca:{ALPACA}",
                                           "--max-len", "3", "--out", out], "raise --max-len"),
        "compress/missing-data-file": (["compress", M, *OK_COMPRESS[:4], "--data", "alpaca:/no/such.json",
                                        "--out", out], "does not exist"),
        "compress/missing-field": (["compress", M, *OK_COMPRESS[:4], "--data", f"alpaca:{bad_alpaca}",
                                    "--out", out], "no 'output' field"),
        "compress/empty-slice": (["compress", M, *OK_COMPRESS[:4], "--data", f"{TEXT}[5:5]", "--out", out],
                                 "no records"),
        "compress/max-len-above-model": (["compress", M, *OK_COMPRESS, "--max-len", "4096", "--out", out], "512"),
        "compress/negative-lr": (["compress", M, *OK_COMPRESS, "--lr", "-1", "--out", out], "--lr"),
        "compress/zero-batch": (["compress", M, *OK_COMPRESS, "--batch-size", "0", "--out", out], "--batch-size must"),
        "compress/slw-workers": (["compress", M, *OK_COMPRESS, "--slw-workers", "0", "--out", out], "workers"),
        "compress/eval-fraction": (["compress", M, *OK_COMPRESS, "--eval-fraction", "1.5", "--out", out],
                                   "--eval-fraction"),
        "compress/non-empty-out": (["compress", M, *OK_COMPRESS, "--out", full], "--overwrite"),
        "compress/from-checkpoint": (["compress", ckpt, *OK_COMPRESS, "--out", out], "already a sharp checkpoint"),
        "compress/plan-actions": (["compress", M, "-s", "auto:40%", "-r", "lora:4", "--data", TEXT, "--plan-actions",
                                   "share,explode", "--out", out], "explode"),
        "compress/plan-min-shared-without-share": (["compress", M, "-s", "auto:40%", "-r", "lora:4", "--data", TEXT,
                                                    "--plan-actions", "drop-mlp", "--plan-min-shared", "0.5",
                                                    "--out", out], "share"),
        # a config's setting is named by the flag that set it, not by its field
        "compress/slw-tokens": (["compress", M, *OK_COMPRESS, "--slw-tokens", "1", "--out", out], "--slw-tokens must"),
        "compress/slw-init": (["compress", M, *OK_COMPRESS, "--slw-init", "svd", "--out", out], "--slw-init 'svd'"),
        "compress/grad-accum": (["compress", M, *OK_COMPRESS, "--grad-accum", "0", "--out", out], "--grad-accum must"),
        "compress/negative-epochs": (["compress", M, *OK_COMPRESS, "--epochs", "-1", "--out", out], "--epochs must"),
        "compress/chat-without-template": (["compress", M, *OK_COMPRESS[:4], "--data", f"alpaca:{ALPACA}",
                                            "--template", "chat", "--out", out], "no chat template"),
        "compress/not-a-number": (["compress", M, *OK_COMPRESS, "--sft-steps", "ten", "--out", out], "--sft-steps"),
        # eval
        "eval/nothing": (["eval", M], "nothing to evaluate"),
        "eval/bad-task": (["eval", M, "--tasks", "ppl:nope=x"], "nope"),
        "eval/missing-task-file": (["eval", M, "--tasks", "ppl:text=/no/such.jsonl"], "does not exist"),
        "eval/template": (["eval", M, "--tasks", f"ppl:{TEXT.replace(':', '=', 1)}", "--template", "x"],
                          "--template"),
        "eval/max-len-above-model": (["eval", M, "--tasks", f"ppl:{TEXT.replace(':', '=', 1)}", "--max-len",
                                      "4096"], "512"),
        "eval/missing-field": (["eval", M, "--tasks", f"ppl:alpaca={bad_alpaca}"], "no 'output' field"),
        "eval/chat-without-template": (["eval", M, "--tasks", f"ppl:alpaca={ALPACA}", "--template", "chat"],
                                       "no chat template"),
        "eval/lm-eval-without-dir": (["eval", M, "--lm-eval", "arc_easy"], "--data-dir"),
        "eval/data-dir-is-a-file": (["eval", M, "--lm-eval", "arc_easy", "--data-dir", a_file], "is a file"),
        "eval/json-is-folder": (["eval", M, "--tasks", f"ppl:{TEXT.replace(':', '=', 1)}", "--json", tmp], "folder"),
        "eval/missing-model": (["eval", tmp / "nope", "--tasks", f"ppl:{TEXT.replace(':', '=', 1)}"], "not found"),
        "eval/json-under-a-file": (["eval", M, "--tasks", f"ppl:{TEXT.replace(':', '=', 1)}", "--json",
                                    a_file / "r.json"], "is a file"),
        "eval/json-unwritable": (["eval", M, "--tasks", f"ppl:{TEXT.replace(':', '=', 1)}", "--json",
                                  "/proc/sharp.json"], "cannot write"),
        # analyze / report
        "analyze/budget": (["analyze", M, "--data", TEXT, "--out", out, "--budget", "140%"], "budget"),
        "analyze/max-len-above-model": (["analyze", M, "--data", TEXT, "--out", out, "--max-len", "4096"], "512"),
        "analyze/non-empty-out": (["analyze", M, "--data", TEXT, "--out", full], "--overwrite"),
        "analyze/missing-field": (["analyze", M, "--data", f"alpaca:{bad_alpaca}", "--out", out], "no 'output'"),
        "analyze/chat-without-template": (["analyze", M, "--data", f"alpaca:{ALPACA}", "--template", "chat", "--out",
                                           out], "no chat template"),
        "analyze/bad-data": (["analyze", M, "--data", "nope:x", "--out", out], "unknown data"),
        "analyze/plan-actions": (["analyze", M, "--data", TEXT, "--out", out, "--budget", "40%", "--plan", "lora:4",
                                  "--plan-actions", "share,explode"], "explode"),
        "analyze/plan-min-shared": (["analyze", M, "--data", TEXT, "--out", out, "--budget", "40%", "--plan",
                                     "lora:4", "--plan-min-shared", "1.5"], "--plan-min-shared"),
        "report/missing-run": (["report", tmp / "nope", "--out", tmp / "r.md"], "nope"),
        "report/out-under-a-file": (["report", ckpt, "--out", a_file / "r.md"], "is a file"),
        "report/out-unwritable": (["report", ckpt, "--out", "/proc/sharp-report.md"], "cannot write"),
        # prune / compare
        "prune/unknown-method": (["prune", M, "--method", "magic", "--budget", "40%", "--out", out], "magic"),
        "prune/bad-budget": (["prune", M, "--method", "mlp-drop", "--budget", "40 percent", "--out", out],
                             "budget"),
        "prune/non-empty-out": (["prune", M, "--method", "layer-drop", "--budget", "40%", "--out", full],
                                "--overwrite"),
        "prune/max-len-above-model": (["prune", M, "--method", "width", "--budget", "20%", "--data", TEXT,
                                       "--max-len", "4096", "--out", out], "512"),
        "prune/heal-steps": (["prune", M, "--method", "width", "--budget", "20%", "--data", TEXT, "--heal",
                              "--steps", "-1", "--out", out], "--steps must"),
        "prune/chat-without-template": (["prune", M, "--method", "width", "--budget", "20%", "--data",
                                         f"alpaca:{ALPACA}", "--template", "chat", "--out", out], "no chat template"),
        "compare/chat-without-template": (["compare", M, "-s", "next:1-4", "-r", "lora:4", "--data", f"alpaca:{ALPACA}",
                                           "--eval", f"ppl:{TEXT.replace(':', '=', 1)}", "--template", "chat",
                                           "--out", out], "no chat template"),
        "compare/chat-eval-without-template": (["compare", M, "-s", "next:1-4", "-r", "lora:4", "--data", TEXT,
                                                "--eval", f"ppl:alpaca={ALPACA}", "--template", "chat", "--out", out],
                                               "no chat template"),
        "compare/bad-strategy": (["compare", M, "-s", "next:1-9", "-r", "lora:4", "--data", TEXT, "--eval",
                                  f"ppl:{TEXT.replace(':', '=', 1)}", "--out", out], "out of range"),
        "compare/eval-max-len-above-model": (["compare", M, "-s", "next:1-4", "-r", "lora:4", "--data", TEXT,
                                              "--eval", f"ppl:{TEXT.replace(':', '=', 1)}", "--eval-max-len", "4096",
                                              "--out", out], "--eval-max-len"),
        "compare/eval-limit": (["compare", M, "-s", "next:1-4", "-r", "lora:4", "--data", TEXT, "--eval",
                                f"ppl:{TEXT.replace(':', '=', 1)}", "--eval-limit", "-3", "--out", out],
                               "--eval-limit"),
        "compare/unknown-method": (["compare", M, "-s", "next:1-4", "-r", "lora:4", "--data", TEXT, "--eval",
                                    f"ppl:{TEXT.replace(':', '=', 1)}", "--methods", "magic", "--out", out],
                                   "magic"),
        # quantize / bench / export
        "quantize/bits": (["quantize", ckpt, "--bits", "3", "--out", out], "3"),
        "quantize/method": (["quantize", ckpt, "--method", "gptq", "--out", out], "gptq"),
        "quantize/non-empty-out": (["quantize", ckpt, "--out", full], "--overwrite"),
        "bench/missing-model": (["bench", tmp / "nope"], "not found"),
        "bench/repeats": (["bench", M, "--repeats", "0"], "--repeats"),
        "bench/threads": (["bench", M, "--threads", "-1"], "--threads"),
        "bench/load-repeats": (["bench", M, "--load-repeats", "-1"], "--load-repeats"),
        "bench/json-unwritable": (["bench", M, "--json", "/proc/sharp.json"], "cannot write"),
        "bench/plot-under-a-file": (["bench", M, "--plot", a_file / "p.png"], "is a file"),
        "export/format": (["export", ckpt, "--format", "onnx", "--out", out], "onnx"),
        "export/outtype": (["export", ckpt, "--outtype", "q9", "--out", out], "q9"),
        "export/non-empty-out": (["export", ckpt, "--out", full], "--overwrite"),
        # typos in flags are click usage errors: still one line, exit 2
        "share/unknown-flag": (["share", M, "--strategyy", "next:1-4", "--out", out], "strategyy"),
        "unknown-command": (["shrae", M], "shrae"),
    }


def _names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return sorted(_cases(Path(d), Path(d), Path(d)))


@pytest.mark.parametrize("name", _names())
def test_bad_argument_is_one_line_exit_2_before_loading(name, tmp_path, checkpoint, bad_alpaca, no_model_load,
                                                        capsys):
    argv, fragment = _cases(tmp_path, checkpoint, bad_alpaca)[name]
    code, out, err = run_cli(argv, capsys)
    assert code == 2, f"exit {code}; stdout={out!r} stderr={err!r}"
    lines = err.splitlines()
    assert len(lines) == 1, err  # one line (no blank line before it either), no traceback
    assert "Traceback" not in err and lines[0].startswith("error:")
    assert fragment in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # nothing written


def test_verify_damaged_checkpoint_exits_1_naming_the_file(checkpoint, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    with open(bad / "recovery.safetensors", "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\x00\x01\x02")
    code, out, err = run_cli(["verify", bad], capsys)
    assert code == 1 and "recovery.safetensors" in err and "sha256" in err
    code, out, err = run_cli(["verify", checkpoint], capsys)
    assert code == 0 and "OK" in out, err


def test_verify_failure_is_one_line_however_long(checkpoint, capsys):
    code, _, err = run_cli(["verify", checkpoint, "--base", M], capsys)  # --base of a full checkpoint
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err  # not wrapped at the console's width
    assert lines[0].startswith("FAIL") and "load it without base=" in lines[0]


def test_compress_refuses_a_second_run_on_the_same_output(tmp_path, capsys):
    from sharp.io.lock import output_lock
    from sharp.recipes import CompressConfig

    cfg = CompressConfig(model=M, strategy="next:1-4", recovery="lora:4", data=TEXT, out=str(tmp_path / "o"))
    with output_lock(cfg.work_dir):  # as if another `sharp compress` were running
        code, _, err = run_cli(["compress", M, *OK_COMPRESS, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "being written by pid" in err


def test_compress_keeps_an_unfinished_run_with_other_settings(tmp_path, capsys, no_model_load):
    """A rerun that changes a setting is refused in one line naming the change: starting over would discard the
    unfinished run's work. --overwrite discards it."""
    from sharp.recipes import CompressConfig, prepare_work_dir

    out = tmp_path / "o"
    work = prepare_work_dir(CompressConfig(model=M, strategy="next:1-4", recovery="lora:4", data=TEXT, out=str(out)))
    (work / "slw").mkdir()
    (work / "slw" / "layer_002").write_text("an hour of SLW")
    code, _, err = run_cli(["compress", M, *OK_COMPRESS, "--slw-steps", "7", "--out", out], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--slw-steps 300 -> 7" in err and "--overwrite" in err
    assert (work / "slw" / "layer_002").read_text() == "an hour of SLW"
    settings = dict(model=M, strategy="next:1-4", recovery="lora:4", data=TEXT, out=str(out))
    CompressConfig(**settings, slw_steps=7, overwrite=True).validate()  # --overwrite passes (the run starts over)
    CompressConfig(**settings, lr=0.003, sft_steps=7).validate()  # SFT-only changes keep SLW: tests/recipes


def test_compress_work_folder_with_a_damaged_run_json_is_kept(tmp_path, capsys, no_model_load):
    from sharp.recipes import CompressConfig, prepare_work_dir

    out = tmp_path / "o"
    work = prepare_work_dir(CompressConfig(model=M, strategy="next:1-4", recovery="lora:4", data=TEXT, out=str(out)))
    (work / "run.json").write_bytes(b"\xff\xfe")  # not UTF-8
    code, _, err = run_cli(["compress", M, *OK_COMPRESS, "--out", out], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "cannot be read" in err and "--overwrite" in err, err
    assert (work / "run.json").read_bytes() == b"\xff\xfe"


def test_compress_resumes_whatever_the_spelling_of_out(tmp_path, monkeypatch):
    from sharp.recipes import CompressConfig, prepare_work_dir

    monkeypatch.chdir(tmp_path)
    settings = dict(model=M, strategy="next:1-4", recovery="lora:4", data=TEXT)
    work = prepare_work_dir(CompressConfig(**settings, out=str(tmp_path / "o")))
    (work / "marker").write_text("kept")
    CompressConfig(**settings, out="o").validate()  # the same run, spelled relative: no refusal
    assert (prepare_work_dir(CompressConfig(**settings, out="o")) / "marker").is_file()
