"""The Typer application object and the behaviour shared by every command."""

from __future__ import annotations

import typer

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
