"""SLW for one target layer, in small pieces: data split, init, the training loop, early stopping, persistence.

`train_layer(job, threads, report)` is what a worker runs (in this process, a spawned one or a Ray task); the
`LayerJob` carries everything it needs. See `slw.py` for the method and the settings.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sharp.errors import SharpError
from sharp.io.atomic import append_json_line, replaced_file, write_text_atomic
from sharp.recovery.activations import ActivationStore
from sharp.recovery.closed_form import fit_mlp, fittable
from sharp.recovery.lazy import DiskModule
from sharp.recovery.slw_config import SLWConfig
from sharp.sharing.recovery import Recovery
from sharp.sharing.shared import SharedLinear

RESULT = "result.json"
RECOVERY = "recovery.safetensors"
STATE = "state.pt"


@dataclass
class LayerJob:
    """One target's SLW: copies of its shared MLP (trained in place) and of what it is fitted to."""

    layer: int
    store_layer: int  # the layer its rows were captured under (differs from `layer` after dropped blocks)
    mlp: nn.Module  # the target's shared MLP (reference weights + recovery), float32
    projections: tuple[str, ...]  # the MLP's projection attributes, output projection last
    store_root: Path
    config: SLWConfig
    layer_dir: str
    log_path: str
    original: nn.Module | DiskModule | None = None  # the target's original MLP (closed-form fit of the input
    # projections); a DiskModule is read from the model folder when the job starts
    post_norm: nn.Module | None = None  # the target's norm after its MLP (Gemma3): fitted quantity = norm(mlp(x))
    device: str = "cpu"
    stop_after: int | None = None  # tests: end after that many steps in this call, as a crash would


# --- data -------------------------------------------------------------------------------------------------


@dataclass
class Rows:
    """A layer's captured rows, split at random into train / held-out, ordinary and attention-sink rows."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    sink_train: tuple[torch.Tensor, torch.Tensor]
    sink_eval: tuple[torch.Tensor, torch.Tensor]


def split_rows(x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor, cfg, layer: int) -> Rows:
    """Rows at positions < sink_positions form their own group; each group loses a random held-out share
    (ordinary: min(eval_tokens, N / 5) rows; sink: a fifth), drawn with a generator seeded by (seed, layer)."""
    is_sink = (pos >= 0) & (pos < cfg.sink_positions)
    xs, ys, x, y = x[is_sink], y[is_sink], x[~is_sink], y[~is_sink]
    if x.shape[0] < 10:
        raise SharpError(f"only {x.shape[0]} tokens were captured for layer {layer}; give SLW more data")
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + layer)
    order = torch.randperm(x.shape[0], generator=g)
    n_eval = max(1, min(cfg.eval_tokens, x.shape[0] // 5))
    ev, tr = order[:n_eval].sort().values, order[n_eval:].sort().values
    sink_order = torch.randperm(xs.shape[0], generator=g)
    n_sink = xs.shape[0] // 5 if xs.shape[0] >= 2 else 0
    sev, stri = sink_order[:n_sink].sort().values, sink_order[n_sink:].sort().values
    return Rows(x[tr], y[tr], x[ev], y[ev], (xs[stri], ys[stri]), (xs[sev], ys[sev]))


# --- the fitted quantity and its error --------------------------------------------------------------------


def fitted(job: LayerJob, out: torch.Tensor) -> torch.Tensor:
    """What the layer adds to the residual: the MLP output, or norm(MLP output) where a post-norm follows it."""
    return job.post_norm(out) if job.post_norm is not None else out


def loss_fn(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    err = (pred - target).pow(2).sum(-1)  # (n,)
    energy = target.pow(2).sum(-1)
    if kind == "token":
        return (err / energy.clamp_min(1e-6)).mean()
    return err.sum() / energy.sum().clamp_min(1e-12)


@torch.no_grad()
def rel_err(job: LayerJob, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> float:
    """sqrt(sum ||f(mlp(x)) - f(y)||^2 / sum ||f(y)||^2) over all rows, in chunks (f: `fitted`)."""
    err = energy = 0.0
    for i in range(0, x.shape[0], chunk):
        yc = fitted(job, y[i : i + chunk].float())
        err += (fitted(job, job.mlp(x[i : i + chunk].float())) - yc).pow(2).sum().item()
        energy += yc.pow(2).sum().item()
    return math.sqrt(err / max(energy, 1e-12))


@dataclass
class Score:
    """Held-out errors: ordinary tokens, sink tokens (None without any), and the early-stopping score."""

    err: float
    sink: float | None
    value: float  # err^2 + sink_weight * sink^2
    in_bounds: bool = True

    @property
    def objective(self) -> float:
        """What the init's choice and early stopping minimize: the value, or inf out of bounds (never kept)."""
        return self.value if self.in_bounds else math.inf


