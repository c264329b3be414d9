"""Atomic files: every output is written under a hidden temporary name beside its target and
renamed into place only when complete, so a failed write never leaves a partial file.

While a run is open (:class:`dcn_inspect.io.outputs.RunOutputs`, which registers itself in
:data:`_OPEN_RUNS`), complete files stay under their hidden names and the run renames them all
together when it commits. Here (the bottom layer) so that every layer can write a file: a
checkpoint (:mod:`dcn_inspect.models.checkpoint`), a dataset, a figure.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterator, List, Optional

from dcn_inspect.core.errors import InputError

__all__ = ["abort_open_runs", "active_run_outputs", "atomic_path", "write_error"]


#: Open runs of this process, innermost last (weak: a run nobody holds is cleaned up by its
#: finaliser).
_OPEN_RUNS: List["weakref.ReferenceType[Any]"] = []


def active_run_outputs() -> Optional[Any]:
    """The innermost open :class:`~dcn_inspect.io.outputs.RunOutputs` of this process (None
    outside a run)."""
    while _OPEN_RUNS:
        run = _OPEN_RUNS[-1]()
        if run is not None and run.is_open:
            return run
        _OPEN_RUNS.pop()
    return None


def abort_open_runs() -> None:
    """Abort every open run of this process (the CLI calls this on any failure or signal)."""
    while _OPEN_RUNS:
        run = _OPEN_RUNS.pop()()
        if run is not None:
            run.abort()


def write_error(path: Path, exc: OSError, what: str = "") -> InputError:
    """The one line for a failed write of ``path`` (``what``: what was being written, if not the
    file itself)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on the device"
    return InputError(
        f"{path}: cannot write{' ' + what if what else ''} ({reason}); nothing was written"
    )


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds
    (during an open :class:`~dcn_inspect.io.outputs.RunOutputs`: when the run commits). An
    ``OSError`` in the block (disk full...) becomes a one-line :class:`InputError` naming
    ``path``."""
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    kept = False
    try:
        try:
            yield tmp
            # mkstemp creates 0600 files; give the output the permissions a plain open() would.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        except OSError as exc:
            raise write_error(path, exc) from None
        run = active_run_outputs()
        if run is not None:
            run.defer(tmp, path)
            kept = True
        else:
            os.replace(tmp, path)
    finally:
        if not kept and tmp.exists():
            tmp.unlink()
