"""The Typer application, its global options and the helpers every command uses.

Nothing here imports torch: ``dcn-inspect --help`` and usage errors stay fast. Command modules
import the library inside their functions.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from dcn_inspect.cli.spelling import lazy_spelling
from dcn_inspect.core.errors import parameter_spelling

if TYPE_CHECKING:
    from rich.console import Console


def plain_metavars(params: Iterable[Any]) -> None:
    """Help shows each value's metavar (``FILE``, ``X,Y``, ``N``...), never a Python type name.

    Recent typer prints ``<bool>``, ``<str>``, ``<list[Path]>`` in the help's type column: flags
    get no metavar (they take no value), options without an explicit ``metavar=`` get ``VALUE``,
    and arguments show their name (upper case) and no type.
    """
    for param in params:
        if isinstance(param, TyperOption):
            if getattr(param, "is_flag", False):
                param.metavar = ""
            elif param.metavar is None:
                param.metavar = "VALUE"
        elif isinstance(param, TyperArgument):
            if param.metavar is None:
                param.metavar = (param.name or "value").upper()
            param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]  # the name column says it


class Command(TyperCommand):
    """Every command: help without Python type names (:func:`plain_metavars`)."""

    def get_params(self, ctx: Any) -> List[Any]:
        params = super().get_params(ctx)  # the command's parameters and --help
        plain_metavars(params)
        return params


#: The order ``dcn-inspect --help`` lists the commands in (set-up first, then the figures);
#: fixed here, not by the order in which the command modules happen to be imported.
COMMAND_ORDER = (
    "doctor",
    "models",
    "info",
    "bins",
    "sample-points",
    "explore",
    "dilation-stats",
    "offsets",
    "receptive-field",
    "attention",
    "demo-data",
)


class Group(TyperGroup):
    """The ``dcn-inspect`` group: its own options' help without Python type names, its commands
    in :data:`COMMAND_ORDER`."""

    def get_params(self, ctx: Any) -> List[Any]:
        params = super().get_params(ctx)
        plain_metavars(params)
        return params

    def list_commands(self, ctx: Any) -> List[str]:
        names = super().list_commands(ctx)
        rank = {name: k for k, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda name: (rank.get(name, len(rank)), names.index(name)))


def one_line_paragraphs(docstring: str) -> str:
    """``docstring`` with each paragraph on one line: rich help keeps a docstring's line breaks,
    so the source can wrap at 100 columns while ``--help`` lays the text out itself."""
    paragraphs = inspect.cleandoc(docstring).split("\n\n")
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)


class App(typer.Typer):
    """``app.command(...)`` registers commands of class :class:`Command`, their help taken from
    the docstring with each paragraph on one line, each run after its option values passed
    :func:`dcn_inspect.cli.prechecks.precheck` (before torch and the model are loaded)."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:  # type: ignore[override]
        kwargs.setdefault("cls", Command)

        def register(function: Callable[..., Any]) -> Callable[..., Any]:
            if kwargs.get("help") is None and function.__doc__:
                kwargs["help"] = one_line_paragraphs(function.__doc__)
            name = (args[0] if args else kwargs.get("name")) or function.__name__.replace("_", "-")

            @functools.wraps(function)  # typer reads the options from the wrapped signature
            def checked_first(**given: Any) -> Any:
                from dcn_inspect.cli.prechecks import precheck

                precheck(name, given)
                return function(**given)

            super(App, self).command(*args, **kwargs)(checked_first)
            return function

        return register


app = App(
    name="dcn-inspect",
    cls=Group,
    help="Inspect what deformable convolutional networks learned: sampling trees, "
    "effective dilation, deformed RoI bins, receptive fields, and where multi-scale deformable "
    "attention looks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

#: Global options: ``--debug`` shows tracebacks, ``--verbose`` shows details (e.g. checkpoint key
#: tables).
state: Dict[str, bool] = {"debug": False, "verbose": False}


@app.callback()
def _global_options(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    verbose: bool = typer.Option(
        False, "--verbose", help="Show details: the checkpoint key table, every warning."
    ),
) -> None:
    state["debug"] = debug
    state["verbose"] = verbose
    if ctx.invoked_subcommand:
        # Text the library writes into the run's outputs (how a unit or RoI was chosen) names
        # parameters as this command's flags, for as long as the command runs.
        def params() -> List[Any]:
            command = ctx.command.get_command(ctx, ctx.invoked_subcommand)  # type: ignore[attr-defined]
            return list(ctx.command.params) + list(getattr(command, "params", []))

        ctx.with_resource(parameter_spelling(lazy_spelling(params)))


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
