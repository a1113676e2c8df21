"""Perplexity: response-only for instruction data, sliding windows for plain text.

Both reduce to the same sum: the negative log-likelihood of every scored token (labels != -100, each predicted
from the tokens before it), token-weighted: nll = sum / tokens, ppl = exp(nll). Accumulated in float64 over
batches processed in a fixed order, so a run is deterministic.

Text is cut into windows by `sharp.data.text_examples` (`max_len` tokens each, a new window every `stride`):
with stride = max_len the windows don't overlap and each scores all its tokens but the first; with a smaller
stride only the new tokens are scored, each with at least max_len - stride tokens of context.

Tasks (`sharp eval --tasks`): `ppl:FORMAT=SOURCE` with SOURCE a path, an alias or a Hub id as in
`sharp.data.parse_data_spec` (a slice such as `[-100:]` selects records), or `ppl:ALIAS`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sharp.data import (
    FORMATS,
    IGNORE,
    DataSpec,
    collate_examples,
    load_records,
    parse_data_spec,
    split_examples,
    text_examples,
    text_token_stream,
    tokenize_examples,
)
from sharp.errors import SharpError


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() + no_grad for the block, the previous training mode restored after. Not inference_mode:
    optimum-quanto's quantized tensors fail under it ("Cannot set version_counter for inference tensor")."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _progress(total: int, description: str, show: bool) -> Iterator[Callable[[int], None]]:
    if not show:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _result(per_example: list[tuple[float, int]]) -> dict[str, float]:
    """{ppl, nll, tokens, examples, nll_sem} from each example's (NLL sum, scored tokens).

    `nll_sem` is the standard error of the token-weighted mean NLL over examples (the ratio estimator's
    delta-method error): how far the measured nll could move with another sample of examples of the same kind.
    Perplexities of two models differ beyond noise only where their nll differ by more than about 2x it."""
    tokens = sum(n for _, n in per_example)
    if tokens == 0:
        raise SharpError("no tokens to score; give more data or a larger --max-len")
    nll = sum(s for s, _ in per_example) / tokens
    k = len(per_example)
    mean_tokens = tokens / k
    spread = sum((s - nll * n) ** 2 for s, n in per_example) / (k - 1) if k > 1 else math.nan
    sem = math.sqrt(spread / k) / mean_tokens if k > 1 else math.nan
    return {"ppl": math.exp(nll), "nll": nll, "tokens": tokens, "examples": k, "nll_sem": sem}


def _nll_per_example(
    model: nn.Module, examples: list[dict], batch_size: int, description: str = "perplexity", progress: bool = False
) -> list[tuple[float, int]]:
    """(NLL sum over scored tokens, number of scored tokens) of each {input_ids, labels} example, in order."""
    if batch_size < 1:
        raise SharpError(f"--batch-size {batch_size} must be at least 1")
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))  # less padding
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    with _eval_mode(model), _progress(len(examples), description, progress) as advance:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            chunk = [examples[i] for i in index]
            batch = {k: v.to(device) for k, v in collate_examples(chunk).items()}
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits  # (B, T, V)
            targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
            for row, i in enumerate(index):  # one row at a time keeps the float32 copy of the logits small
                nll = F.cross_entropy(logits[row, :-1].float(), targets[row], ignore_index=IGNORE, reduction="sum")
                out[i] = (float(nll.double()), int((targets[row] != IGNORE).sum()))
            advance(len(chunk))
    return [(s, n) for s, n in out if n > 0]


def response_perplexity(
    model: nn.Module, examples: list[dict], batch_size: int = 8, progress: bool = False
) -> dict[str, float]:
    """Perplexity of the response tokens of tokenized instruction examples ({input_ids, labels})."""
    return _result(_nll_per_example(model, examples, batch_size, "responses", progress))


def text_perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    max_len: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Sliding-window perplexity of a token stream (N,); `limit` keeps the first windows only."""
    examples = text_examples(token_ids, max_len, stride)[:limit]
    return _result(_nll_per_example(model, examples, batch_size, "text windows", progress))


@dataclass(frozen=True)
class PerplexityTask:
    """One `ppl:` task; `name` is the text the user wrote (the key in results)."""

    name: str
    spec: DataSpec

    @property
    def is_text(self) -> bool:
        return self.spec.format == "text"


def parse_tasks(text: str) -> list[PerplexityTask]:
    """`ppl:FORMAT=SOURCE,ppl:ALIAS,...` → tasks; checks names and that local files exist, loads nothing."""
    tasks = []
    for name in (part.strip() for part in text.split(",")):
        if not name:
            continue
        kind, colon, rest = name.partition(":")
        if kind != "ppl" or not colon:
            raise SharpError(
                f"unknown task '{name}'; perplexity tasks look like ppl:FORMAT=PATH (formats: "
                f"{', '.join(FORMATS)}); zero-shot benchmarks go in --lm-eval"
            )
        fmt, eq, source = rest.partition("=")
        if not eq and fmt in FORMATS:
            raise SharpError(f"task '{name}' names no data; write ppl:{fmt}=PATH")
        spec = parse_data_spec(f"{fmt}:{source}" if eq else rest)
        if any(t.name == name for t in tasks):
            raise SharpError(f"task '{name}' is given twice")
        tasks.append(PerplexityTask(name, spec))
    if not tasks:
        raise SharpError("no tasks given; write e.g. --tasks ppl:text=wiki.txt,ppl:alpaca=data.json")
    return tasks


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[PerplexityTask],
    max_len: int = 512,
    stride: int | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    template: str = "plain",
    eval_fraction: float | None = None,
    seed: int | None = 0,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """{task name: {ppl, nll, tokens}}.

    `limit` keeps the first N examples (instruction) or windows (text); `eval_fraction` scores only the
    held-out part of instruction data, split exactly as training splits it (`split_examples`).
    """
    results = {}
    for task in tasks:
        if task.is_text:
            examples = text_examples(text_token_stream(task.spec, tokenizer), max_len, stride)[:limit]
        else:
            records = load_records(task.spec)
            if eval_fraction:
                records = split_examples(records, eval_fraction, seed)[1]
            examples = tokenize_examples(records[:limit], task.spec.format, tokenizer, template, max_len)
        results[task.name] = _result(_nll_per_example(model, examples, batch_size, task.name, progress))
    return results
