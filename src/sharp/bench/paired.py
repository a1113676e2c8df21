"""Paired decode speed: every model loaded in one process and decoding in turn, round after round, so that a
drift of the machine's speed (a VM's neighbours, clock changes) hits both sides of each pair alike and the ratio
per round cancels it. `sharp bench --paired N` runs this after its usual rounds and reports, per model, the median
of N per-round decode speed ratios against the first model with a distribution-free 95% confidence interval.

    python -m sharp.bench.paired SPEC[@mode] SPEC[@mode] ... --rounds 20 [--tokens 64] [--threads 1]  # JSON

Round i decodes the models in the list rotated by i (each goes first equally often when the rounds are a multiple
of the models); each decode is the same as `sharp bench`'s eager one (prefill of the prompt, then single-token
greedy steps), after one untimed warm-up decode per model. Every model is held in memory at once.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable
from typing import Any

import torch

from sharp.bench.protocol import prompt_ids, subprocess_main
from sharp.errors import SharpError


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(low, high, coverage): a distribution-free confidence interval for the median of `values` (order statistics:
    the number of values below the median is Binomial(n, 1/2)) and the probability that it holds the median, at
    least `confidence` from 6 values on (95%); with fewer, the full range and its lower coverage."""
    if not values:
        raise SharpError("no paired rounds to summarize")
    xs = sorted(values)
    n = len(xs)
    tail = (1 - confidence) / 2
    k, below = 0, 0.0  # largest k with P(Binomial(n, 1/2) < k) <= tail
    while k < n // 2:
        nxt = below + math.comb(n, k) / 2**n
        if nxt > tail:
            break
        below, k = nxt, k + 1
    if k == 0:  # too few values: the full range, which misses the median with probability 2 / 2^n
        return xs[0], xs[-1], 1 - 2 / 2**n
    return xs[k - 1], xs[n - k], 1 - 2 * below


def paired_decode(models: list[tuple[Any, Callable[[Any, torch.Tensor, int], tuple[float, float]], torch.Tensor]],
                  tokens: int, rounds: int) -> list[list[float]]:
    """Decode tokens/s of every (model, decode, prompt) per round: result[model][round]."""
    for model, decode, prompt in models:  # untimed warm-up
        decode(model, prompt, min(tokens, 8))
    speeds: list[list[float]] = [[0.0] * rounds for _ in models]
    for i in range(rounds):
        for j in range(len(models)):
            k = (j + i) % len(models)
            model, decode, prompt = models[k]
            speeds[k][i] = decode(model, prompt, tokens)[1]
    return speeds


def summarize(speeds: list[list[float]]) -> list[dict]:
    """Per model: its speeds, the per-round ratios against the first model, their median and 95% interval."""
    out = []
    for s in speeds:
        ratios = [a / b for a, b in zip(s, speeds[0], strict=True)]
        lo, hi, coverage = median_interval(ratios)
        out.append({"decode_tok_s": s, "ratios": ratios, "ratio_median": statistics.median(ratios),
                    "ratio_ci95": [lo, hi], "ci_coverage": coverage})
    return out


def load(spec: str, mode: str, prompt_tokens: int, threads: int) -> tuple[Any, Callable, torch.Tensor]:
    """(model, decode function, prompt) for a PyTorch model or an ExecuTorch program folder, loaded as `sharp
    bench` loads it."""
    from sharp.io.pte import is_pte_folder

    if is_pte_folder(spec):
        from sharp.bench.pte import decode_pte, pte_runtime
        from sharp.io.pte import PteModel

        model = PteModel(spec, pte_runtime(threads))
        return model, decode_pte, prompt_ids(model.vocab_size, prompt_tokens)
    from sharp.bench.measure import decode, load_for_bench

    model = load_for_bench(spec, mode)
    return model, decode, prompt_ids(model.config.vocab_size, prompt_tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="model specs, each with its mode: path@shared")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    def work() -> list[dict]:
        models = [load(*spec.rsplit("@", 1), args.prompt_tokens, args.threads) for spec in args.specs]
        with torch.no_grad():
            return summarize(paired_decode(models, args.tokens, args.rounds))

    subprocess_main(args.threads, work)


if __name__ == "__main__":
    main()
