"""How the CLI speaks of the library's errors and warnings: in terms of its own flags.

The library names parameters by their Python names (:mod:`dcn_inspect.core.errors`); here each name
becomes the flag or argument of the command being run, read from the command's own click
parameters (``fmt`` -> ``--format``, ``rois_file`` -> ``--rois``, ``images`` -> ``IMAGES...``).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, Optional

from dcn_inspect.cli.spelling import flag_names_of, spelling_of
from dcn_inspect.core.errors import InputError, render_message


def invoked_command(argv: List[str]) -> Optional[str]:
    """The sub-command named on the command line (the first word that is not an option)."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def flag_names(command: Optional[str]) -> Dict[str, str]:
    """Python parameter name -> how the command line spells it, for ``command``."""
    import typer.main

    from dcn_inspect.cli.app import app

    group = typer.main.get_command(app)
    sub = getattr(group, "commands", {}).get(command) if command else None
    params = list(getattr(group, "params", [])) + list(getattr(sub, "params", []) if sub else [])
    return flag_names_of(params)


def name_spelling(command: Optional[str]) -> Callable[[str], str]:
    """A function spelling a Python parameter name as ``command``'s flag."""
    return spelling_of(flag_names(command))


def error_line(error: InputError, command: Optional[str]) -> str:
    """The one line the CLI prints for ``error``."""
    return error.render(name_spelling(command))


def console(stderr: bool = False) -> Any:
    """The rich console every command prints through. Lines of text are never folded (a path
    stays one piece in logs and pipes, where rich would fold at 80 columns); tables still fit
    the width."""
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True)


def print_key_table(report: Any) -> None:
    """The checkpoint key table (missing / unexpected / ignored keys) on stderr."""
    from rich.table import Table

    table = Table(title=f"checkpoint keys: {report.path.name}", title_justify="left")
    table.add_column("status")
    table.add_column("key (model name)")
    table.add_column("checkpoint key / count")
    for row in report.rows():
        table.add_row(*row)
    console(stderr=True).print(table)


def install_warning_printer(command: Optional[str]) -> None:
    """Print each :class:`~dcn_inspect.core.errors.DcnInspectWarning` once, as
    ``dcn-inspect: warning: ...``."""
    import warnings

    from dcn_inspect.core.errors import DcnInspectWarning

    spell = name_spelling(command)
    shown = set()
    previous = warnings.showwarning

    def show(
        message: Any,
        category: type,
        filename: str,
        lineno: int,
        file: Any = None,
        line: Optional[str] = None,
    ) -> None:
        if not issubclass(category, DcnInspectWarning):
            previous(message, category, filename, lineno, file, line)
            return
        text = render_message(str(message), spell)
        text = text[len("dcn-inspect: ") :] if text.startswith("dcn-inspect: ") else text
        if text not in shown:
            shown.add(text)
            print(f"dcn-inspect: warning: {text}", file=sys.stderr)

    warnings.showwarning = show  # type: ignore[assignment]
    warnings.simplefilter("always", DcnInspectWarning)


def install_detail_printer() -> None:
    """With the global ``--verbose``, print what the library logs at INFO on the ``dcn_inspect``
    logger (e.g. a checkpoint's ignored neck/head keys, as a key table) on stderr."""
    import logging

    from dcn_inspect.cli.app import state

    class DetailPrinter(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if not state["verbose"]:
                return
            report = getattr(record, "key_report", None)
            if report is not None:
                print_key_table(report)
            print(f"dcn-inspect: {record.getMessage()}", file=sys.stderr)

    logger = logging.getLogger("dcn_inspect")
    if not any(type(h).__name__ == "DetailPrinter" for h in logger.handlers):
        logger.addHandler(DetailPrinter(logging.INFO))
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
