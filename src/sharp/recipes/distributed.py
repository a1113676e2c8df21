"""`sharp compress` under `torchrun` / `accelerate launch`: which process does what.

    every rank   loads the data and the model, shares it, runs the evaluations (same work, same numbers) and
                 trains SFT through the HF Trainer (DDP, or FSDP / DeepSpeed as `accelerate launch` configures)
    rank 0       alone holds the output lock, writes the work folder (stage timings, evaluations, log, SLW
                 layers, Trainer checkpoints) and the output; it runs SLW while the others wait for its files
                 (spread SLW itself over machines with `--slw-backend ray`)

Waiting on files rather than on a collective keeps a long SLW stage clear of the process group's timeout. A
single process (no `WORLD_SIZE` in the environment) takes every branch as rank 0 and never starts a process
group. Ranks come from the launcher's environment (`RANK`, `WORLD_SIZE`), the same variables the Trainer reads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from sharp.errors import SharpError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """All ranks meet here (a no-op in a single process); starts the process group the Trainer then reuses."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def wait_until(done: Callable[[], bool], what: str, poll: float = 2.0, timeout: float | None = None) -> None:
    """Poll `done` until it is true (rank 0 writing a file the other ranks need). No timeout by default: rank 0's
    SLW may take hours, and if rank 0 dies the launcher (torchrun's elastic agent, which `accelerate launch` runs)
    stops the waiting ranks with it."""
    start = time.monotonic()
    while not done():
        if timeout is not None and time.monotonic() - start > timeout:
            raise SharpError(f"rank {rank()} waited {timeout:.0f} s for {what}; did rank 0 fail?")
        time.sleep(poll)
