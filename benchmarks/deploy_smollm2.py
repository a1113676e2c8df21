"""Deployment numbers for SmolLM2-135M: original vs SHARP next:6-29 and group:3:3-29, 16-bit and 4-bit (quanto
int4, and bitsandbytes nf4 for the original and the first strategy), shared and merged runtimes; writes
docs/results/deploy_smollm2.md (+ .json, .png).

    .venv/bin/python benchmarks/deploy_smollm2.py [--repeats 5] [--tokens 32] [--threads 1]
    .venv/bin/python benchmarks/deploy_smollm2.py --model /path/to/stories260K --quick   # a 1-minute dry run

The SHARP checkpoints are built here with untrained lora:32 recovery (`sharp share`): their perplexity is Direct
Sharing's. --trained DIR (a checkpoint from `sharp compress` with the first strategy) replaces the first
strategy's checkpoint by that recovered one (converted to bf16), so its rows show a trained model's perplexity.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "assets" / "text" / "wikitext2_test.txt"
ALPACA = "alpaca-demo[-32:]"  # the held-out examples `sharp compress --eval-data` scored the --trained checkpoint on


def sh(*args: str) -> None:
    print("$ sharp", " ".join(args), flush=True)
    subprocess.run([str(ROOT / ".venv" / "bin" / "sharp"), *args], check=True)


def prepare(model: str, work: Path, strategies: list[str], trained: str | None) -> dict[str, Path]:
    """16-bit (bf16) original + SHARP checkpoints and their 4-bit versions; returns {label: folder}."""
    from transformers import AutoTokenizer

    import sharp
    from sharp.sharing.state import sharp_config

    paths = {"original 16-bit": work / "orig16"}
    if not paths["original 16-bit"].exists():
        m, tok = sharp.load_model(model, dtype=torch.bfloat16)
        m.save_pretrained(paths["original 16-bit"])
        tok.save_pretrained(paths["original 16-bit"])
    for strategy in strategies:
        folder = work / f"{strategy.replace(':', '_')}16"
        if strategy == strategies[0] and trained:
            folder = work / f"{strategy.replace(':', '_')}_trained16"
            if not folder.exists():
                m = sharp.load(trained, dtype=torch.bfloat16)
                if sharp_config(m).strategy != strategy:
                    raise SystemExit(f"--trained {trained} uses {sharp_config(m).strategy}, not {strategy}")
                sharp.save(m, folder, tokenizer=AutoTokenizer.from_pretrained(trained))
        elif not folder.exists():
            sh("share", str(paths["original 16-bit"]), "--strategy", strategy, "--recovery", "lora:32",
               "--out", str(folder))
        paths[f"SHARP {strategy} 16-bit"] = folder
    sixteen = list(paths.items())
    for label, folder in sixteen:
        q = work / (folder.name.removesuffix("16") + "4")
        if not q.exists():
            sh("quantize", str(folder), "--bits", "4", "--method", "quanto", "--out", str(q))
        paths[label.replace("16-bit", "4-bit")] = q
    for label, folder in sixteen[:2]:  # nf4: the original and the first strategy
        q = work / (folder.name.removesuffix("16") + "nf4")
        if not q.exists():
            sh("quantize", str(folder), "--bits", "4", "--method", "nf4", "--out", str(q))
        paths[label.replace("16-bit", "4-bit nf4")] = q
    return paths


def perplexities(folder: Path, windows: int, max_len: int) -> dict:
    """`sharp eval`'s perplexity on two tasks: WikiText-2 test (first `windows` non-overlapping `max_len`-token
    windows) and the held-out GPT4-Alpaca responses the --trained checkpoint was scored on by `sharp compress`
    (`alpaca-demo[-32:]`, max-len 256: the task its recovery was trained for)."""
    from sharp.bench.measure import load_for_bench
    from sharp.evaluation.perplexity import evaluate_tasks, parse_tasks
    from sharp.io.models import load_tokenizer

    model, tokenizer = load_for_bench(str(folder)), load_tokenizer(str(folder))
    wiki = evaluate_tasks(model, tokenizer, parse_tasks(f"ppl:text={WIKI}"), max_len=max_len, limit=windows)
    alpaca = evaluate_tasks(model, tokenizer, parse_tasks(f"ppl:alpaca={ALPACA}"), max_len=256, batch_size=4)
    (w,), (a,) = wiki.values(), alpaca.values()
    return {"ppl": w["ppl"], "tokens": w["tokens"], "alpaca_ppl": a["ppl"], "alpaca_tokens": a["tokens"]}


def quantized_module_counts(paths: dict) -> dict[str, int]:
    """{label: number of quantized linear modules} of every quantized folder (from its quantization.json)."""
    out = {}
    for label, path in paths.items():
        q = Path(path) / "quantization.json"
        if q.is_file():
            out[label] = len(json.loads(q.read_text())["modules"])
    return out


def trained_info(trained: str | None) -> dict | None:
    """What the --trained checkpoint is: its recovery and the budget `sharp compress` recorded (summary.json)."""
    if not trained:
        return None
    summary = json.loads((Path(trained) / "summary.json").read_text())
    c = summary["config"]
    budget = (f"SLW {c['slw_steps']} steps/layer on {c['slw_fraction']:.0%} of `{c['data']}`, SFT {c['sft_steps']} "
              f"steps × batch {c['batch_size']} at lr {c['lr']}, max-len {c['max_len']}")
    return {"path": str(trained), "recovery": summary["recovery"], "budget": budget,
            "held_out_ppl": summary["perplexity"]}


def cached_ppl(paths: dict[str, Path], cache_file: Path, windows: int, max_len: int) -> dict[str, dict]:
    """`perplexities` of every folder, reusing results for unchanged folders (same weight files, sizes and
    modification times, same windows) from earlier runs of this script."""
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    out = {}
    for label, path in paths.items():
        files = sorted(f for f in Path(path).iterdir() if f.suffix == ".safetensors")
        stamp = [(f.name, f.stat().st_size, f.stat().st_mtime) for f in files]
        key = json.dumps(["v2", str(path), windows, max_len, stamp])
        if key not in cache:
            cache[key] = perplexities(Path(path), windows, max_len)
            cache_file.write_text(json.dumps(cache, indent=1))
        out[label] = cache[key]
    return out


def lean_load_plain(path: Path) -> torch.nn.Module:
    """The original model loaded the way `sharp.load` loads a checkpoint (empty model, no weight init, tensors
    assigned), to separate what the loader costs from what the bytes cost."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with init_empty_weights(include_buffers=False), no_init_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
    model.load_state_dict(load_file(path / "model.safetensors"), strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def load_paths(original: Path, shared: Path, repeats: int = 5) -> dict:
    """Cold and warm load times (median, s) in one process, per loader: the original with from_pretrained and
    with sharp.load's own recipe (so the two models can be compared through the same loader), the SHARP
    checkpoint with sharp.load, without and with its sha256 check. Cold = the files evicted from the page cache
    first (`sharp.bench.measure.evict`); one untimed load of each first pays one-time costs."""
    import gc
    import statistics

    from transformers import AutoModelForCausalLM

    import sharp
    from sharp.bench.measure import weight_files
    from sharp.bench.protocol import evict

    ways = {
        "original, from_pretrained": (original, lambda: AutoModelForCausalLM.from_pretrained(original, dtype="auto")),
        "original, sharp.load's recipe (meta + assign)": (original, lambda: lean_load_plain(original)),
        "SHARP, sharp.load(verify=False)": (shared, lambda: sharp.load(shared, verify=False)),
        "SHARP, sharp.load (default: sha256 of every file)": (shared, lambda: sharp.load(shared)),
    }
    result = {}
    for name, (folder, fn) in ways.items():
        del_me = fn()
        del del_me
        times: dict[str, list[float]] = {"cold": [], "warm": []}
        for kind in ("cold", "warm"):
            for _ in range(repeats):
                if kind == "cold":
                    evict(weight_files(folder))
                t0 = time.perf_counter()
                m = fn()
                times[kind].append(time.perf_counter() - t0)
                del m
                gc.collect()
        result[name] = {kind: statistics.median(v) for kind, v in times.items()}
    result["repeats"] = repeats
    result["bytes"] = {"original": sum(f.stat().st_size for f in weight_files(original)),
                       "SHARP": sum(f.stat().st_size for f in weight_files(shared))}
    return result


def gguf_check(folder: Path, original: Path, work: Path, threads: int, repeats: int) -> dict:
    """Export the 16-bit SHARP checkpoint to GGUF (f16) and check it: re-read by transformers' GGUF loader, and,
    when llama-cpp-python is installed, run by llama.cpp itself — the merged file, and base + LoRA adapter for a
    copy of the checkpoint with random non-zero recovery (the benchmark's own recovery is untrained: B = 0, which
    would make base + adapter equal to base alone). Also llama.cpp decode speed, original vs merged export."""
    import numpy as np
    from transformers import AutoTokenizer

    import sharp
    from sharp.io.export import compare_logits, export_gguf

    out = work / f"{folder.name}_gguf"
    files = export_gguf(folder, out, outtype="f16", overwrite=True)
    ref = sharp.load(folder, dtype=torch.float32, mode="merged")
    ids = torch.arange(1, 33)[None] * 37 % (ref.config.vocab_size - 5) + 5
    result = {k: v.stat().st_size for k, v in files.items()}
    with torch.no_grad():
        want = ref(input_ids=ids).logits[0]
        result["max_abs_logit_diff_transformers_gguf_loader"] = compare_logits(ref, files["merged"], ids)
        result["max_abs_logit"] = float(want.abs().max())
    try:
        import llama_cpp
    except ImportError:
        result["llama_cpp"] = "not installed"
        return result

    def run(gguf: Path, lora: Path | None = None) -> torch.Tensor:
        llm = llama_cpp.Llama(model_path=str(gguf), lora_path=str(lora) if lora else None, logits_all=True,
                              n_ctx=64, n_threads=threads, verbose=False, type_k=0, type_v=0)  # f32 KV cache
        llm.eval(ids[0].tolist())
        return torch.tensor(np.array(llm.scores[: ids.shape[1]]))

    result["llama_cpp_version"] = llama_cpp.__version__
    result["max_abs_logit_diff_llama_cpp"] = float((run(files["merged"]) - want).abs().max())
    noisy = work / f"{folder.name}_random_lora"
    model = sharp.load(folder, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    sharp.save(model, noisy, tokenizer=AutoTokenizer.from_pretrained(folder), overwrite=True)
    nfiles = export_gguf(noisy, work / f"{noisy.name}_gguf", outtype="f32", overwrite=True)
    with torch.no_grad():
        nwant = sharp.load(noisy, dtype=torch.float32)(input_ids=ids).logits[0]
    result["random_lora_changes_logits_by"] = float((run(nfiles["base"]) - nwant).abs().max())
    result["max_abs_logit_diff_llama_cpp_base_lora_f32"] = float((run(nfiles["base"], nfiles["lora"]) - nwant)
                                                                .abs().max())
    result["llama_cpp_decode_tok_s"] = {}
    orig_files = export_gguf(original, work / "orig16_gguf", outtype="f16", overwrite=True)
    for label, gguf in (("original", orig_files["merged"]), ("SHARP merged", files["merged"])):
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=128, n_threads=threads, verbose=False)
        speeds = []
        for _ in range(repeats):
            llm.reset()
            llm.eval(ids[0].tolist())
            t0 = time.perf_counter()
            for _ in range(32):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            speeds.append(32 / (time.perf_counter() - t0))
        result["llama_cpp_decode_tok_s"][label] = sorted(speeds)[len(speeds) // 2]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--strategies", default="next:6-29,group:3:3-29")
    p.add_argument("--trained", default=None)
    p.add_argument("--work", default=str(ROOT / "runs" / "deploy_smollm2"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "deploy_smollm2.md"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--load-repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="the whole list measured this many times in turn")
    p.add_argument("--load-path-repeats", type=int, default=15, help="loads per loader in the same-loader table")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="tiny settings for a dry run")
    p.add_argument("--compile", action="store_true", help="also bench original vs SHARP 16-bit under torch.compile")
    p.add_argument("--prepare-only", action="store_true", help="build the checkpoints and stop")
    p.add_argument("--compile-only", action="store_true", help="add the torch.compile pair to OUT.json")
    p.add_argument("--load-paths-only", action="store_true", help="add the load-path comparison to OUT.json")
    p.add_argument("--render-only", action="store_true", help="re-write OUT from the finished OUT.json")
    p.add_argument("--reuse", action="store_true", help="reuse the bench numbers in OUT.json (re-run the rest)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.tokens, args.ppl_windows, args.load_repeats, args.rounds = 1, 4, 1, 1, 1
    if args.render_only or args.compile_only or args.load_paths_only:
        from sharp.bench.report import markdown_table
        from sharp.bench.runner import bench

        out = Path(args.out)
        report = json.loads(out.with_suffix(".json").read_text())
        if args.compile_only:  # add the torch.compile pair to a finished run
            paths = report["paths"]
            pair = [paths["original 16-bit"], next(v for k, v in paths.items() if k.startswith("SHARP"))]
            report["compiled"] = bench(pair, tokens=args.tokens, repeats=args.repeats, threads=args.threads,
                                       compile=True, load_repeats=1)
            out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        if args.load_paths_only:
            paths = report["paths"]
            shared = next(v for k, v in paths.items() if k.startswith("SHARP"))
            report["load_paths"] = load_paths(Path(paths["original 16-bit"]), Path(shared), args.load_path_repeats)
            out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        report.setdefault("quantized_modules", quantized_module_counts(report["paths"]))
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.write_text(render(report, args.model, markdown_table(report, report["labels"])))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    strategies = args.strategies.split(",")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    paths = prepare(args.model, work, strategies, args.trained)
    if args.prepare_only:
        return

    from sharp.bench.report import markdown_table, plot
    from sharp.bench.runner import bench

    first = f"SHARP {strategies[0]}"
    entries = [  # (label, spec)
        ("original 16-bit", paths["original 16-bit"]),
        (f"{first} 16-bit, shared", paths[f"{first} 16-bit"]),
        (f"{first} 16-bit, merged", f"{paths[f'{first} 16-bit']}@merged"),
        *[(f"SHARP {s} 16-bit, shared", paths[f"SHARP {s} 16-bit"]) for s in strategies[1:]],
        ("original 4-bit", paths["original 4-bit"]),
        (f"{first} 4-bit, shared", paths[f"{first} 4-bit"]),
        (f"{first} 4-bit, merged", f"{paths[f'{first} 4-bit']}@merged"),
        *[(f"SHARP {s} 4-bit, shared", paths[f"SHARP {s} 4-bit"]) for s in strategies[1:]],
        ("original 4-bit nf4", paths["original 4-bit nf4"]),
        (f"{first} 4-bit nf4, shared", paths[f"{first} 4-bit nf4"]),
    ]
    labels = [label for label, _ in entries]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.reuse:
        report = json.loads(out.with_suffix(".json").read_text())
    else:
        print(f"benchmarking {len(entries)} entries", flush=True)
        report = bench([str(s) for _, s in entries], tokens=args.tokens, repeats=args.repeats, threads=args.threads,
                       progress=lambda s: print("  measuring", s, flush=True), load_repeats=args.load_repeats,
                       rounds=args.rounds)
        report["started"] = started
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")  # saved early: --reuse
    plot(report, out.with_suffix(".png"), labels)

    if args.compile:
        print("torch.compile pair", flush=True)
        pair = [paths["original 16-bit"], paths[f"{first} 16-bit"]]
        report["compiled"] = bench([str(x) for x in pair], tokens=args.tokens, repeats=args.repeats,
                                   threads=args.threads, compile=True, load_repeats=1)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print("perplexity", flush=True)
    ppl = cached_ppl(paths, work / "ppl_cache.json", args.ppl_windows, 512 if not args.quick else 64)
    print("load paths", flush=True)
    report["load_paths"] = load_paths(paths["original 16-bit"], paths[f"{first} 16-bit"], args.load_path_repeats)
    print("gguf", flush=True)
    gguf = gguf_check(paths[f"{first} 16-bit"], paths["original 16-bit"], work, args.threads, args.repeats)
    report.update(labels=labels, perplexity=ppl, gguf=gguf, strategies=strategies, trained=trained_info(args.trained),
                  finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    report["paths"] = {k: str(v) for k, v in paths.items()}
    report["quantized_modules"] = quantized_module_counts(paths)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.write_text(render(report, args.model, markdown_table(report, labels)))
    print(f"wrote {out}")


def _provenance(report: dict) -> str:
    first, rest = report["strategies"][0], report["strategies"][1:]
    untrained = ("carry **untrained** `lora:32` recovery (B = 0): their perplexity is Direct Sharing's, not a "
                 "recovered model's; size and speed do not depend on training.")
    if not report.get("trained"):
        return f"The SHARP checkpoints {untrained}"
    t = report["trained"]
    text = (f"The SHARP {first} rows are a **recovered** checkpoint (`{t['recovery']}`, trained by `sharp compress` "
            f"with {t['budget']}; saved in bf16).")
    if rest:
        text += f" The {', '.join(rest)} checkpoints {untrained}"
    return text


def _check(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _original_of(label: str, models: dict) -> dict:
    """The original model at the same precision as `label` ('16-bit', '4-bit' or '4-bit nf4')."""
    precision = re.search(r"(16-bit|4-bit nf4|4-bit)", label).group(1)
    return models[f"original {precision}"]


def render(report: dict, model: str, table: str) -> str:
    """The results page (every number comes from `report`)."""
    from sharp.bench.report import header_lines

    models = dict(zip(report["labels"], report["models"], strict=True))
    ppl = report["perplexity"]
    orig16 = models["original 16-bit"]
    lines = [
        "# Deploying SHARP SmolLM2-135M: size, load, decode, memory, perplexity",
        "",
        f"Generated by `benchmarks/deploy_smollm2.py` ({report['started']} – {report['finished']}), model "
        f"`{model}`. " + _provenance(report),
        "",
        *[f"- {h}" for h in header_lines(report)],
        "- 16-bit = bfloat16; 4-bit = optimum-quanto qint4 (asymmetric, groups of ≤128 along the input, bf16 "
        "scales); 4-bit nf4 = bitsandbytes NF4 (blocks of 64, double-quantized absmax, bf16 compute). Every unique "
        "linear is quantized once, recovery/embeddings/norms stay bf16. `merged` = target weights materialized at "
        "load (for 4-bit: W_ref dequantized + BA, then re-quantized).",
        "- peak RSS includes the Python/torch/transformers runtime (~"
        f"{orig16['peak_rss_mib'] - orig16['model_rss_mib']:.0f} MiB here); `model RSS` below subtracts the RSS "
        "measured after one untimed load was freed. It is approximate: memory the allocator kept from that load is "
        "counted as runtime (the 4-bit merged model, which re-quantizes at load, shows less model RSS than its "
        "weights for that reason).",
        "",
        "## Side by side",
        "",
        table,
        "",
        "![ratios](deploy_smollm2.png)",
        "",
        "## Perplexity and size",
        "",
        f"`sharp eval` perplexity: WikiText-2 test ({next(iter(ppl.values()))['tokens']} tokens in non-overlapping "
        f"512-token windows) and held-out GPT4-Alpaca responses (`{ALPACA}`, "
        f"{next(iter(ppl.values()))['alpaca_tokens']} response tokens, max-len 256: what the trained recovery was "
        "fitted for; its training data is GPT4-Alpaca only, so WikiText-2 shows how little of that recovery "
        "transfers to other text).",
        "",
        "| model | GPT4-Alpaca held-out ppl | WikiText-2 ppl | MiB on disk | model RSS MiB |",
        "|---|---|---|---|---|",
    ]
    for label, r in ppl.items():
        b = models.get(label) or models.get(label + ", shared")
        size = f"{b['bytes_on_disk'] / 2**20:.1f}" if b else "–"
        rss = f"{b['model_rss_mib']:.0f}" if b else "–"
        trained = report.get("trained") and label.startswith(f"SHARP {report['strategies'][0]} ")
        tag = "" if not label.startswith("SHARP") else " (trained)" if trained else " (untrained: Direct Sharing)"
        lines.append(f"| {label}{tag} | {r['alpaca_ppl']:,.1f} | {r['ppl']:,.1f} | {size} | {rss} |")
    lines += ["", "## Targets", "",
              "Stored bytes are the weight files (model.safetensors + recovery.safetensors); the unique-parameter "
              "floor is the bytes of every unique tensor of the loaded shared model (shared weights once). The "
              "difference is the safetensors headers (tensor names) and non-persistent buffers (rotary tables). "
              "Load and decode ratios are against the original of the same precision.", ""]
    for label, r in models.items():
        if label.startswith("original"):
            continue
        base = _original_of(label, models)
        bytes_ratio = r["bytes_on_disk"] / base["bytes_on_disk"]
        cold_ratio = r["cold_load_s"] / base["cold_load_s"]
        speed = r["decode_tok_s"] / base["decode_tok_s"]
        ceiling = base["bytes_per_token"] / r["bytes_per_token"]
        need = 0.98 if label.endswith("merged") else 0.9
        parts = []
        if not label.endswith("merged"):  # a merged runtime reads the same files as the shared one
            gap = r["bytes_on_disk"] / r["bytes_in_memory"] - 1
            parts.append(f"stored bytes {r['bytes_on_disk']:,} vs unique-parameter floor {r['bytes_in_memory']:,} "
                         f"({gap:+.2%}: {_check(abs(gap) <= 0.01)})")
        if label.endswith("merged"):
            parts.append(f"cold load {cold_ratio:.2f}× (materializing the targets at load is the point of this "
                         "mode; it is not held to the bytes target)")
        else:
            parts.append(f"cold load ratio {cold_ratio:.2f} vs bytes ratio {bytes_ratio:.2f} "
                         f"({_check(abs(cold_ratio / bytes_ratio - 1) <= 0.10)} within 10%"
                         + (", through different loaders: see below)" if "16-bit" in label else ")"))
        parts.append(f"decode {speed:.2f}× (target ≥ {need}×: {_check(speed >= need)}; memory-bound ceiling "
                     f"{ceiling:.2f}×)")
        lines.append(f"- **{label}**: " + "; ".join(parts))
    q4 = [(label, r) for label, r in models.items() if label.endswith("4-bit, shared")]
    if q4 and "quantized_modules" in report:
        n, cold0 = report["quantized_modules"], models["original 4-bit"]["cold_load_s"]
        parts = [f"{label.split(',')[0]}: cold load {r['cold_load_s'] / cold0:.2f}× with "
                 f"{n[label.split(',')[0]]}/{n['original 4-bit']} modules = "
                 f"{n[label.split(',')[0]] / n['original 4-bit']:.2f}" for label, r in q4]
        lines += ["", "4-bit (quanto) load time follows the number of quantized modules rather than the bytes: "
                  + "; ".join(parts) + " (building each empty quantized module costs more than reading its bytes "
                  "at this size)."]
    if "load_paths" in report:
        lp = report["load_paths"]
        lines += ["", "### Load time through the same loader", "",
                  "The table's original rows load with `from_pretrained`, the SHARP rows with `sharp.load`, so their "
                  "ratio mixes two loaders' fixed costs with the bytes read. `sharp.load` builds the model on empty "
                  "(meta) weights without random init, applies the sharing, then assigns the stored tensors; here the "
                  f"original also loads that way. {report['labels'][1].split(',')[0]}, median of "
                  f"{report['load_paths'].get('repeats', report['settings']['repeats'])}, in one process:", "",
                  "| loader | cold load s | warm load s |", "|---|---|---|"]
        lines += [f"| {k} | {v['cold']:.3f} | {v['warm']:.3f} |" for k, v in lp.items() if isinstance(v, dict)
                  and "cold" in v]
        lean = lp["original, sharp.load's recipe (meta + assign)"]
        same = lp["SHARP, sharp.load(verify=False)"]["cold"] / lean["cold"]
        bytes_ratio = lp["bytes"]["SHARP"] / lp["bytes"]["original"]
        lines += ["", f"Same loader: cold load ratio {same:.2f} vs stored bytes ratio {bytes_ratio:.2f} "
                  f"({_check(abs(same / bytes_ratio - 1) <= 0.10)} within 10%)."]
    lines += ["", "## Runtime modes: shared vs merged", ""]
    for bits in ("16-bit", "4-bit"):
        sh_ = next((r for k, r in models.items() if k.endswith(f"{bits}, shared")), None)
        me = next((r for k, r in models.items() if k.endswith(f"{bits}, merged")), None)
        if sh_ and me:
            lines.append(
                f"- {bits}: shared holds {sh_['bytes_in_memory'] / 2**20:.1f} MiB of weights (model RSS "
                f"{sh_['model_rss_mib']:.0f} MiB), merged {me['bytes_in_memory'] / 2**20:.1f} MiB (model RSS "
                f"{me['model_rss_mib']:.0f} MiB); warm load {sh_['warm_load_s']:.2f} s vs {me['warm_load_s']:.2f} s "
                f"(merging costs the difference); decode {sh_['decode_tok_s']:.1f} vs {me['decode_tok_s']:.1f} tok/s."
            )
    lines += ["", "## Data locality: does shared mode pay?", ""]
    sh16 = next((r for k, r in models.items() if k.endswith("16-bit, shared")), None)
    pairs = [(bits, next((r for k, r in models.items() if k.endswith(f"{bits}, shared")), None))
             for bits in ("16-bit", "4-bit", "4-bit nf4")]
    pairs = [(bits, r, models[f"original {bits}"]) for bits, r in pairs if r is not None]
    if pairs:
        speed = ", ".join(f"{r['decode_tok_s'] / o['decode_tok_s']:.2f}× ({bits})" for bits, r, o in pairs)
        reads = ", ".join(f"{r['bytes_per_token'] / o['bytes_per_token']:.2f}×" for bits, r, o in pairs)
        lines.append(
            f"- Eager PyTorch, {report['machine']['torch_threads']} thread(s): shared decode runs at {speed} the "
            f"original's speed while reading {reads} the weight bytes per token. Were decode bound by memory "
            "bandwidth, reading fewer bytes would make it faster (up to the inverse of those ratios); it is not, so "
            "on this CPU decode is bound by compute and per-op overhead (bf16 matmuls on a CPU without AVX512-BF16 "
            "convert to fp32 first), and shared mode pays the targets' extra LoRA matmuls instead of gaining a "
            "locality bonus.")
    m = report["machine"]
    lines.append(
        f"- The CPU reports an L3 of {m['l3_cache']} (a VM figure, shared with other tenants): about the size of "
        f"the whole 16-bit model ({orig16['bytes_per_token'] / 2**20:.0f} MiB of weights per token). A reference "
        "MLP (576×1536×3 weights: 5.1 MiB in bf16) is in cache whether or not its target reuses it, so the "
        "phone-side effect the method counts on (DRAM traffic saved by reuse) cannot show on this machine.")
    if "compiled" in report:
        c0, c1 = report["compiled"]["models"]
        lines.append(
            f"- torch.compile (inductor, dynamic shapes): original {c0['decode_tok_s']:.1f} tok/s, SHARP shared "
            f"{c1['decode_tok_s']:.1f} tok/s ({c1['decode_tok_s'] / c0['decode_tok_s']:.2f}×), vs eager "
            f"{orig16['decode_tok_s']:.1f} / {sh16['decode_tok_s']:.1f}; the first (compiling) decode took "
            f"{c0['first_decode_s']:.0f} s / {c1['first_decode_s']:.0f} s. Compiling speeds them up "
            f"{c0['decode_tok_s'] / orig16['decode_tok_s']:.2f}× / {c1['decode_tok_s'] / sh16['decode_tok_s']:.2f}×; "
            "one round only (runs "
            f"{min(c0['runs']['decode_tok_s']):.1f}–{max(c0['runs']['decode_tok_s']):.1f} / "
            f"{min(c1['runs']['decode_tok_s']):.1f}–{max(c1['runs']['decode_tok_s']):.1f} tok/s).")
    else:
        lines.append("- torch.compile (`sharp bench --compile`, dynamic shapes): not measured in this run "
                     "(`benchmarks/deploy_smollm2.py --compile-only` adds it).")
    g = report["gguf"]
    if "llama_cpp_decode_tok_s" in g:
        lc = g["llama_cpp_decode_tok_s"]
        lines.append(
            f"- llama.cpp ({g['llama_cpp_version']} via llama-cpp-python, f16 GGUF, same thread count): original "
            f"{lc['original']:.1f} tok/s, SHARP merged {lc['SHARP merged']:.1f} tok/s — "
            f"{lc['original'] / orig16['decode_tok_s']:.1f}× eager PyTorch's bf16 speed. llama.cpp has no shared "
            "runtime (see the export section), so its SHARP model is a merged one: same size, same speed.")
    q4 = models.get("original 4-bit")
    if q4:
        lines.append(
            "- 4-bit speed: optimum-quanto only uses torch's packed CPU int4 kernel where the input size is a "
            "multiple of 128 (down_proj: 1536); gate/up/attention (576 inputs) dequantize on the fly: the 4-bit "
            f"original decodes {q4['decode_tok_s'] / orig16['decode_tok_s']:.2f}× as fast as 16-bit."
            + (f" bitsandbytes NF4 (dequantize + matmul on this CPU): "
               f"{models['original 4-bit nf4']['decode_tok_s'] / orig16['decode_tok_s']:.2f}×."
               if "original 4-bit nf4" in models else ""))
    dec = max(max(r["runs"]["decode_tok_s"]) / min(r["runs"]["decode_tok_s"]) - 1 for r in models.values())
    cold = max(max(r["runs"]["cold_load_s"]) / min(r["runs"]["cold_load_s"]) - 1 for r in models.values())
    load = report["machine"]["load_average_1m"]
    busy = ("shared with other jobs, so rows measured minutes apart saw different contention"
            if load > 1.5 else "otherwise idle apart from this benchmark")
    lines += ["", "## Noise", "",
              f"The machine was {busy} (1-minute load average {load:.1f} at start). Within one model, decode runs "
              f"spread by up to {dec:.0%} and cold loads by up to {cold:.0%} (max/min − 1); read ratios closer to 1 "
              "than that as ties.", "",
              "Decode tok/s of each run (min – max of the timed runs), to read the medians against:", ""]
    for label, r in models.items():
        runs = r["runs"]["decode_tok_s"]
        lines.append(f"- {label}: {min(runs):.1f} – {max(runs):.1f}; cold loads {min(r['runs']['cold_load_s']):.2f} – "
                     f"{max(r['runs']['cold_load_s']):.2f} s; pages still cached after eviction "
                     f"{r['resident_after_evict']:.0%}")
    g = report["gguf"]
    exported = next(v for k, v in report["paths"].items() if k.startswith("SHARP") and k.endswith("16-bit"))
    exported = Path(exported).relative_to(ROOT) if Path(exported).is_relative_to(ROOT) else exported
    lines += ["", "## On-device export (llama.cpp GGUF)", "", f"`sharp export {exported} --out DIR` (f16):", "",
              f"- `model.gguf` (merged): {g['merged'] / 2**20:.1f} MiB; `base.gguf` (Direct-Sharing base): "
              f"{g['base'] / 2**20:.1f} MiB; `recovery.lora.gguf`: {g['lora'] / 2**20:.2f} MiB.",
              "- GGUF has no tensor aliasing: llama.cpp's loader rejects two tensor infos at one offset and builds "
              "one tensor per layer, so `base.gguf` stores each shared reference weight once per layer that uses it "
              "— it is as large as the merged model and SHARP saves nothing on disk or in RAM in llama.cpp today. "
              "Avoiding it needs a llama.cpp change: an alias table in the metadata (`blk.T.ffn_gate -> "
              "blk.R.ffn_gate`) resolved by the model loader's `create_tensor` to the same `ggml_tensor`.",
              f"- Equivalence: the merged GGUF re-read by transformers' GGUF loader "
              f"(`from_pretrained(dir, gguf_file=...)`) vs the PyTorch merged model in fp32, 32 tokens: max |logit "
              f"difference| {g['max_abs_logit_diff_transformers_gguf_loader']:.4f} (logits up to "
              f"{g['max_abs_logit']:.1f}; the f16 file rounds the merged weights W_ref + BA, which bf16 does not "
              "hold exactly)."]
    if "max_abs_logit_diff_llama_cpp" in g:
        lines.append(
            f"- llama.cpp itself (llama-cpp-python {g['llama_cpp_version']}, built from source here, f32 KV cache): "
            f"merged f16 GGUF vs PyTorch fp32: max |logit difference| {g['max_abs_logit_diff_llama_cpp']:.4f}. "
            "Base + LoRA adapter, checked on a copy of the checkpoint with random non-zero B (so the adapter "
            f"matters: without it the logits differ by up to {g['random_lora_changes_logits_by']:.2f}), exported "
            f"in f32: max |logit difference| {g['max_abs_logit_diff_llama_cpp_base_lora_f32']:.5f} — llama.cpp "
            "applies `recovery.lora.gguf` exactly as `sharp.load` applies the recovery. The same check runs in "
            "tests/io/test_export.py on stories260K when llama-cpp-python is installed.")
    else:
        lines.append(f"- llama.cpp runtime: {g.get('llama_cpp')} — not checked here (`pip install "
                     "'sharp-llm[llamacpp]'` compiles it).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
