"""Writing results: atomic files, runs whose files appear together, deterministic CSVs and the
per-run ``summary.json``.

Every output goes to a temporary file (a hidden, unique name in the target's directory) and is
renamed into place only when complete, so a failed write never leaves a partial file behind.

A command's files are one unit, :class:`RunOutputs` (opened by ``commands.common.start_run``):

- while a run is open, every writer of this module (:func:`atomic_path` and the ``write_*``
  functions built on it) leaves its complete file under its hidden name and the run renames
  them all at :meth:`RunOutputs.commit` (``summary.json`` last); :meth:`RunOutputs.abort` (a
  failure, Ctrl-C, SIGTERM, disk full) removes them, so a failed run changes no visible file;
- the output directory is locked (``flock`` on the directory itself, no lock file): a second
  run on the same directory is refused with a clear message instead of mixing its files in;
- the run's input files are protected: writing onto one of them (``--out`` the dataset's
  folder with a dataset named ``summary.json``, an image named like an output) is an error
  before anything is renamed; so is a directory where a file goes (``out/summary.json`` a
  folder, ``save_offsets`` naming a folder): every target is checked before the first rename;
- a write that fails (disk full, permissions) is a one-line
  :class:`~dcn_inspect.core.errors.InputError` naming the file.

Scratch files a run needs on the way (e.g. per-unit rows before they are sorted) come from
:meth:`RunOutputs.scratch_file` and are removed at the end whatever happens.

CSVs are written with a fixed float format so that the same inputs give the same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple

from dcn_inspect.core.columns import FLOAT_FORMAT, Column, formatted
from dcn_inspect.core.errors import InputError
from dcn_inspect.core.files import (
    _OPEN_RUNS,
    atomic_path,
    write_error,
)

if TYPE_CHECKING:  # pandas is imported by the writers of tables, not with this module
    import pandas as pd

#: Float format of CSV columns without a description (positions have fixed decimals:
#: :mod:`dcn_inspect.core.columns`).
CSV_FLOAT_FORMAT = FLOAT_FORMAT


#: The file names :meth:`RunOutputs.commit` renames last (the mark of a complete run).
LAST_OUTPUTS = ("summary.json",)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(path: Path, frame: pd.DataFrame, columns: Optional[Sequence[Column]] = None) -> None:
    """Write a plain CSV atomically: a header line, then rows (``pandas.read_csv(path)`` reads it).

    ``columns`` (the file's :class:`~dcn_inspect.core.columns.Column` descriptions, which
    ``summary.json`` also lists) must name the frame's columns in order; they set each float
    column's text (positions with fixed decimals). Other floats get six significant digits.
    """
    if columns is not None:
        frame = formatted(frame, columns)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            frame.to_csv(handle, index=False, float_format=CSV_FLOAT_FORMAT, lineterminator="\n")


def write_npz(path: Path, arrays: Dict[str, Any]) -> None:
    """Write a compressed ``.npz`` atomically (a file object keeps numpy from appending a
    suffix)."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(buffer.getvalue())


def write_figure(path: Path, figure: Any, **savefig_kwargs: Any) -> None:
    """Save a matplotlib figure atomically; PNG metadata is fixed so bytes are reproducible."""
    fmt = path.suffix.lstrip(".").lower() or "png"
    metadata: Dict[str, Any] = {"Software": None} if fmt == "png" else {}
    if fmt in ("pdf", "svg"):
        metadata = {"Creator": None, "Date": None} if fmt == "pdf" else {"Date": None}
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=fmt, metadata=metadata, **savefig_kwargs)


def check_out_dir(out: Any) -> Path:
    """``out`` as a path; an empty one (``--out "$UNSET"``) is refused, not read as the current
    directory (``Path("")`` is ``.``)."""
    if out is None or not str(out).strip():
        raise InputError(
            f"{str(out or '')!r}: an empty path (an unset shell variable?); "
            "name the output directory",
            param="out",
        )
    return Path(out)


