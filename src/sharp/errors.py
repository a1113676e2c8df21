"""User-facing errors.

`SharpError` is raised for anything the *user* got wrong (bad strategy text, missing file, rank too large).
Its message is a single line that says what is wrong and how to fix it. The CLI prints it without a
traceback and exits with code 2. Internal invariants use `assert`; library misuse raises `RuntimeError`.
"""

from __future__ import annotations


class SharpError(ValueError):
    """A problem with the user's input: one line, what is wrong and how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever the caller wrote
