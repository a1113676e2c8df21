"""The import-linter contracts of `make lint` hold, and they catch an upward import or an import circle (so they
can fail)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint(src: Path) -> subprocess.CompletedProcess:
    tool = Path(sys.executable).with_name("lint-imports")
    if not tool.is_file():
        pytest.skip("optional: import-linter is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(tool), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=src, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers():
    result = _lint(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "upward"), [
    ("sharing/shared.py", "from sharp.io.models import load_model"),  # sharing must not load models
    ("io/checkpoint.py", "    from sharp.recovery.slw import SLWConfig"),  # a function-local import counts too
    ("io/executorch_quant.py", "from sharp.io.executorch import PTD"),  # a circle inside one layer
])
def test_an_upward_import_or_a_circle_breaks_a_contract(tmp_path, module, upward):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "sharp", src / "sharp", ignore=shutil.ignore_patterns("__pycache__"))
    path = src / "sharp" / module
    text = path.read_text()
    if upward.startswith(" "):  # inside the first function of the module
        at = text.index("\ndef ")
        end = text.index("\n", text.index(":\n", at) + 1)
        text = text[: end + 1] + upward + "\n" + text[end + 1 :]
    else:
        text += "\n" + upward + "\n"
    path.write_text(text)
    result = _lint(src)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and upward.split()[1].rsplit(".", 1)[0] in result.stdout
