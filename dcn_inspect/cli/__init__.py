"""Command-line interface. Each command lives in its own module and only parses, calls the
library function beside it and prints; :func:`main` turns input errors into one line naming the
flag (exit 1), prints warnings once, and never shows a traceback unless ``--debug``.
"""

from __future__ import annotations

import sys
import traceback

from dcn_inspect.cli.app import app, state

# Importing a command module registers its command on ``app``.
from dcn_inspect.cli import doctor  # noqa: E402,F401
from dcn_inspect.cli import models  # noqa: E402,F401
from dcn_inspect.cli import bins  # noqa: E402,F401
from dcn_inspect.cli import sample_points  # noqa: E402,F401
from dcn_inspect.cli import dilation_stats  # noqa: E402,F401
from dcn_inspect.cli import offsets  # noqa: E402,F401
from dcn_inspect.cli import receptive_field  # noqa: E402,F401
from dcn_inspect.cli import demo  # noqa: E402,F401


def main() -> None:
    """Entry point of the ``dcn-inspect`` console script."""
    from dcn_inspect.cli.render import error_line, install_detail_printer, install_warning_printer, invoked_command, print_key_table
    from dcn_inspect.errors import InputError

    command = invoked_command(sys.argv[1:])
    install_warning_printer(command)
    install_detail_printer()
    try:
        app(standalone_mode=False)
    except SystemExit:
        raise
    except InputError as exc:
        if state["debug"]:
            traceback.print_exc()
        if "keys" in exc.details:
            print_key_table(exc.details["keys"])
        print(f"dcn-inspect: error: {error_line(exc, command)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("dcn-inspect: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - last resort: never a bare traceback for users
        # Typer vendors click; recognise its exceptions by shape rather than by import path.
        if type(exc).__name__ == "Abort":
            print("dcn-inspect: aborted", file=sys.stderr)
            sys.exit(1)
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()  # usage errors: Typer's message, exit code 2
            sys.exit(exc.exit_code)
        if state["debug"]:
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"dcn-inspect: internal error: {type(exc).__name__}: {message} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
