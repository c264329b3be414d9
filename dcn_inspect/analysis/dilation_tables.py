"""The tables of ``dcn-inspect dilation-stats``, their CSV columns and their bootstrap intervals.

Rows are named as :class:`~dcn_inspect.analysis.dilation_stats.DilationAccumulator` names them:
a layer, or ``"<layer>:g<k>"`` for offset group ``k`` with ``per_group`` (:func:`split_row`).

- ``dilation_table.csv`` (:data:`TABLE_CSV`, :func:`table_frame`): per row x category of
  :data:`~dcn_inspect.analysis.size_categories.CATEGORIES`, the streaming statistics with the 95 %
  interval of the mean;
- ``dilation_differences.csv`` (:data:`DIFFERENCES_CSV`, :func:`differences_frame`): per row x
  pair of :data:`DIFFERENCES`, ``mean_a - mean_b`` with its 95 % interval;
- ``dilation_units.csv`` (:data:`UNITS_CSV`): one row per unit (written by the command).

Intervals (:func:`bootstrap_intervals`) are percentile bootstraps over images: each resample
draws the used images with replacement and recomputes every category mean as (sum over the
drawn images' units) / (their number of units), from each image's per-category sums and counts
[images, categories]; the differences come from the same resamples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from dcn_inspect.analysis.category_stats import CategoryStats, bootstrap_means
from dcn_inspect.analysis.size_categories import CATEGORIES
from dcn_inspect.core.columns import Column, names, position, present

#: Bootstrap over images behind every interval: resamples and seed (same inputs, same intervals).
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0

_DILATION_UNIT = "the `units` column: cells of the layer's input map, or original-image pixels"
_GROUP = Column(
    "group",
    "offset group: one row per group "
    "(without it a unit's value is the mean of its groups' dilations)",
    only="per_group",
)

#: ``dilation_table.csv``: one row per row layer (top layer first, groups ascending) x category.
TABLE_CSV: Tuple[Column, ...] = (
    Column("layer", "deformable layer (top layer first)"),
    _GROUP,
    Column(
        "category",
        "small / medium / large "
        "(the smallest ground-truth box containing the filter centre, by area) or background",
    ),
    Column("count", "units (filter positions) in the category, over all images"),
    Column(
        "mean",
        "mean effective dilation (mean distance between adjacent sampling locations)",
        _DILATION_UNIT,
    ),
    Column(
        "std",
        "population standard deviation (ddof = 0) of the units' effective dilation",
        _DILATION_UNIT,
    ),
    Column(
        "median",
        "median, from fixed 0.1 %-wide log bins clamped to the exact min/max",
        _DILATION_UNIT,
    ),
    Column("p10", "10th percentile (same histogram)", _DILATION_UNIT),
    Column("p90", "90th percentile (same histogram)", _DILATION_UNIT),
    Column("units", "unit of the dilation values: cells or pixels"),
    Column(
        "ci_low",
        "lower end of the 95 % confidence interval of the mean "
        "(percentile bootstrap over images, seeded)",
        _DILATION_UNIT,
    ),
    Column("ci_high", "upper end of the 95 % confidence interval of the mean", _DILATION_UNIT),
)
#: Columns of ``dilation_table.csv`` without ``per_group``, in order.
TABLE_COLUMNS = names(present(TABLE_CSV))
_INTERVAL_COLUMNS = ("ci_low", "ci_high")


def category_table_columns(quantity: str, unit: str) -> Tuple[Column, ...]:
    """The columns of a table in the dilation-stats layout for another per-unit ``quantity``
    (in ``unit``), as :func:`table_frame` writes it without intervals."""
    described = {
        "count": "units in the category, over all images",
        "mean": f"mean {quantity}",
        "std": f"population standard deviation (ddof = 0) of the {quantity}",
        "units": "unit of the values",
    }
    return tuple(
        Column(
            c.name, described.get(c.name, c.meaning), unit if c.unit == _DILATION_UNIT else c.unit
        )
        for c in present(TABLE_CSV)
        if c.name not in _INTERVAL_COLUMNS
    )


#: The pairwise differences ``dilation_differences.csv`` reports: (category_a, category_b) for
#: mean_a - mean_b, so each is positive when the paper's order holds (receptive fields grow with
#: object size; background between medium and large).
DIFFERENCES: Tuple[Tuple[str, str], ...] = (
    ("medium", "small"),
    ("large", "medium"),
    ("background", "medium"),
    ("large", "background"),
)

#: ``dilation_differences.csv``: one row per row layer x difference of :data:`DIFFERENCES`.
DIFFERENCES_CSV: Tuple[Column, ...] = (
    Column("layer", "deformable layer (top layer first)"),
    _GROUP,
    Column("category_a", "the category whose mean is the minuend"),
    Column("category_b", "the category whose mean is subtracted"),
    Column(
        "difference",
        "mean of category_a - mean of category_b (positive: category_a has the wider filters)",
        _DILATION_UNIT,
    ),
    Column(
        "ci_low",
        "lower end of the 95 % confidence interval of the difference "
        "(the same bootstrap resamples as the means)",
        _DILATION_UNIT,
    ),
    Column(
        "ci_high", "upper end of the 95 % confidence interval of the difference", _DILATION_UNIT
    ),
    Column("units", "unit of the dilation values: cells or pixels"),
)
#: Columns of ``dilation_differences.csv`` without ``per_group``, in order.
DIFFERENCE_COLUMNS = names(present(DIFFERENCES_CSV))

#: ``dilation_units.csv`` (``per_unit``): one row per unit of every measured layer and image.
UNITS_CSV: Tuple[Column, ...] = (
    Column("image", "image file name as the dataset lists it"),
    Column("layer", "deformable layer"),
    _GROUP,
    position("unit_x", "the filter centre (the output cell's centre), x"),
    position("unit_y", "the filter centre, y"),
    Column(
        "category",
        "small / medium / large / background, or ignored (inside only crowd / difficult boxes) "
        "or outside (centre outside the image): counted nowhere",
    ),
    Column(
        "dilation",
        "the unit's effective dilation",
        "summary.json `units`: cells of the layer's input map, or original-image pixels",
    ),
)
#: Columns of ``dilation_units.csv`` without ``per_group``, in order.
UNIT_COLUMNS = names(present(UNITS_CSV))


def split_row(row: str) -> Tuple[str, Optional[int]]:
    """A row name -> (layer, offset group or None): ``"<layer>:g<k>"`` is group k of a layer
    (``per_group``)."""
    layer, sep, group = row.rpartition(":g")
    if sep and group.isdigit():
        return layer, int(group)
    return row, None


# --------------------------------------------------------------------------------------------
# Bootstrap intervals over images
# --------------------------------------------------------------------------------------------


@dataclass
class Intervals:
    """Bootstrap 95 % intervals of one row's category means [categories, 2] and of the
    :data:`DIFFERENCES` of them ({(a, b): (low, high)}, category indices)."""

    means: np.ndarray
    differences: Dict[Tuple[int, int], Tuple[float, float]]


def image_arrays(rows: Sequence[Tuple[int, Any, Any]]) -> Tuple[np.ndarray, np.ndarray]:
    """``DilationAccumulator.image_sums`` rows of one table row -> (sums, counts)
    [images, categories] in image-index order (so any batching or sharding gives the same
    arrays)."""
    ordered = sorted(rows, key=lambda row: row[0])
    sums = np.array([row[1] for row in ordered], dtype=np.float64).reshape(-1, len(CATEGORIES))
    counts = np.array([row[2] for row in ordered], dtype=np.float64).reshape(-1, len(CATEGORIES))
    return sums, counts


def bootstrap_intervals(
    image_sums: Dict[str, Sequence[Tuple[int, Any, Any]]],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Dict[str, Intervals]:
    """Per row: 95 % intervals of the category means and of their :data:`DIFFERENCES`,
    resampling whole images (:func:`~dcn_inspect.analysis.category_stats.bootstrap_means`, the
    same seed for every row)."""
    index = {name: i for i, name in enumerate(CATEGORIES)}
    pairs = [(index[a], index[b]) for a, b in DIFFERENCES]
    out: Dict[str, Intervals] = {}
    for row, rows in image_sums.items():
        sums, counts = image_arrays(rows)
        means, differences = bootstrap_means(sums, counts, pairs, resamples=resamples, seed=seed)
        out[row] = Intervals(means, differences)
    return out


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _row_columns(row: str, per_group: bool) -> Dict[str, Any]:
    layer, group = split_row(row) if per_group else (row, None)
    return {"layer": layer, "group": group} if per_group else {"layer": layer}


def table_frame(
    stats: Dict[str, CategoryStats],
    units: str,
    intervals: Optional[Dict[str, Intervals]] = None,
    per_group: bool = False,
) -> pd.DataFrame:
    """``dilation_table.csv`` rows: every row layer (in the given order) x every category, with
    the bootstrap intervals of the means (no interval columns without ``intervals``)."""
    rows = []
    for row, layer_stats in stats.items():
        bounds = (
            intervals[row].means
            if intervals is not None and row in intervals
            else np.full((len(CATEGORIES), 2), math.nan)
        )
        for k, (category, values) in enumerate(zip(CATEGORIES, layer_stats.summary_rows())):
            rows.append(
                {
                    **_row_columns(row, per_group),
                    "category": category,
                    **values,
                    "units": units,
                    "ci_low": float(bounds[k, 0]),
                    "ci_high": float(bounds[k, 1]),
                }
            )
    columns = [
        name
        for name in names(present(TABLE_CSV, per_group=per_group))
        if intervals is not None or name not in _INTERVAL_COLUMNS
    ]
    frame = pd.DataFrame(rows, columns=columns)
    if per_group:
        frame["group"] = frame["group"].astype("Int64")
    return frame


def differences_frame(
    stats: Dict[str, CategoryStats],
    intervals: Dict[str, Intervals],
    units: str,
    per_group: bool = False,
) -> pd.DataFrame:
    """``dilation_differences.csv`` rows: every row layer x :data:`DIFFERENCES`, the difference of
    the means with its bootstrap interval (NaN where a category has no unit)."""
    index = {name: i for i, name in enumerate(CATEGORIES)}
    rows = []
    for row, layer_stats in stats.items():
        counts = layer_stats.count.cpu().numpy()
        means = layer_stats.mean.cpu().numpy()
        for first, second in DIFFERENCES:
            a, b = index[first], index[second]
            difference = float(means[a] - means[b]) if counts[a] and counts[b] else math.nan
            low, high = (
                intervals[row].differences[(a, b)] if row in intervals else (math.nan, math.nan)
            )
            rows.append(
                {
                    **_row_columns(row, per_group),
                    "category_a": first,
                    "category_b": second,
                    "difference": difference,
                    "ci_low": low,
                    "ci_high": high,
                    "units": units,
                }
            )
    frame = pd.DataFrame(rows, columns=names(present(DIFFERENCES_CSV, per_group=per_group)))
    if per_group:
        frame["group"] = frame["group"].astype("Int64")
    return frame
