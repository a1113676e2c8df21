"""SLW's layers trained in parallel processes, with one progress bar per layer.

Targets are independent, so each runs in its own spawned process (`torch.multiprocessing`: tensors cross by
shared memory); each worker takes one device from `devices` when it starts (SLW spreads them over the visible
GPUs) and trains its jobs there; workers report (layer, step, best rel-err) through a queue that a thread in the
parent drains into the progress bars.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_QUEUE = None
_DEVICE: str | None = None


def _init_worker(queue, devices) -> None:
    global _QUEUE, _DEVICE
    _QUEUE = queue
    _DEVICE = devices.get() if devices is not None else None


def _worker_report(layer: int, step: int, best: float, done: bool = False) -> None:
    _QUEUE.put((layer, step, best, done))


def _worker_main(train: Callable, job, threads: int) -> dict:
    if _DEVICE is not None:
        job.device = _DEVICE
    return train(job, threads, _worker_report)


def train_parallel(train: Callable, jobs: list, workers: int, threads: int, bar: LayerProgress,
                   devices: list[str] | None = None) -> dict[int, dict]:
    """{job.layer: train(job, threads, report)} with each job in a spawned process; `train` must be a
    module-level function (it is pickled by name). `devices` (one per worker) sets `job.device` of the jobs each
    worker runs."""
    from concurrent.futures import ProcessPoolExecutor

    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    queue = ctx.Queue()
    device_queue = None
    if devices is not None:
        device_queue = ctx.Queue()
        for d in devices:
            device_queue.put(d)
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                bar.report(*queue.get(timeout=0.2))
            except Exception:  # queue.Empty, or the queue closing at shutdown
                continue

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(queue, device_queue)) as pool:
            futures = {job.layer: pool.submit(_worker_main, train, job, threads) for job in jobs}
            return {layer: f.result() for layer, f in futures.items()}
    finally:
        stop.set()
        reader.join()


class LayerProgress:
    """One rich progress bar per layer (steps, best held-out rel-err so far)."""

    def __init__(self, enabled: bool, layers: list[int], steps: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("rel-err {task.fields[err]}"), TimeElapsedColumn(),
                                 disable=not enabled)
        self.tasks = {layer: self.progress.add_task(f"SLW layer {layer}", total=steps, err="-") for layer in layers}
        self.lock = threading.Lock()

    def report(self, layer: int, step: int, best: float, done: bool = False) -> None:
        with self.lock:
            total = step if done else None
            self.progress.update(self.tasks[layer], completed=step, total=total, err=f"{best:.3f}")

    def __enter__(self) -> LayerProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)
