"""`python -m sharp.cli` is the `sharp` command (also what `accelerate launch -m sharp.cli` runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import sharp

SRC = str(Path(sharp.__file__).resolve().parents[1])


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "sharp.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_python_m_sharp_cli_lists_the_commands() -> None:
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    assert all(verb in proc.stdout for verb in ("compress", "share", "eval", "prune"))


def test_python_m_sharp_cli_reports_user_errors_like_sharp() -> None:
    """Through `main()`: a user error is one line and exit code 2, not a traceback."""
    proc = _run("prune", "some-model", "--method", "width", "--budget", "forty", "--out", "unused")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: malformed --budget 'forty'"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_warnings_print_as_one_line_each_through_main() -> None:
    """A warning raised while a command runs is one `warning:` line, not Python's file / line / source lines."""
    code = ("import sys, warnings; from sharp.cli.app import app, main; "
            "app.command('warn-twice')(lambda: [warnings.warn('first\\nsecond line', UserWarning), "
            "warnings.warn('another', DeprecationWarning)]); sys.argv = ['sharp', 'warn-twice']; main()")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])),
           "PYTHONWARNINGS": "always"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["warning: first", "warning: another"], proc.stderr
