"""SLW wall time and peak memory with 1 vs N worker processes, plus per-layer rel-err before/after.

    .venv/bin/python benchmarks/slw_scaling.py                       # SmolLM2-135M, next:6-29, lora:64
    .venv/bin/python benchmarks/slw_scaling.py --steps 40 --workers 1,2 --out slw_scaling.json

The activations are captured once (timed on their own); each worker count then trains every target from
the same shared model (same seeds) in a fresh work dir. Peak RSS is sampled every 0.1 s over this process
and all its children (the spawned workers) together. The machine and its load are printed next to the
numbers: on a shared machine the ratio says more than the absolute times.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

import sharp
from sharp.data import collate_examples, load_records, parse_data_spec, tokenize_examples
from sharp.recovery import SLWConfig, capture_activations, target_mlps, train_slw

ALPACA = Path(__file__).resolve().parents[1] / ".." / "shared" / "assets" / "instruct" / "alpaca_en_demo.json"


class PeakRSS:
    """Peak of (RSS of this process + all its descendants), sampled in a background thread."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mib(self) -> float:
        return self.peak / 2**20


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0))
    mem = psutil.virtual_memory().total / 2**30
    return f"{cpu}, {usable} usable CPUs, {mem:.0f} GiB RAM, torch {torch.__version__}"


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=f"alpaca:{ALPACA}")
    ap.add_argument("--records", type=int, default=900, help="first N records are the training pool")
    ap.add_argument("--fraction", type=float, default=0.1, help="share of the pool SLW captures (--slw-fraction)")
    ap.add_argument("--strategy", default="next:6-29")
    ap.add_argument("--recovery", default="lora:64")
    ap.add_argument("--steps", type=int, default=SLWConfig.steps)
    ap.add_argument("--batch-tokens", type=int, default=SLWConfig.batch_tokens)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts to compare")
    ap.add_argument("--activations", default=None,
                    help="reuse this finished capture (an SLW work dir's activations/) instead of capturing")
    ap.add_argument("--work", default=None, help="work dir (default: a temporary one, deleted at the end)")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="slw_scaling-"))
    print(f"machine: {machine()}")
    print(f"load average at start: {load_avg()}")
    model, tok = sharp.load_model(args.model, dtype=torch.float32)
    spec = parse_data_spec(args.data)
    records = load_records(spec)[: args.records]
    examples = tokenize_examples(records, spec.format, tok, "plain", max_len=512)
    n = max(1, round(len(examples) * args.fraction))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = [collate_examples(examples[i : min(i + 4, n)], pad) for i in range(0, n, 4)]
    cfg_kw = dict(steps=args.steps, batch_tokens=args.batch_tokens, seed=0)

    torch.manual_seed(0)
    shared = sharp.share(copy.deepcopy(model), args.strategy, args.recovery)
    targets = sorted(target_mlps(shared))
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        store = capture_activations(model, batches, targets, Path(args.activations or work / "activations"),
                                    max_tokens=SLWConfig.max_tokens, progress=True)
    capture = {"seconds": time.perf_counter() - t0, "peak_rss_mib": rss.mib, "examples": n,
               "tokens_per_layer": store.num_tokens(targets[0])}
    if args.activations:
        capture["examples"] = None
        print(f"capture: reused {args.activations}: {capture['tokens_per_layer']} tokens per layer (not timed)")
    else:
        print(f"capture: {n} examples, {capture['tokens_per_layer']} tokens per layer, {len(targets)} layers, "
              f"{capture['seconds']:.1f} s, peak RSS {rss.mib:.0f} MiB")
    del model

    runs = {}
    for workers in [int(w) for w in args.workers.split(",")]:
        model_w = copy.deepcopy(shared)
        wd = work / f"workers_{workers}"
        shutil.rmtree(wd, ignore_errors=True)
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            results = train_slw(model_w, store, SLWConfig(workers=workers, **cfg_kw), wd, progress=True)
        runs[workers] = {"seconds": time.perf_counter() - t0, "peak_rss_mib": rss.mib, "load_avg": load_avg(),
                         "layers": {t: {k: r[k] for k in ("rel_err_before", "rel_err_init", "rel_err_after", "step",
                                                         "stopped_early", "seconds", "sink_rel_err_before",
                                                         "sink_rel_err_after")} for t, r in results.items()}}
        print(f"workers={workers}: {runs[workers]['seconds']:.1f} s, peak RSS (with children) {rss.mib:.0f} MiB, "
              f"load average {load_avg()}")
        del model_w

    first = runs[min(runs)]
    print(f"\nper-layer held-out rel-err, {args.recovery}, {args.steps} steps x {args.batch_tokens} tokens "
          f"(workers={min(runs)}):")
    print(f"{'layer':>5} {'direct':>8} {'lstsq':>8} {'SLW':>8} {'steps':>6} {'sink direct':>12} {'sink SLW':>9}")
    for t, r in first["layers"].items():
        sink = [f"{v:.3f}" if v is not None else "-" for v in (r["sink_rel_err_before"], r["sink_rel_err_after"])]
        print(f"{t:>5} {r['rel_err_before']:8.3f} {r['rel_err_init']:8.3f} {r['rel_err_after']:8.3f} {r['step']:>6} "
              f"{sink[0]:>12} {sink[1]:>9}")
    if len(runs) > 1:
        base = first["seconds"]
        for w, r in runs.items():
            print(f"workers={w}: {r['seconds']:.1f} s ({base / r['seconds']:.2f}x vs workers={min(runs)}), "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(), "args": vars(args), "capture": capture,
                                              "runs": runs}, indent=2, sort_keys=True) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
