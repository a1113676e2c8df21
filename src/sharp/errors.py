"""User-facing errors.

`SharpError` is raised for anything the *user* got wrong (bad strategy text, missing file, rank too large).
Its message is a single line that says what is wrong and how to fix it. The CLI prints it without a
traceback and exits with code 2. Internal invariants use `assert`; library misuse raises `RuntimeError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping


class SharpError(ValueError):
    """A problem with the user's input: one line, what is wrong and how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever the caller wrote


class SettingError(SharpError):
    """A bad value of one setting of a config, worded with its field (`SLW max_tokens must be at least 2`). A front
    end that calls the setting something else (a CLI flag) rewords the same problem with `named`."""

    def __init__(self, owner: str, setting: str, problem: str) -> None:
        super().__init__(f"{owner} {setting} {problem}")
        self.setting, self.problem = setting, problem

    def named(self, name: str) -> SharpError:
        return SharpError(f"{name} {self.problem}")


@contextlib.contextmanager
def flag_names(flags: Mapping[str, str]) -> Iterator[None]:
    """Inside, a `SettingError` about a setting in `flags` ({setting: "--its-flag"}) is re-raised naming the flag,
    so a CLI user reads `--slw-tokens must be at least 2`, not the config's field name."""
    try:
        yield
    except SettingError as e:
        if e.setting not in flags:
            raise
        raise e.named(flags[e.setting]) from None
