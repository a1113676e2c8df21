"""Evaluation: perplexity (here) and zero-shot benchmarks through lm-eval (`sharp.evaluation.downstream`,
imported on demand because lm-eval is slow to import)."""

from sharp.data.text import text_windows
from sharp.evaluation.perplexity import (
    PerplexityTask,
    evaluate_tasks,
    parse_tasks,
    response_perplexity,
    text_perplexity,
)

__all__ = [
    "PerplexityTask",
    "evaluate_tasks",
    "parse_tasks",
    "response_perplexity",
    "text_perplexity",
    "text_windows",
]
