"""Usage mistakes caught before torch and the model are loaded.

Every command's options are checked here first (the app runs :func:`precheck` before the
command's own function, :class:`dcn_inspect.cli.app.App`), with the library's own check
functions (:mod:`dcn_inspect.core.checks`, torch-free), so ``--grid 0``, a missing image or
``--at`` off the image are reported in a fraction of a second, in the words the library would
use seconds later. What needs the model (layer names, offset groups that exist) is left to the
library; so is whatever a check here cannot tell (an image Pillow cannot read: the reader says
why), and so is the skipping policy of several images (one image is the user's error at once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

#: Which option values each command checks before loading anything, in the order their errors
#: are reported; a command not named here has nothing to check early.
PRECHECKS: Dict[str, Tuple[str, ...]] = {
    "sample-points": ("fmt", "resize", "max_pixels", "group", "units", "images"),
    "receptive-field": ("fmt", "resize", "max_pixels", "group", "units", "images"),
    "offsets": ("fmt", "resize", "max_pixels", "group", "kernel_point", "images"),
    "bins": ("fmt", "resize", "max_pixels"),
    "attention": ("fmt", "resize", "max_pixels", "images"),
    "dilation-stats": ("resize", "max_pixels"),
    "info": ("resize", "max_pixels"),
    "explore": ("resize", "max_pixels", "images"),
}


#: What ``receptive-field --stats`` (a dataset, no unit options: the command refuses them
#: itself) leaves out.
NOT_IN_DATASET_MODE = ("group", "units", "images")


def precheck(command: str, given: Dict[str, Any]) -> None:
    """Check ``command``'s option values ``given`` (by Python parameter name); an
    :class:`~dcn_inspect.core.errors.InputError` naming the parameter on the first problem."""
    for name in PRECHECKS.get(command, ()):
        if not (given.get("stats") and name in NOT_IN_DATASET_MODE):
            _CHECKS[name](given)


def _fmt(given: Dict[str, Any]) -> None:
    from dcn_inspect.core.checks import check_figure_format

    check_figure_format(given["fmt"])


def _resize(given: Dict[str, Any]) -> None:
    from dcn_inspect.core.checks import check_resize

    check_resize(given.get("resize"))


def _max_pixels(given: Dict[str, Any]) -> None:
    from dcn_inspect.core.checks import check_max_pixels

    check_max_pixels(given["max_pixels"])


def _group(given: Dict[str, Any]) -> None:
    from dcn_inspect.core.checks import check_group

    check_group(given["group"])


def _units(given: Dict[str, Any]) -> None:
    from dcn_inspect.core.checks import check_unit_options

    check_unit_options(given.get("at") or (), given.get("grid"))


def _kernel_point(given: Dict[str, Any]) -> None:
    from dcn_inspect.core.checks import parse_kernel_point

    for text in given.get("kernel_point") or ():
        parse_kernel_point(text)


def _images(given: Dict[str, Any]) -> None:
    """One image named on the command line exists and is a file; every ``at`` point lies on
    each image (the given ones, else the bundled ones)."""
    from dcn_inspect.core.checks import check_image_file, check_point_on_image
    from dcn_inspect.io.image_file import displayed_size

    paths = _image_paths(given.get("images"))
    if given.get("images") and len(paths) == 1:  # several: unusable ones are skipped
        check_image_file(paths[0])
    points = _points(given.get("at"))
    if not points:
        return
    for path in paths:
        try:
            check_image_file(path)
        except ValueError:
            continue  # skipped (or reported) by the library
        size = displayed_size(path)  # (height, width) as displayed, EXIF orientation
        for x, y in points if size is not None else ():
            check_point_on_image(x, y, path.name, size[0])


def _image_paths(images: Any) -> List[Path]:
    if images:
        return [Path(p) for p in images]
    from dcn_inspect.io.datasets import bundled_images

    return [Path(p) for p in bundled_images()]


def _points(at: Any) -> List[Tuple[float, float]]:
    from dcn_inspect.core.checks import parse_point

    return [parse_point(text) for text in at or ()]


_CHECKS: Dict[str, Callable[[Dict[str, Any]], None]] = {
    "fmt": _fmt,
    "resize": _resize,
    "max_pixels": _max_pixels,
    "group": _group,
    "units": _units,
    "kernel_point": _kernel_point,
    "images": _images,
}
