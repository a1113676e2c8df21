"""SLW's target layers as Ray tasks: one task per target layer, on a local Ray instance or an existing cluster.

Targets are independent, so each layer's job (the picklable job and module-level train function that the local
backend runs in its own processes, `slw_parallel.py`) becomes one Ray task with `cpus` CPUs or `gpus` GPUs. The
job carries paths, not activations: a task reads its layer's captured shards from the capture folder (written
once by the capture; on several machines it must be a shared path) and saves its layer state next to them, so
a task that Ray retries after a worker or node died resumes from that layer's last saved state.

Ray is optional (`pip install 'sharp-llm[ray]'`) and imported only here. `address=None` starts a local Ray
instance (and stops it afterwards); `"auto"` or `"ray://host:10001"` joins a running cluster. Workers must be
able to import `sharp`: installed on every node, or shipped with the driver's `PYTHONPATH`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from sharp.errors import SharpError

RETRIES = 3  # re-runs of a task whose worker or node died (application errors, e.g. a NaN loss, are not retried)


def _ray_task(train: Callable, job, threads: int, device: str | None) -> dict:
    """Runs inside a Ray worker: train the job on the task's device (its GPU when it has one), like the local
    backend."""
    if device is not None:
        job.device = device
    return train(job, threads, None)


def train_ray(train: Callable, jobs: list, threads: int, bar, address: str | None = None, gpus: float = 0,
              retries: int = RETRIES) -> dict[int, dict]:
    """{job.layer: train(job, threads, None)} with each job a Ray task; `bar` gets each layer when it finishes.

    Each task reserves `threads` CPUs (and `gpus` GPUs when > 0, the job then on `cuda`); Ray runs as many at
    once as the cluster's resources allow.
    """
    try:
        import ray
    except ImportError:
        raise SharpError("--slw-backend ray needs Ray: pip install 'sharp-llm[ray]'") from None

    started = False
    if not ray.is_initialized():
        env = {"env_vars": {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}
        try:
            ray.init(address=address, runtime_env=env, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise SharpError(f"cannot start or reach Ray at {address or 'a local instance'}: {e}") from None
        started = True
    try:
        task = ray.remote(_ray_task).options(num_cpus=threads, num_gpus=gpus, max_retries=retries)
        device = "cuda" if gpus > 0 else None
        pending = {task.remote(train, job, threads, device): job.layer for job in jobs}
        results: dict[int, dict] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            layer = pending.pop(done[0])
            try:
                results[layer] = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:  # the task's own exception (a SharpError keeps its line)
                for ref in pending:
                    ray.cancel(ref)
                cause = getattr(e, "cause", None)
                if isinstance(cause, SharpError):
                    raise SharpError(str(cause)) from None
                raise
            info = results[layer]
            bar.report(layer, info.get("step", 0), info.get("rel_err_after", float("nan")), done=True)
        return results
    finally:
        if started:
            ray.shutdown()
