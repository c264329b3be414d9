"""Resizing an image the way the framework behind a checkpoint does, without that framework.

Offsets near objects and borders depend on the exact input pixels, so a checkpoint is fed the
image its framework would have made:

* sizes (:func:`resized_size`): ``round`` (Python's ``round``: dcn-inspect's own models),
  ``mmdetection`` (mmcv ``rescale_size``: factor ``min(max_size / long side, resize / short
  side)``, each side ``int(side * factor + 0.5)``) or ``detectron2`` (``ResizeShortestEdge``:
  the short side becomes ``resize`` exactly, the long side ``factor * side``, both scaled down
  together when the long side exceeds ``max_size``, then ``int(x + 0.5)``) or ``transformers``
  (transformers' ``get_size_with_aspect_ratio``, the DETR-family image processors: when the long
  side would exceed ``max_size`` the short side becomes ``round(max_size * short / long)``, else
  ``resize``; an image whose short side is that size already is kept; the long side is
  TRUNCATED, ``int(short * long / short_original)`` with the unrounded short side when capped);
* pixels (:func:`resize_image`): Pillow's bilinear filter (antialiased when shrinking; what
  detectron2 uses for uint8 images) or :func:`cv2_bilinear`, a numpy reimplementation of
  OpenCV's ``cv2.resize(..., interpolation=cv2.INTER_LINEAR)`` on uint8 images (what
  mmdetection uses): no antialiasing, half-pixel centres, 11-bit fixed-point weights and
  OpenCV's rounding, bit-exact with OpenCV 4.x/5.x on x86 (tested against ``cv2`` when it is
  installed);
* padding (:func:`padded_size`): bottom/right to a multiple of the size divisor (both
  frameworks pad the normalised tensor with zeros).

The adjoint of the Pillow resize, for gradients taken back to the original image
(:func:`image_gradient`). The resize works on 8-bit values and rounds back to 8 bits, which is
piecewise constant: its exact derivative is zero. The gradient taken through it is therefore
that of the LINEAR resize PIL's rounding approximates: the separable operator
``X = Ry I Rx^T`` per colour channel, ``Ry``, ``Rx`` one axis each as a matrix
(:func:`bilinear_resize_matrix`, equal to PIL's float resize to ~1e-6), whose adjoint is
``dr/dI = Ry^T (dr/dX) Rx``.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
from PIL import Image

#: OpenCV's INTER_RESIZE_COEF_BITS: bilinear weights are integers out of 2**11.
_COEF_SCALE = 2048


def resized_size(
    hw: Tuple[int, int], resize: int, max_size: int = 0, rule: str = "round"
) -> Tuple[int, int]:
    """(height, width) after scaling the shorter side to ``resize`` (0: unchanged), the longer
    side capped at ``max_size`` (0: no cap), rounded by ``rule`` (see the module docstring)."""
    height, width = int(hw[0]), int(hw[1])
    if resize <= 0:
        return height, width
    if rule == "mmdetection":
        factor = resize / min(height, width)
        if max_size > 0:
            factor = min(max_size / max(height, width), factor)
        return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))
    if rule == "detectron2":
        size = resize * 1.0
        scale = size / min(height, width)
        new_h, new_w = (size, scale * width) if height < width else (scale * height, size)
        if max_size > 0 and max(new_h, new_w) > max_size:
            scale = max_size * 1.0 / max(new_h, new_w)
            new_h, new_w = new_h * scale, new_w * scale
        return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))
    if rule == "transformers":
        return _transformers_size(height, width, resize, max_size)
    if rule != "round":
        raise ValueError(f"unknown size rule {rule!r}")
    scale = resize / min(height, width)
    if max_size > 0 and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def _transformers_size(height: int, width: int, size: int, max_size: int) -> Tuple[int, int]:
    """transformers' ``get_size_with_aspect_ratio((height, width), size, max_size)``, the same
    float operations in the same order (``max_size`` 0: no cap), each side at least 1."""
    raw_size = None
    if max_size > 0:
        min_original_size = float(min(height, width))
        max_original_size = float(max(height, width))
        if max_original_size / min_original_size * size > max_size:
            raw_size = max_size * min_original_size / max_original_size
            size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    long_side = raw_size if raw_size is not None else size
    if width < height:
        return max(1, int(long_side * height / width)), max(1, size)
    return max(1, size), max(1, int(long_side * width / height))


def padded_size(hw: Tuple[int, int], divisor: int) -> Tuple[int, int]:
    """``hw`` rounded up to multiples of ``divisor`` (unchanged for 0 or 1)."""
    if divisor <= 1:
        return int(hw[0]), int(hw[1])
    return tuple(-(-int(v) // divisor) * divisor for v in hw)  # type: ignore[return-value]


def _axis(
    source: int, target: int, clamp: bool
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's linear-resize tables for one axis: the two source indices of each target index
    and their fixed-point weights.

    ``f = float32((d + 0.5) * scale - 0.5)`` with ``scale = 1 / (target / source)``; the index is
    ``floor(f)``, the weights ``round((1 - t) * 2048)`` and ``round(t * 2048)`` of the fraction
    ``t`` (float32, round half to even). Columns are clamped by moving the index inside with
    weight (2048, 0) (``clamp``); rows keep the fraction and read the clamped rows.
    """
    scale = 1.0 / (target / source)
    position = ((np.arange(target, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    index = np.floor(position).astype(np.int64)
    fraction = (position - index.astype(np.float32)).astype(np.float32)
    if clamp:
        outside = (index < 0) | (index >= source - 1)
        fraction[outside] = 0.0
        index = np.clip(index, 0, source - 1)
    first = np.clip(index, 0, source - 1)
    second = np.clip(index + 1, 0, source - 1)
    w0 = np.rint((np.float32(1.0) - fraction) * np.float32(_COEF_SCALE)).astype(np.int32)
    w1 = np.rint(fraction * np.float32(_COEF_SCALE)).astype(np.int32)
    return first, second, w0, w1


def cv2_bilinear(image: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """``cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)`` for a uint8 [H, W, C] image.

    Horizontal pass: ``S = p0 * w0 + p1 * w1`` (int32). Vertical pass, as OpenCV's vectorised
    path computes it: ``((S0 >> 4) * v0 >> 16) + ((S1 >> 4) * v1 >> 16)``, then ``(x + 2) >> 2``
    saturated to uint8.
    """
    out_h, out_w = int(hw[0]), int(hw[1])
    height, width = image.shape[:2]
    if (out_h, out_w) == (height, width):
        return image.copy()
    x0, x1, a0, a1 = _axis(width, out_w, clamp=True)
    y0, y1, b0, b1 = _axis(height, out_h, clamp=False)
    rows = np.unique(np.concatenate([y0, y1]))  # only the source rows and columns the output reads
    left = image[np.ix_(rows, x0)].astype(np.int32)
    right = image[np.ix_(rows, x1)].astype(np.int32)
    horizontal = left * a0[None, :, None] + right * a1[None, :, None]  # [R, out_w, C]
    where = np.searchsorted(rows, np.arange(height))
    top = horizontal[where[y0]] >> 4
    bottom = horizontal[where[y1]] >> 4
    value = ((top * b0[:, None, None]) >> 16) + ((bottom * b1[:, None, None]) >> 16)
    return np.clip((value + 2) >> 2, 0, 255).astype(np.uint8)


def resize_image(
    image: np.ndarray, hw: Tuple[int, int], interpolation: str = "pil-bilinear"
) -> np.ndarray:
    """``image`` (uint8 [H, W, 3]) resized to ``hw`` with ``interpolation`` ("pil-bilinear" or
    "cv2-bilinear")."""
    if tuple(hw) == tuple(image.shape[:2]):
        return image
    if interpolation == "cv2-bilinear":
        return cv2_bilinear(image, hw)
    if interpolation != "pil-bilinear":
        raise ValueError(f"unknown interpolation {interpolation!r}")
    return np.asarray(Image.fromarray(image).resize((int(hw[1]), int(hw[0])), Image.BILINEAR))


def bilinear_resize_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """PIL's ``BILINEAR`` resampling of one axis as a matrix [out_size, in_size] (float64).

    Pillow's ``precompute_coeffs``: output sample i sits at ``center = (i + 0.5) * scale``
    (scale = in/out); the triangle filter is widened by ``max(scale, 1)`` (antialiasing when
    shrinking) and its taps ``j`` in
    ``[int(center - support + 0.5), int(center + support + 0.5))`` (clipped to the axis) weigh
    ``tri((j + 0.5 - center) / max(scale, 1))``, normalised to sum 1.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    if in_size == out_size:
        return matrix.fill_diagonal_(1.0)
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = filter_scale
    for i in range(out_size):
        center = (i + 0.5) * scale
        low = max(int(center - support + 0.5), 0)
        high = min(int(center + support + 0.5), in_size)
        taps = torch.arange(low, high, dtype=torch.float64)
        weights = (1.0 - ((taps - center + 0.5) / filter_scale).abs()).clamp(min=0.0)
        total = float(weights.sum())
        if total != 0.0:
            weights = weights / total
        matrix[i, low:high] = weights
    return matrix


def image_gradient(
    input_grad: torch.Tensor, original_hw: Tuple[int, int], std: Sequence[float]
) -> torch.Tensor:
    """dr/dI of the original image [..., 3, H, W] (per 8-bit level) from dr/dX of the model
    input [..., 3, h, w].

    X_c = (R I_c / 255 - mean_c) / std_c with R the separable PIL bilinear resize (identity when
    the sizes agree), so dr/dI_c = R^T (dr/dX_c) / (255 std_c) = Ry^T G_c Rx / (255 std_c).
    """
    height, width = original_hw
    in_h, in_w = input_grad.shape[-2:]
    grad = input_grad / (
        255.0 * torch.tensor(std, dtype=input_grad.dtype, device=input_grad.device).view(3, 1, 1)
    )
    if (in_h, in_w) != (height, width):
        rows = bilinear_resize_matrix(height, in_h).to(grad)  # [h, H]
        cols = bilinear_resize_matrix(width, in_w).to(grad)  # [w, W]
        grad = rows.transpose(0, 1) @ grad @ cols
    return grad
