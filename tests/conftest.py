"""Shared fixtures: tiny random models of every supported architecture, and the real stories260K."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ASSETS = SHARED / "assets"
STORIES = ASSETS / "models" / "stories260K"

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
    if not STORIES.is_dir():
        pytest.skip("../shared/assets/models/stories260K is not available")
    return STORIES


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

    from sharp.cli import main

    old = sys.argv
    sys.argv = ["sharp", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err
