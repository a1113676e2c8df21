"""Run a program written by `sharp export --format executorch` with ExecuTorch's Python runtime.

    model = PteModel("runs/pte")                   # loads model.pte + weights.ptd, one 'forward' method
    logits = model(torch.tensor([[1, 2, 3]]), 0)   # prefill at cache position 0 -> (1, vocab), last position
    logits = model(torch.tensor([[7]]), 3)         # one decode step

The program takes one token per call (see `sharp.io.executorch.Exportable`), so a prompt is fed token by token.
It keeps its KV cache between calls; `pos` says where the given tokens go, so starting again at 0 begins a new
sequence (positions past the new ones are not attended to).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sharp.errors import SharpError
from sharp.io.executorch import META, PTD, PTE, require_executorch


def is_pte_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / PTE).is_file() and (p / META).is_file()


def pte_files(path: str | os.PathLike) -> list[Path]:
    """The files a load reads in bulk: the program and its data file."""
    p = Path(path)
    return [f for f in (p / PTE, p / PTD) if f.is_file()]


def load_runtime():
    """ExecuTorch's runtime with the operator libraries exported programs may use (quantized embedding,
    llama custom ops) registered."""
    require_executorch()
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama::custom_sdpa, llama::update_cache)
    import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed::embedding_byte & co.)
    from executorch.runtime import Runtime

    return Runtime.get()


class PteModel:
    """A loaded program: `model(ids, pos)` -> last-position logits (1, vocab) as a float32 tensor."""

    def __init__(self, path: str | os.PathLike, runtime=None) -> None:
        p = Path(path)
        if not is_pte_folder(p):
            raise SharpError(f"'{path}' is not a folder written by `sharp export --format executorch`")
        self.path = p
        self.meta = json.loads((p / META).read_text())
        self.max_cache_len = int(self.meta["config"]["max_cache_len"])
        self.vocab_size = int(self.meta["vocab_size"])
        runtime = runtime or load_runtime()
        data = p / PTD
        self.program = runtime.load_program(p / PTE, data_path=data if data.is_file() else None)
        self.method = self.program.load_method("forward")

    def __call__(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        ids = ids.reshape(-1).long()
        if pos + len(ids) > self.max_cache_len or len(ids) < 1:
            raise SharpError(f"positions {pos}..{pos + len(ids) - 1} do not fit the exported cache of "
                             f"{self.max_cache_len}; export with a larger --max-cache-len")
        for i, token in enumerate(ids):
            (logits,) = self.method.execute([token.reshape(1, 1), torch.tensor([pos + i])])
        return logits.float()

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, tokens: int) -> torch.Tensor:
        """Greedy continuation of `prompt` (1, n): the new token ids (1, tokens)."""
        logits = self(prompt, 0)
        pos, out = prompt.shape[-1], []
        for _ in range(tokens):
            nxt = logits.argmax(-1, keepdim=True)  # (1, 1)
            out.append(nxt)
            if len(out) == tokens:
                break
            logits = self(nxt, pos)
            pos += 1
        return torch.cat(out, dim=-1)


@torch.no_grad()
def pte_nll(model: PteModel, examples: list[dict]) -> tuple[float, int]:
    """(sum of negative log-likelihoods, number of tokens) of the scored tokens of {input_ids, labels} examples
    (labels aligned with input_ids, -100 = not scored, as `sharp.data` builds them), the same sum
    `sharp.evaluation.perplexity` takes in PyTorch. Each example starts a new sequence at position 0; the tokens
    before its first scored one go in without reading logits."""
    import torch.nn.functional as F

    total, count = 0.0, 0
    for ex in examples:
        ids = torch.as_tensor(ex["input_ids"]).reshape(-1)
        labels = torch.as_tensor(ex["labels"]).reshape(-1)
        scored = (labels[1:] != -100).nonzero().flatten() + 1  # positions predicted from the one before
        if len(scored) == 0:
            continue
        first, last = int(scored[0]), int(scored[-1])
        logits = model(ids[:first], 0)  # (1, vocab): predicts token `first`
        for i in range(first, last + 1):
            if labels[i] != -100:
                total += float(F.cross_entropy(logits.double(), labels[i:i + 1]))
                count += 1
            if i < last:
                logits = model(ids[i:i + 1], i)
    return total, count
