"""Plain text as one token stream, cut into windows (for perplexity and for training on plain text).

Windows (`max_len` tokens each, a new window every `stride` tokens) label the tokens no earlier window
labelled, never a window's own first token (it has no context there). With stride = max_len the windows
don't overlap and each labels all its tokens but the first; a smaller stride gives every labelled token at
least max_len - stride tokens of context.

Documents are joined with a blank line and tokenized once with the tokenizer's own
`add_special_tokens=True` behaviour: a BOS-adding tokenizer puts one BOS at the very start, nothing between
documents (the usual WikiText-2 perplexity set-up).
"""

from __future__ import annotations

import torch

from sharp.data.instruct import IGNORE, split_examples, tokenize_examples
from sharp.data.spec import DataSpec, load_records, parse_data_spec
from sharp.errors import SharpError


def text_token_stream(spec: DataSpec | str, tokenizer) -> torch.Tensor:
    """All the text of a `text:` spec as one LongTensor of token ids, shape (N,)."""
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    if spec.format != "text":
        raise SharpError(f"'{spec.text}' is {spec.format} data, not plain text; write text:PATH")
    text = "\n\n".join(str(r["text"]) for r in load_records(spec))
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    if len(ids) < 2:
        raise SharpError(f"'{spec.text}' holds fewer than 2 tokens; nothing to score")
    return torch.tensor(ids, dtype=torch.long)


def text_windows(n_tokens: int, max_len: int = 512, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, first labelled position) of each window over a stream of `n_tokens` tokens."""
    stride = max_len if stride is None else stride
    if max_len < 2:
        raise SharpError(f"--max-len {max_len} is too small; use at least 2 tokens")
    if not 1 <= stride <= max_len:
        raise SharpError(f"--stride {stride} must be between 1 and --max-len ({max_len})")
    windows, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + max_len, n_tokens)
        first = max(prev_end, begin + 1)
        if end > first:
            windows.append((begin, end, first))
        if end >= n_tokens:
            return windows
        prev_end, begin = end, begin + stride


def text_examples(token_ids: torch.Tensor, max_len: int = 512, stride: int | None = None) -> list[dict]:
    """A token stream (N,) as [{input_ids, labels}] windows; labels -100 where a window scores nothing."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    examples = []
    for begin, end, first in text_windows(len(ids), max_len, stride):
        window = ids[begin:end].tolist()
        examples.append({"input_ids": window, "labels": [IGNORE] * (first - begin) + window[first - begin:]})
    return examples


def split_tokenized(data: str, tokenizer, max_len: int, template: str, eval_fraction: float, seed: int,
                    eval_data: str | None = None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) examples of the data spec `data`: its records split first (`split_examples`), then
    tokenized (plain text by `record_examples`, instruction formats by `tokenize_examples` with `template`); with
    `eval_data` every record of that spec is held out instead. The one way compress, compare and the baselines'
    healing build their examples, so that they train on the same ones."""
    spec = parse_data_spec(data)
    train, held = split_examples(load_records(spec), eval_fraction, seed)
    held_spec = spec
    if eval_data:
        held_spec = parse_data_spec(eval_data)
        held = load_records(held_spec)

    def tokenized(records: list[dict], fmt: str) -> list[dict]:
        if fmt == "text":
            return record_examples(records, tokenizer, max_len)
        return tokenize_examples(records, fmt, tokenizer, template, max_len) if records else []

    return tokenized(train, spec.format), tokenized(held, held_spec.format)


def record_examples(records: list[dict], tokenizer, max_len: int) -> list[dict]:
    """Plain-text records joined by blank lines, tokenized once, cut into consecutive `max_len`-token training
    windows (a language-model loss on every token)."""
    if not records:
        return []
    ids = tokenizer("\n\n".join(r["text"] for r in records), add_special_tokens=True, verbose=False)["input_ids"]
    return text_examples(ids, max_len)
