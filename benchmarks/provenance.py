"""What a results file records about the code it measured: the commit, marked dirty when src/ differs from it."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_rev() -> str:
    """HEAD's short hash, with "-dirty" when src/ has uncommitted changes (the code a run imported); "unknown"
    outside a git checkout."""
    try:
        git = ["git", "-C", str(ROOT)]
        head = subprocess.check_output([*git, "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output([*git, "status", "--porcelain", "src"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")
