"""Reading images and turning them into model inputs, with the exact original<->input scale.

Images are decoded with Pillow, EXIF orientation honoured (:mod:`dcn_inspect.io.image_file`),
converted to 8-bit RGB by one fixed rule per bit depth, never by the image's own values, as
``cv2.imread`` does:

- 8-bit images of every mode (grayscale, palette, RGB, RGBA, CMYK...): Pillow's
  ``convert("RGB")``. Transparency is dropped and the colour under it kept (as ``cv2.imread``
  and Pillow do), not blended onto a background;
- 16-bit images (grayscale PNG / TIFF): value / 257, rounded (65535 -> 255, 257 -> 1);
- 32-bit float images: intensities from 0 to 1, times 255, rounded; values outside 0..1 (or
  not finite) are refused: no fixed scale fits them;
- 32-bit integer images (other than a PNG's 16-bit values): refused.

Memory is bounded by one pixel limit
(``max_pixels``, :data:`~dcn_inspect.core.defaults.DEFAULT_MAX_PIXELS` by default), checked from the
image's header before anything is decoded, on the image AND on the model input it becomes
after resizing (a 1x40000 image resized to a shorter side of 600 would be a 600x24000000 input).

A model input is made the way the checkpoint's framework makes it (:class:`Preprocess`,
:mod:`dcn_inspect.io.resize`): resized (size rule and interpolation of that framework),
normalised, then zero-padded at the bottom and right to the size divisor. The padded cells
are model input but not image: :attr:`ModelInput.scale_to_original` is original / resized
size, per axis (a model with a fixed input size stretches the image, aspect ratio not kept,
so the two differ), so frames map padding to positions beyond the image (border units of the
padding count in no category, like units whose centre lies outside the image).

Every multi-image command follows one policy for images it cannot use (:class:`SkippedImages`):
such an image is skipped and its reason kept for ``summary.json`` and the final message; with
``strict``, or when it is the only image, it is an error. :class:`ImageError` carries a short
``kind`` of reason ("image file not found", "unreadable image", ...) so skipped images can be
counted by kind.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.utils.data
from PIL import Image, ImageOps, UnidentifiedImageError

from dcn_inspect.core.checks import (
    NOT_FOUND,
    SIZE_MISMATCH,
    TOO_LARGE,
    UNREADABLE,
    check_image_file,
    check_max_pixels,
    check_resize,
)
from dcn_inspect.core.defaults import DEFAULT_MAX_PIXELS
from dcn_inspect.core.errors import InputError
from dcn_inspect.io.image_file import (
    ROTATED_ORIENTATIONS,
    displayed_size,
    open_image,
    quiet_pillow_warnings,
    size_mismatch_message,
)
from dcn_inspect.io.resize import padded_size, resize_image, resized_size
from dcn_inspect.models.registry import Preprocess

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageError",
    "ModelInput",
    "SkippedImages",
    "check_image",
    "check_max_pixels",
    "check_model_input_size",
    "check_resize",
    "load_image",
    "model_input_size",
    "read_model_input",
    "resized_size",
    "to_model_input",
]

#: ``ImageError.kind`` values (NOT_FOUND, UNREADABLE, TOO_LARGE, SIZE_MISMATCH), like
#: ``check_max_pixels`` and ``check_resize``, live in :mod:`dcn_inspect.core.checks` (torch-free:
#: the command line runs them before it loads torch).


class ImageError(InputError):
    """An image that cannot be used; ``kind`` is a short reason for counting skipped images."""

    def __init__(self, message: str, kind: str = UNREADABLE) -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self) -> Any:  # DataLoader workers send these to the main process
        return (ImageError, (self.message, self.kind))


@dataclass(frozen=True)
class ModelInput:
    """One image prepared for a model."""

    tensor: torch.Tensor  # [1, 3, H, W], normalised (and padded)
    original_hw: Tuple[int, int]
    input_hw: Tuple[int, int]  # the tensor's size, padding included
    resized_hw: Optional[Tuple[int, int]] = (
        None  # the image inside it (default: input_hw, no padding)
    )

    @property
    def content_hw(self) -> Tuple[int, int]:
        """Size of the resized image inside the model input (the rest is padding)."""
        return self.resized_hw if self.resized_hw is not None else self.input_hw

    @property
    def scale_to_original(self) -> Tuple[float, float]:
        """(sx, sy): original-image x = model-input x * sx (continuous pixel coordinates).

        Original over RESIZED size: the padding at the bottom/right changes nothing here.
        """
        content = self.content_hw
        return self.original_hw[1] / content[1], self.original_hw[0] / content[0]


def check_model_input_size(
    source: Any,
    original_hw: Tuple[int, int],
    preprocess: Preprocess,
    resize: Optional[int],
    max_pixels: int,
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(resized size, padded model-input size) of an image of ``original_hw``, as
    :func:`model_input_size`; an :class:`ImageError` naming both the image's and the model
    input's size when the model input is above ``max_pixels`` (0: no limit). Nothing is
    allocated."""
    resized_hw, input_hw = model_input_size(original_hw, preprocess, resize)
    pixels = input_hw[0] * input_hw[1]
    if max_pixels > 0 and pixels > max_pixels:
        target = preprocess.resize if resize is None else resize
        max_size = preprocess.max_size if resize is None else 0
        rule = "the image's own size" if target <= 0 else f"shorter side resized to {target}"
        rule += f", longer side capped at {max_size}" if target > 0 and max_size > 0 else ""
        if resize is None and any(preprocess.fixed_size):
            rule = f"stretched to {preprocess.fixed_size[1]}x{preprocess.fixed_size[0]}"
        rule += (
            f", padded to a multiple of {preprocess.size_divisor}" if input_hw != resized_hw else ""
        )
        raise ImageError(
            f"{source}: the {original_hw[1]}x{original_hw[0]} image becomes a "
            f"{input_hw[1]}x{input_hw[0]} = {pixels} pixel model input ({rule}), above the limit "
            f"of {max_pixels} (lower `resize` or raise `max_pixels`)",
            TOO_LARGE,
        )
    return resized_hw, input_hw


