"""Peak RSS of SLW on SmolLM2-135M: today's path (a deep copy of the original model to capture from, a deep
copy of each target's MLP and original MLP per job) vs weights from disk (`capture_activations` from the folder,
jobs sharing the reference weights and reading their original MLP from disk), as `sharp compress` runs the stage.

    .venv/bin/python benchmarks/slw_memory_smollm2.py                 # next:6-29, lora:64, 2 rounds
    .venv/bin/python benchmarks/slw_memory_smollm2.py --rounds 3 --steps 20

Needs `sharp assets fetch` (SmolLM2-135M and the GPT4-Alpaca demo sample in the asset cache). Each measurement
is a fresh process: load the model in float32 (as compress does), then reset the kernel's
peak-RSS mark (`/proc/self/clear_refs`) and run the SLW stage (copy or not, share, capture, train every target
sequentially, closed-form init), and read the peak (VmHWM). Variants alternate within each round. Writes
docs/results/slw_memory_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("in-memory copy (before)", "weights from disk")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def measure(variant: str, args) -> dict:
    import torch

    import sharp
    from sharp.data import collate_examples, load_records, parse_data_spec, tokenize_examples
    from sharp.io.models import resolve_model_path
    from sharp.recovery import slw
    from sharp.recovery.slw import SLWConfig, run_slw

    torch.set_num_threads(args.threads)
    model, tok = sharp.load_model(args.model, dtype=torch.float32)
    records = load_records(parse_data_spec(f"alpaca-demo[:{args.examples}]"))
    examples = tokenize_examples(records, "alpaca", tok, "plain", 512)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = [collate_examples(examples[i : i + 4], pad) for i in range(0, len(examples), 4)]
    cfg = SLWConfig(steps=args.steps, eval_every=10, checkpoint_every=10, threads=args.threads, dtype="float16")
    loaded = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak mark restarts here
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        if variant == VARIANTS[0]:
            original = copy.deepcopy(model)
            slw.frozen_sharing_copy = lambda mlp: copy.deepcopy(mlp).float()  # the job copies of before
        else:
            original = resolve_model_path(args.model)
        torch.manual_seed(0)
        sharp.share(model, args.strategy, args.recovery)
        results = run_slw(original, model, batches, cfg, work, progress=False)
    peak = _status_mib("VmHWM")
    return {"variant": variant, "loaded_rss_mib": loaded, "peak_rss_mib": peak, "extra_mib": peak - loaded,
            "seconds": time.perf_counter() - start, "targets": len(results),
            "rel_err_after": {t: r["rel_err_after"] for t, r in results.items()},
            "captured_tokens": max(r["train_tokens"] + r["eval_tokens"] + r["sink_tokens"] for r in results.values())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--strategy", default="next:6-29")
    p.add_argument("--recovery", default="lora:64")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--examples", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "slw_memory_smollm2"))
    p.add_argument("--run", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        print(json.dumps(measure(args.run, args)))
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = []
    for r in range(args.rounds):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--run", variant, *sys.argv[1:]]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            runs.append({"round": r, **json.loads(out.strip().splitlines()[-1])})
            print(f"round {r} {variant}: peak {runs[-1]['peak_rss_mib']:.0f} MiB "
                  f"(+{runs[-1]['extra_mib']:.0f} over the loaded model)", flush=True)
    summary = {v: {k: statistics.median(x[k] for x in runs if x["variant"] == v)
                   for k in ("loaded_rss_mib", "peak_rss_mib", "extra_mib", "seconds")} for v in VARIANTS}
    same = all(a["rel_err_after"] == b["rel_err_after"] for a, b in zip(runs[::2], runs[1::2], strict=True))
    report = {"args": {k: v for k, v in vars(args).items() if k != "run"}, "runs": runs, "median": summary,
              "same_rel_err": same, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                "load_avg": os.getloadavg()}}
    Path(args.out + ".json").write_text(json.dumps(report, indent=2) + "\n")
    Path(args.out + ".md").write_text(_markdown(report))
    print(_markdown(report))


def _markdown(r: dict) -> str:
    a = r["args"]
    before, lazy = (r["median"][v] for v in VARIANTS)
    rows = "\n".join(f"| {v} | {m['loaded_rss_mib']:,.0f} | {m['peak_rss_mib']:,.0f} | {m['extra_mib']:,.0f} | "
                     f"{m['seconds']:,.1f} |" for v, m in r["median"].items())
    tokens = r["runs"][0]["captured_tokens"]
    return f"""# Peak RSS of SLW on SmolLM2-135M: in-memory copy vs weights from disk

Generated by `benchmarks/slw_memory_smollm2.py` ({a['rounds']} rounds, variants alternating, each run a fresh
process). SmolLM2-135M in float32 (as `sharp compress` loads it), `{a['strategy']}` + `{a['recovery']}`
({r['runs'][0]['targets']} targets), SLW on {tokens:,} captured tokens per target from the first {a['examples']}
GPT4-Alpaca examples, {a['steps']} steps per layer, layers trained one after another, {a['threads']} thread(s).
Machine: {r['machine']['cpus']} CPUs, load average {r['machine']['load_avg'][0]:.1f} at the end (shared).

The stage starts with the float32 model loaded; "extra" is the peak above that. Before: a deep copy of the
original model to capture from, and float32 deep copies of each target's shared MLP (reference weights included)
and of its original MLP for its job. From disk: the capture reads one decoder layer at a time from
`model.safetensors`, each job's MLP reuses the reference weights' storage, and each job reads its original MLP
from disk when it starts.

| SLW stage | loaded model (MiB) | peak RSS (MiB) | extra (MiB) | seconds |
|---|---:|---:|---:|---:|
{rows}

Medians over {a['rounds']} runs each. The extra memory of the stage drops from {before['extra_mib']:,.0f} MiB
to {lazy['extra_mib']:,.0f} MiB ({lazy['extra_mib'] / max(before['extra_mib'], 1e-9):.0%}). What remains is one
decoder layer, the captured batches' hidden states (tokens × hidden × 4 bytes), the current layer's activations
and the per-layer training state, none of which grows with the number of layers. The per-layer results
are {'identical' if r['same_rel_err'] else 'NOT identical'} between the two paths (same held-out rel-err for
every target in every round).
"""


if __name__ == "__main__":
    main()
