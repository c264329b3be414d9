"""What an image file's header says, without decoding it or loading torch: its size as displayed
(after EXIF orientation), its EXIF orientation, and the one message for an annotation whose
image size differs from the image's.

Images are read in the frame they are displayed in: a photo stored 4032x3024 with EXIF
orientation 6 (rotated 90 degrees) is a 3024x4032 image (:func:`ImageOps.exif_transpose`), as
every viewer and annotation tool shows it. Orientations 5 to 8 swap width and height.

Pillow reports a corrupt EXIF block with its own ``UserWarning`` (and a site-packages path);
:func:`open_image` turns it into one :func:`~dcn_inspect.core.errors.warn` line naming the
image, and reads what it can (the orientation tag usually survives).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple

from dcn_inspect.core.errors import warn

#: The EXIF tag of the orientation, and the orientations that turn the image by 90 degrees.
ORIENTATION_TAG = 0x0112
ROTATED_ORIENTATIONS = (5, 6, 7, 8)


@contextmanager
def quiet_pillow_warnings() -> Iterator[list]:
    """Collect the warnings issued inside the block instead of printing them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _is_exif_warning(caught: warnings.WarningMessage) -> bool:
    """Pillow's complaint about a metadata block (EXIF is parsed by its TIFF directory reader)."""
    return caught.category is UserWarning and Path(caught.filename).name == "TiffImagePlugin.py"


@contextmanager
def open_image(path: Path) -> Iterator[Tuple[Any, int]]:
    """The image file ``path`` opened by Pillow (not decoded) and its EXIF orientation (1
    without one). A corrupt EXIF block (Pillow parses it while opening some formats and in
    ``getexif``) is one :func:`~dcn_inspect.core.errors.warn` line naming ``path``, and read as
    far as it goes; Pillow's other warnings are issued as they were. Pillow's errors propagate."""
    from PIL import Image

    with quiet_pillow_warnings() as at_open:
        image = Image.open(path)
    try:
        with quiet_pillow_warnings() as at_exif:
            orientation = image.getexif().get(ORIENTATION_TAG, 1)
    except BaseException:
        image.close()
        raise
    problems = [w for w in at_open if _is_exif_warning(w)]
    problems += [w for w in at_exif if issubclass(w.category, UserWarning)]
    others = [w for w in at_open if not _is_exif_warning(w)]
    others += [w for w in at_exif if not issubclass(w.category, UserWarning)]
    for other in others:
        warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    if problems:
        warn(f"{path}: corrupt EXIF block, read as far as it goes ({problems[0].message})")
    with image:
        yield image, orientation if isinstance(orientation, int) else 1


def read_displayed_size(path: Path) -> Tuple[Tuple[int, int], int]:
    """((height, width) as displayed, EXIF orientation) of the image file ``path``, from its
    header; Pillow's errors propagate."""
    with open_image(path) as (image, orientation):
        width, height = image.size
    if orientation in ROTATED_ORIENTATIONS:
        width, height = height, width
    return (int(height), int(width)), orientation


def displayed_size(path: Path) -> Optional[Tuple[Tuple[int, int], int]]:
    """:func:`read_displayed_size`, quietly: ``None`` when the file cannot be read, and no warning
    (the image reader gives them, and says why it cannot read it, in its own words)."""
    try:
        with quiet_pillow_warnings():
            return read_displayed_size(path)
    except Exception:  # noqa: BLE001 - Pillow raises many types for unreadable files
        return None


def size_mismatch_message(
    image: Any,
    image_hw: Tuple[int, int],
    annotated_hw: Tuple[int, int],
    orientation: int = 1,
    source: Any = None,
) -> str:
    """The line for an image of ``image_hw`` whose annotation (in ``source``, when named) says
    ``annotated_hw``; when they are the same size turned by 90 degrees, why."""
    where = f" in {source}" if source is not None else ""
    message = (
        f"{image}: image is {image_hw[1]}x{image_hw[0]} but its annotation{where} says "
        f"{annotated_hw[1]}x{annotated_hw[0]}"
    )
    if tuple(image_hw) == tuple(annotated_hw)[::-1]:
        if orientation in ROTATED_ORIENTATIONS:
            message += (
                f" (width and height swapped: the image carries an EXIF rotation (orientation "
                f"{orientation}) and is read as displayed; the annotation is in the stored frame)"
            )
        else:
            message += " (width and height swapped)"
    return message
