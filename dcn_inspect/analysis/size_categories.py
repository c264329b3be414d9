"""Object-size categories of units: small, medium, large (by box area) and background.

A ground-truth box's area ``(x2 - x1) * (y2 - y1)`` in original-image pixels² decides its size
by two thresholds ``(t1, t2)`` (COCO convention): small ``area < t1``, medium
``t1 <= area < t2``, large ``area >= t2`` (:func:`area_category`). The thresholds are named
(:data:`NAMED_THRESHOLDS`), the dataset's tertiles, or two areas (:func:`resolve_thresholds`).

A unit of an output map takes the category of where its filter centre (the output cell's
centre, mapped through the map's frame to original-image pixels) lies (:func:`unit_categories`):
the smallest non-ignored box containing it, else background inside the image; units counted in
no category carry a negative code (:data:`IGNORED`, :data:`OUTSIDE`).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np

from dcn_inspect.core.errors import InputError
from dcn_inspect.core.geometry import FrameMap

#: Categories in table order. Units counted in none of them carry a negative code.
CATEGORIES: Tuple[str, ...] = ("small", "medium", "large", "background")
SMALL, MEDIUM, LARGE, BACKGROUND = 0, 1, 2, 3
#: Centre inside an ignored (crowd / difficult) box and inside no other box.
IGNORED = -1
#: Centre outside the original image (border units of a map whose extent exceeds the image).
OUTSIDE = -2
CATEGORY_CODES = {
    IGNORED: "ignored",
    OUTSIDE: "outside",
    **{i: name for i, name in enumerate(CATEGORIES)},
}

#: Named area thresholds (small/medium, medium/large) in original-image pixels².
NAMED_THRESHOLDS: Dict[str, Tuple[float, float]] = {
    "paper": (96.0**2, 224.0**2),  # PAPER.md §3: recalled, not verified against the paper
    "coco": (32.0**2, 96.0**2),
}


# --------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------


def resolve_thresholds(
    spec: str, box_areas: Optional[np.ndarray] = None
) -> Tuple[str, Tuple[float, float]]:
    """``paper``, ``coco``, ``tertiles`` (needs ``box_areas``) or ``A,B`` (numbers or ``N^2``) ->
    (name, (small/medium, medium/large)) in pixels²."""
    text = spec.strip().lower()
    if text in NAMED_THRESHOLDS:
        return text, NAMED_THRESHOLDS[text]
    if text == "tertiles":
        if box_areas is None or len(box_areas) < 3:
            count = 0 if box_areas is None else len(box_areas)
            raise InputError(
                f"tertiles: needs at least 3 ground-truth boxes, the dataset has {count}",
                param="thresholds",
            )
        low, high = tertile_thresholds(box_areas)
        return "tertiles", (low, high)
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise InputError(
            f"{spec!r}: expected paper, coco, tertiles or two areas 'A,B' in pixels² "
            "(e.g. 1024,9216 or 32^2,96^2)",
            param="thresholds",
        )
    values = [_area(spec, part) for part in parts]
    if not (0 < values[0] < values[1] and all(math.isfinite(v) for v in values)):
        raise InputError(f"{spec!r}: need 0 < A < B", param="thresholds")
    return "custom", (values[0], values[1])


def _area(spec: str, part: str) -> float:
    """One area of a custom ``A,B`` threshold: a number or ``base^power``."""
    try:
        if "^" in part:
            base, power = part.split("^", 1)
            value = float(base) ** float(power)
        else:
            value = float(part)
    except ValueError:
        raise InputError(f"{spec!r}: {part!r} is not a number", param="thresholds") from None
    except OverflowError:
        raise InputError(
            f"{spec!r}: {part!r} is too large (areas are in pixels²)", param="thresholds"
        ) from None
    if isinstance(value, complex):  # a negative base to a fractional power
        raise InputError(f"{spec!r}: {part!r} is not a real number", param="thresholds")
    return value


def tertile_thresholds(box_areas: np.ndarray) -> Tuple[float, float]:
    """Areas splitting ``box_areas`` into three equally populated thirds.

    Boxes with ``area < low`` are small, ``low <= area < high`` medium, the rest large; the
    thresholds are the 1/3 and 2/3 quantiles (linear interpolation, numpy's default).
    """
    areas = np.sort(np.asarray(box_areas, dtype=np.float64))
    low, high = np.quantile(areas, [1.0 / 3.0, 2.0 / 3.0])
    return float(low), float(high)


# --------------------------------------------------------------------------------------------
# Categories
# --------------------------------------------------------------------------------------------


def area_category(areas: np.ndarray, thresholds: Tuple[float, float]) -> np.ndarray:
    """COCO convention: small ``area < t1``, medium ``t1 <= area < t2``, large ``area >= t2``."""
    areas = np.asarray(areas, dtype=np.float64)
    return np.where(
        areas < thresholds[0], SMALL, np.where(areas < thresholds[1], MEDIUM, LARGE)
    ).astype(np.int64)


def unit_categories(
    frame: FrameMap,
    output_hw: Tuple[int, int],
    image_wh: Tuple[int, int],
    boxes: np.ndarray,
    ignore: np.ndarray,
    thresholds: Tuple[float, float],
) -> np.ndarray:
    """Category code [Ho, Wo] of every unit of a map whose cells sit at ``frame``
    (original-image pixels).

    A unit's centre ``(x, y)`` is inside a box when ``x1 <= x <= x2`` and ``y1 <= y <= y2``
    (boundaries inclusive: a unit on a box edge belongs to the box). Then:

    - inside at least one non-ignored box: the SMALLEST such box (by area) decides small /
      medium / large, whatever larger or ignored boxes also contain the unit (nested boxes:
      the inner object wins);
    - else inside an ignored (crowd / difficult) box: :data:`IGNORED`, counted nowhere;
    - else, centre inside the image (``0 <= x <= W``, ``0 <= y <= H``): background;
    - else :data:`OUTSIDE` (a border unit whose centre lies beyond the image), counted nowhere.
    """
    out_h, out_w = output_hw
    xs, ys = frame.to_image(np.arange(out_w, dtype=np.float64), np.arange(out_h, dtype=np.float64))
    width, height = image_wh
    inside_image = ((ys >= 0) & (ys <= height))[:, None] & ((xs >= 0) & (xs <= width))[None, :]
    codes = np.where(inside_image, BACKGROUND, OUTSIDE).astype(np.int64)
    if len(boxes) == 0:
        return codes
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ignore = np.asarray(ignore, dtype=bool)
    # Unit centres increase along rows and columns, so each box covers a rectangle of units:
    # columns [first x >= x1, last x <= x2], rows likewise (edges inclusive).
    col_start, col_stop = (
        np.searchsorted(xs, boxes[:, 0], "left"),
        np.searchsorted(xs, boxes[:, 2], "right"),
    )
    row_start, row_stop = (
        np.searchsorted(ys, boxes[:, 1], "left"),
        np.searchsorted(ys, boxes[:, 3], "right"),
    )
    # Paint ignored boxes first, then the real ones from the largest to the smallest: the
    # smallest containing box is painted last (ties: the earlier box, as a stable sort by area).
    for n in np.flatnonzero(ignore):
        codes[row_start[n] : row_stop[n], col_start[n] : col_stop[n]] = IGNORED
    kept = np.flatnonzero(~ignore)
    if kept.size:
        areas = (boxes[kept, 2] - boxes[kept, 0]) * (boxes[kept, 3] - boxes[kept, 1])
        order = kept[np.argsort(areas, kind="stable")][::-1]
        box_codes = area_category(
            (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), thresholds
        )
        for n in order:
            codes[row_start[n] : row_stop[n], col_start[n] : col_stop[n]] = box_codes[n]
    return codes
