"""The typer application, its error handling and shared console."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.table import Table

from sharp.errors import SharpError

app = typer.Typer(
    name="sharp",
    help="SHARP: share adjacent decoder layers of a pretrained LLM, with recovery parameters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def facts_table(title: str) -> Table:
    """A two-column table of named facts (bold names, right-aligned values)."""
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    return table


def add_counts(table: Table, original: int, mlp_original: int, removed: int, recovery: int, stored: int) -> None:
    """The parameter-count rows `sharp info` and `sharp plan` print alike."""
    for name, value in (("parameters (original)", original), ("MLP parameters (original)", mlp_original),
                        ("parameters removed", removed), ("recovery parameters", recovery),
                        ("parameters stored", stored)):
        table.add_row(name, f"{value:,}")


def fail(message: str) -> typer.Exit:
    """Print a one-line user error and return the exit to raise (code 2)."""
    from rich.markup import escape

    # escaped: messages quote extras like '.[nf4]', which rich would otherwise eat as markup tags
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   line: str | None = None) -> str:
    """`warnings.formatwarning` for the command line: one line per warning, like `fail`'s errors, not Python's two
    (file, line number and the source line mean nothing to a user of the command). Formatting, not showing, is
    replaced, so that code recording warnings (pytest.warns, catch_warnings) still records them."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    return f"warning: {text}\n"


def main() -> None:
    """Console-script entry point: user errors become one line and exit code 2; warnings one line each."""
    import warnings

    warnings.formatwarning = format_warning
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # our own rich status lines say what is loading; the variable spares `sharp --help` importing transformers
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already (an in-process caller): too late for the variable
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        code = app(standalone_mode=False)  # returns the exit code of a typer.Exit in this mode
    except SharpError as e:
        raise SystemExit(fail(str(e)).exit_code) from None
    except typer.Exit as e:
        raise SystemExit(e.exit_code) from None
    except typer.Abort:
        err_console.print("aborted")
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise SystemExit(130) from None
    except Exception as e:  # click usage errors and friends (typer may vendor its own click: match by name)
        kinds = {c.__name__ for c in type(e).__mro__}
        if "UsageError" in kinds or "ClickException" in kinds:
            raise SystemExit(fail(e.format_message().replace("\n", " ")).exit_code) from None
        raise
    sys.exit(code if isinstance(code, int) else 0)
