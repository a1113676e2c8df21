"""The `sharp` command line. Each verb lives in a small module that registers itself on `app`;
every command is a thin shell over a Python function users can call directly."""

from __future__ import annotations

from sharp.cli.app import app, main  # noqa: F401

# Importing the command modules registers their verbs on `app`.
from sharp.cli import core  # noqa: F401, E402  isort: skip
from sharp.cli import evaluate  # noqa: F401, E402  isort: skip
from sharp.cli import assets  # noqa: F401, E402  isort: skip
from sharp.cli import baselines  # noqa: F401, E402  isort: skip
from sharp.cli import analyze  # noqa: F401, E402  isort: skip
from sharp.cli import compress  # noqa: F401, E402  isort: skip
from sharp.cli import deploy  # noqa: F401, E402  isort: skip
from sharp.cli import plan  # noqa: F401, E402  isort: skip
