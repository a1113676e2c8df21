"""Fixtures shared by the io tests."""

import pytest
import torch

import sharp
from tests.conftest import randomize_recovery


@pytest.fixture
def shared_ckpt(stories_path, tmp_path):
    """A bf16 stories260K sharing layers 2<-1 and 4<-3 with trained-looking LoRA recovery, saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.bfloat16).eval()
    sharp.share(model, "next:1-4", "lora:4")
    randomize_recovery(model)
    sharp.save(model, tmp_path / "s16", tokenizer=AutoTokenizer.from_pretrained(stories_path))
    return tmp_path / "s16"
