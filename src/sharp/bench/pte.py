"""`sharp bench` numbers for an ExecuTorch program folder (`sharp export --format executorch`), measured with
ExecuTorch's Python runtime in the current process, in the same order and with the same fields as
`sharp.bench.measure.measure` (which calls this for such folders).

Load = `Runtime.load_program(model.pte, data_path=weights.ptd)` + `load_method("forward")`: the XNNPACK delegate
reads and packs its weights there. Import time of the runtime is excluded (paid once before the untimed load).
Decode: prefill of the prompt in one call (TTFT = that call + argmax), then single-token greedy steps.
`bytes_in_memory` and `bytes_per_token` are the program's file bytes (a decode step reads every weight; the tied
embedding is the LM head's matrix). XNNPACK repacks its weights at load and the packed copies show in peak RSS:
with its weight cache on (`sharp.io.pte.load_runtime` turns it on, as ExecuTorch's phone builds do) a shared
weight is packed once, without it once per operator that reads it; each row says which (`xnnpack_weight_cache`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from sharp.bench.protocol import load_and_decode, prompt_ids
from sharp.errors import SharpError
from sharp.io.manifest import folder_bytes
from sharp.io.pte import PteModel, load_runtime, pte_files, xnnpack_weight_cache


def decode_pte(model, prompt: torch.Tensor, tokens: int) -> tuple[float, float]:
    """(time to first token in s, decode tokens/s) for a `sharp.io.pte.PteModel`."""
    t0 = time.perf_counter()
    nxt = model(prompt, 0).argmax(-1, keepdim=True)
    ttft = time.perf_counter() - t0
    pos = prompt.shape[-1]
    t1 = time.perf_counter()
    for _ in range(tokens):
        nxt = model(nxt, pos).argmax(-1, keepdim=True)
        pos += 1
    return ttft, tokens / (time.perf_counter() - t1)


def pte_runtime(threads: int = 0):
    """ExecuTorch's runtime as `sharp bench` runs programs (`sharp.io.pte.load_runtime`: XNNPACK's weight cache on),
    with `threads` XNNPACK threads (0: ExecuTorch's default)."""
    runtime = load_runtime()
    if threads:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(threads)
    return runtime


def measure_pte(path: str, tokens: int = 64, repeats: int = 5, prompt_tokens: int = 32,
                load_repeats: int | None = None, threads: int = 0) -> dict:
    load_repeats = load_repeats or repeats
    runtime = pte_runtime(threads)
    weight_cache = xnnpack_weight_cache()  # as load_runtime left it
    files = pte_files(path)
    first = PteModel(path, runtime)  # untimed: one-time costs must not count as the first cold load
    if prompt_tokens + tokens + 1 > first.max_cache_len:
        raise SharpError(f"--prompt-tokens + --tokens ({prompt_tokens + tokens}) exceed the program's cache of "
                         f"{first.max_cache_len}; export with a larger --max-cache-len")
    del first
    timed = load_and_decode(lambda: PteModel(path, runtime), lambda model: prompt_ids(model.vocab_size, prompt_tokens),
                            decode_pte, files, tokens, repeats, load_repeats)
    stored = sum(f.stat().st_size for f in files)
    return {
        "model": str(path),
        "mode": "executorch",
        "path": str(Path(path)),
        "bytes_on_disk": stored,
        "bytes_folder": folder_bytes(path),
        "bytes_in_memory": stored,
        "bytes_per_token": stored,
        "xnnpack_weight_cache": weight_cache,
        **timed,
    }
