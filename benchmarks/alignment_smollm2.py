"""Does aligning the target MLP's hidden units to the reference's help the closed-form fit? SmolLM2-135M
→ docs/results/alignment_smollm2.md.

    .venv/bin/python benchmarks/alignment_smollm2.py          # needs `sharp assets fetch`; ~5 min on one core

An MLP's hidden units can be permuted (rows of gate/up, columns of down) without changing its function. SLW's
closed-form init (`--slw-init closed-form`) fits the shared gate/up towards the *target's* gate/up outputs unit by
unit, so it depends on the order of the target's units, which is arbitrary. Model-merging work (Git Re-Basin and
others) aligns units before comparing weights. Here each target's units are matched to the reference's by a linear
assignment (scipy's Hungarian solver) maximizing, summed over gate and up, how much of each target unit's output a
per-channel gate on its matched reference unit explains on the captured inputs. The permuted target is the same
function, so only the fit's starting point changes.

Per target of `next:6-29` (reference = the layer before), `lora+gate:64`: held-out relative error of the shared MLP
(1.0 = the MLP deleted) with the closed-form fit of the down projection only, of every projection, and of every
projection after alignment; the gate/up fit error before and after; and the matched units' correlation beside
the unaligned order's. Fits use every training token (the attention-sink rows included, as SLW does); held-out
errors are over positions >= 1 of a random 20% of the tokens.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from provenance import git_rev

ROOT = Path(__file__).resolve().parents[1]
ALPACA = "alpaca-demo"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--targets", default="7-29", help="odd target layers FIRST-LAST (reference: the layer before)")
    p.add_argument("--recovery", default="lora+gate:64")
    p.add_argument("--records", type=int, default=160, help="GPT4-Alpaca records captured (max 256 tokens each)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--doc", default=str(ROOT / "docs" / "results" / "alignment_smollm2.md"))
    p.add_argument("--rows", default=str(ROOT / "docs" / "results" / "alignment_smollm2.json"),
                   help="the measured rows, written beside the document")
    p.add_argument("--from-rows", action="store_true", help="only render the document from --rows")
    return p.parse_args()


def capture(model, tok, texts: list[str], layers: list[int]) -> tuple[dict, dict, torch.Tensor]:
    """MLP inputs and outputs of `layers` on every token, and each token's position."""
    xs = {i: [] for i in layers}
    ys = {i: [] for i in layers}

    def keep(i: int):
        def hook(module, args, out) -> None:  # returns None: the output is left as it is
            xs[i].append(args[0][0].detach())
            ys[i].append(out[0].detach())
        return hook

    hooks = [model.model.layers[i].mlp.register_forward_hook(keep(i)) for i in layers]
    pos = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt", truncation=True, max_length=256)["input_ids"]
            model(ids)
            pos.append(torch.arange(ids.shape[1]))
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in xs.items()}, {i: torch.cat(v) for i, v in ys.items()}, torch.cat(pos)


def captured(args) -> tuple:
    """What both benchmarks measure on: (start time, git commit, the fp32 model, the odd targets, MLP inputs and
    outputs of each target and its reference, train rows, held-out rows at positions >= 1, tokens captured)."""
    import sharp
    from sharp.data import load_records

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = datetime.datetime.now(datetime.UTC)
    git = git_rev()  # the code measured: read when the run starts
    first, last = (int(v) for v in args.targets.split("-"))
    targets = list(range(first, last + 1, 2))
    model, tok = sharp.load_model(args.model, dtype=torch.float32)
    model.eval()
    records = load_records(f"{ALPACA}[:{args.records}]")
    texts = ["\n".join(str(r[k]) for k in ("instruction", "input", "output") if r.get(k)) for r in records]
    xs, ys, pos = capture(model, tok, texts, sorted(set(targets) | {t - 1 for t in targets}))
    n = pos.shape[0]
    order = torch.randperm(n)
    train, held = order[: int(0.8 * n)].sort().values, order[int(0.8 * n):].sort().values
    return started, git, model, targets, xs, ys, train, held[pos[held] >= 1], n


def rel_err(mlp, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((mlp(x) - y).pow(2).sum() / y.pow(2).sum()).sqrt())


def alignment(reference, target, xx: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(permutation of the target's units, mean matched correlation, mean correlation in the given order).
    Pair score: the share of a target unit's output that a gate on a reference unit explains, gate + up."""
    from scipy.optimize import linear_sum_assignment

    score = 0.0
    for name in ("gate_proj", "up_proj"):
        wr, wt = getattr(reference, name).weight.double(), getattr(target, name).weight.double()
        cross = wr @ xx @ wt.T  # <ref unit i, target unit j> over the tokens
        ref_energy = (wr @ xx * wr).sum(1)
        target_energy = (wt @ xx * wt).sum(1)
        score = score + cross.pow(2) / (ref_energy[:, None] * target_energy[None, :]) / 2
    score = score.detach()
    _, col = linear_sum_assignment(score.numpy(), maximize=True)
    perm = torch.as_tensor(col)
    idx = torch.arange(len(perm))
    matched, given = score[idx, perm].sqrt().mean(), score.diagonal().sqrt().mean()
    return perm, float(matched), float(given)


def permuted(mlp, perm: torch.Tensor):
    """The same MLP with its hidden units in the order `perm` (the same function)."""
    mlp = copy.deepcopy(mlp)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[perm])
        mlp.up_proj.weight.copy_(mlp.up_proj.weight[perm])
        mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])
    return mlp


