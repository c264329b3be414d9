"""The effective receptive field (ERF) of a unit and its summary numbers.

ERF: ``sum_colour |dr / dI(p)|`` for every pixel p of the ORIGINAL image, I in 8-bit intensity
levels (0..255), r the unit's response. The gradient reaches the original image through the
model input's normalisation and the linearised resize
(:func:`~dcn_inspect.io.resize.image_gradient`); an ERF is a map [..., H, W] of the original
image.

Summary numbers (:func:`erf_numbers`, original-image pixels, pixel (r, c) centred at
(c + 0.5, r + 0.5)): the mass (the map's sum), the gradient-weighted centroid of the pixel
centres, the radii of the discs around the centroid holding 50 % and 90 % of the mass, and the
fraction of the mass on the pixels of the unit's ground-truth box (:func:`unit_box`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from dcn_inspect.io.resize import image_gradient

__all__ = [
    "ErfNumbers",
    "effective_receptive_field",
    "erf_memory_bytes",
    "erf_numbers",
    "unit_box",
]


def effective_receptive_field(
    input_grad: torch.Tensor, original_hw: Tuple[int, int], std: Sequence[float]
) -> torch.Tensor:
    """The ERF [..., H, W]: ``sum_colour |dr/dI|`` over the original image's pixels, from
    dr/d(model input) [..., 3, h, w]."""
    return image_gradient(input_grad, original_hw, std).abs().sum(dim=-3)


def erf_memory_bytes(units: int, original_hw: Tuple[int, int]) -> int:
    """Bytes the ERF maps of ``units`` units take (float32), to check before allocating."""
    return units * original_hw[0] * original_hw[1] * 4


@dataclass(frozen=True)
class ErfNumbers:
    """Summary of one ERF map (original-image pixels)."""

    mass: float  # sum of the map
    centroid_x: float  # gradient-weighted mean of the pixel centres
    centroid_y: float
    radius_50: float  # smallest radius around the centroid holding 50 % of the mass
    radius_90: float
    mass_in_box: Optional[float]  # fraction of the mass on pixels whose centre lies in the box


def erf_numbers(erf: np.ndarray, box: Optional[Sequence[float]] = None) -> ErfNumbers:
    """Centroid, 50 % / 90 % mass radii (discs around the centroid, pixel centres; the radius of
    the first pixel, in order of distance, at which the cumulative mass reaches the fraction) and
    the fraction of mass inside ``box`` (x1, y1, x2, y2; edges inclusive)."""
    erf = np.asarray(erf, dtype=np.float64)
    height, width = erf.shape
    mass = float(erf.sum())
    nan = float("nan")
    if not mass > 0:
        return ErfNumbers(mass, nan, nan, nan, nan, None if box is None else nan)
    xs = np.arange(width, dtype=np.float64) + 0.5
    ys = np.arange(height, dtype=np.float64) + 0.5
    centroid_x = float((erf.sum(axis=0) * xs).sum() / mass)
    centroid_y = float((erf.sum(axis=1) * ys).sum() / mass)
    nonzero = np.nonzero(erf)
    values = erf[nonzero]
    distance = np.hypot(xs[nonzero[1]] - centroid_x, ys[nonzero[0]] - centroid_y)
    order = np.argsort(distance, kind="stable")
    cumulative = np.cumsum(values[order])
    radii = []
    for fraction in (0.5, 0.9):
        k = int(np.searchsorted(cumulative, fraction * cumulative[-1], side="left"))
        radii.append(float(distance[order][min(k, len(order) - 1)]))
    in_box: Optional[float] = None
    if box is not None:
        x1, y1, x2, y2 = (float(v) for v in box)
        keep_x = (xs >= x1) & (xs <= x2)
        keep_y = (ys >= y1) & (ys <= y2)
        in_box = float(erf[np.ix_(keep_y, keep_x)].sum() / mass)
    return ErfNumbers(mass, centroid_x, centroid_y, radii[0], radii[1], in_box)


def unit_box(unit_xy: Tuple[float, float], boxes: np.ndarray) -> Optional[int]:
    """Index of the smallest box containing the unit centre (edges inclusive), None if none does
    (the rule of :func:`dcn_inspect.analysis.size_categories.unit_categories`)."""
    if boxes is None or len(boxes) == 0:
        return None
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x, y = unit_xy
    inside = (boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])
    if not inside.any():
        return None
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    candidates = np.nonzero(inside)[0]
    return int(candidates[np.argsort(areas[candidates], kind="stable")[0]])