@contextmanager
def _checked_image(
    path: Path, max_pixels: int, preprocess: Optional[Preprocess], resize: Optional[int]
) -> Iterator[Tuple[Image.Image, Tuple[int, int]]]:
    """The opened (not decoded) image and its (height, width) after EXIF orientation, once every
    check that needs no pixels has passed; Pillow's failures inside the block become
    :class:`ImageError` naming ``path``."""
    max_pixels = check_max_pixels(max_pixels)
    check_image_file(path, ImageError)
    try:
        with open_image(path) as (image, orientation):
            width, height = image.size
            if max_pixels > 0 and width * height > max_pixels:
                raise ImageError(
                    f"{path}: image is {width}x{height} = {width * height} pixels, above the "
                    f"limit of {max_pixels} (raise it with `max_pixels`)",
                    TOO_LARGE,
                )
            oriented = (width, height) if orientation in ROTATED_ORIENTATIONS else (height, width)
            if preprocess is not None:
                check_model_input_size(path, oriented, preprocess, resize, max_pixels)
            yield image, oriented
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"{path}: refused as a decompression bomb ({exc}); raise the limit with `max_pixels`",
            TOO_LARGE,
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except MemoryError:
        raise ImageError(
            f"{path}: out of memory decoding the image (lower `max_pixels`)", TOO_LARGE
        ) from None
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders and EXIF parsing raise many types for bad files
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ImageError(f"{path}: image is corrupt or truncated ({reason})") from None


def check_image(
    path: Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    preprocess: Optional[Preprocess] = None,
    resize: Optional[int] = None,
) -> Tuple[int, int]:
    """(height, width) of ``path`` from its header, after every check :func:`load_image` makes
    before decoding (found, readable, within ``max_pixels``, its model input too)."""
    with _checked_image(Path(path), max_pixels, preprocess, resize) as (_, hw):
        return hw


