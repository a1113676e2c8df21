"""The measuring protocol `sharp bench` applies to every model, whatever runs it (PyTorch in `measure.py`,
ExecuTorch in `pte.py`), and the OS readings it takes: page-cache eviction, resident and peak memory.

Order of events (after the caller's untimed first load): baseline RSS -> evict the model's files from the page
cache (`posix_fadvise(POSIX_FADV_DONTNEED)`, checked with `mincore`) -> cold load #1 -> one warm-up decode -> R
timed decodes -> peak RSS (load + decode of this model) -> R-1 more cold loads and R warm loads. Times are medians.
"""

from __future__ import annotations

import ctypes
import gc
import json
import mmap
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def load_and_decode(load: Callable[[], Any], ready: Callable[[Any], torch.Tensor],
                    decode: Callable[[Any, torch.Tensor, int], tuple[float, float]], files: list[Path],
                    tokens: int, repeats: int, load_repeats: int) -> dict:
    """The timed fields of a bench row. `load` returns a loaded model (timed until it can run), `ready` prepares
    the first cold-loaded one (untimed) and returns the prompt, `decode(model, prompt, tokens)` returns (TTFT in
    s, decode tokens/s); `files` are the weights a load reads."""
    gc.collect()
    baseline = rss_bytes()
    resident = [evict(files)]
    t0 = time.perf_counter()
    model = load()
    cold = [time.perf_counter() - t0]
    prompt = ready(model)
    t0 = time.perf_counter()
    decode(model, prompt, min(tokens, 8))  # warm-up (with torch.compile: where compilation happens)
    first_decode = time.perf_counter() - t0
    runs = [decode(model, prompt, tokens) for _ in range(repeats)]
    peak = peak_rss_bytes()
    del model
    gc.collect()
    for _ in range(load_repeats - 1):
        resident.append(evict(files))
        t0 = time.perf_counter()
        model = load()
        cold.append(time.perf_counter() - t0)
        del model
        gc.collect()
    warm = []
    for _ in range(load_repeats):
        t0 = time.perf_counter()
        model = load()
        warm.append(time.perf_counter() - t0)
        del model
        gc.collect()
    return timings(cold, warm, first_decode, runs, peak, baseline, resident)


def subprocess_main(threads: int, work: Callable[[], Any]) -> None:
    """The body of a measuring subprocess (`sharp.bench.measure`, `sharp.bench.paired`): `threads` torch threads
    (0: torch's default), libraries quiet, `work()`'s result printed as one JSON line for the parent; a SharpError
    becomes {"error": message} and exit code 2."""
    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from sharp.errors import SharpError

    try:
        result = work()
    except SharpError as e:
        print(json.dumps({"error": str(e)}))
        raise SystemExit(2) from None
    print(json.dumps(result))


def timings(cold: list[float], warm: list[float], first_decode: float, runs: list[tuple[float, float]], peak: int,
            baseline: int, resident: list[float]) -> dict:
    """The timed fields of a bench row (medians, and every run): shared by PyTorch and ExecuTorch rows."""
    return {
        "cold_load_s": statistics.median(cold),
        "warm_load_s": statistics.median(warm),
        "first_decode_s": first_decode,
        "ttft_s": statistics.median(r[0] for r in runs),
        "decode_tok_s": statistics.median(r[1] for r in runs),
        "peak_rss_mib": peak / 2**20,
        "model_rss_mib": (peak - baseline) / 2**20,
        "resident_after_evict": max(resident),
        "runs": {"cold_load_s": cold, "warm_load_s": warm, "ttft_s": [r[0] for r in runs],
                 "decode_tok_s": [r[1] for r in runs]},
    }


def prompt_ids(vocab_size: int, length: int) -> torch.Tensor:
    """A fixed, tokenizer-free prompt (decode speed does not depend on the text)."""
    return (torch.arange(1, length + 1) * 7919 % (vocab_size - 3) + 3)[None, :]


def evict(files: list[Path]) -> float:
    """Drop `files` from the page cache; returns the fraction of their pages still resident afterwards."""
    resident = total = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            r, t = _resident_pages(fd, f.stat().st_size)
        finally:
            os.close(fd)
        resident, total = resident + r, total + t
    return resident / total if total else 0.0


def _resident_pages(fd: int, size: int) -> tuple[int, int]:
    """(resident, total) pages of an open file in the page cache, via mmap + mincore(2); (0, 0) off Linux."""
    if size == 0 or not sys.platform.startswith("linux"):
        return 0, 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return 0, 0
    try:
        n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * n)()
        if libc.mincore(addr, size, vec) != 0:
            return 0, 0
        return sum(v & 1 for v in vec), n
    finally:
        libc.munmap(addr, size)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
