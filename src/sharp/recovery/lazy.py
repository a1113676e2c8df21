"""Weights from disk, one decoder layer at a time: SLW's capture without a copy of the original model in memory.

`capture_from_disk` writes the same store as `capture_activations` (same rows, same order, same values) from a
model folder's safetensors files instead of a loaded model:

 1. the model is built on the meta device (nothing allocated); only the token embedding is read from disk;
 2. one forward pass per batch runs with every decoder layer replaced by a stub that records the arguments the
    model hands that layer (attention mask, rotary position embeddings, ...: each architecture's own code
    builds them, so nothing here is per-model) and returns its input;
 3. then layer by layer: read layer i's tensors from disk (safetensors memory-maps the file and copies out just
    those tensors), run every batch's hidden states through it, hook the targets' MLPs to store their inputs
    and outputs, and free the layer before reading the next.

Peak memory is the embedding, one decoder layer, and the hidden states of the captured batches
(tokens × hidden × 4 bytes in float32), whatever the depth of the model.

`DiskModule` / `original_mlps` give each SLW job its target's original MLP (the closed-form init fits towards
it) as a meta skeleton plus where its tensors are: the job reads them when it starts, not before. And
`frozen_sharing_copy` gives an SLW job a copy of a target's shared MLP that reuses the frozen reference weights'
storage (float32 already) instead of duplicating it for each job.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sharp.arch import get_adapter
from sharp.errors import SharpError
from sharp.io.atomic import write_text_atomic
from sharp.recovery.activations import DTYPES, META, ActivationStore, _keep_mask, _progress_bar, finished_capture

INDEX = "model.safetensors.index.json"


class SafetensorsWeights:
    """Tensors of a model folder by name, read on demand (only the requested ones leave the file)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for f in sorted(self.folder.glob("*.safetensors")):
                with safe_open(f, framework="pt") as handle:
                    self.files.update(dict.fromkeys(handle.keys(), f))
        if not self.files:
            raise SharpError(f"'{folder}' has no safetensors weights to read layer by layer")

    @staticmethod
    def available(folder: str | Path) -> bool:
        """A plain model folder with safetensors weights (not a sharp checkpoint, a quantized or pruned one)."""
        p = Path(folder)
        markers = ("sharp_config.json", "quantization.json", "sharp_prune.json")
        return p.is_dir() and any(p.glob("*.safetensors")) and not any((p / m).exists() for m in markers)

    def load_into(self, module: nn.Module, prefix: str, dtype: torch.dtype, device: str | torch.device) -> None:
        """Give every parameter and persistent buffer of `module` its tensor `prefix + name` from disk."""
        names = list(module.state_dict().keys())
        missing = [prefix + n for n in names if prefix + n not in self.files]
        if missing:
            raise SharpError(f"'{self.folder}' has no tensor {missing[0]}; load the model instead of reading it lazily")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[prefix + n], []).append(n)
        state = {}
        for f, group in by_file.items():
            with safe_open(f, framework="pt") as handle:
                for n in group:
                    t = handle.get_tensor(prefix + n)
                    state[n] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        module.load_state_dict(state, strict=True, assign=True)


