"""Crash safety: outputs appear by one rename, a killed write leaves the previous state (and its hidden leftovers
are cleaned by the next write), every writer holds the output lock, and a `sharp compress` killed after
publishing its checkpoint finishes on rerun instead of refusing its own output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

import sharp
from sharp.errors import SharpError
from sharp.io.atomic import atomic_dir
from sharp.io.lock import output_lock
from sharp.io.manifest import verify_manifest, write_manifest
from tests.conftest import C4, STORIES, run_cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[2])}


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_failed_write_keeps_the_previous_folder_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    with pytest.raises(RuntimeError), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("crash while writing")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert _siblings(out) == []  # no temp folder, no lock file


def test_success_replaces_in_one_rename_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    for text in ("first", "second"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "f.txt").write_text(text)
    assert (out / "f.txt").read_text() == "second" and _siblings(out) == []


_HOLD_WRITE = """
import sys, time
from pathlib import Path
from sharp.io.atomic import atomic_dir
out = Path(sys.argv[1])
with atomic_dir(out, overwrite=True) as tmp:
    (tmp / "big.bin").write_bytes(b"x" * 1_000_000)
    print("writing", flush=True)
    time.sleep(60)
"""


def test_sigkilled_write_leaves_the_previous_folder_and_the_next_write_cleans_up(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "f.txt").write_text("previous")
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_WRITE, str(out)], env=ENV, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert sorted(p.name for p in out.iterdir()) == ["f.txt"] and (out / "f.txt").read_text() == "previous"
    assert any(".tmp-" in name for name in _siblings(out))  # the killed writer's hidden temp folder
    with atomic_dir(out, overwrite=True) as tmp:  # its lock died with it; the next write cleans up
        (tmp / "f.txt").write_text("next")
    assert (out / "f.txt").read_text() == "next" and _siblings(out) == []


def test_a_kill_between_the_two_renames_puts_the_previous_folder_back(tmp_path):
    out = tmp_path / "out"
    parked = tmp_path / ".out.old-abc123" / "x"  # what a kill right after `os.replace(out, old / "x")` leaves
    parked.mkdir(parents=True)
    (parked / "f.txt").write_text("previous")
    with pytest.raises(SharpError, match="--overwrite"), atomic_dir(out):
        pass  # the restored folder is the previous state: not empty, so no overwrite without --overwrite
    assert (out / "f.txt").read_text() == "previous" and _siblings(out) == []


def test_lock_refuses_a_second_writer_and_is_removed_after(tmp_path):
    out = tmp_path / "out"
    with output_lock(out) as lock:
        assert lock.is_file() and "pid" in lock.read_text()
        with pytest.raises(SharpError, match=f"being written by pid {os.getpid()}"), atomic_dir(out):
            pass
    assert not lock.exists()


def test_every_writer_takes_the_output_lock(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    model = sharp.load(checkpoint)
    commands = [
        ["share", STORIES, "-s", "next:1-4", "-r", "lora:4", "--out", out],
        ["merge", checkpoint, "--out", out],
        ["quantize", checkpoint, "--out", out],
        ["export", checkpoint, "--out", out],
        ["prune", STORIES, "--method", "layer-drop", "--budget", "40%", "--data", f"text:{C4}[:4]",
         "--calib-samples", "2", "--max-len", "32", "--out", out],
    ]
    with output_lock(out):  # another run is writing `out`
        with pytest.raises(SharpError, match="being written"):
            sharp.save(model, out)
        for argv in commands:
            code, _, err = run_cli(argv, capsys)
            assert code == 2 and "being written by pid" in err, (argv[0], err)
    assert not out.exists() and _siblings(out) == []


_SAVE_LOOP = """
import sys, torch
torch.set_num_threads(1)
import sharp
from sharp.sharing.shared import recoveries
model = sharp.load(sys.argv[1])
value = 0
while True:
    value += 1
    with torch.no_grad():
        for _, rec in recoveries(model):
            for p in rec.parameters():
                p.fill_(value)
    sharp.save(model, sys.argv[2], overwrite=True)
    print(value, flush=True)
"""


def test_sigkill_during_repeated_saves_never_leaves_a_half_written_checkpoint(checkpoint, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(checkpoint), str(out)], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    try:
        saved = [int(proc.stdout.readline()) for _ in range(2)]  # two complete saves, the next one in flight
        time.sleep(0.05 + (os.getpid() % 7) / 20)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert verify_manifest(out) == []
    model = sharp.load(out)
    values = {float(p.flatten()[0]) for n, p in model.named_parameters() if ".recovery." in n}
    assert len(values) == 1 and values.pop() >= saved[-1]  # one whole save, the last finished or a later one
    sharp.save(model, out, overwrite=True)  # the next save cleans whatever the kill left
    assert _siblings(out) == []


def test_compress_killed_after_publishing_finishes_on_rerun(checkpoint, tmp_path, no_model_load, capsys):
    import shutil

    from sharp.recipes import CompressConfig, compress

    cfg = CompressConfig(model=str(STORIES), strategy="next:1-4", recovery="lora:4", data=f"text:{C4}",
                         out=str(tmp_path / "out"))
    shutil.copytree(checkpoint, cfg.out)  # the published checkpoint ...
    summary = {"config": asdict(cfg), "perplexity": {"sft": 1.0}}
    (Path(cfg.out) / "summary.json").write_text(json.dumps(summary))
    write_manifest(Path(cfg.out))
    cfg.work_dir.mkdir()  # ... and the work folder the kill kept from being removed
    (cfg.work_dir / "run.json").write_text("{}")
    assert compress(cfg, progress=False)["perplexity"] == {"sft": 1.0}  # no model loaded, nothing retrained
    assert not cfg.work_dir.exists()
    other = CompressConfig(**{**asdict(cfg), "seed": 1})  # another run's settings: the output is not its own
    other.work_dir.mkdir()
    with pytest.raises(SharpError, match="--overwrite"):
        compress(other, progress=False)
