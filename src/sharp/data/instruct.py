"""Instruction examples: prompt templates, response-only labels, held-out split, padding.

Templates (one per format; every format maps its record to (system, instruction, input, output)):

    plain  [{system}\\n\\n]### Instruction:\\n{instruction}\\n{input}\\n### Response:\\n{output}<eos>
           (the template RESEARCH.md measured with; `input` may be empty, the line stays)
    chat   the tokenizer's own chat template: [system], user = instruction[\\n\\n input], assistant = output

Special tokens: the plain template follows the tokenizer's own `add_special_tokens=True` behaviour (a Llama or
SmolLM2 tokenizer prepends its BOS, others may add nothing) and appends the EOS token so the model learns to
stop; the chat template's text carries its own special tokens, so it is tokenized without adding any.
Labels are -100 on the prompt (and on padding): the loss and perplexity cover the response tokens only.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterable

import torch

from sharp.data.spec import FORMATS, Format
from sharp.errors import SharpError

TEMPLATES = ("plain", "chat")
IGNORE = -100
PLAIN_PROMPT = "### Instruction:\n{instruction}\n{input}\n### Response:\n"


def render(parts: tuple[str, str, str, str], tokenizer=None, template: str = "plain") -> tuple[str, str]:
    """(prompt, prompt + response) text of one example."""
    system, instruction, inp, output = parts
    if template == "plain":
        prompt = (f"{system}\n\n" if system else "") + PLAIN_PROMPT.format(instruction=instruction, input=inp)
        return prompt, prompt + output
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": f"{instruction}\n\n{inp}" if inp else instruction})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": output}], tokenize=False)
    return prompt, full


def check_template(template: str, tokenizer=None) -> None:
    """A known `template`, and with a tokenizer given, `chat` only where the tokenizer has a chat template (the
    tokenizer loads in a fraction of a second: commands check this before the model loads)."""
    if template not in TEMPLATES:
        raise SharpError(f"unknown --template '{template}'; choose one of: {', '.join(TEMPLATES)}")
    if tokenizer is not None and template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise SharpError("this tokenizer has no chat template; use --template plain")


def check_chat_template(template: str, specs: Iterable, load_tokenizer: Callable[[], object]) -> None:
    """`--template chat` with instruction data (`specs`: DataSpecs): the tokenizer (`load_tokenizer()`, called only
    then) must have a chat template. Commands call this before the model loads."""
    if template == "chat" and any(spec.format != "text" for spec in specs):
        check_template(template, load_tokenizer())


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_examples(
    records: list[dict],
    fmt: str | Format,
    tokenizer,
    template: str = "plain",
    max_len: int = 512,
) -> list[dict[str, list[int]]]:
    """Records → [{input_ids, labels}], labels -100 outside the response, cut to `max_len` tokens.

    The response starts where the tokens of the full text stop matching those of the prompt alone, so a
    token merged across the boundary counts as response. Examples whose prompt fills `max_len` are dropped
    (with a warning); none left is an error.
    """
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    if fmt.name == "text":
        raise SharpError("text data has no responses; use text_token_stream / ppl:text for plain text")
    check_template(template, tokenizer)
    if max_len < 2:
        raise SharpError(f"--max-len {max_len} is too small; use at least 2 tokens")
    texts = [render(fmt.parts(r, i), tokenizer, template) for i, r in enumerate(records)]
    if not texts:
        raise SharpError("no instruction records to tokenize")
    special = template == "plain"
    prompt_ids = tokenizer([p for p, _ in texts], add_special_tokens=special)["input_ids"]
    full_ids = tokenizer([f for _, f in texts], add_special_tokens=special)["input_ids"]
    eos = tokenizer.eos_token_id if special else None
    examples = []
    for prompt, full in zip(prompt_ids, full_ids, strict=True):
        ids = list(full)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        n = _common_prefix(prompt, ids)
        labels = [IGNORE] * n + ids[n:]
        ids, labels = ids[:max_len], labels[:max_len]
        if any(label != IGNORE for label in labels[1:]):  # position 0 is never predicted
            examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise SharpError(f"every prompt is at least {max_len} tokens long, so no response token is left; "
                         "raise --max-len")
    if len(examples) < len(records):
        warnings.warn(f"{len(records) - len(examples)} of {len(records)} examples dropped: their prompt "
                      f"fills --max-len {max_len}", stacklevel=2)
    return examples


def split_examples(items: list, eval_fraction: float, seed: int | None = 0) -> tuple[list, list]:
    """Deterministic (train, held-out) split; both keep the original order.

    round(n * eval_fraction) items (at least one) are held out: a seeded random choice, or with
    `seed=None` the last ones (RESEARCH.md's "last 100 of the GPT4-Alpaca sample" is fraction 0.1, seed None).
    Split the records, not the tokenized examples, so that dropped examples cannot shift the split.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise SharpError(f"--eval-fraction {eval_fraction} must be in [0, 1)")
    n = len(items)
    if eval_fraction == 0.0:
        return list(items), []
    n_eval = max(1, round(n * eval_fraction))
    if n_eval >= n:
        raise SharpError(f"--eval-fraction {eval_fraction} leaves no training data out of {n} examples")
    order = list(range(n))
    if seed is not None:
        random.Random(seed).shuffle(order)
        held = set(order[:n_eval])
    else:
        held = set(order[n - n_eval:])
    train = [x for i, x in enumerate(items) if i not in held]
    evals = [x for i, x in enumerate(items) if i in held]
    return train, evals


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (Llama-style tokenizers have no
    pad token), else 0. Padded positions are masked out either way."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id or 0


def collate_examples(examples: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids (pad_id), labels (-100), attention_mask (0 on padding)."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.as_tensor(e["input_ids"])
        labels[row, :n] = torch.as_tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