def load_image(
    path: Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    preprocess: Optional[Preprocess] = None,
    resize: Optional[int] = None,
) -> np.ndarray:
    """Read ``path`` as an RGB uint8 array [H, W, 3]; one-line :class:`InputError` on failure.

    The header is checked against ``max_pixels`` before decoding: the image's own size and,
    when ``preprocess`` is given, the model input it becomes (``resize`` overrides the
    model's shorter side, as in :func:`to_model_input`).
    """
    path = Path(path)
    with _checked_image(path, max_pixels, preprocess, resize) as (image, _):
        file_format = image.format
        with quiet_pillow_warnings():  # a corrupt EXIF block was reported by _checked_image
            image = ImageOps.exif_transpose(image)
        return _rgb_uint8(image, path, file_format)


def _rgb_uint8(image: Image.Image, path: Path, file_format: Optional[str]) -> np.ndarray:
    """The decoded ``image`` as RGB uint8 [H, W, 3], by the fixed rule of its bit depth (module
    docstring)."""
    mode = image.mode
    if mode.startswith("I;16") or (mode == "I" and file_format == "PNG"):  # 16-bit values
        levels = np.asarray(image, dtype=np.float64) / 257.0
    elif mode == "F":
        levels = np.asarray(image, dtype=np.float64)
        if not np.isfinite(levels).all():
            raise ImageError(f"{path}: 32-bit float image with non-finite values")
        low, high = float(levels.min(initial=0.0)), float(levels.max(initial=0.0))
        if low < 0.0 or high > 1.0:
            raise ImageError(
                f"{path}: 32-bit float image with values from {low:g} to {high:g}; float images "
                "are read as intensities from 0 to 1 (times 255): convert it to 8 or 16 bits"
            )
        levels = levels * 255.0
    elif mode in ("I", "I;32", "I;32B", "I;32L"):
        raise ImageError(
            f"{path}: 32-bit integer image ({mode}): no fixed 8-bit scale for it; "
            "convert it to 8 or 16 bits"
        )
    else:  # 8-bit modes; the colour under transparency is kept, as cv2.imread does
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    gray = np.floor(levels + 0.5).clip(0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def model_input_size(
    original_hw: Tuple[int, int], preprocess: Preprocess, resize: Optional[int] = None
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(resized size, padded model-input size) of an image of ``original_hw``.

    ``resize`` overrides the model's shorter side (0: the image's own size; the model's
    ``max_size`` then does not apply); the model's size rule and size divisor always do. A
    model's ``fixed_size`` (aspect ratio not kept) is its size unless ``resize`` overrides it.
    """
    if resize is None and any(preprocess.fixed_size):
        fixed = (int(preprocess.fixed_size[0]), int(preprocess.fixed_size[1]))
        return fixed, padded_size(fixed, preprocess.size_divisor)
    target = preprocess.resize if resize is None else resize
    max_size = preprocess.max_size if resize is None else 0
    resized = resized_size(original_hw, target, max_size, preprocess.size_rule)
    return resized, padded_size(resized, preprocess.size_divisor)


def to_model_input(
    image: np.ndarray,
    preprocess: Preprocess,
    resize: Optional[int] = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ModelInput:
    """Resize, normalise and pad an RGB uint8 image for a model. ``resize`` overrides the model's
    own; a model input above ``max_pixels`` is refused before it is allocated."""
    original_hw = (int(image.shape[0]), int(image.shape[1]))
    resized_hw, input_hw = check_model_input_size(
        "image", original_hw, preprocess, resize, check_max_pixels(max_pixels)
    )
    array = resize_image(image, resized_hw, preprocess.interpolation).astype(np.float32) / 255.0
    mean = np.asarray(preprocess.mean, dtype=np.float32)
    std = np.asarray(preprocess.std, dtype=np.float32)
    normalised = ((array - mean) / std).transpose(2, 0, 1)
    tensor = torch.zeros((1, 3, input_hw[0], input_hw[1]), dtype=torch.float32)
    tensor[0, :, : resized_hw[0], : resized_hw[1]] = torch.from_numpy(
        np.ascontiguousarray(normalised)
    )
    return ModelInput(
        tensor=tensor, original_hw=original_hw, input_hw=input_hw, resized_hw=resized_hw
    )


def read_model_input(
    path: Path,
    preprocess: Preprocess,
    resize: Optional[int] = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    expected_hw: Optional[Tuple[int, int]] = None,
) -> Tuple[np.ndarray, ModelInput]:
    """Read ``path`` and prepare it for a model: (RGB uint8 image, model input).

    ``expected_hw`` (from an annotation) must match the decoded size, else :class:`ImageError`.
    """
    image = load_image(path, max_pixels, preprocess, resize)
    if expected_hw is not None and tuple(image.shape[:2]) != tuple(expected_hw):
        header = displayed_size(Path(path))
        orientation = header[1] if header is not None else 1
        raise ImageError(
            size_mismatch_message(path, image.shape[:2], expected_hw, orientation), SIZE_MISMATCH
        )
    return image, to_model_input(image, preprocess, resize, max_pixels)


#: How many skipped images ``summary.json`` lists by name (all are counted).
SKIPPED_LISTED = 20


@dataclass
class SkippedImages:
    """The one policy for images a command cannot use, and their record for ``summary.json``.

    :meth:`skip` keeps an image's reason, or raises its error when ``strict`` is set or the
    image is the only one (``total == 1``): a single unusable input is the user's error, one
    bad file among many is not. :meth:`check_any_used` fails when nothing was usable.
    """

    total: int
    strict: bool = False
    items: List[Dict[str, str]] = field(
        default_factory=list
    )  # {"image", "kind", "reason"} in order

    def skip(self, image: str, error: InputError) -> None:
        if self.strict:
            raise InputError(
                f"{error} (skipped images are errors with `strict`)", details=error.details
            ) from error
        if self.total == 1:
            raise error
        self.items.append(
            {"image": str(image), "kind": getattr(error, "kind", UNREADABLE), "reason": str(error)}
        )

    @property
    def count(self) -> int:
        return len(self.items)

    def by_kind(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for item in self.items:
            counts[item["kind"]] = counts.get(item["kind"], 0) + 1
        return counts

    def check_any_used(self, used: int, what: str) -> None:
        """Fail when none of the ``total`` inputs could be used (``what`` names them)."""
        if used == 0 and self.total > 0:
            reasons = "; ".join(item["reason"] for item in self.items[:3]) or "none listed"
            raise InputError(f"{what}: no image could be used ({reasons})")

    def merge(self, others: Sequence["SkippedImages"]) -> "SkippedImages":
        """One record of several (the ranks of a distributed run), in the given order."""
        merged = SkippedImages(self.total, self.strict, list(self.items))
        for other in others:
            merged.items.extend(other.items)
        return merged

    def summary(self) -> Dict[str, Any]:
        """The ``skipped`` section of every command's ``summary.json``."""
        return {
            "count": self.count,
            "by_kind": self.by_kind(),
            "images": self.items[:SKIPPED_LISTED],
        }


@dataclass
class ImageItem:
    """One image of a dataset as a DataLoader worker prepared it: its model input, or why not."""

    index: int  # position in the dataset's image list
    tensor: Optional[torch.Tensor]  # [3, H, W] model input; None when the image cannot be used
    error: Optional[ImageError] = None
    resized_hw: Optional[Tuple[int, int]] = None  # the image inside the (padded) model input


class DatasetImages(torch.utils.data.Dataset):
    """Decodes and preprocesses the annotated images ``indices`` of ``entries`` (in DataLoader
    workers); an image that cannot be used becomes an item with its error, never an exception,
    so the main process applies :class:`SkippedImages` to it.

    ``entries`` need ``path`` (None when not found), ``file_name``, ``width`` and ``height``.
    """

    def __init__(
        self,
        entries: Sequence[Any],
        indices: Sequence[int],
        preprocess: Preprocess,
        resize: Optional[int],
        max_pixels: int,
    ) -> None:
        self.entries = entries
        self.indices = list(indices)
        self.preprocess = preprocess
        self.resize = resize
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> ImageItem:
        index = self.indices[position]
        entry = self.entries[index]
        if entry.path is None:
            return ImageItem(
                index, None, ImageError(f"{entry.file_name}: image file not found", NOT_FOUND)
            )
        try:
            _, model_input = read_model_input(
                entry.path,
                self.preprocess,
                self.resize,
                self.max_pixels,
                (entry.height, entry.width),
            )
        except ImageError as exc:
            return ImageItem(index, None, exc)
        return ImageItem(index, model_input.tensor[0], resized_hw=model_input.content_hw)
