"""`sharp bench`: storage, load and decode numbers for several models side by side, with ratios against the first
model and the physical floors those ratios should be read against.

Each model is measured in its own fresh subprocess (`python -m sharp.bench.measure`), one after the other, so
peak RSS is per model and no model warms another's caches. Floors:

    load floor     stored bytes ratio: a cold load must read every stored byte once
    decode floor   unique bytes read per token ratio: batch-1 decode on a CPU is memory-bound, so a model that
                   reads fewer weight bytes per token can be at most that much faster (and a shared model reads
                   its shared weights once per use: in-cache re-reads are the locality bonus)

A model spec is a model folder, sharp checkpoint, .gguf file or alias, optionally suffixed with the runtime mode
of a sharp checkpoint: `runs/ckpt@merged` (default `@shared`), or an ExecuTorch program folder written by
`sharp export --format executorch` (measured with ExecuTorch's runtime: compare it against another program).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from sharp.errors import SharpError

MODES = ("shared", "merged")
# every per-model field `sharp bench --json` emits
FIELDS = (
    "model", "mode", "path", "bytes_on_disk", "bytes_folder", "bytes_in_memory", "bytes_per_token",
    "cold_load_s", "warm_load_s", "first_decode_s", "ttft_s", "decode_tok_s", "peak_rss_mib", "model_rss_mib",
    "resident_after_evict", "runs", "ratios", "floors",
)  # and, with --paired, "decode_paired"
RATIO_FIELDS = {
    "bytes_on_disk": "bytes_on_disk",
    "cold_load": "cold_load_s",
    "warm_load": "warm_load_s",
    "ttft": "ttft_s",
    "decode_speed": "decode_tok_s",
    "peak_rss": "peak_rss_mib",
    "bytes_per_token": "bytes_per_token",
}
EVICTION_NOTE = (
    "cold load: the model's weight files are dropped from the page cache with "
    "posix_fadvise(POSIX_FADV_DONTNEED) before each cold load (resident_after_evict says how many pages stayed)"
)


def parse_spec(spec: str) -> tuple[str, str]:
    """'path@merged' -> ('path', 'merged'); no suffix -> shared."""
    model, at, mode = spec.rpartition("@")
    if at and mode in MODES:
        return model, mode
    if at and "/" not in mode:
        raise SharpError(f"unknown runtime mode '@{mode}' in '{spec}'; use @shared or @merged")
    return spec, "shared"


def machine_info(threads: int = 0, device: str = "cpu") -> dict:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "l3_cache": l3.read_text().strip() if l3.is_file() else "unknown",
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        **({"gpu": torch.cuda.get_device_name(torch.device(device))} if device.startswith("cuda") else {}),
    }


def _run_json(module: str, args: list[str], crashed: Callable[[int, str], Exception]):
    """Run `python -m module args` (a measuring subprocess, `sharp.bench.protocol.subprocess_main`) and return the
    JSON it printed last; {"error": ...} becomes a SharpError, no output `crashed(exit code, last stderr line)`."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("{", "[{"))]  # not ExecuTorch's "[cpuinfo…"
    if not lines:
        raise crashed(proc.returncode, (proc.stderr.strip().splitlines() or ["no output"])[-1])
    result = json.loads(lines[-1])
    if isinstance(result, dict) and "error" in result:
        raise SharpError(result["error"])
    return result


def measure_in_subprocess(spec: str, mode: str, tokens: int, repeats: int, prompt_tokens: int, threads: int,
                          compile: bool = False, load_repeats: int = 0, device: str = "cpu") -> dict:
    args = [spec, "--mode", mode, "--tokens", str(tokens), "--repeats", str(repeats), "--prompt-tokens",
            str(prompt_tokens), "--threads", str(threads), "--load-repeats", str(load_repeats), "--device", device]
    if compile:
        args.append("--compile")
    return _run_json("sharp.bench.measure", args, lambda code, tail: RuntimeError(
        f"benchmark of '{spec}' failed (exit {code}): {tail}"))


def paired_in_subprocess(parsed: list[tuple[str, str]], tokens: int, prompt_tokens: int, threads: int,
                         rounds: int) -> list[dict]:
    """`sharp.bench.paired` on every model in one fresh process: per model, its per-round decode speed ratios
    against the first model, their median and 95% interval."""
    args = [*(f"{m}@{mode}" for m, mode in parsed), "--rounds", str(rounds), "--tokens", str(tokens),
            "--prompt-tokens", str(prompt_tokens), "--threads", str(threads)]
    return _run_json("sharp.bench.paired", args, lambda code, tail: SharpError(
        f"the paired decode failed (exit {code}: {tail}); it holds every model in memory at once: leave out "
        "--paired or bench fewer models"))


def pool_paired(runs: list[dict], firsts: list[dict]) -> dict:
    """One model's paired decode over several processes (each a fresh load: where the OS placed its weights
    differs between loads, which the rounds inside one process cannot vary): ratios pooled, plus each process's
    median ratio, whose spread shows what a load changes."""
    from sharp.bench.paired import summarize

    speeds = [s for run in runs for s in run["decode_tok_s"]]
    first = [s for run in firsts for s in run["decode_tok_s"]]
    return {**summarize([first, speeds])[1], "process_medians": [run["ratio_median"] for run in runs]}


def add_ratios(results: list[dict]) -> None:
    """ratios[k] = value / first model's value, for every field in RATIO_FIELDS (decode_speed: higher = faster)."""
    first = results[0]
    for r in results:
        r["ratios"] = {k: (r[f] / first[f] if first[f] else None) for k, f in RATIO_FIELDS.items()}
        r["floors"] = {
            "load_time_ratio": r["ratios"]["bytes_on_disk"],  # cold load can't beat reading fewer bytes
            "decode_speed_ratio": 1 / r["ratios"]["bytes_per_token"] if r["ratios"]["bytes_per_token"] else None,
        }


def combine_rounds(rounds: list[dict]) -> dict:
    """One model's result from several rounds: every timed run pooled (medians over all of them), memory as the
    median round, eviction as the worst round."""
    if len(rounds) == 1:
        return rounds[0]
    out = dict(rounds[0])
    out["runs"] = {k: [x for r in rounds for x in r["runs"][k]] for k in rounds[0]["runs"]}
    for field in ("cold_load_s", "warm_load_s", "ttft_s", "decode_tok_s"):
        out[field] = statistics.median(out["runs"][field])
    for field in ("first_decode_s", "peak_rss_mib", "model_rss_mib"):
        out[field] = statistics.median(r[field] for r in rounds)
    out["resident_after_evict"] = max(r["resident_after_evict"] for r in rounds)
    return out


def bench(
    specs: list[str],
    tokens: int = 64,
    repeats: int = 5,
    prompt_tokens: int = 32,
    threads: int = 0,
    compile: bool = False,
    progress: Callable[[str], None] | None = None,
    load_repeats: int = 0,
    rounds: int = 1,
    device: str = "cpu",
    paired: int = 0,
) -> dict:
    """Measure every model (in order, each in a fresh subprocess) and return the report `sharp bench --json`
    writes: machine, settings, and one entry per model with ratios against the first.

    With `rounds > 1` the whole list is measured that many times in turn (A B C A B C ...), and each model's
    medians are taken over all its runs: a machine whose speed drifts over minutes then shifts every model alike
    instead of whichever one it happened to be measuring. `device` is where the models decode (`--device`).

    With `paired > 0`, after each round every model is loaded into one fresh process and they decode in turn for
    `paired` rounds (`sharp.bench.paired`): each model's `decode_paired` holds the per-round decode speed ratios
    against the first model (all processes pooled), their median and 95% interval (a ratio a drifting machine
    cannot fake), and each process's median (what a fresh load changes)."""
    if not specs:
        raise SharpError("give at least one model to benchmark")
    for flag, value, least in (("--repeats", repeats, 1), ("--tokens", tokens, 1),
                               ("--prompt-tokens", prompt_tokens, 1), ("--rounds", rounds, 1),
                               ("--load-repeats", load_repeats, 0), ("--paired", paired, 0), ("--threads", threads, 0)):
        if value < least:
            raise SharpError(f"{flag} must be at least {least}, got {value}")
    load_repeats = load_repeats or repeats
    from sharp.io.device import resolve_device
    from sharp.io.formats import is_sharp_checkpoint
    from sharp.io.models import resolve_model_path
    from sharp.io.pte import is_pte_folder

    device = str(resolve_device(device))
    if paired and device != "cpu":
        raise SharpError("--paired measures on the CPU only; leave out --device or --paired")
    if paired and compile:
        raise SharpError("--paired decodes eagerly; leave out --compile or --paired")

    parsed = [parse_spec(s) for s in specs]
    for model, mode in parsed:  # fail on a typo before minutes of measuring
        if is_pte_folder(model):
            if mode != "shared":
                raise SharpError(f"'{model}' is an ExecuTorch program: @{mode} does not apply to it")
            from sharp.io.executorch import require_executorch

            require_executorch()
            continue
        path = resolve_model_path(model)  # a missing model too, not only a wrong @mode
        if mode != "shared" and not is_sharp_checkpoint(path):
            raise SharpError(f"'{model}' is a plain model: @{mode} only applies to sharp checkpoints")
    per_model: list[list[dict]] = [[] for _ in specs]
    paired_runs: list[list[dict]] = []  # one fresh process per round
    for _ in range(rounds):
        for i, (spec, (model, mode)) in enumerate(zip(specs, parsed, strict=True)):
            if progress:
                progress(spec)
            r = measure_in_subprocess(model, mode, tokens, repeats, prompt_tokens, threads, compile, load_repeats,
                                      device)
            r["model"] = spec
            per_model[i].append(r)
        if paired:
            if progress:
                progress(f"{len(specs)} models in turn, {paired} rounds")
            paired_runs.append(paired_in_subprocess(parsed, tokens, prompt_tokens, threads, paired))
    results = [combine_rounds(rs) for rs in per_model]
    add_ratios(results)
    if paired:
        for i, r in enumerate(results):
            r["decode_paired"] = pool_paired([run[i] for run in paired_runs], [run[0] for run in paired_runs])
    return {
        "machine": machine_info(threads, device),
        "settings": {"tokens": tokens, "repeats": repeats, "load_repeats": load_repeats,
                     "prompt_tokens": prompt_tokens, "batch": 1, "rounds": rounds,
                     "decoding": "greedy, KV cache, single-token steps", "statistic": "median",
                     "compile": compile, "cold_load": EVICTION_NOTE, "paired_rounds": paired},
        "models": results,
    }
