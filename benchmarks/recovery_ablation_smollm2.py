"""Recovery levers, added one at a time, on SmolLM2-135M → docs/results/recovery_ablation_smollm2.md.

    .venv/bin/python benchmarks/recovery_ablation_smollm2.py          # needs `sharp assets fetch`; ../shared for
                                                                       # DialogSum and WikiText-2 (else skipped)

Every row is one `sharp compress` run (the Python API: `sharp.recipes.compress`) of `next:6-29` on the same
GPT4-Alpaca training records, with the same SLW and SFT budget; each row changes one setting of the row above:

    today          lora:64, SLW init = lstsq (down projection only), original inputs, CE loss, recovery trained
    closed-form    + every shared projection fitted in closed form before SLW
    gate           + recovery lora+gate:64 (a per-channel gate on the reference's output)
    distillation   + SFT loss kd (the original model as teacher)
    shared weights + SFT also trains the shared reference weights (no storage cost)
    sequential     + SLW in layer order on the partly shared model's inputs
    planner        + `--strategy auto:N` with N = the stored parameters of the rows above: per layer, share (with
                   a rank of R/4…2R), drop the MLP, drop the block or keep, from closed-form costs; shared MLPs
                   must account for at least half of the removed parameters
    slw-budget     + SLW 300 steps per target at peak lr 3e-3 instead of 100 at 1e-2 (from the closed-form
                   init, 1e-2 for 100 steps left layer 15 at 0.76, 3e-3 for 300 at 0.72; measured on 2 targets)
    slw-data       + SLW on a random 50% of the training records, at most 81,920 tokens per target (instead of
                   15% and 24,576: the rank-16..128 corrections are fitted on ~3x the tokens)

For each row: the per-target
SLW relative error (median, range), held-out perplexity after SLW alone (GPT4-Alpaca) and after SFT (GPT4-Alpaca,
DialogSum, WikiText-2; ≥ 64 examples each, ± the standard error of the mean NLL), stored / trained parameters,
training tokens, time and peak memory per stage. Finished rows are cached in `--work`/rows.json (keyed by their
settings), so a rerun only computes what changed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from provenance import git_rev

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
DIALOGSUM = ASSETS / "instruct" / "dialogsum_dev.jsonl"
WIKITEXT = ASSETS / "text" / "wikitext2_test.txt"

LEVERS = [  # (key, what the row adds, settings changed from the row above)
    ("today", "today's recipe", {"recovery": "lora:64", "slw_init": "lstsq"}),
    ("closed-form", "+ closed-form init of every projection", {"slw_init": "closed-form"}),
    ("gate", "+ gate on the reference (lora+gate:64)", {"recovery": "lora+gate:64"}),
    ("distillation", "+ distillation (SFT loss kd)", {"loss": "kd"}),
    ("shared", "+ shared reference weights trained", {"train": "recovery+shared"}),
    ("sequential", "+ sequential SLW inputs", {"slw_inputs": "sequential"}),
    ("planner", "+ planner (auto: at the stored size above, shared ≥ 50% of the removal)",
     {"strategy": "auto:{stored}", "plan_min_shared": 0.5}),
    ("slw-budget", "+ longer SLW (300 steps at lr 3e-3)", {"slw_steps": 300, "slw_lr": 3e-3}),
    ("slw-data", "+ more SLW data (a random 50% of the records, ≤ 81,920 tokens per target)",
     {"slw_fraction": 0.5, "slw_tokens": 81920}),
]


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


def build_parser() -> argparse.ArgumentParser:
    """The budget flags (`sink_weight_smollm2.py` takes the same)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--strategy", default="next:6-29")
    p.add_argument("--work", default="runs/recovery_ablation_smollm2")
    p.add_argument("--doc", default=str(ROOT / "docs" / "results" / "recovery_ablation_smollm2.md"))
    p.add_argument("--rows", default=",".join(k for k, _, _ in LEVERS), help="which rows to run (cumulative)")
    p.add_argument("--eval-limit", type=int, default=64, help="examples / windows per evaluation task")
    p.add_argument("--slw-steps", type=int, default=100)
    p.add_argument("--slw-fraction", type=float, default=0.15)
    p.add_argument("--slw-tokens", type=int, default=24576)
    p.add_argument("--slw-sink-weight", type=float, default=1.0, help="compress --slw-sink-weight, every row (1.0: "
                   "what the committed rows used; compress's default is 0.1 since docs/results/sink_weight_smollm2.md)")
    p.add_argument("--sft-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="CPUs this run may use (pinned; 0 = all)")
    return p


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def shared_stored(args: argparse.Namespace) -> int:
    """Stored parameters of `args.strategy` with the gated recovery: the planner row's budget."""
    import sharp

    model, _ = sharp.load_model(args.model)
    sharp.share(model, args.strategy, "lora+gate:64")
    return sharp.count_parameters(model)["stored"]


def row_settings(args: argparse.Namespace, upto: str, stored: int | None = None) -> dict:
    settings = {"model": args.model, "strategy": args.strategy, "data": "alpaca-demo[:899]",
                "eval_data": f"alpaca-demo[-{args.eval_limit}:]", "eval_fraction": 0.0, "slw_steps": args.slw_steps,
                "slw_fraction": args.slw_fraction, "slw_tokens": args.slw_tokens, "sft_steps": args.sft_steps,
                "batch_size": args.batch_size, "lr": args.lr, "max_len": args.max_len, "eval_steps": 0,
                "save_steps": 20, "slw_sink_weight": args.slw_sink_weight}
    for key, _, change in LEVERS:
        settings.update({k: v.format(stored=stored) if isinstance(v, str) else v for k, v in change.items()})
        if key == upto:
            return settings
    raise KeyError(upto)


def run_row(key: str, settings: dict, work: Path, args: argparse.Namespace, known: dict) -> dict:
    """One compress run + the three-task evaluation. `known`: scores of the original model (and of Direct Sharing,
    when strategy and recovery are unchanged) from an earlier row, seeded into compress's work folder."""
    import torch

    import sharp
    from sharp.evaluation.perplexity import evaluate_tasks, parse_tasks
    from sharp.recipes import CompressConfig
    from sharp.recipes.compress import compress

    out = work / key
    cfg = CompressConfig(**settings, out=str(out), overwrite=True)
    if known:  # the same model on the same held-out records: earlier rows' scores, not recomputed
        from sharp.recipes import prepare_work_dir

        evals = cfg.work_dir / "evals.json"
        if not evals.is_file():
            prepare_work_dir(cfg)
            evals.write_text(json.dumps(known))
    start = time.perf_counter()
    summary = compress(cfg, progress=False)
    seconds = time.perf_counter() - start
    model, tok = sharp.load_model(str(out), dtype=torch.float32)
    tasks = [f"ppl:alpaca=alpaca-demo[-{args.eval_limit}:]"]
    if DIALOGSUM.is_file():
        tasks.append(f"ppl:dialogsum={DIALOGSUM}[:{args.eval_limit}]")
    if WIKITEXT.is_file():
        tasks.append(f"ppl:text={WIKITEXT}")
    res = evaluate_tasks(model, tok, parse_tasks(",".join(tasks)), max_len=args.max_len * 2, batch_size=4,
                         limit=args.eval_limit)
    return {"key": key, "settings": settings, "summary": summary, "seconds": seconds,
            "eval": {t.split("=")[0].removeprefix("ppl:"): v for t, v in res.items()}}


def same_settings(cached: dict, settings: dict) -> bool:
    """Whether a cached row was run with `settings` (rows cached before a flag existed ran at its value then; a flag
    neither names ran at that value in both)."""
    from sharp.recipes.config import SETTINGS_BEFORE_THEIR_FLAG

    return {**SETTINGS_BEFORE_THEIR_FLAG, **cached} == {**SETTINGS_BEFORE_THEIR_FLAG, **settings}


def main() -> None:
    args = parse_args()
    if args.threads:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache_path = work / "rows.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    wanted = [k.strip() for k in args.rows.split(",") if k.strip()]
    results = []
    stored = shared_stored(args) if "planner" in wanted else None
    for key, label, _ in LEVERS:
        if key not in wanted:
            continue
        settings = row_settings(args, key, stored)
        hit = cache.get(key)
        if hit and same_settings(hit["settings"], settings):
            log(f"{key}: cached")
        else:
            log(f"{key}: running {json.dumps(settings)}")
            known = {}
            for earlier in results:
                prev = earlier[2]
                known["original"] = prev["summary"]["perplexity"]["original"]
                if all(prev["settings"][k] == settings[k] for k in ("strategy", "recovery")):
                    known["direct"] = prev["summary"]["perplexity"]["direct"]
            hit = run_row(key, settings, work, args, known)
            cache[key] = hit
            cache_path.write_text(json.dumps(cache, indent=2, sort_keys=True, default=str))
            log(f"{key}: done in {hit['seconds'] / 60:.1f} min: "
                + ", ".join(f"{t} {v['ppl']:.2f}" for t, v in hit["eval"].items()))
        results.append((key, label, hit))
    write_doc(Path(args.doc), args, results)
    log(f"wrote {args.doc}")


def _slw_errors(summary: dict) -> list[float]:
    return [v["rel_err_after"] for v in (summary.get("slw") or {}).values()]


def _slw_by_source_layer(summary: dict) -> dict[int, dict]:
    """SLW results keyed by the source model's layer index: SLW runs after a plan's block drops, so its keys index
    the compressed model's layers."""
    slw = summary.get("slw") or {}
    drops = set((summary.get("plan") or {}).get("block_drops") or [])
    kept = [i for i in range(len(drops) + 1 + max(map(int, slw), default=0)) if i not in drops]  # source indices
    return {kept[int(k)]: v for k, v in slw.items()}


def write_doc(path: Path, args: argparse.Namespace, results: list) -> None:
    if not results:
        return
    tasks = list(results[0][2]["eval"])
    first = results[0][2]
    lines = [
        "# Recovery levers, one at a time — SmolLM2-135M `next:6-29`",
        "",
        f"Generated by `benchmarks/recovery_ablation_smollm2.py` (git {git_rev()}, {datetime.date.today()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs). Do not edit by hand; rerun the script.",
        "",
        "## Budget (the same for every row)",
        "",
        f"- training data: GPT4-Alpaca records [:899]; held out: the last {args.eval_limit} records (never trained on)",
        f"- SLW: a random {args.slw_fraction:.0%} of the training records, at most {args.slw_tokens:,} tokens per "
        f"target, {args.slw_steps} AdamW steps per target at peak lr 1e-2 (early stopping allowed; the last row "
        f"changes this budget, as it says); attention-sink weight {args.slw_sink_weight}",
        f"- SFT: {args.sft_steps} steps × batch {args.batch_size}, lr {args.lr}, max {args.max_len} tokens",
        f"- evaluation: {args.eval_limit} examples per task (WikiText-2: {args.eval_limit} windows of "
        f"{args.max_len * 2} tokens); ± = standard error of the mean NLL per token (nats)",
        f"- original model: GPT4-Alpaca {first['summary']['perplexity']['original']:.2f}",
        "",
        "## Results",
        "",
        "| row | SLW rel. error median (range) | after SLW: alpaca | after SFT: "
        + " | ".join(tasks) + " | stored | trained | SFT tokens | SLW time | SFT time | peak RSS |",
        "|---|---|---:|" + "---:|" * len(tasks) + "---:|---:|---:|---:|---:|---:|",
    ]
    for _, label, r in results:
        s = r["summary"]
        errs = _slw_errors(s)
        err = f"{statistics.median(errs):.3f} ({min(errs):.2f}–{max(errs):.2f})" if errs else "–"
        timing = s.get("timing", {})
        peak = max((t.get("peak_rss_mib") or 0) for t in timing.values()) if timing else 0
        cells = [f"{r['eval'][t]['ppl']:.2f} ±{r['eval'][t]['nll_sem']:.3f}" for t in tasks]
        sft = s.get("sft") or {}
        lines.append(f"| {label} | {err} | {s['perplexity'].get('slw', float('nan')):.2f} | " + " | ".join(cells)
                     + f" | {s['params']['stored']:,} | {sft.get('trainable') or 0:,} | "
                     f"{sft.get('train_tokens') or 0:,} | {timing.get('slw', {}).get('seconds', 0) / 60:.1f} min | "
                     f"{timing.get('sft', {}).get('seconds', 0) / 60:.1f} min | {peak:,.0f} MiB |")
    best = min(results, key=lambda r: r[2]["summary"]["perplexity"].get("slw", float("inf")))
    best_err = min(results, key=lambda r: statistics.median(_slw_errors(r[2]["summary"]) or [float("inf")]))
    median = statistics.median(_slw_errors(best_err[2]["summary"]))
    slw_ppl = best[2]["summary"]["perplexity"]["slw"]
    done = {k for k, _, _ in results}
    lines += ["", "## Against the targets", "",
              f"- median post-SLW relative error ≤ 0.7: best row '{best_err[1]}' reaches {median:.3f} — "
              f"{'met' if median <= 0.7 else 'NOT met'};",
              f"- SLW-only GPT4-Alpaca perplexity ≤ 25: best row '{best[1]}' reaches {slw_ppl:.2f} — "
              f"{'met' if slw_ppl <= 25 else 'NOT met'}."]
    missing = [label for key, label, _ in LEVERS if key not in done]
    if missing:
        lines += ["- Levers not measured in this file (not run at this budget on this machine): "
                  + "; ".join(missing) + "."]
    lines += ["", "Each row's Original and Direct Sharing scores (the same model on the same records in every row) "
              "are computed once and reused by later rows."]
    lines += ["", "## Per-target SLW relative error (held-out; 1.0 = the MLP deleted)", ""]
    by_layer = [(label, _slw_by_source_layer(r["summary"])) for _, label, r in results]
    layers = sorted({t for _, slw in by_layer for t in slw})
    lines += ["Columns: the original model's layer index (a plan's block drops renumber the layers SLW sees).", ""]
    lines += ["| row | " + " | ".join(map(str, layers)) + " |", "|---|" + "---:|" * len(layers)]
    for label, slw in by_layer:
        lines.append(f"| {label} | " + " | ".join(f"{slw[t]['rel_err_after']:.2f}" if t in slw else "–"
                                                  for t in layers) + " |")
    for _, label, r in results:
        plan = r["summary"].get("plan")
        if plan:
            lines += ["", f"Plan of the row '{label}': `{plan['strategy']}` — {len(plan['shares'])} shared MLPs, "
                      f"{len(plan['mlp_drops'])} MLPs and {len(plan['block_drops'])} blocks dropped; shared MLPs "
                      f"remove {plan['shared_fraction']:.0%} of the {plan['removed']:,} removed parameters."]
    lines += ["", "Settings of each row (JSON, as passed to `CompressConfig`):", ""]
    lines += [f"- {label}: `{json.dumps(r['settings'], sort_keys=True)}`" for _, label, r in results]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
