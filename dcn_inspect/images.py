"""Reading images and turning them into model inputs, with the exact original<->input scale.

Images are decoded with Pillow, EXIF orientation honoured, converted to 8-bit RGB whatever
their mode (grayscale, palette, RGBA, CMYK, 16-bit). Images above a pixel limit are refused
from their header, before the pixels are decoded.

A model input is made the way the checkpoint's framework makes it (:class:`Preprocess`,
:mod:`dcn_inspect.resize`): resized (size rule and interpolation of that framework),
normalised, then zero-padded at the bottom and right to the size divisor. The padded cells
are model input but not image: :attr:`ModelInput.scale_to_original` is original / resized
size, so frames map padding to positions beyond the image (border units of the padding count
in no category, like units whose centre lies outside the image).

Every multi-image command follows one policy for images it cannot use (:class:`SkippedImages`):
such an image is skipped and its reason kept for ``summary.json`` and the final message; with
``strict``, or when it is the only image, it is an error. :class:`ImageError` carries a short
``kind`` of reason ("image file not found", "unreadable image", ...) so skipped images can be
counted by kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.utils.data
from PIL import Image, ImageOps, UnidentifiedImageError

from dcn_inspect.defaults import DEFAULT_MAX_PIXELS
from dcn_inspect.errors import InputError
from dcn_inspect.models.registry import Preprocess
from dcn_inspect.resize import padded_size, resize_image, resized_size

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageError",
    "ModelInput",
    "SkippedImages",
    "load_image",
    "model_input_size",
    "read_model_input",
    "resized_size",
    "to_model_input",
]

#: ``ImageError.kind`` values.
NOT_FOUND = "image file not found"
UNREADABLE = "unreadable image"
TOO_LARGE = "image too large"
SIZE_MISMATCH = "image size differs from its annotation"


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
    resized_hw: Optional[Tuple[int, int]] = None  # the image inside it (default: input_hw, no padding)

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


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read ``path`` as an RGB uint8 array [H, W, 3]; one-line :class:`InputError` on failure."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: image not found", NOT_FOUND)
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, expected an image file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: image file is empty")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max_pixels > 0 and width * height > max_pixels:
                raise ImageError(
                    f"{path}: image is {width}x{height} = {width * height} pixels, above the limit of "
                    f"{max_pixels} (raise it with `max_pixels`)",
                    TOO_LARGE,
                )
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                peak = 65535.0 if array.max(initial=0) > 255 else 255.0
                rgb = np.repeat((array / peak * 255.0).round().clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
                return rgb
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba)
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused as a decompression bomb ({exc}); raise the limit with `max_pixels`", TOO_LARGE) from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: image is corrupt or truncated ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def model_input_size(original_hw: Tuple[int, int], preprocess: Preprocess, resize: Optional[int] = None) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(resized size, padded model-input size) of an image of ``original_hw``.

    ``resize`` overrides the model's shorter side (0: the image's own size; the model's
    ``max_size`` then does not apply); the model's size rule and size divisor always do.
    """
    target = preprocess.resize if resize is None else resize
    max_size = preprocess.max_size if resize is None else 0
    resized = resized_size(original_hw, target, max_size, preprocess.size_rule)
    return resized, padded_size(resized, preprocess.size_divisor)


def to_model_input(image: np.ndarray, preprocess: Preprocess, resize: int | None = None) -> ModelInput:
    """Resize, normalise and pad an RGB uint8 image for a model. ``resize`` overrides the model's own."""
    original_hw = (int(image.shape[0]), int(image.shape[1]))
    resized_hw, input_hw = model_input_size(original_hw, preprocess, resize)
    array = resize_image(image, resized_hw, preprocess.interpolation).astype(np.float32) / 255.0
    mean = np.asarray(preprocess.mean, dtype=np.float32)
    std = np.asarray(preprocess.std, dtype=np.float32)
    normalised = ((array - mean) / std).transpose(2, 0, 1)
    tensor = torch.zeros((1, 3, input_hw[0], input_hw[1]), dtype=torch.float32)
    tensor[0, :, : resized_hw[0], : resized_hw[1]] = torch.from_numpy(np.ascontiguousarray(normalised))
    return ModelInput(tensor=tensor, original_hw=original_hw, input_hw=input_hw, resized_hw=resized_hw)


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
    image = load_image(path, max_pixels)
    if expected_hw is not None and tuple(image.shape[:2]) != tuple(expected_hw):
        raise ImageError(
            f"{path}: image is {image.shape[1]}x{image.shape[0]} but its annotation says {expected_hw[1]}x{expected_hw[0]}",
            SIZE_MISMATCH,
        )
    return image, to_model_input(image, preprocess, resize)


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
    items: List[Dict[str, str]] = field(default_factory=list)  # {"image", "kind", "reason"} in order

    def skip(self, image: str, error: InputError) -> None:
        if self.strict:
            raise InputError(f"{error} (skipped images are errors with `strict`)", details=error.details) from error
        if self.total == 1:
            raise error
        self.items.append({"image": str(image), "kind": getattr(error, "kind", UNREADABLE), "reason": str(error)})

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
        return {"count": self.count, "by_kind": self.by_kind(), "images": self.items[:SKIPPED_LISTED]}


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

    def __init__(self, entries: Sequence[Any], indices: Sequence[int], preprocess: Preprocess, resize: Optional[int], max_pixels: int) -> None:
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
            return ImageItem(index, None, ImageError(f"{entry.file_name}: image file not found", NOT_FOUND))
        try:
            _, model_input = read_model_input(entry.path, self.preprocess, self.resize, self.max_pixels, (entry.height, entry.width))
        except ImageError as exc:
            return ImageItem(index, None, exc)
        return ImageItem(index, model_input.tensor[0], resized_hw=model_input.content_hw)
