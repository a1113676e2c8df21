"""Single-layer warmup (SLW): fit each target's recovery to its original MLP, one layer at a time.

For a target layer t with captured inputs x (post-norm hidden states) and original outputs y (see
`activations.py`), SLW trains only the recovery parameters of t's MLP (the reference weights stay frozen) to
minimize the relative squared error

    loss = sum_i ||mlp_t(x_i) - y_i||^2 / sum_i ||y_i||^2          (loss="relative", per batch)
    loss = mean_i ||mlp_t(x_i) - y_i||^2 / ||y_i||^2                (loss="token")

Relative, so one learning rate fits every layer whatever its output scale (SmolLM2's last layer writes
outputs ~5x larger than its neighbours). Progress is reported as rel-err = sqrt(relative squared error) on
held-out tokens (the last `eval_tokens` captured rows of the layer, i.e. whole later sequences); rel-err 1.0
is as bad as outputting zeros.

Rows at positions < `sink_positions` (position 0 by default) form a second group with its own relative loss
term (weight `sink_weight`): some MLPs write a massive attention-sink activation there (SmolLM2's layer 11,
13x the residual), which must be reproduced or the whole model breaks, yet it would swamp the ordinary
tokens in one pooled L2 loss, and dropping it leaves the sink unfitted. Both errors are reported; early
stopping and the kept (best) state use the sum of the two held-out squared errors.

Before gradient descent, `init="lstsq"` sets the LoRA of the MLP's output projection (down_proj) to the
best rank-r correction in closed form: with h the intermediate activation the shared gate/up compute, it
solves min ||(W_ref + dW) h - y||^2 over rank-r dW (ridge + reduced-rank regression). This is the exact L2
optimum for the output projection given the reference gate/up, fitted on real activations (not on the
weights, which RESEARCH.md found useless), and is a much better start than zero.

Targets are independent: with `workers > 1` each layer trains in its own spawned process with
cores/workers torch threads (spawned children re-import the calling script, so a script calling this with
workers > 1 needs the usual `if __name__ == "__main__":` guard).
Every layer keeps its state in `work_dir/layer_NNN/`: `state.pt` every
`checkpoint_every` steps (recovery + optimizer + early-stopping state; batches are a pure function of
(seed, layer, step)), then `recovery.safetensors` + `result.json` when done. A rerun skips finished layers
and resumes unfinished ones from their last state, ending where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sharp.arch import get_adapter
from sharp.errors import SharpError
from sharp.io.atomic import replaced_file, write_text_atomic
from sharp.recovery.activations import DTYPES, ActivationStore, capture_activations
from sharp.recovery.lazy import frozen_sharing_copy
from sharp.recovery.slw_parallel import LayerProgress, train_parallel
from sharp.sharing.recovery import LoRARecovery, Recovery
from sharp.sharing.shared import SharedLinear

LOG = "slw_log.jsonl"
ACTIVATIONS = "activations"
LOSSES = ("relative", "token")
BACKENDS = ("local", "ray")
INITS = ("lstsq", "zero")


@dataclass
class SLWConfig:
    """Budget and optimizer of single-layer warmup (all per target layer unless said otherwise)."""

    steps: int = 300  # optimizer steps per layer (upper bound: early stopping may end sooner)
    lr: float = 1e-2  # peak AdamW lr; on SmolLM2 layer 19, 150 steps: 2e-3 -> rel-err 0.76, 5e-3 0.71, 1e-2 0.69
    batch_tokens: int = 1024  # captured tokens per step (sampled with replacement)
    warmup_steps: int = 10  # linear warmup, then cosine decay to lr * min_lr_ratio at `steps`
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    loss: str = "relative"  # see module docstring
    init: str = "lstsq"  # "lstsq": closed-form rank-r fit of down_proj's LoRA first; "zero": start at identity
    init_ridge: float = 1e-2  # ridge of the lstsq init, relative to the mean activation energy
    eval_every: int = 25  # steps between held-out evaluations (early stopping looks at these)
    patience: int = 4  # evaluations without a relative improvement > min_delta before stopping
    min_delta: float = 1e-3
    eval_tokens: int = 2048  # captured tokens held out per layer (at most a fifth of the capture)
    checkpoint_every: int = 50  # steps between saved states (resumption granularity)
    seed: int = 0
    workers: int = 1  # parallel layer trainers (processes); 1 trains in this process
    threads: int | None = None  # total torch threads across workers (default: the CPUs we may use)
    max_tokens: int | None = 32768  # cap on captured tokens per layer
    skip_positions: int = 0  # drop the first positions of each sequence entirely (not recommended, see sink_*)
    sink_positions: int = 1  # rows at positions < this (attention-sink tokens) are fitted as a separate group
    sink_weight: float = 1.0  # weight of the sink group's relative loss next to the other tokens'
    sink_batch: int = 32  # sink rows per step
    dtype: str = "float16"  # stored activations (float16/bfloat16 halve the disk of float32)
    keep_activations: bool = False  # keep the captured shards once every layer is trained
    backend: str = "local"  # "local": this process or `workers` processes; "ray": one Ray task per layer
    ray_address: str | None = None  # Ray cluster to join ("auto", "ray://host:10001"); None: a local instance
    task_gpus: float = 0  # GPUs per Ray task (0: CPU tasks with threads = CPUs / workers)

    def __post_init__(self) -> None:
        positive = ("steps", "batch_tokens", "eval_every", "eval_tokens", "checkpoint_every", "workers", "patience")
        for name in positive:
            if getattr(self, name) < 1:
                raise SharpError(f"SLW {name} must be at least 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise SharpError(f"SLW learning rate must be positive (got {self.lr})")
        if self.loss not in LOSSES:
            raise SharpError(f"unknown SLW loss '{self.loss}'; choose one of: {', '.join(LOSSES)}")
        if self.init not in INITS:
            raise SharpError(f"unknown SLW init '{self.init}'; choose one of: {', '.join(INITS)}")
        if self.backend not in BACKENDS:
            raise SharpError(f"unknown SLW backend '{self.backend}'; choose one of: {', '.join(BACKENDS)}")
        if self.task_gpus < 0:
            raise SharpError(f"SLW GPUs per task must be >= 0 (got {self.task_gpus})")
        if self.dtype not in DTYPES:
            raise SharpError(f"unknown SLW activation dtype '{self.dtype}'; choose one of: {', '.join(DTYPES)}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise SharpError(f"SLW max_tokens must be at least 2 (got {self.max_tokens})")

    @classmethod
    def from_dict(cls, d: Mapping) -> SLWConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise SharpError(f"unknown SLW setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)


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
    original_model: nn.Module | str | Path,
    shared_model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    config: SLWConfig,
    work_dir: str | Path,
    targets: list[int] | None = None,
    progress: bool = True,
) -> dict[int, dict]:
    """Capture the original model's target MLPs on `batches`, then train every target (resumable).

    `original_model` is the loaded original model, or its folder: then `lazy.capture_from_disk` reads its
    safetensors one decoder layer at a time (no copy of the model in memory; same activations).
    `targets` defaults to every layer of `shared_model` that shares its MLP. Returns `train_slw`'s results;
    `shared_model`'s recovery parameters are trained in place.
    """
    work_dir = Path(work_dir)
    targets = sorted(target_mlps(shared_model)) if targets is None else sorted(targets)
    if not targets:
        raise SharpError("the model shares no MLP, so SLW has nothing to train; pick a --strategy with targets")
    pending = [t for t in targets if not _done(_layer_dir(work_dir, t))]
    store = None
    if pending and isinstance(original_model, str | Path):  # a model folder: read one layer at a time
        from sharp.recovery.lazy import capture_from_disk

        weight = next(shared_model.parameters())  # compute as the loaded model would: its dtype, its device
        store = capture_from_disk(original_model, batches, targets, work_dir / ACTIVATIONS, config.max_tokens,
                                  config.skip_positions, config.dtype, progress=progress, compute_dtype=weight.dtype,
                                  device=weight.device)
    elif pending:
        store = capture_activations(original_model, batches, targets, work_dir / ACTIVATIONS, config.max_tokens,
                                    config.skip_positions, config.dtype, progress=progress)
    results = train_slw(shared_model, store, config, work_dir, targets=targets, progress=progress)
    if not config.keep_activations and (work_dir / ACTIVATIONS).exists():
        import shutil

        shutil.rmtree(work_dir / ACTIVATIONS)
    return results


def train_slw(
    shared_model: nn.Module,
    store: ActivationStore | None,
    config: SLWConfig,
    work_dir: str | Path,
    targets: list[int] | None = None,
    progress: bool = True,
    _stop_after: int | None = None,
) -> dict[int, dict]:
    """Train each target's recovery on its captured (x, y); load the results into `shared_model`.

    Returns {layer: result} with rel_err_before / rel_err_init / rel_err_after (held-out), steps, stopped_early,
    seconds and the eval curve. `_stop_after` ends each layer after that many steps in this call, leaving its
    state saved as a crash would (tests use it to simulate an interruption).
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    mlps = target_mlps(shared_model)
    targets = sorted(mlps) if targets is None else sorted(targets)
    for t in targets:
        if t not in mlps:
            raise SharpError(f"layer {t} does not share its MLP, so SLW cannot train it; targets: {sorted(mlps)}")
    adapter = get_adapter(shared_model)
    results: dict[int, dict] = {}
    jobs = []
    for t in targets:
        layer_dir = _layer_dir(work_dir, t)
        if _done(layer_dir):
            results[t] = json.loads((layer_dir / "result.json").read_text())
            continue
        if store is None or t not in store.layers:
            raise SharpError(f"no captured activations for layer {t}; run SLW with data (capture first)")
        jobs.append(_Job(t, frozen_sharing_copy(mlps[t]), store.root, store.shards(t), adapter.mlp_projs[-1],
                         asdict(config), str(layer_dir), str(work_dir / LOG), _stop_after))
    if jobs:
        cpus = config.threads or len(os.sched_getaffinity(0))
        workers = min(config.workers, len(jobs))
        threads = max(1, cpus // workers)
        with LayerProgress(progress, [j.layer for j in jobs], config.steps) as bar:
            if config.backend == "ray":
                from sharp.recovery.slw_ray import train_ray

                results.update(train_ray(_train_layer, jobs, threads, bar, config.ray_address, config.task_gpus))
            elif workers == 1:
                previous = torch.get_num_threads()
                try:
                    for job in jobs:
                        results[job.layer] = _train_layer(job, threads, bar.report)
                finally:
                    torch.set_num_threads(previous)
            else:
                results.update(train_parallel(_train_layer, jobs, workers, threads, bar))
    for t in targets:
        layer_dir = _layer_dir(work_dir, t)
        if _done(layer_dir):
            _load_recovery(mlps[t], layer_dir)
    return {t: results[t] for t in targets if t in results and _done(_layer_dir(work_dir, t))}


# --- one layer -------------------------------------------------------------------------------------------


@dataclass
class _Job:
    layer: int
    mlp: nn.Module  # a copy of the target MLP (reference weights + recovery), float32
    store_root: Path
    shards: list[Path]
    out_proj: str  # attribute of the MLP's output projection (down_proj)
    config: dict
    layer_dir: str
    log_path: str
    stop_after: int | None


def _train_layer(job: _Job, threads: int, report: Callable[..., None] | None = None) -> dict:
    """Train one target's recovery; everything it needs is in `job` (so it runs in any process)."""
    torch.set_num_threads(threads)
    cfg = SLWConfig.from_dict(job.config)
    layer_dir = Path(job.layer_dir)
    layer_dir.mkdir(parents=True, exist_ok=True)
    mlp = job.mlp.train()
    for p in mlp.parameters():
        p.requires_grad_(False)
    rec_modules = [m for m in mlp.modules() if isinstance(m, Recovery)]
    params = [p for m in rec_modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    store = ActivationStore(job.store_root)
    device = next(mlp.parameters()).device
    x, y = (t.to(device) for t in store.load(job.layer))  # (N, hidden) each, stored dtype
    pos = store.positions(job.layer).to(device)
    is_sink = (pos >= 0) & (pos < cfg.sink_positions)  # e.g. position 0: massive activations, own loss term
    xs, ys, x, y = x[is_sink], y[is_sink], x[~is_sink], y[~is_sink]
    if x.shape[0] < 10:
        raise SharpError(f"only {x.shape[0]} tokens were captured for layer {job.layer}; give SLW more data")
    n_eval = max(1, min(cfg.eval_tokens, x.shape[0] // 5))
    x_tr, y_tr, x_ev, y_ev = x[:-n_eval], y[:-n_eval], x[-n_eval:], y[-n_eval:]
    n_sink_eval = xs.shape[0] // 5 if xs.shape[0] >= 2 else 0
    xs_tr, ys_tr = xs[: xs.shape[0] - n_sink_eval], ys[: xs.shape[0] - n_sink_eval]
    xs_ev, ys_ev = xs[xs.shape[0] - n_sink_eval :], ys[xs.shape[0] - n_sink_eval :]

    def evaluate() -> tuple[float, float | None, float]:
        """(rel-err of ordinary tokens, rel-err of sink tokens, score = the loss's held-out value)."""
        err = _rel_err(mlp, x_ev, y_ev)
        sink = _rel_err(mlp, xs_ev, ys_ev) if n_sink_eval else None
        return err, sink, err**2 + (cfg.sink_weight * sink**2 if sink is not None else 0.0)

    start = time.perf_counter()

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if params else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg)) if optimizer else None
    state_path = layer_dir / "state.pt"
    if state_path.is_file():  # resume
        st = torch.load(state_path, weights_only=False)
        mlp.load_state_dict(st["mlp"], strict=False)
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        info, best_state = st["info"], st["best_state"]
        _log(job.log_path, {"event": "resume", "layer": job.layer, "step": info["step"]})
    else:
        before, sink_before, score_before = evaluate()
        init, sink_init, score = before, sink_before, score_before
        if cfg.init == "lstsq":
            identity = _recovery_state(mlp)
            _lstsq_init(mlp, getattr(mlp, job.out_proj), x_tr, y_tr, cfg.init_ridge)
            init, sink_init, score = evaluate()
            if init > before:  # the fit did not generalize (too few tokens): start from the identity
                # (compared on ordinary tokens only: it ignores the sink rows, which SGD then fits quickly)
                mlp.load_state_dict(identity, strict=False)
                init, sink_init, score = before, sink_before, score_before
        info = {"layer": job.layer, "rel_err_before": before, "rel_err_init": init, "step": 0, "best": score,
                "rel_err_after": init, "sink_rel_err_before": sink_before, "sink_rel_err_after": sink_init,
                "sink_tokens": int(xs.shape[0]),
                "best_step": 0, "bad_evals": 0, "stopped_early": False, "curve": [], "seconds": 0.0,
                "train_tokens": int(x_tr.shape[0]), "eval_tokens": int(n_eval),
                "params": sum(p.numel() for p in params)}
        best_state = _recovery_state(mlp)
        _log(job.log_path, {"event": "start", "layer": job.layer, "rel_err_before": before, "rel_err_init": init})
    steps_this_call = 0
    running = None
    while optimizer is not None and info["step"] < cfg.steps and not info["stopped_early"]:
        if job.stop_after is not None and steps_this_call >= job.stop_after:
            return info  # simulated crash: only the last periodic state survives
        step = info["step"]
        idx = torch.randint(x_tr.shape[0], (cfg.batch_tokens,), generator=_generator(cfg.seed, job.layer, step))
        idx = idx.to(device)
        loss = _loss(mlp(x_tr[idx].float()), y_tr[idx].float(), cfg.loss)
        if xs_tr.shape[0]:
            j = torch.randint(xs_tr.shape[0], (min(cfg.sink_batch, xs_tr.shape[0]),),
                              generator=_generator(cfg.seed + 1, job.layer, step)).to(device)
            loss = loss + cfg.sink_weight * _loss(mlp(xs_tr[j].float()), ys_tr[j].float(), "relative")
        if not torch.isfinite(loss):  # stop before the step: state.pt stays the last good state
            good = f"its last good state is {state_path}" if state_path.is_file() else "no state was saved yet"
            raise SharpError(f"SLW loss of layer {job.layer} became {loss.item()} at step {step + 1}; training "
                             f"stopped and {good}; lower the SLW learning rate or check the data")
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        info["step"] = step = step + 1
        steps_this_call += 1
        if step % cfg.eval_every == 0 or step == cfg.steps:
            err, sink, score = evaluate()
            point = {"step": step, "train_loss": running, "rel_err": err, "sink_rel_err": sink,
                     "lr": scheduler.get_last_lr()[0]}
            info["curve"].append(point)
            _log(job.log_path, {"event": "eval", "layer": job.layer, **point})
            if score < info["best"] * (1 - cfg.min_delta):
                info.update(best=score, best_step=step, bad_evals=0, rel_err_after=err, sink_rel_err_after=sink)
                best_state = _recovery_state(mlp)
            else:
                info["bad_evals"] += 1
                info["stopped_early"] = info["bad_evals"] >= cfg.patience
        if step % cfg.checkpoint_every == 0 and step < cfg.steps and not info["stopped_early"]:
            _save_state(state_path, mlp, optimizer, scheduler, info, best_state)
        if report is not None:
            report(job.layer, step, info["rel_err_after"])
    mlp.load_state_dict(best_state, strict=False)  # the best held-out state, not the last
    info["seconds"] += time.perf_counter() - start
    with replaced_file(layer_dir / "recovery.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in best_state.items()}, tmp)
    _write_json(layer_dir / "result.json", info)  # written last: marks the layer done
    state_path.unlink(missing_ok=True)
    _log(job.log_path, {"event": "done", "layer": job.layer, "rel_err_before": info["rel_err_before"],
                        "rel_err_after": info["rel_err_after"], "steps": info["step"],
                        "stopped_early": info["stopped_early"], "seconds": info["seconds"]})
    if report is not None:
        report(job.layer, info["step"], info["rel_err_after"], done=True)
    return info


def _schedule(cfg: SLWConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _generator(seed: int, layer: int, step: int) -> torch.Generator:
    """Batches depend on (seed, layer, step) only, so a resumed run draws the same batches."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer * 10_007 + step)


def _loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    err = (pred - target).pow(2).sum(-1)  # (n,)
    energy = target.pow(2).sum(-1)
    if kind == "token":
        return (err / energy.clamp_min(1e-6)).mean()
    return err.sum() / energy.sum().clamp_min(1e-12)


@torch.no_grad()
def _rel_err(mlp: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> float:
    """sqrt(sum ||mlp(x) - y||^2 / sum ||y||^2) over all rows, in chunks."""
    err = energy = 0.0
    for i in range(0, x.shape[0], chunk):
        yc = y[i : i + chunk].float()
        err += (mlp(x[i : i + chunk].float()) - yc).pow(2).sum().item()
        energy += yc.pow(2).sum().item()
    return math.sqrt(err / max(energy, 1e-12))


@torch.no_grad()
def _lstsq_init(mlp: nn.Module, out_proj: nn.Module, x: torch.Tensor, y: torch.Tensor, ridge: float,
                chunk: int = 4096) -> None:
    """Set the output projection's LoRA (B, A) to the rank-r minimizer of ||(W + BA) h - y||^2 + ridge.

    h is what reaches the output projection (input captured by a hook); r = the LoRA rank. Reduced-rank
    regression: dW* = R H^T (H H^T + lam I)^-1 with R = y - out(h), then project dW* onto the top-r principal
    directions of its fitted values dW* H, and split it as B = P sqrt(S), A = sqrt(S) Q^T.
    """
    lora = next((m for m in out_proj.modules() if isinstance(m, LoRARecovery)), None)
    if lora is None:  # no LoRA on the output projection (e.g. recovery "scale"): nothing to solve
        return
    captured: list[torch.Tensor] = []
    handle = out_proj.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    m_in = lora.in_features
    hh = torch.zeros(m_in, m_in, dtype=torch.float64)
    rh = torch.zeros(lora.out_features, m_in, dtype=torch.float64)
    try:
        for i in range(0, x.shape[0], chunk):
            captured.clear()
            yc = y[i : i + chunk].float()
            residual = yc - mlp(x[i : i + chunk].float())  # (n, out): what the recovery must add
            h = captured[0].reshape(-1, m_in)  # (n, in)
            hh += (h.T @ h).double()
            rh += (residual.T @ h).double()
    finally:
        handle.remove()
    lam = ridge * hh.diagonal().mean().clamp_min(1e-12)
    dw = torch.linalg.solve(hh + lam * torch.eye(m_in, dtype=hh.dtype), rh.T).T  # (out, in)
    fitted_cov = dw @ hh @ dw.T  # (out, out) = (dW H)(dW H)^T
    _, vecs = torch.linalg.eigh(fitted_cov)
    top = vecs[:, -lora.rank :]  # (out, r)
    dw_r = top @ (top.T @ dw)
    u, s, vh = torch.linalg.svd(dw_r, full_matrices=False)
    r = lora.rank
    root = s[:r].sqrt()
    lora.lora_B.copy_((u[:, :r] * root).to(lora.lora_B.dtype))
    lora.lora_A.copy_((root[:, None] * vh[:r]).to(lora.lora_A.dtype))


def _recovery_state(mlp: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in mlp.state_dict().items() if ".recovery." in f".{k}"}


def _save_state(path: Path, mlp, optimizer, scheduler, info: dict, best_state: dict) -> None:
    with replaced_file(path) as tmp:
        torch.save({"mlp": _recovery_state(mlp), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "info": info, "best_state": best_state}, tmp)


def _load_recovery(mlp: nn.Module, layer_dir: Path) -> None:
    state = load_file(layer_dir / "recovery.safetensors")
    expected = set(_recovery_state(mlp))
    if set(state) != expected:
        raise SharpError(f"'{layer_dir}' holds recovery for another configuration; delete the SLW work dir")
    ref = mlp.state_dict()
    mlp.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()}, strict=False)


def _layer_dir(work_dir: Path, layer: int) -> Path:
    return Path(work_dir) / f"layer_{layer:03d}"


def _done(layer_dir: Path) -> bool:
    return (layer_dir / "result.json").is_file() and (layer_dir / "recovery.safetensors").is_file()


def _write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _log(path: str, record: dict) -> None:
    """Append one JSON line (small single writes in append mode stay whole across worker processes)."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
