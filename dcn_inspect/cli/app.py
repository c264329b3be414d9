"""The Typer application object and the behaviour shared by every command."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List

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

#: Set by the global ``--debug`` option: show tracebacks instead of one-line errors.
state = {"debug": False}


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    state["debug"] = debug


def print_skipped(console: "Console", skipped: List[Dict[str, str]]) -> None:
    """The final message about images a multi-image command skipped (reasons are in summary.json too)."""
    for item in skipped:
        console.print(f"skipped: {item['reason']}")
    if skipped:
        console.print(f"{len(skipped)} image(s) skipped (reasons in summary.json)")
