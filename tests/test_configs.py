"""The launch configurations under configs/ parse as accelerate and DeepSpeed read them, and point at files
that exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.num_machines >= 1
    assert config.num_processes % config.num_machines == 0
    ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
    if ds_file:
        ds = json.loads((ROOT / ds_file).read_text())
        assert ds["zero_optimization"]["stage"] in (2, 3)
        if ds["zero_optimization"]["stage"] == 3:  # SFT saves the recovery from the gathered weights
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_every_config_is_listed_in_the_readme():
    readme = (ROOT / "configs" / "README.md").read_text()
    assert ACCELERATE and all(f"accelerate/{p.name}" in readme for p in ACCELERATE)
