"""Plain text as one token stream (for perplexity windows and text-only calibration data).

Documents are joined with a blank line and tokenized once with the tokenizer's own
`add_special_tokens=True` behaviour: a BOS-adding tokenizer puts one BOS at the very start, nothing between
documents (the usual WikiText-2 perplexity set-up).
"""

from __future__ import annotations

import torch

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
