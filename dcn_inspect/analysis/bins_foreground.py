"""The paper's Fig. 7 measured: how much of an RoI's bins lands on the object's foreground.

Dai et al. (2017) show deformable (PS) RoI pooling bins and say "the parts move onto the
object's foreground". Given an object mask, this module turns that into a number:

    fraction = (sampling points of the bins that land on the mask) / (all sampling points)

for the regular bins (the op's own sampling pattern with zero offsets) and for the deformed
bins (the same pattern shifted by each bin's offset), per bin and per RoI.

- Sampling points are those of :class:`~dcn_inspect.analysis.bins.BinGeometry` (``points``: the
  deformed bins' bilinear sampling points, original-image pixels; ``regular_points``: the
  points the op reads with zero offsets, i.e. the deformed points minus the bin's shift, since
  a bin moves rigidly, computed without that subtraction's rounding).
- A point (x, y) lands on the mask when the pixel containing it, (row floor(y), column
  floor(x)), belongs to the mask (pixel (r, c) covers [c, c+1) x [r, r+1)). Points outside the
  image land on no object and count in the denominator.
- An RoI's fraction is over all its sampling points (every bin has the same number, so it is
  also the mean of its bins' fractions).
- Which object an RoI belongs to (:func:`match_object`): an RoI made from an annotated box is
  that box's object; any other RoI belongs to the annotated object whose box has the highest
  IoU with it, if that IoU is at least :data:`MATCH_IOU` (ties: the first such box), else to no
  object (no fraction).

:func:`foreground_table` aggregates per-RoI fractions over a dataset per ground-truth class and
overall (mean over RoIs; a 95 % percentile-bootstrap interval of the mean gain, resampling
whole images, seeded). A row whose RoIs come from fewer than :data:`MIN_INTERVAL_IMAGES`
images has no interval (NaN): resampling one image draws that image every time, a zero-width
interval that says nothing about the spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from dcn_inspect.analysis.bins import BinGeometry
from dcn_inspect.analysis.category_stats import bootstrap_means
from dcn_inspect.core.columns import Column, names, position

#: An RoI not made from an annotated box belongs to the best-IoU annotated object at or above
#: this IoU.
MATCH_IOU = 0.5

#: The ``group`` of the overall row of :func:`foreground_table`.
OVERALL = "all"

#: A row of :func:`foreground_table` gets an interval of its gain from this many images on
#: (the bootstrap resamples images: below two it has no spread to measure).
MIN_INTERVAL_IMAGES = 2

_FRACTION = "fraction of sampling points on the object's mask"

#: ``foreground_table.csv`` (``bins DATASET``): per ground-truth class, then overall.
TABLE_CSV: Tuple[Column, ...] = (
    Column("group", "ground-truth class, or `all`"),
    Column("rois", "RoIs measured (annotated boxes with a mask)"),
    Column("images", "images they come from"),
    Column("fg_regular", "mean over RoIs of the regular bins' " + _FRACTION, "0..1"),
    Column("fg_deformed", "mean over RoIs of the deformed bins' " + _FRACTION, "0..1"),
    Column("gain", "fg_deformed - fg_regular", "fraction"),
    Column(
        "gain_ci_low",
        "lower end of the 95 % confidence interval of the gain "
        f"(percentile bootstrap over images, seeded; empty below {MIN_INTERVAL_IMAGES} images)",
        "fraction",
    ),
    Column(
        "gain_ci_high",
        "upper end of the 95 % confidence interval of the gain "
        f"(empty below {MIN_INTERVAL_IMAGES} images)",
        "fraction",
    ),
    Column(
        "improved",
        "fraction of RoIs whose deformed bins land more on the object than the regular ones",
        "0..1",
    ),
)
#: Columns of the per-class and overall table (``foreground_table.csv``).
TABLE_COLUMNS = names(TABLE_CSV)

#: ``foreground_rois.csv`` (``bins DATASET``): one row per measured RoI (an annotated box).
ROIS_CSV: Tuple[Column, ...] = (
    Column("image", "image file name as the dataset lists it"),
    Column("roi", "index of the RoI (the annotated box) in the image"),
    Column("label", "its ground-truth class"),
    Column("class", "whose offsets were used"),
    Column("chosen_by", "how that class was chosen (gt, pred, ...)"),
    Column("object", "index of the annotated object whose mask is used"),
    position("x1", "the RoI's left edge"),
    position("y1", "the RoI's top edge"),
    position("x2", "the RoI's right edge"),
    position("y2", "the RoI's bottom edge"),
    Column("fg_regular", "the regular bins' " + _FRACTION, "0..1"),
    Column("fg_deformed", "the deformed bins' " + _FRACTION, "0..1"),
    Column("gain", "fg_deformed - fg_regular", "fraction"),
)

#: Columns of the per-RoI table :func:`foreground_table` reads.
ROI_COLUMNS = ["image", "roi", "label", "class", "fg_regular", "fg_deformed"]


def box_iou(box: Sequence[float], boxes: np.ndarray) -> np.ndarray:
    """IoU of one box (x1, y1, x2, y2) with boxes [N, 4]; 0 where a union is empty."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = (float(v) for v in box)
    ix = np.clip(np.minimum(x2, boxes[:, 2]) - np.maximum(x1, boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(y2, boxes[:, 3]) - np.maximum(y1, boxes[:, 1]), 0, None)
    inter = ix * iy
    union = (
        max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
        + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        - inter
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_object(
    box: Sequence[float], boxes: np.ndarray, min_iou: float = MATCH_IOU
) -> Tuple[Optional[int], float]:
    """(index of the annotated box with the highest IoU with ``box``, that IoU); index ``None``
    when no box reaches ``min_iou``. Ties go to the first box."""
    ious = box_iou(box, boxes)
    if ious.size == 0:
        return None, 0.0
    best = int(np.argmax(ious))
    return (best if ious[best] >= min_iou else None), float(ious[best])


def on_mask(points: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Whether each point [..., 2] (x, y in original-image pixels) lies in a pixel of ``mask``
    [H, W]."""
    height, width = mask.shape
    columns = np.floor(points[..., 0])
    rows = np.floor(points[..., 1])
    inside = (columns >= 0) & (columns < width) & (rows >= 0) & (rows < height)
    result = np.zeros(points.shape[:-1], dtype=bool)
    result[inside] = mask[rows[inside].astype(np.int64), columns[inside].astype(np.int64)]
    return result


@dataclass(frozen=True)
class BinForeground:
    """Foreground fractions of one RoI row set: per bin [ph, pw] and over the whole RoI."""

    regular_bins: np.ndarray
    deformed_bins: np.ndarray
    regular: float
    deformed: float

    @property
    def gain(self) -> float:
        return self.deformed - self.regular


def bin_foreground(geometry: BinGeometry, row: int, mask: np.ndarray) -> BinForeground:
    """Fractions of row set ``row``'s sampling points on ``mask``, regular vs deformed bins.

    ``geometry`` and ``mask`` must be in the same pixels (original image: ``geometry.scaled``).
    """
    deformed_points = geometry.points[row]  # [ph, pw, S, 2]
    regular_points = geometry.undeformed_points(row)
    regular_hits = on_mask(regular_points, mask)
    deformed_hits = on_mask(deformed_points, mask)
    with np.errstate(invalid="ignore"):
        return BinForeground(
            regular_bins=regular_hits.mean(axis=-1)
            if regular_hits.shape[-1]
            else np.full(regular_hits.shape[:-1], np.nan),
            deformed_bins=deformed_hits.mean(axis=-1)
            if deformed_hits.shape[-1]
            else np.full(deformed_hits.shape[:-1], np.nan),
            regular=float(regular_hits.mean()) if regular_hits.size else float("nan"),
            deformed=float(deformed_hits.mean()) if deformed_hits.size else float("nan"),
        )


def foreground_table(rois: pd.DataFrame, resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per ground-truth class and overall: mean foreground fraction of regular and deformed bins.

    ``rois`` has one row per RoI (columns :data:`ROI_COLUMNS`; ``label`` is the RoI's
    ground-truth class, rows without a fraction are left out). Columns :data:`TABLE_COLUMNS`:
    ``rois`` and ``images`` counted, ``fg_regular`` / ``fg_deformed`` means over RoIs,
    ``gain`` their difference, ``gain_ci_low`` / ``gain_ci_high`` its 95 % percentile-bootstrap
    interval (``resamples`` draws of whole images with replacement, ``seed``; NaN when the row's
    RoIs come from fewer than :data:`MIN_INTERVAL_IMAGES` images), ``improved`` the
    fraction of RoIs whose deformed bins have the larger fraction. Classes in order of first
    appearance, then the overall row (``group`` = :data:`OVERALL`).
    """
    measured = rois.dropna(subset=["fg_regular", "fg_deformed"])
    groups = list(dict.fromkeys(str(v) for v in measured["label"]))
    images = list(dict.fromkeys(measured["image"]))
    column_of = {name: k for k, name in enumerate(groups + [OVERALL])}
    image_of = {name: k for k, name in enumerate(images)}
    sums = np.zeros((len(images), len(column_of)))
    counts = np.zeros((len(images), len(column_of)))
    gains = (measured["fg_deformed"] - measured["fg_regular"]).to_numpy(dtype=np.float64)
    for gain, label, image in zip(gains, measured["label"], measured["image"]):
        for column in (column_of[str(label)], column_of[OVERALL]):
            sums[image_of[image], column] += gain
            counts[image_of[image], column] += 1
    intervals, _ = bootstrap_means(sums, counts, resamples=resamples, seed=seed)
    rows = []
    for name, column in column_of.items():
        part = measured if name == OVERALL else measured[measured["label"].astype(str) == name]
        regular = part["fg_regular"].to_numpy(dtype=np.float64)
        deformed = part["fg_deformed"].to_numpy(dtype=np.float64)
        images_of_row = int(part["image"].nunique())
        low, high = (
            intervals[column] if images_of_row >= MIN_INTERVAL_IMAGES else (math.nan, math.nan)
        )
        rows.append(
            {
                "group": name,
                "rois": len(part),
                "images": images_of_row,
                "fg_regular": float(regular.mean()) if len(part) else float("nan"),
                "fg_deformed": float(deformed.mean()) if len(part) else float("nan"),
                "gain": float((deformed - regular).mean()) if len(part) else float("nan"),
                "gain_ci_low": float(low),
                "gain_ci_high": float(high),
                "improved": float((deformed > regular).mean()) if len(part) else float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)
