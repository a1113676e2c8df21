"""`sharp bench --device`: checked before anything is measured, and handed to every measurement."""

from __future__ import annotations

import pytest
import torch

import sharp.bench.runner as runner
from sharp.errors import SharpError


class _Stop(Exception):
    pass


def test_a_missing_gpu_fails_before_measuring(stories_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runner, "measure_in_subprocess", lambda *a, **k: pytest.fail("measured"))
    with pytest.raises(SharpError, match="--device cuda: CUDA is not available"):
        runner.bench([str(stories_path)], device="cuda")


def test_every_measurement_gets_the_device(stories_path, monkeypatch):
    seen = []

    def spy(spec, mode, *args):
        seen.append(args[-1])
        raise _Stop

    monkeypatch.setattr(runner, "measure_in_subprocess", spy)
    with pytest.raises(_Stop):
        runner.bench([str(stories_path)], device="cpu")
    assert seen == ["cpu"]
    assert runner.machine_info(1, "cpu")["device"] == "cpu"
