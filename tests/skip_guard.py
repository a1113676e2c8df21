"""A pytest plugin (loaded by tests/conftest.py): a skipped test fails the run unless it declares itself optional.

The suite used to skip whenever ../shared/assets was missing, which is every user's clone, so `make test` reported
green while SLW, SFT and compress went untested. The data the tests need now lives in tests/fixtures/; a skip is
allowed only for a test marked `gpu` or one needing an optional extra (llama-cpp-python, executorch, a fetched
135M model), whose reason must then start with "optional", e.g.
`pytest.importorskip("llama_cpp", reason="optional extra llama-cpp-python is not installed")`.
"""

from __future__ import annotations

import pytest

OPTIONAL = "optional"


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_unexplained_skip(report: pytest.TestReport | pytest.CollectReport, gpu: bool) -> None:
    if not report.skipped or hasattr(report, "wasxfail") or gpu:
        return
    reason = _skip_reason(report)
    if reason.startswith(OPTIONAL):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped without declaring itself optional: {reason!r}. Tests run on the data in "
                       f"tests/fixtures/; only a `gpu` test or one needing an optional extra may skip, and then "
                       f"its reason starts with {OPTIONAL!r} (tests/skip_guard.py)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    _fail_unexplained_skip(outcome.get_result(), gpu=item.get_closest_marker("gpu") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield  # a whole module skipped (a module-level importorskip) is held to the same rule
    _fail_unexplained_skip(outcome.get_result(), gpu=False)
