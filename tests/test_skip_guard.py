"""The skip guard (tests/skip_guard.py) fails a run that skips for any reason but a declared optional one."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = '''
import pytest


@pytest.mark.skipif(True, reason="offline assets not present")
def test_skipif_for_missing_data():
    pass


@pytest.fixture
def data():
    pytest.skip("../shared/assets/models/stories260K is not available")


def test_fixture_skips_for_missing_data(data):
    pass


def test_missing_module():
    pytest.importorskip("no_such_module_sharp")


def test_optional_extra():
    pytest.importorskip("no_such_module_sharp", reason="optional extra no-such-module is not installed")


@pytest.mark.gpu
def test_gpu():
    pytest.skip("needs a CUDA device")


@pytest.mark.xfail(reason="known")
def test_xfail():
    raise AssertionError


def test_passes():
    pass
'''


def _run(tmp_path: Path, files: dict[str, str]) -> tuple[int, str]:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.skip_guard", "-p", "no:cacheprovider",
                           "-rA", "-q", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "300"})
    return proc.returncode, proc.stdout + proc.stderr


def test_only_optional_and_gpu_skips_pass(tmp_path):
    code, out = _run(tmp_path, {"test_cases.py": CASES})
    assert code == 1, out
    summary = out.strip().splitlines()[-1]  # a skip in setup (skipif, a fixture) turns into an error there
    assert re.match(r"1 failed, 1 passed, 2 skipped, 1 xfailed, 2 errors in ", summary), out
    for name in ("test_skipif_for_missing_data", "test_fixture_skips_for_missing_data", "test_missing_module"):
        assert re.search(rf"(FAILED|ERROR) test_cases.py::{name} - skipped without declaring", out), name
    assert re.search(r"SKIPPED \[1\] test_cases.py:\d+: optional extra no-such-module is not installed", out)
    assert re.search(r"SKIPPED \[1\] test_cases.py:\d+: needs a CUDA device", out)


def test_a_module_skipped_at_import_fails_the_collection(tmp_path):
    files = {"test_mod.py": 'import pytest\n\npytest.importorskip("no_such_module_sharp")\n\n\ndef test_x():\n'
                            '    pass\n',
             "test_opt.py": 'import pytest\n\npytest.importorskip("no_such_module_sharp", reason="optional: x")\n'}
    code, out = _run(tmp_path, files)
    assert code != 0 and "skipped without declaring itself optional" in out and "test_mod.py" in out, out
    assert "1 skipped" in out and "1 error" in out, out
