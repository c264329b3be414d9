"""The native checkpoint format: one file with architecture, config, weights and metadata.

Written with ``torch.save`` as a plain dict of tensors and primitives so it loads with
``torch.load(weights_only=True)``; no pickled objects, so loading it never runs code.

Reading any checkpoint (:func:`read_checkpoint_file`) costs memory bounded by the file's size:
a zip archive's declared sizes (what PyTorch allocates to inflate it) are checked before
``torch.load`` opens it, and plain pickles go through an unpickler that builds no large object
from a small file (:mod:`dcn_inspect.models.safe_pickle`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from dcn_inspect.core.errors import InputError, refuse_special_file

NATIVE_FORMAT = "dcn-inspect/1"

#: Suffixes read as plain pickles (detectron2 model-zoo files) rather than PyTorch files.
PLAIN_PICKLE_SUFFIXES = (".pkl", ".pickle")

#: How much larger than the file a zip checkpoint may declare its contents: ``torch.save`` stores
#: its entries uncompressed (1x); an archive re-compressed with deflate holds float weights at
#: ~90 % of their size. A file that would inflate further is mostly padding: a zip bomb.
MAX_INFLATION = 4

#: Declared bytes allowed beyond ``MAX_INFLATION`` times the file size (small files, zero tensors).
INFLATION_SLACK_BYTES = 64 * 2**20

#: Entries a zip checkpoint may have (``torch.save`` writes one per tensor storage plus a few).
MAX_ZIP_ENTRIES = 100_000


def missing_file_reason(path: Path) -> str:
    """Why ``path`` cannot be opened although it was named: a symlink loop, a broken link, or
    absent."""
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "symlink loop (the link points back to itself)"
            return f"broken symlink (to {os.readlink(path)})"
    return "file not found"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_native(
    path: Path,
    arch: str,
    config: Dict[str, Any],
    model: nn.Module,
    meta: Optional[Dict[str, Any]] = None,
) -> None:
    """Write a native checkpoint atomically."""
    from dcn_inspect.core.files import atomic_path

    payload = {
        "format": NATIVE_FORMAT,
        "arch": arch,
        "config": dict(config),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


def read_checkpoint_file(path: Path) -> Any:
    """Read a checkpoint without running code from it; one-line errors for missing, corrupt or
    unsafe files.

    PyTorch files (zip or legacy format) go through ``torch.load(weights_only=True)``, with
    numpy arrays/scalars allowed through guarded reconstructors; plain pickles (detectron2
    ``.pkl``) through :func:`dcn_inspect.models.safe_pickle.load_pickle_file`, which refuses code.
    """
    from dcn_inspect.models.safe_pickle import NUMPY_SAFE_GLOBALS, load_pickle_file

    path = Path(path)
    if not path.exists():
        reason = missing_file_reason(path)
        raise InputError(
            f"{path}: {'checkpoint not found' if reason == 'file not found' else reason}"
        )
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a checkpoint file")
    refuse_special_file(path, "a checkpoint file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: checkpoint file is empty")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        check_zip_sizes(path)
    if not is_zip and path.suffix.lower() in PLAIN_PICKLE_SUFFIXES:
        return load_pickle_file(path)
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure is reported as a bad checkpoint
        text = str(exc).strip()
        if not is_zip and "magic number" in text:
            return load_pickle_file(path)  # a plain pickle under another suffix
        first = text.splitlines()[0] if text else type(exc).__name__
        if "Weights only load failed" in text or "weights_only" in text:
            raise InputError(
                f"{path}: refused to load: {_weights_only_reason(text)} "
                "(read with torch.load(weights_only=True), which never runs code; re-save only "
                "the state_dict where the file is trusted)"
            ) from None
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({first[:200]})") from None


def check_zip_sizes(path: Path) -> None:
    """Refuse a zip checkpoint whose entries declare more bytes than :data:`MAX_INFLATION` times
    the file (plus :data:`INFLATION_SLACK_BYTES`), or too many entries, before anything is
    inflated."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            end = zipfile._EndRecData(handle)  # type: ignore[attr-defined]  # the end record only: no entry is read
        if end is None:
            raise zipfile.BadZipFile("no end of central directory")
        entries = int(end[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]
        if entries > MAX_ZIP_ENTRIES:
            raise InputError(
                f"{path}: the archive declares {entries} entries (at most {MAX_ZIP_ENTRIES}); "
                "not a PyTorch checkpoint"
            )
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except InputError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        ValueError,
        EOFError,
        struct.error,
    ) as exc:
        raise InputError(
            f"{path}: not a readable PyTorch checkpoint "
            f"(broken zip archive: {str(exc)[:160] or type(exc).__name__})"
        ) from None
    declared = sum(info.file_size for info in infos)
    if declared > MAX_INFLATION * size + INFLATION_SLACK_BYTES:
        compressed = sum(1 for info in infos if info.compress_type != zipfile.ZIP_STORED)
        raise InputError(
            f"{path}: the {size}-byte archive declares {declared} bytes uncompressed "
            f"({compressed} compressed entries, over {MAX_INFLATION}x its size): refused before "
            "inflating it (a zip bomb?); torch.save writes uncompressed archives"
        )


def _weights_only_reason(text: str) -> str:
    """The useful part of PyTorch's multi-paragraph weights_only refusal."""
    refused = re.search(r"refused: ([^\n]+)", text)
    if refused:
        return refused.group(1).strip()[:160]
    unsupported = re.search(r"GLOBAL ([\w.]+)", text)
    if unsupported:
        return f"the file pickles {unsupported.group(1)}, not only tensors"
    detail = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return (
        detail.group(1).strip()[:160]
        if detail
        else "the file contains pickled objects, not only tensors"
    )


def is_native(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == NATIVE_FORMAT
