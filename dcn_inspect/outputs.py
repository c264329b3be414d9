"""Writing results: atomic files, deterministic CSVs and the per-run ``summary.json``.

Every output goes to a temporary file in the same directory and is renamed into place only
when complete, so an interrupted or failed run never leaves a partial file behind. CSVs are
written with a fixed float format so that the same inputs give the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence

import pandas as pd

from dcn_inspect.columns import FLOAT_FORMAT, Column, formatted
from dcn_inspect.errors import InputError

#: Float format of CSV columns without a description (positions have fixed decimals: :mod:`dcn_inspect.columns`).
CSV_FLOAT_FORMAT = FLOAT_FORMAT


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(path: Path, frame: pd.DataFrame, columns: Optional[Sequence[Column]] = None) -> None:
    """Write a plain CSV atomically: a header line, then rows (``pandas.read_csv(path)`` reads it).

    ``columns`` (the file's :class:`~dcn_inspect.columns.Column` descriptions, which
    ``summary.json`` also lists) must name the frame's columns in order; they set each float
    column's text (positions with fixed decimals). Other floats get six significant digits.
    """
    if columns is not None:
        frame = formatted(frame, columns)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            frame.to_csv(handle, index=False, float_format=CSV_FLOAT_FORMAT, lineterminator="\n")


def write_npz(path: Path, arrays: Dict[str, Any]) -> None:
    """Write a compressed ``.npz`` atomically (a file object keeps numpy from appending a suffix)."""
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


def prepare_out_dir(out: Path) -> Path:
    """Create ``out`` (reusing it if present; unrelated files are kept) and check it is writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory", param="out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out}: cannot create the output directory ({exc.strerror})", param="out") from None
    if not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory", param="out")
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"{out}: the output directory is not writable", param="out")
    return out


def versions() -> Dict[str, str]:
    """Versions of everything that shapes the results."""
    import matplotlib
    import numpy
    import torch

    import dcn_inspect
    from dcn_inspect.ops import backend_info

    return {
        "dcn_inspect": dcn_inspect.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pandas": pd.__version__,
        "matplotlib": matplotlib.__version__,
        "ops_backend": backend_info().name,
    }


#: Keys of summary.json that legitimately differ between two identical runs.
TIMING_KEYS = ("wall_seconds", "finished_at", "started_at", "images_per_second", "forward_seconds", "build_seconds", "timing")


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
        write_text(path, json.dumps(self.data, indent=2, sort_keys=True, default=_json_default) + "\n")
        return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "as_dict"):
        return value.as_dict()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
