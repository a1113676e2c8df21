"""Atomic output folders: write into a temporary sibling, then rename into place.

A run killed at any moment leaves either the previous folder or nothing, never a half-written result. The
write holds `output_lock(out)`, so two runs never publish into the same folder at once; the next write to `out`
removes the hidden leftovers of a killed one (and puts back a previous folder a kill caught mid-swap).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sharp.errors import SharpError


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any work) if `out` can't be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SharpError(f"output '{out}' exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SharpError(f"output folder '{out}' exists and is not empty; pass --overwrite or choose another --out")
    _check_place(out, "--out")
    return out


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """`check_output_dir` for a single output file (a report, a JSON): fail before the work, not after it."""
    path = Path(path)
    if path.is_dir():
        raise SharpError(f"{flag} '{path}' is a folder; give a file name")
    _check_place(path, flag)
    return path


def _check_place(path: Path, flag: str) -> None:
    """The nearest existing folder above `path` is a folder that files can be created in."""
    probe = path.absolute().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SharpError(f"cannot create {flag} '{path}': '{probe}' is a file, not a folder; choose another {flag}")
    if (reason := _write_error(probe)) is not None:
        raise SharpError(f"cannot write {flag} '{path}' in '{probe}' ({reason}); choose a place you can write to")


def _write_error(folder: Path) -> str | None:
    """Why a file cannot be created in `folder` (None: it can). A real write, not os.access: root, read-only
    mounts and pseudo file systems all answer truly."""
    try:
        fd, name = tempfile.mkstemp(prefix=".sharp-write-test-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out` in one rename."""
    from sharp.io.lock import output_lock

    out = check_output_dir(out, overwrite)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        _clean_leftovers(out)
        out = check_output_dir(out, overwrite)  # again: another run may have published it meanwhile
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.absolute().parent))
        try:
            yield tmp
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other folder
            for f in tmp.rglob("*"):  # make the data durable before the rename publishes it
                if f.is_file():
                    os.chmod(f, 0o666 & ~umask)
                    with open(f, "rb+") as fh:
                        os.fsync(fh.fileno())
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.absolute().parent))
                os.replace(out, old / "x")
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _clean_leftovers(out: Path) -> None:
    """Hidden siblings a killed write left (we hold the lock, so no live writer owns them): temp folders,
    including those of a save nested in one, are removed; a previous folder caught mid-swap is put back."""
    parent = out.absolute().parent
    for old in sorted(parent.glob(f".{glob.escape(out.name)}.old-*")):
        if not out.exists() and (old / "x").is_dir():
            os.replace(old / "x", out)
        shutil.rmtree(old, ignore_errors=True)
    for pattern in (f".{glob.escape(out.name)}.tmp-*", f"..{glob.escape(out.name)}.tmp-*"):
        for tmp in parent.glob(pattern):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # the lock file of a killed nested save
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replaced_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, so a reader (or a
    kill) sees the old file or the new one, never half of one. On failure the temporary file is removed."""
    path = Path(path)
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.absolute().parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`Path.write_text`, but all or nothing (see `replaced_file`)."""
    with replaced_file(path) as tmp:
        tmp.write_text(text)


def append_json_line(path: str | os.PathLike, row: dict) -> None:
    """Append `row` to a JSONL log as one line: a single small write in append mode stays whole even when several
    processes append to the same file, and a kill cuts off at most the last line (the readers drop it)."""
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True, default=str) + "\n")


def work_dir_of(out: str | os.PathLike) -> Path:
    """`OUT.work` beside `out`: where a command that trains keeps what it resumes from until `out` is written."""
    out = Path(out).absolute()
    return out.parent / f"{out.name}.work"


def refuse_foreign_work_dir(work: Path) -> None:
    """Refuse a `work` that sharp did not make: not a folder, or holding files but no run.json."""
    if work.exists() and (not work.is_dir() or (not (work / "run.json").is_file() and any(work.iterdir()))):
        raise SharpError(f"'{work}' exists and is not a sharp work folder (no run.json); move it away or choose "
                         "another --out")
