"""Run a program written by `sharp export --format executorch` with ExecuTorch's Python runtime.

    model = PteModel("runs/pte")                   # loads model.pte + weights.ptd, one 'forward' method
    logits = model(torch.tensor([[1, 2, 3]]), 0)   # prefill at cache position 0 -> (1, vocab), last position
    logits = model(torch.tensor([[7]]), 3)         # one decode step

The program takes one token per call (see `sharp.io.executorch.Exportable`), so a prompt is fed token by token.
It keeps its KV cache between calls; `pos` says where the given tokens go, so starting again at 0 begins a new
sequence (positions past the new ones are not attended to).

XNNPACK packs each operator's weights into its own buffer when a program loads, so without its weight cache a
weight two layers share is packed, held and read twice: the file is smaller but memory and decode traffic are
not. `load_runtime` turns the cache on (as ExecuTorch's Android and Apple builds do by default), so packed
weights are keyed by their data name and a shared weight is packed once.
"""

from __future__ import annotations

import ctypes
import functools
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


def load_runtime(weight_cache: bool = True):
    """ExecuTorch's runtime with the operator libraries exported programs may use (quantized embedding,
    llama custom ops) registered, and XNNPACK's weight cache set as asked for programs loaded from now on."""
    require_executorch()
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama::custom_sdpa, llama::update_cache)
    import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed::embedding_byte & co.)
    from executorch.runtime import Runtime

    runtime = Runtime.get()  # loads libexecutorch, whose backend registry the option below reaches
    set_xnnpack_weight_cache(weight_cache)
    return runtime


class _BackendOption(ctypes.Structure):
    """`executorch::runtime::BackendOption`: char key[64]; std::variant<bool, int, std::array<char, 256>> value
    (256 bytes of storage aligned like int, then a one-byte index)."""

    _fields_ = [("key", ctypes.c_char * 64), ("value", ctypes.c_int32 * 64), ("index", ctypes.c_uint8)]


class _OptionSpan(ctypes.Structure):
    _fields_ = [("data", ctypes.POINTER(_BackendOption)), ("length", ctypes.c_size_t)]


@functools.cache
def _option_functions():
    """`executorch::runtime::set_option` / `get_option` from the installed libexecutorch, or None. ExecuTorch's
    Python bindings do not bind backend options; these two are its public C++ entry points for them."""
    import executorch

    for folder in executorch.__path__:
        for lib in sorted((Path(folder) / "lib").glob("libexecutorch.*")):
            try:
                so = ctypes.CDLL(str(lib))
                fns = [getattr(so, f"_ZN10executorch7runtime10{name}_optionEPKcNS0_4SpanINS0_13BackendOptionEEE")
                       for name in ("set", "get")]
            except (OSError, AttributeError):
                continue
            for fn in fns:
                fn.restype, fn.argtypes = ctypes.c_uint32, [ctypes.c_char_p, _OptionSpan]
            return fns
    return None


def _weight_cache_option(enabled: bool = False) -> _OptionSpan:
    """A one-option span for `weight_cache_enabled` holding the bool alternative (the span keeps the option alive)."""
    opt = _BackendOption(key=b"weight_cache_enabled")
    opt.value[0], opt.index = int(enabled), 0
    return _OptionSpan(ctypes.pointer(opt), 1)


def xnnpack_weight_cache() -> bool:
    """Whether XNNPACK's weight cache is on for programs loaded from now on; False where this ExecuTorch build
    cannot tell or has no such option (then each operator packs its own weights)."""
    fns = _option_functions()
    if fns is None:
        return False
    span = _weight_cache_option()
    opt = span.data.contents
    return fns[1](b"XnnpackBackend", span) == 0 and opt.index == 0 and bool(opt.value[0] & 0xFF)


def set_xnnpack_weight_cache(enabled: bool) -> bool:
    """Switch XNNPACK's weight cache for programs loaded from now on (the process-wide default of the
    `weight_cache_enabled` backend option). Returns the state read back (`xnnpack_weight_cache`)."""
    fns = _option_functions()
    if fns is None or fns[0](b"XnnpackBackend", _weight_cache_option(enabled)) != 0:
        return False
    return xnnpack_weight_cache()


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