def prepare_out_dir(out: Path) -> Path:
    """Create ``out`` (reusing it if present; unrelated files are kept) and check it is writable;
    an empty path is refused (:func:`check_out_dir`)."""
    out = check_out_dir(out)
    if os.path.islink(out) and not out.exists():
        raise InputError(f"{out}: is a symlink that leads nowhere (broken, or a loop)", param="out")
    try:
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: exists and is not a directory", param="out")
        out.mkdir(parents=True, exist_ok=True)
    except InputError:
        raise
    except OSError as exc:
        reason = "symlink loop" if exc.errno == errno.ELOOP else exc.strerror
        raise InputError(
            f"{out}: cannot create the output directory ({reason})", param="out"
        ) from None
    if not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory", param="out")
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"{out}: the output directory is not writable", param="out")
    return out


# --------------------------------------------------------------------------------------------
# One run's files


class _RunFiles:
    """What a run has to clean up; shared with its finaliser (which must not hold the run)."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self.pending: Dict[Path, Path] = {}  # target -> complete hidden file
        self.scratch: List[Path] = []
        self.lock_fd: Optional[int] = None
        self.open = True
        self.created_dir: Optional[Path] = None  # the output directory, when this run created it

    def discard(self, remove_created_dir: bool = False) -> None:
        """Remove every pending and scratch file and release the lock (in the owning process only:
        a forked worker inherits this object but not the right to clean up); with
        ``remove_created_dir``, also the output directory if this run created it and it is empty."""
        if not self.open or os.getpid() != self.owner:
            return
        self.open = False
        for tmp in [*self.pending.values(), *self.scratch]:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.pending.clear()
        self.scratch.clear()
        self.release()
        if remove_created_dir and self.created_dir is not None:
            with contextlib.suppress(OSError):
                self.created_dir.rmdir()  # only succeeds when empty

    def release(self) -> None:
        if self.lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)
            self.lock_fd = None


class RunOutputs:
    """The files of one run: written complete under hidden names, renamed into place together by
    :meth:`commit`, removed by :meth:`abort`; the output directory locked meanwhile; the run's
    inputs never overwritten. See the module docstring.

    ``out_dir`` is None for a run that writes nothing (a distributed rank other than 0): it
    then only tracks scratch files. ``created``: the run created ``out_dir`` (an aborted run
    then removes it again when it is empty).
    """

    def __init__(self, out_dir: Optional[Path], created: bool = False) -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._files = _RunFiles()
        self._files.created_dir = self.out_dir if created else None
        self._protected: Dict[
            Tuple[int, int], Tuple[str, Path]
        ] = {}  # (device, inode) -> (parameter, path)
        self._finalizer = weakref.finalize(self, self._files.discard, True)
        if self.out_dir is not None:
            self._lock(self.out_dir)
        _OPEN_RUNS.append(weakref.ref(self))

    @property
    def is_open(self) -> bool:
        return self._files.open

    def _lock(self, out_dir: Path) -> None:
        try:
            fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise InputError(
                f"{out_dir}: cannot open the output directory ({exc.strerror})", param="out"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                self._files.open = False
                raise InputError(
                    f"{out_dir}: another dcn-inspect run is writing into this directory; "
                    "wait for it to finish or choose another `out`",
                    param="out",
                ) from None
            return  # a file system without flock (some network mounts): run unlocked
        self._files.lock_fd = fd

    # -- inputs

    def protect(self, parameter: str, paths: Iterable[Any]) -> None:
        """Files the run reads (``parameter`` names where they came from): never written onto."""
        for item in paths:
            if item is None:
                continue
            try:
                status = os.stat(item)
            except (OSError, ValueError, TypeError):
                continue
            self._protected.setdefault((status.st_dev, status.st_ino), (parameter, Path(item)))

    def check_target(self, path: Path) -> None:
        """An error when ``path`` is one of the protected inputs."""
        try:
            status = os.stat(path)
        except (OSError, ValueError):
            return
        hit = self._protected.get((status.st_dev, status.st_ino))
        if hit is not None:
            parameter, source = hit
            raise InputError(
                f"{path}: is an input of this run (`{parameter}` {source}); "
                "refusing to overwrite it: choose another `out`",
                param="out",
            )

    # -- files

    def defer(self, tmp: Path, target: Path) -> None:
        """Keep the complete file ``tmp`` until :meth:`commit` renames it onto ``target``."""
        if not self.is_open:
            raise RuntimeError("the run's outputs are closed")
        self.check_target(target)
        previous = self._files.pending.pop(Path(target), None)
        if previous is not None and previous != tmp:
            with contextlib.suppress(OSError):
                previous.unlink()
        self._files.pending[Path(target)] = tmp

    def scratch_file(self, directory: Path, prefix: str, suffix: str) -> Tuple[int, Path]:
        """A new private file (fd, path) in ``directory``, removed when the run ends."""
        try:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
        except OSError as exc:
            raise write_error(Path(directory) / (prefix + "*" + suffix), exc) from None
        self._files.scratch.append(Path(name))
        return fd, Path(name)

    @property
    def pending(self) -> List[Path]:
        """The targets written so far, in order."""
        return list(self._files.pending)

    def check_targets(self) -> None:
        """An error naming the first pending target that cannot be renamed onto: a protected
        input, or a directory (a file cannot replace it); nothing is renamed."""
        for target in self._files.pending:
            self.check_target(target)
            if os.path.isdir(target) and not os.path.islink(target):
                raise write_error(
                    target, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
                )

    def commit(self) -> None:
        """Check every target (:meth:`check_targets`), then rename every pending file onto its
        target (:data:`LAST_OUTPUTS` last), remove the scratch files, release the directory."""
        files = self._files
        if not files.open:
            return
        order = sorted(files.pending.items(), key=lambda item: item[0].name in LAST_OUTPUTS)
        try:
            self.check_targets()
            for target, tmp in order:
                self.check_target(target)
                os.replace(tmp, target)
                del files.pending[target]
        except OSError as exc:
            files.discard(remove_created_dir=True)
            raise write_error(target, exc) from None
        except BaseException:
            files.discard(remove_created_dir=True)
            raise
        files.discard()  # scratch files and the lock

    def abort(self) -> None:
        """Remove every file the run wrote (nothing visible was) and the output directory if the
        run created it; release the directory."""
        self._files.discard(remove_created_dir=True)

    def __enter__(self) -> "RunOutputs":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def versions() -> Dict[str, str]:
    """Versions of everything that shapes the results (pandas and matplotlib: as imported, else
    as installed; a run that wrote no table or figure need not import them to name them)."""
    import numpy
    import torch

    import dcn_inspect
    from dcn_inspect.ops import backend_info

    return {
        "dcn_inspect": dcn_inspect.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pandas": _version("pandas"),
        "matplotlib": _version("matplotlib"),
        "ops_backend": backend_info().name,
    }


def _version(package: str) -> str:
    """``package.__version__`` if it is imported, else the installed distribution's version."""
    module = sys.modules.get(package)
    if module is not None:
        return str(module.__version__)
    from importlib import metadata

    return metadata.version(package)


#: Keys of summary.json that legitimately differ between two identical runs.
TIMING_KEYS = (
    "wall_seconds",
    "finished_at",
    "started_at",
    "images_per_second",
    "forward_seconds",
    "build_seconds",
    "timing",
)


class RunSummary:
    """Collects what a command did and writes ``summary.json`` at the end (atomically)."""

    def __init__(self, command: str, parameters: Dict[str, Any]) -> None:
        self.started = time.time()
        self.data: Dict[str, Any] = {"command": command, "parameters": parameters}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def write(self, out_dir: Path) -> Path:
        self.data["versions"] = versions()
        self.data["argv"] = sys.argv[1:]
        self.data["wall_seconds"] = round(time.time() - self.started, 3)
        path = Path(out_dir) / "summary.json"
        write_text(
            path, json.dumps(self.data, indent=2, sort_keys=True, default=_json_default) + "\n"
        )
        return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "as_dict"):
        return value.as_dict()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
