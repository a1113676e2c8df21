"""Shared fixtures: tiny random models of every supported architecture, the real stories260K and small real data
sets vendored under tests/fixtures/ (sources and licences in tests/fixtures/README.md), so the suite runs fully in
any clone. A skip that does not declare itself optional fails the run (tests/skip_guard.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# A skip that does not start "optional" (and is not in a `gpu` test) fails the run: see tests/skip_guard.py.
from tests.skip_guard import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

FIXTURES = Path(__file__).resolve().parent / "fixtures"
STORIES = FIXTURES / "models" / "stories260K"  # llama2.c's stories260K: a real pretrained Llama, 1 MB
C4 = FIXTURES / "text" / "c4_sample.jsonl"  # the first 16 documents of the C4 sample, `{text}` lines
WIKI = FIXTURES / "text" / "wikitext2_test_excerpt.txt"  # the first 5.7 KB of WikiText-2 raw test
ALPACA = FIXTURES / "instruct" / "alpaca_sample.json"  # the first 44 GPT4-Alpaca records
DIALOGSUM = FIXTURES / "instruct" / "dialogsum_dev_sample.jsonl"  # the first 5 DialogSum dev records
DOWNSTREAM = FIXTURES / "downstream"  # the first 40 (arc_easy, piqa) or 10 (others) documents of each task

# The full data sets, where a developer's machine has them beside the checkout. They feed only optional larger
# checks (tests/test_shared_assets.py), which are not collected at all without them: nothing skips in a clone.
SHARED_ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
collect_ignore = [] if SHARED_ASSETS.is_dir() else ["test_shared_assets.py"]


TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_config(model_type: str):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    if model_type == "llama":
        return LlamaConfig(**TINY)
    if model_type == "mistral":
        return MistralConfig(**TINY, sliding_window=None)
    if model_type == "qwen2":
        return Qwen2Config(**TINY)
    if model_type == "gemma3_text":
        return Gemma3TextConfig(**TINY, head_dim=8, sliding_window=16)
    if model_type == "phi3":
        return Phi3Config(**TINY, pad_token_id=0)
    raise ValueError(model_type)


def tiny_model(model_type: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    return model.eval()


@pytest.fixture
def stories_path() -> Path:
    return STORIES


def pytest_report_header(config) -> str:
    full = "run" if not collect_ignore else f"not collected ({SHARED_ASSETS} is absent)"
    return f"sharp: data from {FIXTURES}; full-data checks {full}"


def randomize_recovery(model, seed: int = 1) -> None:
    """Give every recovery parameter non-trivial values (as if trained)."""
    from sharp.sharing.shared import recoveries

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, rec in recoveries(model):
            for p in rec.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the `sharp` console script in-process: (exit code, stdout, stderr)."""
    import sys
    import warnings

    from sharp.cli import main

    old, formatwarning = sys.argv, warnings.formatwarning
    sys.argv = ["sharp", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv, warnings.formatwarning = old, formatwarning  # main() sets the command line's one-line format
    out, err = capsys.readouterr()
    return code, out, err
