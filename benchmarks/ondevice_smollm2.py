"""On-device numbers for SmolLM2-135M in ExecuTorch (XNNPACK delegate, ExecuTorch's Python runtime): the original
vs SHARP next:6-29 (a recovered checkpoint) and group:3:3-29, in fp32, fp16 and 8da4w; program bytes,
load, TTFT, decode tokens/s, peak RSS (`sharp bench`, interleaved rounds), perplexity computed by the programs
themselves, logit equivalence with PyTorch; and `sharp quantize --recovery-bits / --embedding-bits` in PyTorch.
Writes docs/results/ondevice_smollm2.md (+ .json).

    python benchmarks/ondevice_smollm2.py --trained runs/trained_next6-29 [--trained runs/next6-29_r16] [--paired 15]
    python benchmarks/ondevice_smollm2.py --model /path/to/stories260K --strategies next:1-4 --quick   # dry run

Here (one core): ~45 min of exports, then ~50 min of measuring. Needs the `[executorch]` extra. Exports are cached
in --work (a folder that holds model.pte is not exported again), so the script can be stopped and rerun. Without
--trained the next:6-29 checkpoint is an untrained `sharp share` (its perplexity is Direct Sharing's); group:3:3-29
is always untrained (lora:64, B = 0). Several --trained checkpoints of the first strategy (e.g. two recovery ranks)
each get their rows, labelled with their recovery.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ALPACA = "alpaca-demo[-100:]"  # records no README command trains on (they train on alpaca-demo[:899])
PRECISIONS = {  # label: `sharp export` options
    "fp32": [],
    "fp16": ["--dtype", "fp16"],
    "8da4w": ["--quant", "8da4w", "--recovery-bits", "8"],
}
EXTRA = {"8da4w, recovery 4-bit": ["--quant", "8da4w", "--recovery-bits", "4"]}  # first strategy only
PROMPT = [1, 4093, 314, 253, 2118, 30, 2043, 6202, 28, 1117, 17401, 351, 260, 1343, 282, 1345]


def sharp_cli(*args: str) -> None:
    print("$ sharp", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-c", "import sys; from sharp.cli import main; sys.argv[0] = 'sharp'; main()",
                    *args], check=True)


def prepare(model: str, work: Path, strategies: list[str], trained: list[str]) -> dict[str, Path]:
    """{label: source}: the original model folder and one sharp checkpoint per strategy (the first strategy's are
    the `trained` ones, if any, labelled with their recovery when there are several)."""
    from sharp.io.models import resolve_model_path

    sources = {"original": Path(resolve_model_path(model))}
    for i, strategy in enumerate(strategies):
        if i == 0 and trained:
            for t in trained:
                recovery = json.loads((Path(t) / "sharp_config.json").read_text())["recovery"]
                sources[f"SHARP {strategy}" + (f" {recovery}" if len(trained) > 1 else "")] = Path(t)
            continue
        folder = work / f"share_{strategy.replace(':', '_')}"
        if not folder.exists():
            sharp_cli("share", str(sources["original"]), "--strategy", strategy, "--recovery", "lora:64",
                      "--out", str(folder))
        sources[f"SHARP {strategy}"] = folder
    return sources


def export_all(sources: dict[str, Path], work: Path, precisions: dict, extra: dict, cache_len: int) -> dict:
    """{(label, precision): {"path", "export_s"}}; exports already on disk are reused (their time as recorded)."""
    old = work / "export_times.json"  # written by earlier versions of this script
    times = json.loads(old.read_text()) if old.is_file() else {}
    out = {}
    for i, (label, src) in enumerate(sources.items()):
        todo = {**precisions, **(extra if i == 1 else {})}
        for prec, opts in todo.items():
            name = f"{src.name}_{prec}".replace(", ", "_").replace(" ", "_").replace(":", "_")  # by source
            folder, stamp = work / "pte" / name, work / "pte" / f"{name}.export_s"
            if not (folder / "model.pte").is_file():
                t0 = time.perf_counter()
                sharp_cli("export", str(src), "--format", "executorch", "--out", str(folder), "--overwrite",
                          "--max-cache-len", str(cache_len), *opts)
                stamp.write_text(f"{time.perf_counter() - t0:.1f}\n")  # one file per export: runs can overlap
            seconds = float(stamp.read_text()) if stamp.is_file() else times.get(str(folder))
            out[(label, prec)] = {"path": folder, "export_s": seconds}
    return out


def examples(source: Path, n: int, max_len: int) -> list[dict]:
    from sharp.data import load_records, parse_data_spec, tokenize_examples
    from sharp.io.models import load_tokenizer

    spec = parse_data_spec(ALPACA)
    records = load_records(spec)[-n:]
    return tokenize_examples(records, spec.format, load_tokenizer(str(source)), "plain", max_len)


def program_ppl(folder: Path, exs: list[dict], cache: dict, cache_file: Path) -> dict:
    """Held-out response perplexity computed by the program itself, token by token (cached by file stamps)."""
    from sharp.io.pte import PteModel, pte_files, pte_nll

    stamp = json.dumps(["v1", str(folder), len(exs), [(f.name, f.stat().st_size, f.stat().st_mtime)
                                                       for f in pte_files(folder)]])
    if stamp not in cache:
        t0 = time.perf_counter()
        nll, n = pte_nll(PteModel(folder), exs)
        cache[stamp] = {"ppl": math.exp(nll / n), "tokens": n, "seconds": time.perf_counter() - t0}
        cache_file.write_text(json.dumps(cache, indent=1))
    return cache[stamp]


@torch.no_grad()
def torch_model(source: Path):
    import sharp

    return sharp.load_model(str(source), dtype=torch.float32, tokenizer=False)[0]


@torch.no_grad()
def equivalence(source: Path, folder: Path, prompt: list[int]) -> dict:
    """Max |logit difference| of the program against PyTorch fp32 on every position of `prompt`."""
    from sharp.io.pte import PteModel

    model = torch_model(source)
    ids = torch.tensor([prompt]) % model.config.vocab_size  # SmolLM2's ids; a dry run's tiny model has fewer
    want = model(ids).logits[0]
    pte = PteModel(folder)
    got = torch.stack([pte(ids[:, i:i + 1], i)[0] for i in range(len(prompt))])
    return {"max_abs_diff": float((got - want).abs().max()), "max_abs_logit": float(want.abs().max()),
            "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).float().mean())}


@torch.no_grad()
def torch_ppl(source: Path, exs: list[dict]) -> float:
    from sharp.evaluation.perplexity import response_perplexity

    return response_perplexity(torch_model(source), exs, batch_size=4)["ppl"]


def pytorch_quantize(sources: dict[str, Path], work: Path, exs: list[dict]) -> list[dict]:
    """`sharp quantize` (quanto int4) of the original and the first SHARP checkpoint with the recovery / embedding
    stored at 16, 8 or 4 bits: bytes of the weight files and held-out perplexity in PyTorch."""
    import sharp
    from sharp.evaluation.perplexity import response_perplexity

    rows = []
    label, src = list(sources.items())[1]
    bf16 = {"original": work / "orig_bf16", label: work / f"{src.name}_bf16"}  # by source: --trained may change
    if not bf16["original"].exists():
        m, tok = sharp.load_model(str(sources["original"]), dtype=torch.bfloat16)
        m.save_pretrained(bf16["original"])
        tok.save_pretrained(bf16["original"])
    if not bf16[label].exists():
        from sharp.io.models import load_tokenizer

        sharp.save(sharp.load(src, dtype=torch.bfloat16), bf16[label], tokenizer=load_tokenizer(str(src)))
    variants = [("original", 16, 16), ("original", 16, 8), (label, 16, 16), (label, 8, 16), (label, 4, 16),
                (label, 4, 8)]
    cache_file = work / "q4_ppl_cache.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    for name, rbits, ebits in variants:
        out = work / f"q4_{'orig' if name == 'original' else src.name}_r{rbits}_e{ebits}"
        if not out.exists():
            sharp_cli("quantize", str(bf16[name]), "--bits", "4", "--method", "quanto", "--recovery-bits",
                      str(rbits), "--embedding-bits", str(ebits), "--out", str(out))
        stamp = json.dumps([str(out), len(exs), (out / "manifest.json").stat().st_mtime])
        if stamp not in cache:  # cached: the slowest part (quanto int4 runs eagerly)
            with torch.no_grad():
                model = sharp.load_model(str(out), tokenizer=False)[0]
                cache[stamp] = response_perplexity(model, exs, batch_size=4)["ppl"]
            cache_file.write_text(json.dumps(cache, indent=1))
        rows.append({"model": name, "recovery_bits": rbits if name != "original" else None, "embedding_bits": ebits,
                     "bytes": sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors"),
                     "ppl": cache[stamp]})
    for r in rows:
        base = next(o for o in rows if o["model"] == "original" and o["embedding_bits"] == r["embedding_bits"])
        r["ratio"] = r["bytes"] / base["bytes"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--strategies", default="next:6-29,group:3:3-29")
    p.add_argument("--trained", action="append", default=[], help="a recovered checkpoint of the first strategy "
                   "(repeat for several, e.g. two recovery ranks)")
    p.add_argument("--work", default=str(ROOT / "runs" / "ondevice_smollm2"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "ondevice_smollm2.md"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--load-repeats", type=int, default=3)
    p.add_argument("--paired", type=int, default=15, help="rounds of `sharp bench --paired` per process, one "
                   "process per --rounds (0: none): every program in one process, decoding in turn; the decode "
                   "ratio per round against the same precision's original")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="XNNPACK threads (0: ExecuTorch's default)")
    p.add_argument("--cache-len", type=int, default=256)
    p.add_argument("--ppl-examples", type=int, default=64)
    p.add_argument("--precisions", default="fp32,fp16,8da4w", help=f"of {','.join(PRECISIONS)}")
    p.add_argument("--program-ppl", choices=("quantized", "all"), default="quantized",
                   help="programs whose perplexity they compute themselves (~10k calls each): quantized and "
                        "half-precision ones, or all; fp32 programs otherwise show PyTorch fp32's, which the "
                        "logit-equivalence table ties them to")
    p.add_argument("--quick", action="store_true", help="fp32 only, one round, few tokens: a dry run")
    p.add_argument("--note", default="", help="a line for the document (e.g. where --trained came from)")
    p.add_argument("--export-only", action="store_true", help="stop after the exports (run the rest later)")
    p.add_argument("--skip-pytorch", action="store_true", help="leave out the sharp quantize section")
    p.add_argument("--render-only", action="store_true", help="write --out again from its .json (no measuring)")
    args = p.parse_args()
    if args.render_only:
        out = Path(args.out)
        out.write_text(render(json.loads(out.with_suffix(".json").read_text())))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    precisions, extra = (({"fp32": []}, {}) if args.quick else
                         ({k: PRECISIONS[k] for k in args.precisions.split(",")}, EXTRA))
    if args.quick:
        args.rounds, args.repeats, args.load_repeats, args.tokens, args.prompt_tokens = 1, 1, 1, 4, 4
        args.paired = min(args.paired, 2)
        args.ppl_examples = 2
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    strategies = args.strategies.split(",")
    sources = prepare(args.model, work, strategies, args.trained)
    programs = export_all(sources, work, precisions, extra, args.cache_len)
    if args.export_only:
        return

    from sharp.bench.runner import bench

    keys = list(programs)
    report = bench([str(programs[k]["path"]) for k in keys], tokens=args.tokens, repeats=args.repeats,
                   prompt_tokens=args.prompt_tokens, threads=args.threads, load_repeats=args.load_repeats,
                   rounds=args.rounds, paired=args.paired)
    (work / "bench_report.json").write_text(json.dumps(report, indent=1, default=str))  # kept if a later step fails
    exs = examples(sources["original"], args.ppl_examples, args.cache_len)
    torch_ppl_rows = {label: torch_ppl(src, exs) for label, src in sources.items()}
    ppl_file = work / "ppl_cache.json"
    ppl_cache = json.loads(ppl_file.read_text()) if ppl_file.is_file() else {}
    rows = []
    for key, r in zip(keys, report["models"], strict=True):
        label, prec = key
        base = report["models"][keys.index(("original", prec.split(",")[0]))]
        untrained = label != "original" and sources[label] not in map(Path, args.trained)
        lossy = prec != "fp32"  # quantized or half precision: the program's own perplexity, not PyTorch fp32's
        if args.program_ppl == "all" or (lossy and not untrained):
            ppl = program_ppl(programs[key]["path"], exs, ppl_cache, ppl_file)
        elif lossy:  # ~10k program calls for Direct Sharing's perplexity: not worth it
            ppl = {"ppl": None, "by": "untrained"}
        else:
            ppl = {"ppl": torch_ppl_rows[label], "by": "pytorch"}
        rows.append({**{k: v for k, v in r.items() if k not in ("ratios", "floors", "decode_paired")},
                     "program": r["model"], "paired": paired_vs(r, base),
                     "model": label, "precision": prec, "export_s": programs[key]["export_s"], "ppl": ppl,
                     "vs_original": {f: r[f] / base[f] for f in ("bytes_on_disk", "cold_load_s", "warm_load_s",
                                                                  "ttft_s", "decode_tok_s", "peak_rss_mib")}})
    equiv = {label: equivalence(src, programs[(label, "fp32")]["path"], PROMPT[: min(16, args.cache_len)])
             for label, src in sources.items()}
    quant_rows = [] if args.skip_pytorch or args.quick else pytorch_quantize(sources, work, exs)
    result = {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": report["machine"], "settings": {**report["settings"], "cache_len": args.cache_len,
                                                         "ppl_examples": args.ppl_examples},
              "threads": args.threads or _threads(), "sources": {k: str(v) for k, v in sources.items()},
              "trained": args.trained,
              "training": [_training(t) for t in args.trained], "note": args.note,
              "rows": rows, "equivalence": equiv, "torch_ppl": torch_ppl_rows, "pytorch_quantize": quant_rows,
              "reference_gguf": _gguf_reference()}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    out.write_text(render(result))
    print(f"wrote {out}")


def paired_vs(row: dict, base: dict) -> dict | None:
    """The paired decode ratios of a bench row against another row of the same run (its precision's original):
    per round, the two programs' speeds measured moments apart; median and 95% interval of the ratios."""
    if "decode_paired" not in row:
        return None
    from sharp.bench.paired import summarize

    speeds, base_speeds = row["decode_paired"]["decode_tok_s"], base["decode_paired"]["decode_tok_s"]
    s = summarize([base_speeds, speeds])[1]
    per = len(speeds) // len(row["decode_paired"]["process_medians"])  # rounds per process, in process order
    return {"speeds": speeds, "ratios": s["ratios"], "median": s["ratio_median"], "ci95": s["ratio_ci95"],
            "ci_coverage": s["ci_coverage"],
            "process_medians": [statistics.median(s["ratios"][i:i + per]) for i in range(0, len(speeds), per)]}


def _training(trained: str | None) -> dict | None:
    """How the recovered checkpoint was trained (`sharp compress` writes summary.json)."""
    f = Path(trained or "") / "summary.json"
    if not trained or not f.is_file():
        return None
    d = json.loads(f.read_text())
    keys = ("model", "strategy", "recovery", "data", "slw_steps", "sft_steps", "lr", "max_len", "batch_size")
    return {"config": {k: d["config"].get(k) for k in keys}, "perplexity": d.get("perplexity"),
            "eval_data": d["config"].get("eval_data"), "seconds": {k: v.get("seconds") for k, v in
                                                                  d.get("timing", {}).items()}}


def _threads() -> int:
    from executorch.extension.pybindings import portable_lib

    return portable_lib._threadpool_get_thread_count()


def _gguf_reference() -> dict | None:
    """llama.cpp numbers measured by benchmarks/deploy_smollm2.py (llama.cpp is not built in this script)."""
    f = ROOT / "docs" / "results" / "deploy_smollm2.json"
    if not f.is_file():
        return None
    d = json.loads(f.read_text())
    return {"gguf": d.get("gguf"), "started": d.get("started")}


def _ppl(p: dict) -> str:
    if p["ppl"] is None:
        return "– (untrained)"
    return f"{p['ppl']:,.2f}" + ("†" if p.get("by") == "pytorch" else "")


def _paired(p: dict | None) -> str:
    if not p:
        return "–"
    m = p.get("process_medians", [])
    spread = f"; loads {min(m):.3f}–{max(m):.3f}" if len(m) > 1 else ""
    return f"{p['median']:.3f}× [{p['ci95'][0]:.3f}–{p['ci95'][1]:.3f}{spread}]"


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def _training_lines(t: dict | None) -> list[str]:
    if not t:
        return []
    c, p, sec = t["config"], t["perplexity"] or {}, t["seconds"]
    command = (f"sharp compress {c['model']} --strategy {c['strategy']} --recovery {c['recovery']} --data "
               f"'{c['data']}' --slw-steps {c['slw_steps']} --sft-steps {c['sft_steps']} --lr {c['lr']} "
               f"--max-len {c['max_len']}")
    return [f"- recovered checkpoint ({c['recovery']}): `{command}` (SLW then SFT, {sec.get('slw', 0) / 60:.0f} + "
            f"{sec.get('sft', 0) / 60:.0f} min here): a deliberately short budget, enough for the on-device numbers "
            f"(bytes and speed do not depend on training), not for quality. Its own eval on `{t['eval_data']}`: "
            f"original {p.get('original', 0):.2f}, Direct Sharing {p.get('direct', 0):,.0f}, "
            f"SLW {p.get('slw', 0):.1f}, SFT {p.get('sft', 0):.1f}"]


def _rank_lines(r: dict, recovered: list[str]) -> list[str]:
    """Where several recovered checkpoints of one strategy were measured (two recovery ranks, say): what each
    costs and buys per precision, side by side."""
    if len(recovered) < 2:
        return []
    lines = ["", "## Recovered checkpoints side by side", "",
             "The same strategy with different recovery, per precision: bytes and paired decode against the "
             "original in that precision, and held-out perplexity.", "",
             "| precision | " + " | ".join(recovered) + " |", "|---|" + "---|" * len(recovered)]
    for prec in dict.fromkeys(row["precision"] for row in r["rows"]):
        cells = []
        for label in recovered:
            row = next((x for x in r["rows"] if x["model"] == label and x["precision"] == prec), None)
            if row is None:
                cells.append("–")
                continue
            paired = row.get("paired")
            decode = f"{paired['median']:.3f}×" if paired else f"{row['vs_original']['decode_tok_s']:.2f}×"
            cells.append(f"{row['vs_original']['bytes_on_disk']:.3f}× bytes, decode {decode}, ppl {_ppl(row['ppl'])}")
        lines.append(f"| {prec} | " + " | ".join(cells) + " |")
    return lines


def render(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    trained = [str(Path(t)) for t in r["trained"]]  # as `sources` holds them
    recovered = [k for k, v in r["sources"].items() if v in trained]
    first = next(k for k in r["sources"] if k != "original")
    lines = [
        "# SHARP SmolLM2-135M on an on-device runtime: ExecuTorch",
        "",
        f"Generated by `benchmarks/ondevice_smollm2.py` ({r['started']} – {r['finished']}). "
        + ("".join(f"The {k} rows are the **recovered** checkpoint `{r['sources'][k]}`. " for k in recovered)
           if recovered else
           f"The {first} rows are an **untrained** `sharp share` (lora:64, B = 0: Direct Sharing's perplexity). ")
        + "The other SHARP rows carry **untrained** lora:64 recovery (their perplexity is Direct Sharing's; size "
          "and speed do not depend on training).",
        "",
        *[line for t in r["training"] for line in _training_lines(t)],
        *([f"- {r['note']}"] if r.get("note") else []),
        f"- machine: {m['cpu']}, {m['cores']} cores, load average {m['load_average_1m']:.2f} at start; ExecuTorch's "
        f"Python runtime with {r['threads']} XNNPACK threads",
        "- XNNPACK weight cache: " + ("on" if all(row.get("xnnpack_weight_cache") for row in r["rows"]) else
                                      "off for some rows")
        + " (packed weights keyed by their data name, so a weight two layers share is packed and held once; "
          "ExecuTorch's Android and Apple builds enable it, its Python wheel needs `sharp.io.pte.load_runtime` to)",
        f"- `sharp bench` settings: prompt {s['prompt_tokens']} tokens (fed one per call: the programs have static "
        f"shapes), decode {s['tokens']} greedy tokens, {s['statistic']} of {s['repeats']} decode runs and "
        f"{s['load_repeats']} cold + warm loads per round × {s['rounds']} rounds (all programs in turn each round)",
        f"- {s['cold_load']}; load = `Runtime.load_program(model.pte, data_path=weights.ptd)` + `load_method` "
        "(XNNPACK packs its weights there)",
        f"- programs: KV cache of {s['cache_len']} positions, ExecuTorch's `custom_sdpa` / `update_cache` kernels "
        "for attention, everything else in the XNNPACK delegate; every constant in `weights.ptd`, one copy per "
        "distinct byte string",
        f"- perplexity: held-out GPT4-Alpaca responses (last {s['ppl_examples']} records of `{ALPACA}`, max-len "
        f"{s['cache_len']}, no record any checkpoint trained on), computed by each program token by token "
        "(`sharp.io.pte.pte_nll`); † marks PyTorch fp32's perplexity of the same checkpoint, shown for fp32 "
        "programs, which match PyTorch to the logit differences below",
        "- fp16 (when run): every float in half precision (XNNPACK's f16 kernels); 8da4w: torchao int8 dynamic "
        "activations × "
        "int4 weights in groups of 32 (HQQ scales), LM head 8da8w, the tied embedding read from the LM head's int8 "
        "matrix, recovery 8da8w (or 8da4w where marked)",
        "",
        "## Side by side",
        "",
        "Ratios are against the original in the same precision; [min–max] of every decode run (runs × rounds) "
        "beside the median: where two rows' ranges overlap, their decode ratio is within this machine's noise."
        + (f" Paired decode: after each round above, all programs loaded into one fresh process, decoding "
           f"{s['tokens']} tokens each in turn for {s['paired_rounds']} rounds (order rotated each round); per round "
           "the ratio of a program's speed to its precision's original, measured seconds apart, so the machine's "
           "drift cancels; median over all processes [95% distribution-free interval of the median; range of the "
           "per-load medians, which shows what a fresh load changes: where the OS placed the weights]. A ratio "
           "counts as slower beyond noise only where the interval and every load's median are below 1."
           if s.get("paired_rounds") else ""),
        "",
        "| model | precision | MiB (pte + ptd) | cold load s | warm load s | TTFT s | decode tok/s | peak RSS MiB "
        "| paired decode ratio | held-out ppl | export s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        v, orig = row["vs_original"], row["model"] == "original"
        values = {"bytes_on_disk": _mib(row["bytes_on_disk"]), "cold_load_s": f"{row['cold_load_s']:.3f}",
                  "warm_load_s": f"{row['warm_load_s']:.3f}", "ttft_s": f"{row['ttft_s']:.3f}",
                  "decode_tok_s": f"{row['decode_tok_s']:.1f}", "peak_rss_mib": f"{row['peak_rss_mib']:.0f}"}
        runs = row.get("runs", {}).get("decode_tok_s") or [row["decode_tok_s"]]
        values["decode_tok_s"] += f" [{min(runs):.1f}–{max(runs):.1f}]"
        cells = [t if orig else f"{t} ({v[f]:.2f}×)" for f, t in values.items()]
        exp = f"{row['export_s']:.0f}" if row["export_s"] else "–"
        lines.append(f"| {row['model']} | {row['precision']} | " + " | ".join(cells)
                     + f" | {'–' if orig else _paired(row.get('paired'))} | {_ppl(row['ppl'])} | {exp} |")
    lines += ["", "## Targets (issue 14)", "", "| target | measured |", "|---|---|"]
    for row in r["rows"]:
        if row["model"] == "original":
            continue
        v, paired = row["vs_original"], row.get("paired")
        want = 0.85 if row["precision"].startswith("8da4w") else 0.80
        if paired:
            low = min([paired["ci95"][0], *paired.get("process_medians", [])])
            high = max([paired["ci95"][1], *paired.get("process_medians", [])])
            sure = paired.get("ci_coverage", 1.0) >= 0.95
            if paired["median"] >= 1.0:
                verdict = "met (faster beyond noise)" if low >= 1.0 and sure else "met on the median (within noise)"
            else:
                verdict = "missed (slower beyond noise)" if high < 1.0 and sure else "missed (within noise)"
            decode = f"paired {_paired(paired)} {verdict}"
        else:
            decode = f"{v['decode_tok_s']:.2f}× {'met' if v['decode_tok_s'] >= 1.0 else 'missed'}"
        lines.append(f"| {row['model']} {row['precision']}: bytes ≤ {want:.2f}×, decode ≥ 1.0× | "
                     f"{v['bytes_on_disk']:.3f}× {'met' if v['bytes_on_disk'] <= want else 'missed'}, {decode} |")
    lines += _rank_lines(r, recovered)
    lines += ["", "PyTorch fp32 perplexity on the same examples: "
              + ", ".join(f"{k} {v:,.1f}" for k, v in r["torch_ppl"].items()) + ".", ""]
    lines += ["## Logit equivalence (fp32 program vs PyTorch fp32)", "",
              "| model | max abs logit difference | max abs logit | argmax agreement |", "|---|---|---|---|"]
    for k, e in r["equivalence"].items():
        lines.append(f"| {k} | {e['max_abs_diff']:.2e} | {e['max_abs_logit']:.1f} | {e['argmax_agree']:.0%} |")
    if r["pytorch_quantize"]:
        lines += ["", "## `sharp quantize` in PyTorch: recovery and embedding bits", "",
                  "optimum-quanto int4 linears (`sharp quantize --bits 4 --method quanto`); recovery matrices and the "
                  "tied embedding stored at the given bits (absmax, groups of 64) and dequantized at load. Bytes of "
                  "the weight files; ratio against the original with the same embedding bits.", "",
                  "| model | recovery bits | embedding bits | MiB | vs original | held-out ppl |",
                  "|---|---|---|---|---|---|"]
        for q in r["pytorch_quantize"]:
            lines.append(f"| {q['model']} | {q['recovery_bits'] or '–'} | {q['embedding_bits']} | {_mib(q['bytes'])} "
                         f"| {q['ratio']:.3f}× | {q['ppl']:,.2f} |")
    g = (r.get("reference_gguf") or {}).get("gguf")
    if g:
        tok = g.get("llama_cpp_decode_tok_s", {})
        lines += ["", "## llama.cpp, for reference", "",
                  f"From `docs/results/deploy_smollm2.json` ({r['reference_gguf']['started']}, not re-measured here): "
                  f"f16 GGUF `model.gguf` (merged) {_mib(g['merged'])} MiB, `base.gguf` {_mib(g['base'])} MiB + "
                  f"`recovery.lora.gguf` {_mib(g['lora'])} MiB; llama.cpp decode "
                  + ", ".join(f"{k} {v:.1f} tok/s" for k, v in tok.items()) + " (1 thread)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
