"""The Typer application, its global options and the helpers every command uses.

Nothing here imports torch: ``dcn-inspect --help`` and usage errors stay fast. Command modules
import the library inside their functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional

import typer


if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(
    name="dcn-inspect",
    help="Inspect what deformable convolutional networks learned: sampling trees, effective dilation, deformed RoI bins.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

#: Global options: ``--debug`` shows tracebacks, ``--verbose`` shows details (e.g. checkpoint key tables).
state: Dict[str, bool] = {"debug": False, "verbose": False}


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    verbose: bool = typer.Option(False, "--verbose", help="Show details: the checkpoint key table, every warning."),
) -> None:
    state["debug"] = debug
    state["verbose"] = verbose


def comma_list(values: Optional[List[str]]) -> Optional[List[str]]:
    """Repeatable and/or comma-separated option values as one list (None when none given)."""
    names = [name.strip() for item in (values or []) for name in item.split(",") if name.strip()]
    return names or None


def print_skipped(console: "Console", skipped: List[Dict[str, str]]) -> None:
    """The final message about images a command skipped (reasons are in summary.json too)."""
    for item in skipped:
        console.print(f"skipped: {item['reason']}", highlight=False)
    if skipped:
        console.print(f"{len(skipped)} image(s) skipped (reasons in summary.json)")
