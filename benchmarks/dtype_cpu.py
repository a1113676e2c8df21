"""`sharp compress` on stories260K by storage and compute dtype, on this machine's CPU: wall time per stage,
held-out perplexity per stage, checkpoint bytes.

    .venv/bin/python benchmarks/dtype_cpu.py [--rounds 2] [--out docs/results/dtype_cpu.md]

Variants (each run in-process, rounds interleaved so drift over minutes does not land on one variant):

    fp32                  the fp32 source as is (what every run did before `--dtype`)
    bf16 (fp32 compute)   a bf16 copy of the source, `--dtype auto`: bf16 storage, fp32 math (the CPU default)
    bf16 compute          the same, with the compute dtype forced to bf16 (what a GPU does)
    bf16 compute, bf16 SFT tensors   also without SFT's float32 copies of the trained tensors

It also loads each written checkpoint again and scores it (`sharp eval`'s path on the CPU): the summary's
"after SFT" perplexity must be what the stored model gives.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
MODEL = ASSETS / "models" / "stories260K"
C4 = ASSETS / "text" / "c4_demo.jsonl"
SETTINGS = dict(strategy="next:1-4", recovery="lora:8", data=f"text:{C4}[:120]", max_len=128, batch_size=8,
                slw_steps=40, sft_steps=30, lr=5e-3, eval_steps=15, save_steps=10, eval_fraction=0.15, seed=0,
                device="cpu")
VARIANTS = ("fp32", "bf16 (fp32 compute)", "bf16 compute", "bf16 compute, bf16 SFT tensors")


def bf16_copy(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(MODEL).save_pretrained(folder)
    return folder


def run(variant: str, source: Path, out: Path) -> dict:
    import sharp.io.device as device
    import sharp.recovery.sft as sft
    from sharp.evaluation.perplexity import response_perplexity
    from sharp.io.models import folder_bytes
    from sharp.recipes import CompressConfig, compress

    compute, masters = device.compute_dtype, sft._float32_masters
    if "bf16 compute" in variant:
        device.compute_dtype = lambda storage, where: storage
    if "bf16 SFT" in variant:
        sft._float32_masters = lambda model: []
    try:
        summary = compress(CompressConfig(model=str(source), out=str(out), **SETTINGS), progress=False)
    finally:
        device.compute_dtype, sft._float32_masters = compute, masters
    # the written checkpoint scored as `sharp eval --device cpu` scores it, on compress's held-out examples
    model, tok, _ = device.load_on_device(str(out), "cpu", "auto")
    reloaded = response_perplexity(model, held_out(tok), SETTINGS["batch_size"])["ppl"]
    stored = {str(t.dtype).removeprefix("torch.") for t in _tensors(out)}
    return {"variant": variant, "seconds": {k: v["seconds"] for k, v in summary["timing"].items()},
            "ppl": summary["perplexity"], "reloaded_ppl": reloaded, "bytes": folder_bytes(out),
            "stored_dtypes": sorted(stored), "dtype": summary["dtype"]}


def held_out(tokenizer) -> list[dict]:
    """The examples `compress` holds out for these settings (same split, same chunking)."""
    from sharp.data import load_records, split_examples
    from sharp.recipes import text_examples

    records = load_records(SETTINGS["data"])
    _, held = split_examples(records, SETTINGS["eval_fraction"], SETTINGS["seed"])
    return text_examples(held, tokenizer, SETTINGS["max_len"])


def _tensors(folder: Path):
    from safetensors.torch import load_file

    for name in ("model.safetensors", "recovery.safetensors"):
        yield from load_file(folder / name).values()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "dtype_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {"fp32": MODEL, "bf16": bf16_copy(tmp / "bf16")}
        for r in range(args.rounds):
            for v in VARIANTS:
                out = tmp / f"out-{r}-{VARIANTS.index(v)}"
                rows[v].append(run(v, sources["fp32" if v == "fp32" else "bf16"], out))
                print(v, json.dumps(rows[v][-1]), flush=True)
    write(rows, args)


def write(rows: dict[str, list[dict]], args) -> None:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU")
    flags = Path("/proc/cpuinfo").read_text()
    bf16_hw = "avx512_bf16" in flags or "amx_bf16" in flags
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    lines = [
        "# Storage and compute dtype on the CPU: `sharp compress` of stories260K", "",
        "Generated by `benchmarks/dtype_cpu.py` (do not edit by hand). Settings: "
        + ", ".join(f"{k}={v}" for k, v in SETTINGS.items() if k != "data")
        + f", data=c4_demo[:120]. Sharp {commit}; {cpu}, torch {torch.__version__}, 2 threads, "
        f"AVX512-BF16/AMX: {'yes' if bf16_hw else 'no'}. {args.rounds} interleaved rounds; times are medians.", "",
        "| variant | stored | bytes | load s | SLW s | SFT s | eval s | total s | original | direct | after SLW "
        "| after SFT | reloaded |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v, runs in rows.items():
        med = {k: statistics.median(r["seconds"].get(k, 0.0) for r in runs) for k in ("load", "slw", "sft", "eval")}
        total = statistics.median(sum(s for k, s in r["seconds"].items() if k != "save") for r in runs)
        p = runs[0]["ppl"]
        reloaded = runs[0]["reloaded_ppl"]
        lines.append(f"| {v} | {'/'.join(runs[0]['stored_dtypes'])} | {runs[0]['bytes']:,} | {med['load']:.1f} | "
                     f"{med['slw']:.1f} | {med['sft']:.1f} | {med['eval']:.1f} | {total:.1f} | "
                     f"{p['original']:.3f} | {p['direct']:.3f} | {p['slw']:.3f} | {p['sft']:.3f} | "
                     f"{reloaded:.3f} |")
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
