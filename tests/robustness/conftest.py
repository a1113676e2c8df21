"""Fixtures of the robustness suite: a small sharp checkpoint of stories260K, broken data files, and a guard
that fails a test when a model's weights are loaded (validation must happen before that)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import STORIES


class ModelLoaded(BaseException):  # noqa: N818 - BaseException so no `except Exception` can swallow it
    """Raised by the guard: the command read model weights before failing on a bad argument."""


@pytest.fixture
def no_model_load(monkeypatch):
    """Any `from_pretrained` of a model (not a config or tokenizer) fails the test."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    def refuse(*args, **kwargs):
        raise ModelLoaded("model weights were loaded before the bad argument was reported")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda cls, *a, **k: refuse()))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """stories260K shared `next:1-4` with trained-looking `lora:4` recovery (a full checkpoint)."""
    import sharp
    from tests.conftest import randomize_recovery

    model, tok = sharp.load_model(str(STORIES))
    sharp.share(model, "next:1-4", "lora:4", source=str(STORIES))
    randomize_recovery(model)
    out = tmp_path_factory.mktemp("ckpt") / "s260"
    sharp.save(model, out, tokenizer=tok)
    return out


@pytest.fixture
def bad_alpaca(tmp_path) -> Path:
    """Alpaca records, the third of which lacks its `output` field."""
    records = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(5)]
    del records[2]["output"]
    path = tmp_path / "bad_alpaca.json"
    path.write_text(json.dumps(records))
    return path
