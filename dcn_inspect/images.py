"""Reading images and turning them into model inputs, with the exact original<->input scale.

Images are decoded with Pillow, EXIF orientation honoured, converted to 8-bit RGB whatever
their mode (grayscale, palette, RGBA, CMYK, 16-bit). Images above a pixel limit are refused
from their header, before the pixels are decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dcn_inspect.errors import InputError
from dcn_inspect.models.registry import Preprocess

#: Default limit on width*height; raise it with ``--max-pixels``.
DEFAULT_MAX_PIXELS = 50_000_000


@dataclass(frozen=True)
class ModelInput:
    """One image prepared for a model."""

    tensor: torch.Tensor  # [1, 3, H, W], normalised
    original_hw: Tuple[int, int]
    input_hw: Tuple[int, int]

    @property
    def scale_to_original(self) -> Tuple[float, float]:
        """(sx, sy): original-image x = model-input x * sx (continuous pixel coordinates)."""
        return self.original_hw[1] / self.input_hw[1], self.original_hw[0] / self.input_hw[0]


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read ``path`` as an RGB uint8 array [H, W, 3]; one-line :class:`InputError` on failure."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: image not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an image file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: image file is empty")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max_pixels > 0 and width * height > max_pixels:
                raise InputError(
                    f"{path}: image is {width}x{height} = {width * height} pixels, above the limit of "
                    f"{max_pixels} (raise it with --max-pixels)"
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
        raise InputError(f"{path}: refused as a decompression bomb ({exc}); raise the limit with --max-pixels") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: image is corrupt or truncated ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def resized_size(hw: Tuple[int, int], resize: int, max_size: int = 0) -> Tuple[int, int]:
    """Size after scaling the shorter side to ``resize`` (0: unchanged), longer side capped at ``max_size``."""
    height, width = hw
    if resize <= 0:
        return height, width
    scale = resize / min(height, width)
    if max_size > 0 and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def to_model_input(image: np.ndarray, preprocess: Preprocess, resize: int | None = None) -> ModelInput:
    """Normalise (and resize) an RGB uint8 image for a model. ``resize`` overrides the model's own."""
    target = preprocess.resize if resize is None else resize
    original_hw = (int(image.shape[0]), int(image.shape[1]))
    input_hw = resized_size(original_hw, target, preprocess.max_size if resize is None else 0)
    pil = Image.fromarray(image)
    if input_hw != original_hw:
        pil = pil.resize((input_hw[1], input_hw[0]), Image.BILINEAR)
    array = np.asarray(pil, dtype=np.float32) / 255.0
    mean = np.asarray(preprocess.mean, dtype=np.float32)
    std = np.asarray(preprocess.std, dtype=np.float32)
    tensor = torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy()).unsqueeze(0)
    return ModelInput(tensor=tensor, original_hw=original_hw, input_hw=input_hw)


class ImageBatchReader:
    """Reads the images of a multi-image command, skipping unreadable ones.

    One unreadable image among several is skipped and its reason kept (for ``summary.json``
    and the final message); alone, or with ``strict``, it is an error.
    """

    def __init__(self, paths: List[Path], max_pixels: int, strict: bool) -> None:
        self.paths = paths
        self.max_pixels = max_pixels
        self.strict = strict
        self.skipped: List[Dict[str, str]] = []

    def read(self, path: Path) -> Optional[np.ndarray]:
        """The image as RGB uint8, or None when it was skipped."""
        try:
            return load_image(path, self.max_pixels)
        except InputError as exc:
            if self.strict or len(self.paths) == 1:
                raise
            self.skipped.append({"image": str(path), "reason": str(exc)})
            return None

    def check_any_read(self) -> None:
        """Fail when every image was skipped: there is nothing to report."""
        if len(self.skipped) == len(self.paths):
            reasons = "; ".join(item["reason"] for item in self.skipped[:3])
            raise InputError(f"no readable image among {len(self.paths)}: {reasons}")

    def summary(self) -> Dict[str, Any]:
        return {"count": len(self.skipped), "images": self.skipped}
