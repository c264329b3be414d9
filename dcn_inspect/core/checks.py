"""Option values checked before any work, without torch: the one copy of each check.

The library calls these where it always did (``check_resize`` in the command functions,
``parse_point`` while choosing units, ...), and the command line calls the same functions
before it imports torch and loads the model (:mod:`dcn_inspect.cli.prechecks`), so a plain
usage mistake (``--grid 0``, a missing image, ``--at`` off the image) is reported in a fraction
of a second with the library's own words. Nothing here imports torch, numpy or Pillow.

Every error is an :class:`~dcn_inspect.core.errors.InputError` naming the parameter (``at``,
``grid``, ``resize``...), as everywhere in the library.
"""

from __future__ import annotations

import errno
import math
import numbers
import os
import stat
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

from dcn_inspect.core.defaults import FIGURE_FORMATS, MAX_RESIZE_SIDE
from dcn_inspect.core.errors import InputError, refuse_special_file

#: An offset group: an index, or "mean" (the groups averaged).
GroupChoice = Union[int, str]

#: Kinds of unusable images (``ImageError.kind`` in :mod:`dcn_inspect.io.images`).
NOT_FOUND = "image file not found"
UNREADABLE = "unreadable image"
TOO_LARGE = "image too large"
SIZE_MISMATCH = "image size differs from its annotation"

#: Makes the error for an unusable image from (message, kind).
ImageErrorFactory = Callable[[str, str], InputError]


def _plain_error(message: str, kind: str) -> InputError:
    return InputError(message)


def check_figure_format(fmt: str) -> str:
    """``fmt`` lower-cased without a dot; an error unless it is one of :data:`FIGURE_FORMATS`."""
    fmt = fmt.lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        raise InputError(f"{fmt!r}: use png, svg or pdf", param="fmt")
    return fmt


def check_max_pixels(max_pixels: int) -> int:
    """``max_pixels`` is 0 (no limit) or a positive number of pixels."""
    if (
        isinstance(max_pixels, bool)
        or not isinstance(max_pixels, numbers.Integral)
        or max_pixels < 0
    ):
        raise InputError(
            f"{max_pixels!r}: must be a number of pixels >= 1, or 0 for no limit",
            param="max_pixels",
        )
    return int(max_pixels)


def check_resize(resize: Optional[int]) -> None:
    """``resize`` is None (the model's own), 0 (the image's size) or a positive shorter side up to
    :data:`~dcn_inspect.core.defaults.MAX_RESIZE_SIDE`."""
    if resize is None:
        return
    if isinstance(resize, bool) or not isinstance(resize, numbers.Integral):
        raise InputError(f"{resize!r}: must be a whole number of pixels", param="resize")
    if resize < 0:
        raise InputError(
            f"{resize}: must be 0 (the image's own size) or a positive shorter-side length",
            param="resize",
        )
    if resize > MAX_RESIZE_SIDE:
        raise InputError(
            f"{resize}: above the largest shorter side of {MAX_RESIZE_SIDE} pixels", param="resize"
        )


def check_group(group: GroupChoice) -> GroupChoice:
    """Validate a ``group`` value ("mean" or a non-negative integer, also given as a string)."""
    if isinstance(group, str):
        if group.strip().lower() == "mean":
            return "mean"
        try:
            group = int(group)
        except ValueError:
            raise InputError(
                f"{group!r}: expected an offset-group index (0, 1, ...) or 'mean'", param="group"
            ) from None
    if int(group) < 0:
        raise InputError(f"{group}: the offset-group index must be >= 0", param="group")
    return int(group)


def parse_point(text: str) -> Tuple[float, float]:
    """``"X,Y"`` -> (x, y) in image pixels; one-line error naming the ``at`` parameter."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
    except ValueError:
        raise InputError(
            f"{text!r}: expected X,Y in image pixels, e.g. `at` 120,80", param="at"
        ) from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise InputError(f"{text!r}: X and Y must be finite numbers", param="at")
    return x, y


def check_unit_options(at: Sequence[Any], grid: Optional[int]) -> List[Tuple[float, float]]:
    """The ``at`` points as (x, y) (strings ``"X,Y"`` or pairs) and a checked ``grid`` step,
    before any work: the unit options every unit-analysing command takes."""
    points = [parse_point(p) if isinstance(p, str) else (float(p[0]), float(p[1])) for p in at]
    if grid is not None and grid < 1:
        raise InputError(f"{grid}: STEP must be a positive number of units", param="grid")
    return points


def check_point_on_image(x: float, y: float, image_name: str, image_hw: Tuple[int, int]) -> None:
    """An ``at`` point (x, y) lies on the image (its edges included)."""
    height, width = image_hw
    if not (0 <= x <= width and 0 <= y <= height):
        raise InputError(f"{x:g},{y:g}: outside {image_name} ({width}x{height} pixels)", param="at")


def parse_kernel_point(text: str) -> Tuple[int, int]:
    """``"a,b"`` (kernel row a, column b, 0-based) -> (a, b); one-line error naming
    ``kernel_point``."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        raise InputError(
            f"{text!r}: expected A,B = kernel row, column "
            "(0-based; 1,1 is the centre of a 3x3 kernel)",
            param="kernel_point",
        ) from None
    if a < 0 or b < 0:
        raise InputError(f"{text!r}: kernel row and column start at 0", param="kernel_point")
    return a, b


def check_image_file(path: Path, error: ImageErrorFactory = _plain_error) -> os.stat_result:
    """``path`` is an image file that can be opened: found, no symlink loop, readable, not a
    directory, pipe or device, not empty. Returns its status; ``error(message, kind)`` makes the
    error (:class:`~dcn_inspect.io.images.ImageError` in the library)."""
    try:
        status = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: image not found", NOT_FOUND) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(
                f"{path}: symlink loop (the link points back to itself)", NOT_FOUND
            ) from None
        raise error(f"{path}: cannot read ({exc.strerror})", NOT_FOUND) from None
    if stat.S_ISDIR(status.st_mode):
        raise error(f"{path}: is a directory, expected an image file", UNREADABLE)
    refuse_special_file(path, "an image file", lambda message: error(message, UNREADABLE))
    if status.st_size == 0:
        raise error(f"{path}: image file is empty", UNREADABLE)
    return status
