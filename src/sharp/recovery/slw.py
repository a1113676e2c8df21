"""Single-layer warmup (SLW): fit each target's recovery to its original MLP, one layer at a time.

For a target layer t with captured inputs x (post-norm hidden states) and original outputs y (see
`activations.py`), SLW trains only the recovery parameters of t's MLP (the reference weights stay frozen) to
minimize the relative squared error of what the layer adds to the residual stream (the MLP output, or its
post-feedforward norm where the architecture has one, e.g. Gemma3):

    loss = sum_i ||mlp_t(x_i) - y_i||^2 / sum_i ||y_i||^2          (loss="relative", per batch)
    loss = mean_i ||mlp_t(x_i) - y_i||^2 / ||y_i||^2                (loss="token")

Relative, so one learning rate fits every layer whatever its output scale. Progress is reported as rel-err =
sqrt(relative squared error) on held-out tokens (a random `eval_tokens` rows of the layer); rel-err 1.0 is as bad
as deleting the MLP.

Rows at positions < `sink_positions` (position 0 by default) form a second group with its own relative loss
term (weight `sink_weight`): some MLPs write a massive attention-sink activation there (SmolLM2's layer 11,
13x the residual), which must be reproduced or the whole model breaks, yet it would swamp the ordinary tokens in
one pooled loss. Early stopping and the kept (best) state use err^2 + sink_weight * sink_err^2 on held-out rows
(`--slw-sink-weight`). The default 0.1 (was 1.0) comes from docs/results/sink_weight_smollm2.md (one run per
weight, gated and ungated lora:64 on SmolLM2): at 1.0 SLW gave up ordinary-token error for sink error it did not
need (median sink error 0.007 vs 0.024 at 0.1; ordinary 0.764 vs 0.735); at 0.1 perplexity after SLW alone was
lower in both rows, and after SFT lower on GPT4-Alpaca (gated 15.2 vs 17.5) and otherwise within about one SEM but
for the ungated row's DialogSum (35.0 vs 41.7). A gated target never keeps a state worse than its deleted MLP on
either group, so a light weight cannot trade the sink away.

Init (`init`):
    closed-form  every shared projection gets its best gated / rank-r correction in closed form on the captured
                 rows (`closed_form.py`: whitened reduced-rank regression; gate/up towards the target's own
                 projections, then down on the corrected features towards the target MLP's output); lstsq's
                 fit is tried too, as a candidate below
    lstsq        the same, for the output projection only (the toolkit's first init)
    zero         start from Direct Sharing
The init keeps the best held-out of: Direct Sharing, the fit(s), and (recoveries with a gate) the deleted MLP, and
a gated target keeps no state worse than its deleted MLP on either group (ordinary or sink rows), so it never ends
worse than dropping its MLP; closed-form never ends worse than lstsq (on held-out rows).
Gradient steps (AdamW) then refine from there.

Inputs (`inputs`):
    original     every target sees the original model's activations: one capture, layers independent, so they
                 train in parallel (`workers`)
    sequential   targets are fitted in layer order, each on the inputs the model produces once its earlier
                 targets are already shared and fitted (the outputs it is fitted to are still the original
                 target MLP's, applied to those inputs), as GPTQ's true-sequential mode: later layers learn to
                 work with what earlier shared layers actually give them. One capture per target.

Every layer keeps its state in `work_dir/layer_NNN/` (`slw_layer.py`): `state.pt` every `checkpoint_every`
steps, then `recovery.safetensors` + `result.json` when done. A rerun skips finished layers and resumes
unfinished ones, ending where an uninterrupted run ends. With `workers > 1` each layer trains in its own spawned
process (a script calling this needs the usual `if __name__ == "__main__":` guard); with `backend="ray"` each
layer is a Ray task (`slw_ray.py`).

Devices and dtypes: the capture runs where the model it runs is (in its compute dtype). Each layer then trains on
`device` (default: `config.device`, else the shared model's), in float32 whatever the model's dtype: a job carries
float32 CPU copies of the MLPs (they cross to worker processes), the closed-form fit accumulates its statistics in
float64 and solves on the CPU, and the result is cast back to the model's dtype when loaded into it. With
`device` a CUDA device without an index and several GPUs visible, parallel workers take them round-robin.

The original model may be given as its folder (plain safetensors): then nothing of it is loaded whole. The
capture reads it one decoder layer at a time (`capture.capture_activations`), and each job reads its target's original
MLP when it starts (`lazy.DiskModule`). Each job's MLP copy reuses the frozen reference weights' storage. With
`original_dtype` the folder's weights are rounded to it as they are read: SLW then fits to what the original model
loaded in that dtype computes, as it does when given that loaded model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from sharp.arch import get_adapter
from sharp.errors import SharpError
from sharp.io.device import worker_devices
from sharp.recovery.activations import ActivationStore
from sharp.recovery.capture import capture_activations
from sharp.recovery.lazy import DiskModule, frozen_sharing_copy, original_mlps
from sharp.recovery.slw_config import SLWConfig
from sharp.recovery.slw_layer import RESULT, LayerJob, is_done, load_result, train_layer
from sharp.recovery.slw_parallel import LayerProgress, train_parallel
from sharp.sharing.shared import SharedLinear

LOG = "slw_log.jsonl"
ACTIVATIONS = "activations"
def target_mlps(model: nn.Module) -> dict[int, nn.Module]:
    """{layer index: MLP module} of every layer whose MLP holds a `SharedLinear` (found structurally)."""
    adapter = get_adapter(model)
    out = {}
    for i, layer in enumerate(adapter.layers(model)):
        mlp = getattr(layer, adapter.mlp_attr)
        if any(isinstance(m, SharedLinear) for m in mlp.modules()):
            out[i] = mlp
    return out


def run_slw(
    original_model: nn.Module | str | Path | None,
    shared_model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    config: SLWConfig,
    work_dir: str | Path,
    targets: list[int] | None = None,
    progress: bool = True,
    layer_map: Mapping[int, int] | None = None,
    device: torch.device | str | None = None,
    original_dtype: torch.dtype | None = None,
) -> dict[int, dict]:
    """Capture the target MLPs' inputs and outputs on `batches` (where the models are), then train every target
    on `device` (resumable; see the module docstring for the default).

    `original_model` is the loaded original model, or its folder (read from disk layer by layer, see the module
    docstring), or None when every target is finished already. `targets` defaults to every layer of
    `shared_model` that shares its MLP. `layer_map` maps a layer of `shared_model` to the same layer of
    `original_model` where a plan dropped whole blocks (default: the same number). `original_dtype`: the dtype a
    folder's weights are rounded to as they are read (the one the shared model was loaded in; None: as stored).
    Returns `train_slw`'s results;
    `shared_model`'s recovery parameters are trained in place; `original_model` is not modified.
    """
    work_dir = Path(work_dir)
    targets = sorted(target_mlps(shared_model)) if targets is None else sorted(targets)
    if not targets:
        raise SharpError("the model shares no MLP, so SLW has nothing to train; pick a --strategy with targets")
    batches = list(batches)
    source = {t: (layer_map or {}).get(t, t) for t in targets}
    weight = next(shared_model.parameters())  # a folder is computed as the loaded model would: its dtype, device
    originals: dict = {}  # a resumed run whose layers are all done needs no original model (compress passes None)
    if isinstance(original_model, str | Path):  # a folder: each original MLP is read when its job starts
        originals = original_mlps(original_model, source, original_dtype)
    elif original_model is not None:
        originals = {t: get_adapter(original_model).mlp(original_model, source[t]) for t in targets}
    elif any(not is_done(_layer_dir(work_dir, t)) for t in targets):
        raise SharpError("SLW needs the original model for the layers it has not finished")
    if config.inputs == "original":
        pending = [t for t in targets if not is_done(_layer_dir(work_dir, t))]
        store = None
        if pending:  # a folder is computed as the loaded model would be: in its dtype, on its device
            store = capture_activations(original_model, batches, sorted(source.values()), work_dir / ACTIVATIONS,
                                        config.max_tokens, config.skip_positions, config.dtype, progress=progress,
                                        compute_dtype=weight.dtype, device=weight.device,
                                        storage_dtype=original_dtype)
        results = train_slw(shared_model, store, config, work_dir, targets, progress, originals=originals,
                            store_layers=source, device=device)
        _remove_activations(work_dir / ACTIVATIONS, config)
        return results
    results = {}
    for t in targets:  # sequential: each capture runs the shared model with every earlier target already fitted
        root = work_dir / ACTIVATIONS / f"layer_{t:03d}"
        store = None
        if not is_done(_layer_dir(work_dir, t)):
            original = originals[t]  # from a folder: only this target's original MLP is read, for this capture
            if isinstance(original, DiskModule):
                original = original.load(weight.dtype, weight.device)
            store = capture_activations(shared_model, batches, [t], root, config.max_tokens, config.skip_positions,
                                        config.dtype, progress=progress, outputs={t: original})
            del original
        results.update(train_slw(shared_model, store, config, work_dir, [t], progress, originals=originals,
                                 device=device))
        _remove_activations(root, config)
    _remove_activations(work_dir / ACTIVATIONS, config)
    return results


def train_slw(
    shared_model: nn.Module,
    store: ActivationStore | None,
    config: SLWConfig,
    work_dir: str | Path,
    targets: list[int] | None = None,
    progress: bool = True,
    originals: Mapping[int, nn.Module] | None = None,
    store_layers: Mapping[int, int] | None = None,
    _stop_after: int | None = None,
    device: torch.device | str | None = None,
) -> dict[int, dict]:
    """Train each target's recovery on its captured (x, y); load the results into `shared_model`.

    `originals` maps each target to its original MLP, needed by `init="closed-form"` (the input-side projections
    are fitted towards the target's own); `store_layers` maps a target to the layer its rows were captured under
    (default: the same number). Returns {layer: result} with rel_err_before / rel_err_init /
    rel_err_after (held-out), step, stopped_early, seconds and the eval curve. `_stop_after` ends each layer
    after that many steps in this call, leaving its state saved as a crash would (tests use it). Each layer
    trains on `device` (default: `config.device`, else where `shared_model` is), in float32.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    mlps = target_mlps(shared_model)
    targets = sorted(mlps) if targets is None else sorted(targets)
    for t in targets:
        if t not in mlps:
            raise SharpError(f"layer {t} does not share its MLP, so SLW cannot train it; targets: {sorted(mlps)}")
    adapter = get_adapter(shared_model)
    layers = adapter.layers(shared_model)
    device = torch.device(device or config.device or next(shared_model.parameters()).device)
    results: dict[int, dict] = {}
    jobs = []
    for t in targets:
        layer_dir = _layer_dir(work_dir, t)
        if is_done(layer_dir):
            results[t] = json.loads((layer_dir / RESULT).read_text())
            continue
        captured = (store_layers or {}).get(t, t)
        if store is None or captured not in store.layers:
            raise SharpError(f"no captured activations for layer {t}; run SLW with data (capture first)")
        if config.init == "closed-form" and originals is None:
            raise SharpError("SLW init 'closed-form' needs the original target MLPs (originals=...); "
                             "use init='lstsq' or 'zero' without them")
        post_norm = adapter.mlp_post_norm(layers[t])
        original = originals[t] if originals is not None else None
        if isinstance(original, nn.Module):  # frozen: a float32 CPU view where it is one already, no copy
            original = frozen_sharing_copy(original)
        jobs.append(LayerJob(  # the MLP copy shares the frozen reference weights, so N jobs hold 1 copy of them
            layer=t, store_layer=captured, mlp=frozen_sharing_copy(mlps[t]), projections=adapter.mlp_projs,
            store_root=store.root,
            config=config, layer_dir=str(layer_dir), log_path=str(work_dir / LOG), original=original,
            post_norm=frozen_sharing_copy(post_norm) if post_norm is not None else None,
            device=str(device), stop_after=_stop_after))
    if jobs:
        cpus = config.threads or len(os.sched_getaffinity(0))
        workers = min(config.workers, len(jobs))
        threads = max(1, cpus // workers)
        with LayerProgress(progress, [j.layer for j in jobs], config.steps) as bar:
            if config.backend == "ray":
                from sharp.recovery.slw_ray import train_ray

                results.update(train_ray(train_layer, jobs, threads, bar, config.ray_address, config.task_gpus))
            elif workers == 1:
                previous = torch.get_num_threads()
                try:
                    for job in jobs:
                        results[job.layer] = train_layer(job, threads, bar.report)
                finally:
                    torch.set_num_threads(previous)
            else:
                devices = [str(d) for d in worker_devices(device, workers)]  # a worker may take its own GPU
                results.update(train_parallel(train_layer, jobs, workers, threads, bar, devices))
    for t in targets:
        if is_done(_layer_dir(work_dir, t)):
            load_result(mlps[t], _layer_dir(work_dir, t))
    return {t: results[t] for t in targets if t in results and is_done(_layer_dir(work_dir, t))}


def _layer_dir(work_dir: Path, layer: int) -> Path:
    return Path(work_dir) / f"layer_{layer:03d}"


def _remove_activations(root: Path, config: SLWConfig) -> None:
    if not config.keep_activations and root.exists():
        shutil.rmtree(root)
