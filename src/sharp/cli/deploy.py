"""`sharp quantize`, `sharp bench`, `sharp export`: shipping a SHARP model to a device."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from sharp.cli.app import app, console, err_console


@app.command()
def quantize(
    model: str = typer.Argument(..., help="A sharp checkpoint (or a plain model folder / alias)."),
    bits: int = typer.Option(4, "--bits", help="Weight bits (4)."),
    method: str = typer.Option("quanto", "--method", help="quanto (optimum-quanto int4) or nf4 (bitsandbytes NF4)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: a quantized sharp checkpoint."),
    recovery_bits: int = typer.Option(16, "--recovery-bits", help="Store the recovery (LoRA) matrices in 8 or 4 "
                                                                  "bits (dequantized at load), or 16: as they are."),
    embedding_bits: int = typer.Option(16, "--embedding-bits", help="Store the input embedding (and a tied LM head) "
                                                                    "in 8 or 4 bits (dequantized at load), or 16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    dtype: str = typer.Option("auto", "--dtype", help="Dtype of what stays unquantized (norms, embeddings, "
                              "recovery): auto (the source's; bf16 for a GGUF), bf16, fp16 or fp32."),
) -> None:
    """Quantize each unique weight once (shared weights stay shared); recovery matrices and the embedding stay
    16-bit unless --recovery-bits / --embedding-bits say 8 or 4."""
    from sharp.io.dtypes import parse_dtype
    from sharp.io.manifest import folder_bytes
    from sharp.io.quantize import quantized_linears
    from sharp.recipes.quantize import quantize_checkpoint

    storage = parse_dtype(dtype) or "auto"
    with err_console.status(f"quantizing {model}"):
        q = quantize_checkpoint(model, out, bits=bits, method=method, overwrite=overwrite, dtype=storage,
                                recovery_bits=recovery_bits, embedding_bits=embedding_bits)
    console.print(f"{len(quantized_linears(q))} unique linear layers quantized to {bits}-bit ({method}), recovery "
                  f"{recovery_bits}-bit, embedding {embedding_bits}-bit; {folder_bytes(out) / 2**20:.1f} MiB "
                  f"written to [bold]{out}[/]")


@app.command()
def bench(
    models: list[str] = typer.Argument(..., help="Models to compare (the first is the reference); "
                                                 "suffix a sharp checkpoint with @merged for the merged runtime."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the full report (every field) here."),
    plot_out: Path | None = typer.Option(None, "--plot", help="Write a PNG of the ratios here."),
    repeats: int = typer.Option(5, "--repeats", help="Runs per measurement (medians are reported)."),
    tokens: int = typer.Option(64, "--tokens", help="Decoded tokens per run."),
    prompt_tokens: int = typer.Option(32, "--prompt-tokens", help="Prompt length for time to first token."),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
    compile: bool = typer.Option(False, "--compile", help="Run the models under torch.compile."),
    load_repeats: int = typer.Option(0, "--load-repeats", help="Cold and warm loads per model (0: --repeats)."),
    rounds: int = typer.Option(1, "--rounds", help="Measure the whole list this many times in turn (pooled)."),
    device: str = typer.Option("cpu", "--device", help="Where the models decode: cpu (the default: the floors "
                               "assume a CPU's memory-bound decode), auto, cuda, cuda:N or mps. Models run in "
                               "their stored dtype."),
    paired: int = typer.Option(0, "--paired", help="After each round, load every model into one process (all "
                               "in memory at once) and decode them in turn for this many rounds: a decode speed "
                               "ratio against the first model per round (median and 95% interval), where a "
                               "machine's drift cancels. CPU only, eager."),
) -> None:
    """Bytes on disk, cold/warm load, time to first token, decode tokens/s and peak RSS, side by side."""
    from rich.progress import Progress

    from sharp.bench.report import plot, rich_table
    from sharp.bench.runner import bench as run_bench
    from sharp.io.atomic import check_output_file

    for flag, path in (("--json", json_out), ("--plot", plot_out)):
        if path is not None:  # before the benchmark, not after it
            check_output_file(path, flag)
    # started by the first measurement: a bad flag refused before it leaves its one error line, no blank line
    progress = Progress(console=err_console, transient=True)
    task = progress.add_task("benchmarking", total=(len(models) + (1 if paired else 0)) * rounds)
    done = [0]

    def step(spec: str) -> None:
        progress.start()
        progress.update(task, completed=done[0], description=f"measuring {spec}")
        done[0] += 1

    try:
        report = run_bench(models, tokens, repeats, prompt_tokens, threads, compile, progress=step,
                           load_repeats=load_repeats, rounds=rounds, device=device, paired=paired)
    finally:
        if progress.live.is_started:  # stopping prints a newline on a non-terminal even when never started
            progress.stop()
    console.print(rich_table(report))
    if json_out:
        from sharp.io.atomic import write_text_atomic

        write_text_atomic(json_out, json.dumps(report, indent=2) + "\n")
        console.print(f"report written to [bold]{json_out}[/]")
    if plot_out:
        plot_out.parent.mkdir(parents=True, exist_ok=True)
        plot(report, plot_out)
        console.print(f"plot written to [bold]{plot_out}[/]")


@app.command()
def export(
    model: str = typer.Argument(..., help="A 16-bit sharp checkpoint (or a plain model folder / alias)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp) or executorch (.pte, XNNPACK)."),
    outtype: str = typer.Option("f16", "--outtype", help="gguf: f16 or f32 (quantize further with llama-quantize)."),
    dtype: str = typer.Option("fp32", "--dtype", help="executorch: fp32, fp16 or bf16."),
    quant: str = typer.Option("none", "--quant", help="executorch: none or 8da4w (4-bit weights, 8-bit dynamic "
                                                      "activations; LM head and tied embedding 8-bit)."),
    group_size: int = typer.Option(32, "--group-size", help="executorch 8da4w: weights per scale (multiple of 32)."),
    recovery_bits: int = typer.Option(8, "--recovery-bits", help="executorch 8da4w: LoRA recovery bits (8, 4, 16)."),
    max_cache_len: int = typer.Option(256, "--max-cache-len", help="executorch: KV cache positions."),
    fuse: bool = typer.Option(True, "--fuse/--no-fuse", help="executorch: one matmul for a target MLP's gate and "
                                                             "up recovery A matrices."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
) -> None:
    """Write on-device files: llama.cpp GGUF (merged model, plus a Direct-Sharing base and a LoRA adapter for
    lora:R), or an ExecuTorch program that stores every unique weight once."""
    from sharp.errors import SharpError

    if fmt == "executorch":
        from sharp.io.executorch import ExportConfig, export_executorch

        config = ExportConfig(dtype=dtype, quant=quant, group_size=group_size, recovery_bits=recovery_bits,
                              max_cache_len=max_cache_len, fuse=fuse)
        with err_console.status(f"exporting {model} to ExecuTorch (a few minutes)"):
            files = export_executorch(model, out, config, overwrite=overwrite)
        for kind, path in files.items():
            console.print(f"{kind:>7}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        return
    if fmt != "gguf":
        raise SharpError(f"unknown --format '{fmt}'; choose gguf or executorch")
    from sharp.io.export import export_gguf

    with err_console.status(f"exporting {model}"):
        files = export_gguf(model, out, outtype=outtype, overwrite=overwrite)
    for kind, path in files.items():
        console.print(f"{kind:>7}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if "base" in files:
        console.print("note: base.gguf repeats each shared reference weight in its target layers (GGUF has no "
                      "tensor aliasing), so it is as large as the merged model; the adapter holds the recovery.")
