"""`manifest.json`: the sha256 and size of every file of a folder sharp saved, and the check of a folder against it.

A sharp checkpoint's manifest also records the base identity and `adapter_only`, so `sharp verify` can tell a
complete checkpoint from one that lost a file, and a manifest from another checkpoint is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from sharp.io.atomic import write_text_atomic
from sharp.io.formats import MANIFEST, RECOVERY, SHARP_CONFIG, WEIGHTS, is_adapter_only


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder (0 for a missing path)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


@torch.no_grad()
def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of named tensors: sorted names, dtypes, shapes and raw bytes."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """sha256 and size of every file, plus (for a sharp checkpoint) the base identity and `adapter_only`."""
    folder = Path(folder)
    files = {
        f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        for f in sorted(folder.iterdir())
        if f.is_file() and f.name != MANIFEST
    }
    manifest: dict = {"files": files}
    if (folder / SHARP_CONFIG).is_file():
        try:
            manifest["base"] = json.loads((folder / SHARP_CONFIG).read_text()).get("base")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            manifest["base"] = None  # load refuses such a config itself
        manifest["adapter_only"] = is_adapter_only(folder)
    # a rewrite (compress adds files) never leaves half a manifest
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def verify_manifest(folder: str | os.PathLike, hashes: bool = True) -> list[str]:
    """Problems found in `folder` against its manifest (empty list = intact)."""
    folder = Path(folder)
    try:
        full = json.loads((folder / MANIFEST).read_text())
        manifest = full["files"]
        entries = [(str(name), int(e["bytes"]), str(e["sha256"])) for name, e in sorted(manifest.items())]
    except FileNotFoundError:
        return [f"{MANIFEST} is missing"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError):
        return [f"{MANIFEST} is unreadable"]
    problems = []
    for name, size, sha in entries:
        f = folder / name
        if Path(name).name != name or name == MANIFEST:
            problems.append(f"{MANIFEST} lists an invalid file name '{name}'")
        elif not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{name} has {f.stat().st_size} bytes, expected {size} (truncated?)")
        elif hashes and sha256_file(f) != sha:
            problems.append(f"{name} does not match its sha256 (corrupted)")
    if (folder / SHARP_CONFIG).is_file():
        for required in (SHARP_CONFIG, RECOVERY, "config.json"):
            if required not in manifest:
                problems.append(f"{MANIFEST} does not list {required}")
        if WEIGHTS not in manifest and not full.get("adapter_only", False):
            problems.append(f"{MANIFEST} does not list {WEIGHTS}")
        if not problems and "base" in full:
            try:
                recorded = json.loads((folder / SHARP_CONFIG).read_text()).get("base")
            except (OSError, json.JSONDecodeError, AttributeError):
                recorded = None
            if recorded != full["base"]:
                problems.append(f"the base identity in {MANIFEST} differs from {SHARP_CONFIG}")
    return problems