def evaluate(job: LayerJob, rows: Rows, sink_weight: float) -> Score:
    """A gated target can always fall back to its deleted MLP, so for it a state worse than that on either group
    (rel-err > 1) is out of bounds: never kept, whatever the sink weight trades."""
    err = rel_err(job, rows.x_eval, rows.y_eval)
    sink = rel_err(job, *rows.sink_eval) if rows.sink_eval[0].shape[0] else None
    value = err**2 + (sink_weight * sink**2 if sink is not None else 0.0)
    in_bounds = err <= 1 + 1e-6 and (sink is None or sink <= 1 + 1e-6)  # False for NaN too
    return Score(err, sink, value, in_bounds=in_bounds or not has_gate(job))


# --- init -------------------------------------------------------------------------------------------------


def recovery_state(mlp: nn.Module) -> dict[str, torch.Tensor]:
    """The recovery tensors of an MLP, by name (found by type)."""
    return {f"{n}.{k}": v.detach().clone() for n, m in mlp.named_modules() if isinstance(m, Recovery)
            for k, v in m.state_dict().items()}


def load_recovery_state(mlp: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for n, m in mlp.named_modules():
        if isinstance(m, Recovery):
            m.load_state_dict({k: state[f"{n}.{k}"].to(v.dtype) for k, v in m.state_dict().items()})


def has_gate(job: LayerJob) -> bool:
    """Whether the output projection's recovery has a gate (so the MLP can be turned off)."""
    out = getattr(job.mlp, job.projections[-1])
    return isinstance(out, SharedLinear) and fittable(out.recovery)[0]


def deleted_state(job: LayerJob) -> dict[str, torch.Tensor] | None:
    """The recovery state that turns the MLP's output off (gate 0, no correction on the output projection), or
    None when the output projection has no gate."""
    if not has_gate(job):
        return None
    state = recovery_state(job.mlp)
    prefix = f"{job.projections[-1]}.recovery."
    for k in state:
        if k.startswith(prefix) and k.rsplit(".", 1)[-1] in ("gate", "lora_B"):
            state[k] = torch.zeros_like(state[k])
    return state


def initialize(job: LayerJob, rows: Rows, cfg) -> dict:
    """Apply `cfg.init` and keep, among the identity (Direct Sharing), the fit(s) and (with a gate) the deleted
    MLP, the state with the best held-out score. Returns the init report.

    closed-form also tries lstsq's fit (the output projection alone, on the reference's own features): moving
    gate/up towards the target's projections can leave features the output projection reads worse than the
    reference's (SmolLM2, lora:64 without a gate: docs/results/recovery_ablation_smollm2.md's second row), so the
    held-out score decides per layer."""
    identity = recovery_state(job.mlp)
    candidates = {"identity": identity}
    report: dict = {}
    if cfg.init != "zero":
        chunk = 8192
        xs = torch.cat([rows.x_train, rows.sink_train[0]])
        ys = torch.cat([rows.y_train, rows.sink_train[1]])
        chunks = [(xs[i : i + chunk].float(), ys[i : i + chunk].float()) for i in range(0, xs.shape[0], chunk)]
        report["fit"] = fit_mlp(job.mlp, job.original, job.projections if cfg.init == "closed-form"
                                else job.projections[-1:], chunks, cfg.damping, cfg.fit_iters)
        candidates["fit"] = recovery_state(job.mlp)
        if cfg.init == "closed-form" and len(report["fit"]) > 1:  # something besides the output was fitted
            load_recovery_state(job.mlp, identity)
            report["fit_output"] = fit_mlp(job.mlp, job.original, job.projections[-1:], chunks, cfg.damping,
                                           cfg.fit_iters)
            candidates["fit_output"] = recovery_state(job.mlp)
    if (deleted := deleted_state(job)) is not None:
        candidates["deleted"] = deleted
    scores = {}
    for name, state in candidates.items():
        load_recovery_state(job.mlp, state)
        scores[name] = evaluate(job, rows, cfg.sink_weight)
    best = min(scores, key=lambda n: scores[n].objective)
    load_recovery_state(job.mlp, candidates[best])
    report.update(chosen=best, **{f"score_{n}": s.value for n, s in scores.items()},
                  **{f"errors_{n}": [s.err, s.sink] for n, s in scores.items()})
    if out := [n for n, s in scores.items() if not s.in_bounds]:
        report["out_of_bounds"] = out  # worse than the deleted MLP on ordinary or sink rows
    return {"report": report, "before": scores["identity"], "init": scores[best]}


# --- persistence ------------------------------------------------------------------------------------------


def is_done(layer_dir: Path) -> bool:
    return (layer_dir / RESULT).is_file() and (layer_dir / RECOVERY).is_file()


def save_result(layer_dir: Path, best_state: dict, info: dict) -> None:
    with replaced_file(layer_dir / RECOVERY) as tmp:
        save_file({k: v.contiguous() for k, v in best_state.items()}, tmp)
    write_text_atomic(layer_dir / RESULT, json.dumps(info, indent=2, sort_keys=True) + "\n")  # last: marks it done
    (layer_dir / STATE).unlink(missing_ok=True)


def load_result(mlp: nn.Module, layer_dir: Path) -> None:
    """Load a finished layer's recovery into `mlp` (refused when it was made for another configuration)."""
    state = load_file(layer_dir / RECOVERY)
    if set(state) != set(recovery_state(mlp)):
        raise SharpError(f"'{layer_dir}' holds recovery for another configuration; delete the SLW work dir")
    load_recovery_state(mlp, state)


# --- training ---------------------------------------------------------------------------------------------


@dataclass
class EarlyStopping:
    """Keeps the best held-out state; stops after `patience` evaluations without a relative gain > min_delta."""

    best: float
    best_state: dict
    patience: int
    min_delta: float
    bad_evals: int = 0

    def update(self, score: float, state: Callable[[], dict]) -> bool:
        """Record an evaluation; True if it is the new best."""
        if score < self.best * (1 - self.min_delta):
            self.best, self.best_state, self.bad_evals = score, state(), 0
            return True
        self.bad_evals += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad_evals >= self.patience


def schedule(cfg) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batch_generator(seed: int, layer: int, step: int) -> torch.Generator:
    """Batches depend on (seed, layer, step) only, so a resumed run draws the same batches."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer * 10_007 + step)


def train_layer(job: LayerJob, threads: int, report: Callable[..., None] | None = None) -> dict:
    """Fit one target's recovery (init, then AdamW on the L2 loss); resumable from `layer_dir/state.pt`."""
    torch.set_num_threads(threads)
    cfg = job.config
    layer_dir = Path(job.layer_dir)
    layer_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(job.device)
    if isinstance(job.original, DiskModule):  # read in the worker, so only running jobs hold an original MLP
        job.original = job.original.load(torch.float32, device)
    for module in (job.mlp, job.original, job.post_norm):
        if module is not None:
            module.to(device).requires_grad_(False)
    mlp = job.mlp.train()
    params = [p for m in mlp.modules() if isinstance(m, Recovery) for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    store = ActivationStore(job.store_root)
    x, y = (t.to(device) for t in store.load(job.store_layer))  # (N, hidden) each, stored dtype
    rows = split_rows(x, y, store.positions(job.store_layer).to(device), cfg, job.layer)
    del x, y
    start = time.perf_counter()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if params else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(cfg)) if optimizer else None
    state_path = layer_dir / STATE
    if state_path.is_file():  # resume
        st = torch.load(state_path, weights_only=False, map_location=device)  # saved on any device
        load_recovery_state(mlp, st["mlp"])
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        info, stopper = st["info"], st["stopper"]
        append_json_line(job.log_path, {"event": "resume", "layer": job.layer, "step": info["step"]})
    else:
        init = initialize(job, rows, cfg)
        before, chosen = init["before"], init["init"]
        info = {"layer": job.layer, "step": 0, "init": init["report"],
                "rel_err_before": before.err, "sink_rel_err_before": before.sink,
                "rel_err_init": chosen.err, "sink_rel_err_init": chosen.sink,
                "rel_err_after": chosen.err, "sink_rel_err_after": chosen.sink, "best_step": 0,
                "stopped_early": False, "curve": [], "seconds": 0.0, "sink_tokens": int(rows.sink_train[0].shape[0]
                                                                                         + rows.sink_eval[0].shape[0]),
                "train_tokens": int(rows.x_train.shape[0]), "eval_tokens": int(rows.x_eval.shape[0]),
                "params": sum(p.numel() for p in params)}
        stopper = EarlyStopping(chosen.objective, recovery_state(mlp), cfg.patience, cfg.min_delta)
        append_json_line(job.log_path, {"event": "start", "layer": job.layer, "rel_err_before": before.err,
                           "rel_err_init": chosen.err, "init": init["report"].get("chosen")})
    steps_this_call = 0
    running = None
    x_tr, y_tr = rows.x_train, rows.y_train
    xs_tr, ys_tr = rows.sink_train
    while optimizer is not None and info["step"] < cfg.steps and not info["stopped_early"]:
        if job.stop_after is not None and steps_this_call >= job.stop_after:
            return info  # simulated crash: only the last periodic state survives
        step = info["step"]
        idx = torch.randint(x_tr.shape[0], (cfg.batch_tokens,), generator=batch_generator(cfg.seed, job.layer, step))
        idx = idx.to(device)
        loss = loss_fn(fitted(job, mlp(x_tr[idx].float())), fitted(job, y_tr[idx].float()), cfg.loss)
        if xs_tr.shape[0]:
            j = torch.randint(xs_tr.shape[0], (min(cfg.sink_batch, xs_tr.shape[0]),),
                              generator=batch_generator(cfg.seed + 1, job.layer, step)).to(device)
            sink = loss_fn(fitted(job, mlp(xs_tr[j].float())), fitted(job, ys_tr[j].float()), "relative")
            loss = loss + cfg.sink_weight * sink
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
            score = evaluate(job, rows, cfg.sink_weight)
            point = {"step": step, "train_loss": running, "rel_err": score.err, "sink_rel_err": score.sink,
                     "lr": scheduler.get_last_lr()[0]}
            info["curve"].append(point)
            append_json_line(job.log_path, {"event": "eval", "layer": job.layer, **point})
            if stopper.update(score.objective, lambda: recovery_state(mlp)):
                info.update(best_step=step, rel_err_after=score.err, sink_rel_err_after=score.sink)
            info["stopped_early"] = stopper.stop
        if step % cfg.checkpoint_every == 0 and step < cfg.steps and not info["stopped_early"]:
            with replaced_file(state_path) as tmp:
                torch.save({"mlp": recovery_state(mlp), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "info": info, "stopper": stopper}, tmp)
        if report is not None:
            report(job.layer, step, info["rel_err_after"])
    load_recovery_state(mlp, stopper.best_state)  # the best held-out state, not the last
    info["seconds"] += time.perf_counter() - start
    save_result(layer_dir, stopper.best_state, info)
    append_json_line(job.log_path, {"event": "done", "layer": job.layer, "rel_err_before": info["rel_err_before"],
                       "rel_err_after": info["rel_err_after"], "steps": info["step"],
                       "stopped_early": info["stopped_early"], "seconds": info["seconds"]})
    if report is not None:
        report(job.layer, info["step"], info["rel_err_after"], done=True)
    return info
