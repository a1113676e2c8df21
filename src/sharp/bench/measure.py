"""One model's numbers, measured in the current process. `sharp.bench.runner` runs this in a fresh subprocess
per model, so peak RSS belongs to that model only.

Order of events: import libraries and the model class, then one untimed load (it pays one-time costs: lazy
imports such as bitsandbytes', first-call initialization), then `sharp.bench.protocol.load_and_decode` (cold and
warm loads, R timed decodes: prefill + first token = TTFT, then N single-token greedy steps, batch 1).

    python -m sharp.bench.measure SPEC [--mode shared|merged] [--tokens 64] [--repeats 5] [--device cpu]  # JSON

SPEC may also be an ExecuTorch program folder (`sharp export --format executorch`): `sharp.bench.pte` measures it
with ExecuTorch's runtime, same fields. On another device than the CPU (`--device cuda`), a load is timed until the
weights are there, and every timing waits for the device to finish (`synchronize`); RSS stays the host's.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn

from sharp.bench.protocol import load_and_decode, prompt_ids, subprocess_main
from sharp.bench.pte import measure_pte

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The files a load reads in bulk (weights); configs and tokenizers are a few KiB."""
    p = Path(path)
    if p.is_file():
        return [p]
    return sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds; quantized tensor subclasses are summed over their inner tensors, and a
    bitsandbytes 4-bit weight counts its quantization state (block absmax, code maps) too."""
    state = getattr(t, "quant_state", None)
    if state is not None:
        extra = state.as_dict(packed=True).values()
        return t.numel() * t.element_size() + sum(v.numel() * v.element_size() for v in extra)
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def unique_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes held by unique weights, bytes read per decoded token). A token reads every unique weight once,
    except an untied input embedding, of which it reads one row."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():  # each module once, however many names it has
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(t) not in seen:
                seen.add(id(t))
                total += tensor_bytes(t)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    per_token = total
    if head is None or head.weight is not emb:
        per_token -= tensor_bytes(emb) - tensor_bytes(emb[0])
    return total, per_token


def load_for_bench(spec: str, mode: str = "shared") -> nn.Module:
    """Load the model as a user would (`sharp.load_model`: a sharp checkpoint with sharing, a quantized or plain
    folder, a .gguf file), without its tokenizer. The manifest's sha256 check is skipped (it would read every
    byte once more); its sizes are still checked."""
    from sharp.errors import SharpError
    from sharp.io.formats import is_sharp_checkpoint
    from sharp.io.manifest import verify_manifest
    from sharp.io.models import load_model, resolve_model_path

    path = resolve_model_path(spec)
    if is_sharp_checkpoint(path):
        problems = verify_manifest(path, hashes=False)
        if problems:
            raise SharpError(f"checkpoint '{path}' is damaged: {problems[0]}")
    model, _ = load_model(spec, mode=mode, verify=False, tokenizer=False)
    return model


def _import_model_class(spec: str) -> None:
    """Import the architecture's modeling code now, so the first timed load doesn't pay for it."""
    from transformers import AutoModelForCausalLM

    from sharp.io.models import load_config

    config = load_config(spec)
    AutoModelForCausalLM._model_mapping[type(config)]  # noqa: B018  (the lookup imports the module)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a clock read after it measures the work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.no_grad()  # not inference_mode: quanto's tensors reject it
def decode(model: nn.Module, prompt: torch.Tensor, tokens: int) -> tuple[float, float]:
    """(time to first token in s, decode tokens/s): greedy, batch 1, KV cache, no `generate()` overhead; on the
    prompt's device."""
    device = prompt.device
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    synchronize(device)
    ttft = time.perf_counter() - t0
    cache = out.cache
    t1 = time.perf_counter()
    for _ in range(tokens):
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        cache = out.cache
        nxt = out.logits[:, -1:].argmax(-1)
    synchronize(device)
    return ttft, tokens / (time.perf_counter() - t1)


def measure(spec: str, mode: str = "shared", tokens: int = 64, repeats: int = 5, prompt_tokens: int = 32,
            compile: bool = False, load_repeats: int | None = None, device: str = "cpu", threads: int = 0) -> dict:
    """Every per-model field of `sharp bench` (see `sharp.bench.runner.FIELDS`); loads are timed
    `load_repeats` times each (default: `repeats`). The model runs on `device`."""
    load_repeats = load_repeats or repeats
    where = torch.device(device)

    def load() -> nn.Module:  # onto the device, timed until it is there
        loaded = load_for_bench(spec, mode).to(where)
        synchronize(where)
        return loaded

    from sharp.io.manifest import folder_bytes
    from sharp.io.models import resolve_model_path
    from sharp.io.pte import is_pte_folder

    if is_pte_folder(spec):  # an ExecuTorch program (`sharp export --format executorch`)
        return measure_pte(spec, tokens, repeats, prompt_tokens, load_repeats, threads)
    path = resolve_model_path(spec)
    files = weight_files(path)
    _import_model_class(spec)
    del_me = load()  # untimed: one-time costs must not count as the first cold load
    del del_me
    sizes = {}

    def ready(model: nn.Module) -> torch.Tensor:
        if compile:
            model.forward = torch.compile(model.forward, dynamic=True)
        sizes["stored"], sizes["per_token"] = unique_bytes(model)
        return prompt_ids(model.config.vocab_size, prompt_tokens).to(where)

    timed = load_and_decode(load, ready, decode, files, tokens, repeats, load_repeats)
    return {
        "model": spec,
        "mode": mode,
        "path": str(path),
        "bytes_on_disk": sum(f.stat().st_size for f in files),
        "bytes_folder": folder_bytes(path),
        "bytes_in_memory": sizes["stored"],
        "bytes_per_token": sizes["per_token"],
        **timed,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--mode", default="shared", choices=["shared", "merged"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--load-repeats", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    def work() -> dict:
        from sharp.io.device import resolve_device

        return measure(args.spec, args.mode, args.tokens, args.repeats, args.prompt_tokens, args.compile,
                       args.load_repeats or None, str(resolve_device(args.device)), args.threads)

    subprocess_main(args.threads, work)


if __name__ == "__main__":
    main()
