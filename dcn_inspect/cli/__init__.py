"""Command-line interface. Each command lives in its own module and only parses, calls the
library function beside it and prints; :func:`main` turns input errors into one line naming the
flag (exit 1), prints warnings once, and never shows a traceback unless ``--debug``.

Exit codes: 0 done, 1 an error (one line naming the problem), 2 a usage error, 130 interrupted
(Ctrl-C, SIGINT), 143 terminated (SIGTERM). Whatever ends a run early, the files it was writing
are removed (:func:`dcn_inspect.core.files.abort_open_runs`): an output directory holds either the
previous run's complete files or this run's, never a mix or a partial file.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import traceback
from typing import Any, Callable, Dict

# Importing a command module registers its command on ``app``.
from dcn_inspect.cli import (
    attention,  # noqa: E402,F401
    bins,  # noqa: E402,F401
    demo,  # noqa: E402,F401
    dilation_stats,  # noqa: E402,F401
    doctor,  # noqa: E402,F401
    explore,  # noqa: E402,F401
    models,  # noqa: E402,F401
    offsets,  # noqa: E402,F401
    receptive_field,  # noqa: E402,F401
    sample_points,  # noqa: E402,F401
)
from dcn_inspect.cli.app import app, state

#: Exit codes of a run ended by a signal (128 + the signal's number, as shells report them).
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived: unwinds the run like Ctrl-C does (every ``finally`` runs), then exit 143.

    A ``BaseException`` so that no ``except Exception`` in the library or the user's model
    swallows it, and not a ``KeyboardInterrupt`` so it keeps its own exit code.
    """


def _raise_terminated(owner: int) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked worker inherited the handler: die as SIGTERM would
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the unwinding finish
        raise Terminated()

    return handler


def _set_handlers(handlers: Dict[int, Any]) -> Dict[int, Any]:
    """Install ``handlers`` (signal -> handler); returns the previous ones (none off the main
    thread)."""
    previous: Dict[int, Any] = {}
    for signum, handler in handlers.items():
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread: signals stay as they are
            break
    return previous


def main() -> None:
    """Entry point of the ``dcn-inspect`` console script."""
    from dcn_inspect.cli.render import (
        error_line,
        install_detail_printer,
        install_warning_printer,
        invoked_command,
        print_key_table,
    )
    from dcn_inspect.core.errors import InputError

    command = invoked_command(sys.argv[1:])
    install_warning_printer(command)
    install_detail_printer()
    previous = _set_handlers({signal.SIGTERM: _raise_terminated(os.getpid())})
    code = 0
    try:
        returned = app(standalone_mode=False)
        # Typer turns KeyboardInterrupt into exit code 130 and returns it without standalone mode.
        if isinstance(returned, int) and not isinstance(returned, bool) and returned != 0:
            code = returned
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Terminated:
        code = EXIT_TERMINATED
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except InputError as exc:
        if state["debug"]:
            traceback.print_exc()
        if "keys" in exc.details:
            print_key_table(exc.details["keys"])
        print(f"dcn-inspect: error: {error_line(exc, command)}", file=sys.stderr)
        code = 1
    except Exception as exc:  # noqa: BLE001 - last resort: never a bare traceback for users
        code = _unexpected(exc)
    finally:
        # Clean up with further signals held off, so a second Ctrl-C cannot leave half of it.
        held = _set_handlers({signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN})
        try:
            # Only a command that wrote through dcn_inspect.core.files can have open runs; a
            # usage error never imported it, and needs no clean-up.
            files = sys.modules.get("dcn_inspect.core.files")
            if files is not None:
                files.abort_open_runs()
        finally:
            _set_handlers({**held, **previous})
    if code == EXIT_INTERRUPTED:
        print("dcn-inspect: interrupted", file=sys.stderr)
    elif code == EXIT_TERMINATED:
        print("dcn-inspect: terminated", file=sys.stderr)
    sys.exit(code)


def run() -> None:
    """Entry point of the ``dcn-inspect`` console script and of ``python -m dcn_inspect``:
    :func:`main`, then the process ends without Python's interpreter teardown.

    Tearing down a process that imported torch (and matplotlib, pandas) takes 0.4-0.7 s on a
    2-core CPU (module finalisation and libtorch's static destructors: ``bench/commands.py``
    measures it), paid after every output is written. By then the run is over: what must still
    happen at exit (``atexit`` callbacks, ``weakref.finalize`` of open runs, logging) runs here,
    the standard streams are flushed, then ``os._exit``. When another non-daemon thread is
    still alive, or a profiler or tracer (``python -m cProfile``, coverage) watches, the normal
    exit runs instead. Tests call :func:`main`, which ends in ``SystemExit`` as before.
    """
    try:
        main()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    if not isinstance(code, int):  # as sys.exit: None is 0, anything else printed and 1
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    working = any(
        t.is_alive() and not t.daemon
        for t in threading.enumerate()
        if t is not threading.main_thread()
    )
    # a profiler or coverage tool writes its results in the normal teardown
    watched = sys.getprofile() is not None or sys.gettrace() is not None
    if working or watched:
        sys.exit(code)
    atexit._run_exitfuncs()  # what Python's own exit runs (CPython's, there since 3.0)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (``| head``) or stream: nothing to keep
            pass
    os._exit(code)


def _unexpected(exc: Exception) -> int:
    """The line for an exception that is not an input error; returns the exit code."""
    # Typer vendors click; recognise its exceptions by shape rather than by import path.
    if type(exc).__name__ == "Abort":
        print("dcn-inspect: aborted", file=sys.stderr)
        return 1
    if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
        exc.show()  # usage errors: Typer's message, exit code 2
        return int(exc.exit_code)  # type: ignore[attr-defined]
    if state["debug"]:
        traceback.print_exc()
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    print(
        f"dcn-inspect: internal error: {type(exc).__name__}: {message} (rerun with --debug for "
        "the traceback)",
        file=sys.stderr,
    )
    return 1
