"""Finding an annotation's image file inside its dataset's folder, and OS errors in words.

A file name that points outside the dataset's folder (absolute, or through ``..``) is only
followed with ``allow_outside_paths``; without it the image is looked for by its bare name
inside, and :func:`outside_error` names the entry when it is not there.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Optional, Sequence

from dcn_inspect.core.errors import InputError


def os_reason(exc: OSError) -> str:
    """Why an OS call failed, in a few words (a symlink loop is named as one)."""
    return "symlink loop" if exc.errno == errno.ELOOP else (exc.strerror or type(exc).__name__)


def leaves_directory(file_name: str) -> bool:
    """True when ``file_name``, joined to a directory, points outside it (absolute, or ``..``)."""
    name = Path(file_name)
    return name.is_absolute() or ".." in name.parts


def find_image(
    file_name: str, search_dirs: Sequence[Path], allow_outside: bool = True
) -> Optional[Path]:
    """The first existing ``dir / file_name`` (also tried with the bare file name); a
    ``file_name`` leaving the directories is only followed with ``allow_outside``."""
    outside = leaves_directory(file_name)
    for directory in search_dirs:
        candidates = (
            [directory / Path(file_name).name]
            if outside and not allow_outside
            else [directory / file_name, directory / Path(file_name).name]
        )
        for candidate in candidates:
            if candidate.is_file():
                return candidate
    return None


def outside_error(
    source: Path, where: str, file_name: str, search_dirs: Sequence[Path]
) -> InputError:
    """The error for an image named outside the dataset's folder and not found inside it."""
    inside = ", ".join(str(d) for d in search_dirs)
    return InputError(
        f"{source}: {where}: file_name {file_name[:200]!r} points outside the dataset directory "
        f"({inside}) and {Path(file_name).name} is not there; "
        "pass `allow_outside_paths` to read it"
    )