def main() -> None:
    args = parse_args()
    if args.from_rows:
        saved = json.loads(Path(args.rows).read_text())
        return write_doc(args, saved["rows"], datetime.datetime.fromisoformat(saved["started"]), saved["tokens"],
                         saved["held"], saved["git"])
    import sharp
    from sharp.recovery.closed_form import fit_mlp

    started, git, model, targets, xs, ys, train, held, n = captured(args)
    first, last = targets[0], targets[-1]
    original = copy.deepcopy(model)
    sharp.share(model, f"next:{first - 1}-{last}", args.recovery)

    rows = []
    for t in targets:
        start = time.perf_counter()
        x, y = xs[t], ys[t]
        chunks = [(x[train][i : i + 8192], y[train][i : i + 8192]) for i in range(0, len(train), 8192)]
        mlp = model.model.layers[t].mlp
        target, reference = original.model.layers[t].mlp, original.model.layers[t - 1].mlp
        untouched = copy.deepcopy(mlp.state_dict())
        row = {"layer": t, "direct": rel_err(mlp, x[held], y[held])}
        for name, fitted_to, projections in (("down", target, ("down_proj",)),
                                             ("all", target, ("gate_proj", "up_proj", "down_proj")),
                                             ("aligned", None, ("gate_proj", "up_proj", "down_proj"))):
            mlp.load_state_dict(untouched)
            if fitted_to is None:
                xx = x[train].double().T @ x[train].double()
                perm, row["corr_matched"], row["corr_given"] = alignment(reference, target, xx)
                fitted_to = permuted(target, perm)
                row["same_function"] = rel_err(fitted_to, x[held], y[held])
            report = fit_mlp(mlp, fitted_to, projections, chunks)
            row[name] = rel_err(mlp, x[held], y[held])
            if "gate_proj" in report:
                row[f"{name}_gate_up"] = (report["gate_proj"]["rel_err"] + report["up_proj"]["rel_err"]) / 2
        mlp.load_state_dict(untouched)
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(f"layer {t}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "layer"), flush=True)
    Path(args.rows).write_text(json.dumps({"started": started.isoformat(), "git": git, "tokens": n,
                                           "held": len(held), "rows": rows}, indent=1))
    write_doc(args, rows, started, n, len(held), git)


def write_doc(args, rows: list[dict], started, tokens: int, held: int, git: str) -> None:
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "layer"}
    lines = [
        "# Aligning hidden units before the closed-form fit — SmolLM2-135M",
        "",
        f"Generated by `benchmarks/alignment_smollm2.py` (git {git}, {started:%Y-%m-%d}, one thread). Do not edit "
        "by hand; rerun the script.",
        "",
        "An MLP's hidden units can be permuted without changing its function. The closed-form init fits the shared "
        "gate/up towards the target's gate/up outputs unit by unit, so it depends on the target's (arbitrary) unit "
        "order. Here the target's units are first matched to the reference's (Hungarian assignment on how much of a "
        "target unit's output a gate on the matched reference unit explains), then the same fit runs.",
        "",
        f"Model {args.model}, `next:{int(args.targets.split('-')[0]) - 1}-{args.targets.split('-')[1]}`, "
        f"recovery `{args.recovery}`; {tokens:,} tokens of {args.records} GPT4-Alpaca records (max 256 each): "
        f"fits on a random 80% (position 0 included), relative errors on the other {held:,} tokens at positions "
        ">= 1 (1.0 = the MLP deleted). Correlations: root-mean of the squared uncentered correlation of matched "
        "units' outputs, gate and up averaged ('given': the units in their stored order).",
        "",
        "| layer | Direct Sharing | fit down only | fit every projection | aligned, then every projection | "
        "gate/up fit error | aligned gate/up fit error | unit correlation, given | matched | s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows + [{"layer": "median", **med}]:
        lines.append(f"| {r['layer']} | {r['direct']:.3f} | {r['down']:.3f} | {r['all']:.3f} | {r['aligned']:.3f} | "
                     f"{r['all_gate_up']:.3f} | {r['aligned_gate_up']:.3f} | {r['corr_given']:.3f} | "
                     f"{r['corr_matched']:.3f} | {r['seconds']:.0f} |")
    worst = max(abs(r["same_function"]) for r in rows)
    worse = [r["layer"] for r in rows if r["down"] > r["direct"]]
    lines += [
        "",
        f"Check: every permuted target reproduces its own output (largest held-out relative difference {worst:.1e}).",
        "",
        "## Reading",
        "",
        f"- Alignment moves the median fitted error from {med['all']:.3f} to {med['aligned']:.3f} and the gate/up "
        f"fit error from {med['all_gate_up']:.3f} to {med['aligned_gate_up']:.3f}.",
        f"- The matching does find closer partners: a matched reference unit's output explains "
        f"{med['corr_matched'] ** 2:.0%} of a target unit's (median), {med['corr_given'] ** 2:.0%} in the stored "
        f"order. But the rank-r correction fitted with the gate already brings the gate/up error to "
        f"{med['all_gate_up']:.3f} in either order: the better partners' gain does not survive it.",
        "- " + ("So alignment gives the fit no better starting point, and SHARP's closed-form init keeps the units as "
                "stored (no option for it)."
                if med["all"] - med["aligned"] < 0.01 else
                f"Alignment lowers the median error by {med['all'] - med['aligned']:.3f}: worth an `--slw-init` "
                "option."),
        *([f"- 'fit down only' is worse than Direct Sharing at layer(s) {', '.join(map(str, worse))}: these fits "
           "weigh every training row alike, position 0's included, while the errors are measured on positions >= 1. "
           "SLW weighs position 0 apart (`--slw-sink-weight`) and keeps the best of its candidate inits on held-out "
           "rows."] if worse else []),
        "",
    ]
    Path(args.doc).write_text("\n".join(lines))
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    sys.exit(main())
