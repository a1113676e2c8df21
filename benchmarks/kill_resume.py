"""Kill `sharp compress` with SIGKILL at random moments, rerun it, and check every run ends like an uninterrupted one.

    .venv/bin/python benchmarks/kill_resume.py [--trials 20] [--parallel 3] [--seed 0] [--out docs/results/...]

One uninterrupted run of `sharp compress` on stories260K (a tiny SLW + SFT budget) gives the reference time T
and perplexity. Then, per trial: start the same command into a fresh folder, SIGKILL it after a random
0.05 T .. 1.05 T seconds (T scaled for `--parallel` trials at once), look at what it left (the stage the kill
hit; the output folder must be absent or pass its manifest, never half-written), rerun the same command to the
end, run `sharp verify` on the result and compare its held-out perplexity and recovery tensors with the
reference. Prints a table and writes it (with the command and settings) to the results file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
MODEL = ASSETS / "models" / "stories260K"
C4 = ASSETS / "text" / "c4_demo.jsonl"
FLAGS = ["--strategy", "next:1-4", "--recovery", "lora:8", "--data", f"text:{C4}[:12]", "--max-len", "96",
         "--batch-size", "8", "--slw-steps", "12", "--sft-steps", "8", "--lr", "5e-3", "--eval-steps", "4",
         "--save-steps", "2", "--eval-fraction", "0.15", "--seed", "0"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}
TOLERANCE = 1e-3  # relative perplexity difference accepted as "the same result"


def sharp_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from sharp.cli import main; main()", *map(str, args)]


def compress_cmd(out: Path) -> list[str]:
    return sharp_cmd("compress", MODEL, *FLAGS, "--out", out)


def run_to_end(out: Path, log: Path) -> tuple[int, float, str]:
    start = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.call(compress_cmd(out), env=ENV, stdout=fh, stderr=subprocess.STDOUT)
    return code, time.perf_counter() - start, log.read_text()


def stage_left(out: Path) -> str:
    """What a killed run left behind: the stage the kill hit."""
    work = out.parent / f"{out.name}.work"
    if out.exists():
        return "done (clean-up)" if work.exists() else "finished"
    if not work.exists():
        return "start-up"
    sft = sorted(int(d.name.split("-")[1]) for d in (work / "sft").glob("checkpoint-*")) if (work / "sft").exists() \
        else []
    if sft or (work / "sft").exists():
        return f"SFT (checkpoint {sft[-1]})" if sft else "SFT (no checkpoint yet)"
    slw = work / "slw"
    if slw.exists():
        done = len(list(slw.glob("layer_*/result.json")))
        captured = (slw / "activations").exists()
        return f"SLW ({done} layer{'s' if done != 1 else ''} done)" if done or not captured else "SLW (capture)"
    evals = json.loads((work / "evals.json").read_text()) if (work / "evals.json").is_file() else {}
    if "direct" in evals:
        return "share / SLW start"
    if "original" in evals:
        return "eval (Direct Sharing)"
    return "load / eval (original)"


def out_state(out: Path) -> str:
    """The output folder right after the kill: absent, or complete (manifest intact); anything else is broken."""
    if not out.exists():
        return "absent"
    code = subprocess.call(sharp_cmd("verify", out, "--no-load"), env=ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    return "complete" if code == 0 else "BROKEN"


def recovery_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a / "recovery.safetensors"), load_file(b / "recovery.safetensors")
    assert set(x) == set(y)
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "kill_resume.md")
    parser.add_argument("--parallel", type=int, default=1, help="Trials run at once (each is one process).")
    parser.add_argument("--keep", action="store_true", help="Keep the run folders (printed at the end).")
    args = parser.parse_args()
    if not MODEL.is_dir():
        raise SystemExit(f"missing {MODEL}")
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kill_resume-"))
    # every run imports a snapshot of src/ taken now: others editing the working tree cannot change the code
    # between a trial's killed run and its rerun
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    ENV["PYTHONPATH"] = str(root / "src")
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()

    ref = root / "reference"
    code, ref_time, log = run_to_end(ref, root / "reference.log")
    if code != 0:
        raise SystemExit(f"the uninterrupted run failed:\n{log}")
    ref_ppl = json.loads((ref / "summary.json").read_text())["perplexity"]
    print(f"reference: {ref_time:.1f} s, perplexity {ref_ppl}", flush=True)

    def trial(number: int, delay: float) -> dict:
        out = root / f"trial{number:02d}" / "out"
        out.parent.mkdir()
        with open(out.parent / "killed.log", "w") as fh:
            proc = subprocess.Popen(compress_cmd(out), env=ENV, stdout=fh, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=delay)
                killed = False  # it finished first
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
        stage = stage_left(out) if killed else "finished before the kill"
        after_kill = out_state(out)
        if after_kill != "complete" or stage == "done (clean-up)":
            code, seconds, log = run_to_end(out, out.parent / "rerun.log")
        else:  # finished (before or while being killed): rerunning it is refused (its --out is not empty) by design
            code, seconds, log = 0, 0.0, ""
        verify = subprocess.run(sharp_cmd("verify", out), env=ENV, capture_output=True, text=True)
        row = {"trial": number, "kill_s": round(delay, 1), "killed": killed, "stage": stage,
               "after_kill": after_kill, "rerun_exit": code, "rerun_s": round(seconds, 1),
               "resumed": "resumes from" in log, "verify": "OK" if verify.returncode == 0 else "FAIL"}
        if code == 0:
            ppl = json.loads((out / "summary.json").read_text())["perplexity"]
            row["ppl"] = ppl["sft"]
            row["dppl"] = ppl["sft"] - ref_ppl["sft"]
            row["dparam"] = recovery_diff(out, ref)
            row["leftovers"] = sorted(p.name for p in out.parent.iterdir() if p.name.startswith("."))
        print(_line(row), flush=True)
        with lock:  # the results file always holds every trial finished so far
            done.append(row)
            rows_so_far = sorted(done, key=lambda r: r["trial"])
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(_markdown(rows_so_far, ref_time, ref_ppl, _ok(rows_so_far, ref_ppl), args.parallel,
                                          commit, args.trials))
        if not args.keep:
            shutil.rmtree(out.parent, ignore_errors=True)
        return row

    lock, done = threading.Lock(), []

    # Trials run `--parallel` at a time (each run is single-threaded), so each is slower than the reference:
    # kill delays span 0.05-1.05 x the reference time scaled by that slowdown.
    slowdown = max(1.0, 0.4 * args.parallel)
    delays = [rng.uniform(0.05, 1.05) * ref_time * slowdown for _ in range(args.trials)]
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(trial, range(1, args.trials + 1), delays))
    ok = _ok(rows, ref_ppl)
    report = _markdown(rows, ref_time, ref_ppl, ok, args.parallel, commit, args.trials)
    args.out.write_text(report)
    print(report)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"run folders kept in {root}")
    sys.exit(0 if ok else 1)


def _ok(rows: list[dict], ref_ppl: dict) -> bool:
    return all(r["rerun_exit"] == 0 and r["verify"] == "OK" and r["after_kill"] != "BROKEN"
               and abs(r["dppl"]) <= TOLERANCE * ref_ppl["sft"] and not r["leftovers"] for r in rows)


def _line(r: dict) -> str:
    tail = (f"ppl {r['ppl']:.4f} (Δ {r['dppl']:+.2e}), max |Δparam| {r['dparam']:.1e}" if r["rerun_exit"] == 0
            else "rerun FAILED")
    return (f"trial {r['trial']:2d}: kill at {r['kill_s']:6.1f} s in {r['stage']:<24} out after kill: "
            f"{r['after_kill']:<8} rerun {r['rerun_s']:5.1f} s, verify {r['verify']}, {tail}")


def _markdown(rows: list[dict], ref_time: float, ref_ppl: dict, ok: bool, parallel: int, commit: str,
              planned: int) -> str:
    cmd = "sharp compress ../shared/assets/models/stories260K " + " ".join(
        a.replace(str(ASSETS), "../shared/assets") for a in FLAGS) + " --out OUT"
    lines = [
        "# Kill and resume: `sharp compress` under SIGKILL",
        "",
        "Generated by `benchmarks/kill_resume.py` (do not edit by hand). Each trial starts the command below into a",
        "fresh folder, kills it with SIGKILL after a random 0.05–1.05 × the uninterrupted wall time (scaled by",
        f"{max(1.0, 0.4 * parallel):g} for {parallel} trials running at once), records the",
        "stage the kill hit (from what the run left in `OUT.work/`) and whether `OUT` was absent or complete (never",
        "half-written), reruns the same command to the end (unless the run finished before the kill), runs",
        "`sharp verify OUT` (manifest + load) and compares",
        "the held-out perplexity after SFT and the recovery tensors with the uninterrupted run.",
        "",
        f"    {cmd}",
        "",
        f"Code: sharp-llm {commit} (a snapshot of src/ taken at the start; every run imports it). "
        f"{len(rows)} of {planned} trials done.",
        "",
        f"Uninterrupted run: {ref_time:.1f} s wall time (2 shared CPU cores, OMP_NUM_THREADS=1); held-out perplexity "
        + ", ".join(f"{k} {v:.4f}" for k, v in ref_ppl.items()) + ".",
        "",
        "| trial | kill at (s) | stage hit | OUT after kill | rerun (s) | rerun exit | verify | ppl after SFT "
        "| Δ ppl | max abs Δ recovery | leftovers |",
        "|---:|---:|---|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["rerun_exit"] == 0:
            tail = f"{r['ppl']:.4f} | {r['dppl']:+.2e} | {r['dparam']:.1e} | {', '.join(r['leftovers']) or 'none'}"
        else:
            tail = "– | – | – | –"
        lines.append(f"| {r['trial']} | {r['kill_s']:.1f} | {r['stage']} | {r['after_kill']} | {r['rerun_s']:.1f} "
                     f"| {r['rerun_exit']} | {r['verify']} | {tail} |")
    stages = sorted({r["stage"] for r in rows})
    worst = max((abs(r["dppl"]) for r in rows if "dppl" in r), default=float("nan"))
    lines += [
        "",
        f"Stages hit: {', '.join(stages)}.",
        f"Largest |Δ ppl|: {worst:.2e} (tolerance {TOLERANCE:g} × reference). "
        f"Result: {'every trial ended with a verified checkpoint matching the uninterrupted run' if ok else 'FAILED'}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
