"""A lock file that stops two runs writing the same output folder.

`fcntl.flock` is released by the kernel when the holder dies (even by SIGKILL), so a crashed run never
leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from sharp.errors import SharpError


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold `.<name>.lock` beside `out` for the duration of the block (the file is removed afterwards)."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise SharpError(f"'{out}' is being written by {holder}; wait for it or choose another --out") from None
        try:  # the holder we waited on may have removed the file: then lock the new one
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield lock_path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # while still locked, so no one else holds this inode
        os.close(fd)
