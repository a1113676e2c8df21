"""`sharp compress` under torchrun: 2 CPU processes over gloo train SFT like 1 process with the same effective
batch, only rank 0 writes, and a 2-process run killed mid-SFT resumes to the uninterrupted result.

Tolerance: recovery tensors within 1e-5 absolute (they are ~0.1 in size; measured 3.5e-7 here): the two runs
differ only in the order of float32 reductions (per-rank gradients averaged by DDP vs one batch). The 8 steps
(32 examples) stay inside the first epoch (the 44 vendored records less the held-out 10%): at an epoch's end a
single process runs a short last batch, while accelerate fills the last rank's batch with examples from the
start of the epoch (measured: the runs then differ by 7e-5 after step 12).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from tests.conftest import ALPACA
from tests.conftest import STORIES as MODEL

SRC = Path(__file__).resolve().parents[2] / "src"

pytestmark = pytest.mark.slow

# variable-length responses (labels -100 elsewhere): the loss must be normalized over both ranks' tokens
ARGS = [str(MODEL), "--strategy", "next:1-4", "--recovery", "lora:8", "--data", f"alpaca:{ALPACA}",
        "--max-len", "96", "--stages", "sft", "--sft-steps", "8", "--lr", "5e-3", "--eval-steps", "0",
        "--save-steps", "3", "--eval-fraction", "0.1", "--seed", "0"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
TOL = 1e-5


def _command(out: Path, processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "sharp.cli", "compress", *ARGS, "--batch-size", "4", "--out", str(out)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "sharp.cli", "compress", *ARGS, "--batch-size", str(4 // processes), "--out", str(out)]


def _run(out: Path, processes: int) -> str:
    proc = subprocess.run(_command(out, processes), env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "recovery.safetensors"), load_file(b / "recovery.safetensors")
    assert set(x) == set(y) and x
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    one, two = root / "one", root / "two"
    _run(one, 1)
    stdout = _run(two, 2)
    assert stdout.count("checkpoint written to") == 1  # rank 0 alone reports
    return {"one": one, "two": two, "root": root}


def test_two_gloo_processes_match_one_process_with_the_same_effective_batch(runs):
    one, two = runs["one"], runs["two"]
    trained = load_file(two / "recovery.safetensors")
    assert max(t.abs().max().item() for t in trained.values()) > 0.01  # SFT moved the recovery
    assert _max_diff(one, two) < TOL
    rows = [json.loads(line) for line in (two / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r.get("stage") == "sft"]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # each logged step once: rank 1 does not log
    from sharp.io.manifest import verify_manifest

    assert not verify_manifest(two)


def test_two_process_run_killed_mid_sft_resumes_to_the_same_result(runs):
    out = runs["root"] / "killed"
    proc = subprocess.Popen(_command(out, 2), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out.parent / f"{out.name}.work" / "sft" / "checkpoint-3" / "trainer_state.json"
    deadline = time.monotonic() + 600
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = psutil.Process(proc.pid).children(recursive=True)  # torchrun starts them in their own sessions
    for p in [psutil.Process(proc.pid), *ranks]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(ranks, timeout=30)
    assert not (out / "summary.json").exists(), "the run ended before the kill; nothing was resumed"
    log = _run(out, 2)
    assert log.count("SFT resumes from") == 2  # both ranks, from the checkpoint rank 0 wrote
    assert _max_diff(out, runs["two"]) < TOL