def meta_model(model_path: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> nn.Module:
    """The model of a folder's config.json with every weight on the meta device (nothing allocated or read);
    non-persistent buffers (rotary tables) are real, on `device`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(model_path)
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    for module in model.modules():  # rotary tables etc. were computed for real; weights stay on meta
        for name, buf in module._buffers.items():
            if buf is not None and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)
    return model


@dataclass
class DiskModule:
    """A module whose weights stay on disk until `load()`: a meta skeleton and the name prefix of its tensors
    in a model folder. Small to pickle (to a spawned worker or a Ray task), so it is read where it is used."""

    skeleton: nn.Module
    folder: str
    prefix: str

    def load(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
        module = copy.deepcopy(self.skeleton)
        SafetensorsWeights(self.folder).load_into(module, self.prefix, dtype, device)
        return module


def original_mlps(model_path: str | Path, layers: Mapping[int, int]) -> dict[int, DiskModule]:
    """{key: the MLP of decoder layer `layers[key]` of the model folder}, each read only when loaded."""
    model = meta_model(model_path)
    adapter = get_adapter(model)
    return {k: DiskModule(adapter.mlp(model, i), str(model_path), f"{adapter.layers_path}.{i}.{adapter.mlp_attr}.")
            for k, i in layers.items()}


class _Stub(nn.Module):
    """Stands in for decoder layer `index` during the recording pass: keeps its arguments, returns its input."""

    def __init__(self, index: int, last: int, calls: list) -> None:
        super().__init__()
        self.index, self.last, self.calls = index, last, calls

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.index == 0:
            self.calls[-1]["input"] = hidden_states  # what the model hands its first layer (embedded, scaled)
        self.calls[-1][self.index] = (args, kwargs)
        if self.index == self.last:
            raise _Stop
        return hidden_states


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_from_disk(
    model_path: str | Path,
    batches: Iterable[Mapping[str, torch.Tensor]],
    targets: list[int],
    work_dir: str | Path,
    max_tokens: int | None = None,
    skip_positions: int = 0,
    dtype: str = "float16",
    flush_bytes: int = 64 << 20,
    progress: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> ActivationStore:
    """`capture_activations` for a model folder read one layer at a time (see the module docstring)."""
    root = Path(work_dir)
    if (finished := finished_capture(root, dtype, targets)) is not None:
        return finished
    weights = SafetensorsWeights(model_path)
    targets = sorted(set(targets))
    last = targets[-1]
    model = meta_model(model_path, compute_dtype, device)
    config = model.config
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    prefix = adapter.layers_path + "."
    decoder = model.get_decoder()
    embed = model.get_input_embeddings()  # the only weights read before the layers
    embed_name = next(n for n, m in model.named_modules() if m is embed)
    weights.load_into(embed, embed_name + ".", compute_dtype, device)
    real = list(layers)
    calls: list[dict[int, tuple]] = []
    for i in range(last + 1):
        layers[i] = _Stub(i, last, calls)

    # 1. record each batch's per-layer arguments and its embedded input; keep batches until max_tokens is met
    hidden, keeps, positions = [], [], []
    seen = 0
    for batch in batches:
        ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(device)
        calls.append({})
        try:
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
        hidden.append(calls[-1].pop("input"))
        keeps.append(_keep_mask(mask, skip_positions))
        positions.append(mask.long().cumsum(-1) - 1)
        seen += int(keeps[-1].sum())
        if max_tokens is not None and seen >= max_tokens:
            break
    if seen == 0:
        raise SharpError("the SLW data gave no tokens to capture (empty data, or every sequence shorter than "
                         f"skip_positions={skip_positions}); give more data")

    # 2. layer by layer: read it, run every batch through it, store the targets' MLP rows, free it
    if root.exists():
        shutil.rmtree(root)  # an unfinished capture: start over
    root.mkdir(parents=True)
    counts = dict.fromkeys(targets, 0)
    bar = _progress_bar(progress, last + 1)
    task = bar.add_task("SLW capture, layer by layer from disk", total=last + 1)
    bar.start()
    for i in range(last + 1):
        layer = real[i]
        weights.load_into(layer, f"{prefix}{i}.", compute_dtype, device)
        writer = _LayerWriter(root / f"layer_{i:03d}", DTYPES[dtype], flush_bytes) if i in targets else None
        for b in range(len(hidden)):
            handle = None
            if writer is not None:
                room = None if max_tokens is None else max_tokens - counts[i]
                hook = _store_hook(writer, counts, i, keeps[b], positions[b], room)
                handle = getattr(layer, adapter.mlp_attr).register_forward_hook(hook)
            args, kwargs = calls[b][i]
            try:
                hidden[b] = layer(hidden[b], *args, **kwargs)
            finally:
                if handle is not None:
                    handle.remove()
        if writer is not None:
            writer.flush()
        layers[i] = layer.to("meta")  # frees the weights; the next layer is read next
        bar.update(task, advance=1)
    bar.stop()
    meta = {"layers": targets, "hidden_size": int(config.hidden_size), "dtype": dtype,
            "skip_positions": skip_positions, "tokens": {str(t): counts[t] for t in targets}}
    write_text_atomic(root / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return ActivationStore(root)


def _store_hook(writer: _LayerWriter, counts: dict, layer: int, keep: torch.Tensor, pos: torch.Tensor,
                room: int | None):
    """Forward hook on a target's MLP: store its kept input/output rows (at most `room` more)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        counts[layer] += writer.add(args[0][keep][:room], output[keep][:room], pos[keep][:room])

    return hook


class _LayerWriter:
    """Rows of one layer, appended to shards of about `flush_bytes` (the layout `ActivationStore` reads)."""

    def __init__(self, folder: Path, dtype: torch.dtype, flush_bytes: int) -> None:
        self.folder, self.dtype, self.flush_bytes = folder, dtype, flush_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows: tuple[list, list, list] = ([], [], [])
        self.bytes = self.shard = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, p: torch.Tensor) -> int:
        x, y = x.to("cpu", self.dtype), y.to("cpu", self.dtype)
        for buf, t in zip(self.rows, (x, y, p.cpu()), strict=True):
            buf.append(t)
        self.bytes += 2 * x.numel() * x.element_size()
        if self.bytes >= self.flush_bytes:
            self.flush()
        return x.shape[0]

    def flush(self) -> None:
        xs, ys, ps = self.rows
        if xs:
            save_file({"x": torch.cat(xs).contiguous(), "y": torch.cat(ys).contiguous(),
                       "p": torch.cat(ps).to(torch.int32)}, self.folder / f"shard_{self.shard:05d}.safetensors")
            self.shard += 1
        self.rows = ([], [], [])
        self.bytes = 0


def frozen_sharing_copy(mlp: nn.Module) -> nn.Module:
    """A float32 CPU copy of `mlp` for one SLW job (jobs cross to worker processes; `train_layer` moves it to
    the job's device): its recovery is copied, its frozen weights are new Parameters over the original storage
    when that is float32 on the CPU already (a view, no memory), else float32 CPU copies."""
    from sharp.sharing.shared import recoveries

    trainable = {id(p) for _, r in recoveries(mlp) for p in r.parameters()}
    memo = {id(p): nn.Parameter(p.detach().to("cpu", torch.float32), requires_grad=False)
            for p in mlp.parameters() if id(p) not in trainable}
    return copy.deepcopy(mlp, memo).to("cpu", torch.float32)
