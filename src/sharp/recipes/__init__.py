"""Recipes: whole pipelines users call as one function (`compress`, `compare`, `plan`, `quantize_checkpoint`),
composed of components that know nothing about the CLI. Settings and stage metering live in `config`."""

from sharp.recipes.compress import compress
from sharp.recipes.config import RUNTIME_ONLY, STAGES, CompressConfig, RecoverySettings, StageMeter, prepare_work_dir

__all__ = ["RUNTIME_ONLY", "STAGES", "CompressConfig", "RecoverySettings", "StageMeter", "compress", "prepare_work_dir"]
