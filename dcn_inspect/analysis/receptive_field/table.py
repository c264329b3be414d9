"""The tables of ``receptive-field``: their columns (meaning, unit) and their rows, built from
:class:`~dcn_inspect.analysis.receptive_field.fields.ReceptiveFields`.

- ``<stem>_receptive_field.csv`` (:data:`RECEPTIVE_FIELD_CSV`, :func:`units_table`): one row per
  unit and model;
- ``<stem>_erf.npz`` (:func:`field_arrays`): the ERF maps and the gradient-weighted trees;
- ``receptive_field_units.csv`` (:data:`STATS_UNITS_CSV`, the dataset mode): one row per unit,
  layer and image.

Positions are original-image pixels (continuous, (0, 0) = top-left corner of the top-left
pixel, x right, y down); a missing value (no box, no theoretical receptive field, no saliency
search) is NaN, written empty.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from dcn_inspect.analysis.receptive_field.erf import unit_box
from dcn_inspect.analysis.receptive_field.fields import ReceptiveFields
from dcn_inspect.analysis.receptive_field.saliency import FOUND, NO_REGION
from dcn_inspect.core.columns import Column, names, position

__all__ = [
    "CSV_COLUMNS",
    "RECEPTIVE_FIELD_CSV",
    "STATS_UNITS_CSV",
    "field_arrays",
    "units_table",
]

_PX2 = "original-image pixels²"

#: What the saliency status column says (both tables).
#: ``saliency_status`` of a unit whose saliency region was not searched (`no_saliency`).
NOT_SEARCHED = "not_searched"

_STATUS = (
    f"`{FOUND}`: the saliency region (a box containing the unit) meets the error bound; "
    f"`{NO_REGION}`: the image with every pixel masked already does, so no box is the "
    "smallest and no region is given (its columns empty); "
    f"`{NOT_SEARCHED}`: no saliency search was run (`no_saliency`)"
)

#: ``<stem>_receptive_field.csv``: one row per unit and model, in this column order.
RECEPTIVE_FIELD_CSV: Tuple[Column, ...] = (
    Column("model", "`model` or `compare` (summary.json names them)"),
    Column("unit", "index of the unit (summary.json lists how each was chosen)"),
    Column("layer", "the deformable layer the unit belongs to"),
    Column(
        "channel",
        "the channel whose value is the response (empty: the sum over the layer's channels)",
    ),
    Column("unit_row", "the unit's row in the layer's output map"),
    Column("unit_col", "the unit's column in the layer's output map"),
    position("unit_x", "the unit's centre, x"),
    position("unit_y", "the unit's centre, y"),
    Column("response", "the layer's output at the unit (the response r)", "layer output"),
    Column(
        "erf_mass",
        "total effective receptive field: sum over pixels and colours of |dr/dI|",
        "r per 8-bit level",
    ),
    position("erf_centroid_x", "gradient-weighted centroid of the ERF, x"),
    position("erf_centroid_y", "gradient-weighted centroid of the ERF, y"),
    position(
        "erf_radius_50", "radius of the disc around the centroid holding 50 % of the ERF mass"
    ),
    position(
        "erf_radius_90", "radius of the disc around the centroid holding 90 % of the ERF mass"
    ),
    position(
        "box_x1", "the smallest ground-truth box containing the unit centre, left (empty: none)"
    ),
    position("box_y1", "that box, top"),
    position("box_x2", "that box, right"),
    position("box_y2", "that box, bottom"),
    Column("erf_mass_in_box", "fraction of the ERF mass inside that box", "0..1"),
    position("rf_x1", "theoretical receptive field (regular grids, offsets as zero), left"),
    position("rf_y1", "theoretical receptive field, top"),
    position("rf_x2", "theoretical receptive field, right"),
    position("rf_y2", "theoretical receptive field, bottom"),
    position(
        "saliency_x1",
        "error-bounded saliency region (the smallest box containing the unit found by "
        "progressive masking whose pixels alone give the response within the error bound), "
        "left (empty: no region, see saliency_status)",
    ),
    position("saliency_y1", "saliency region, top"),
    position("saliency_x2", "saliency region, right"),
    position("saliency_y2", "saliency region, bottom"),
    Column("saliency_area", "area of the saliency region", _PX2),
    Column(
        "saliency_error",
        "relative error of the response the saliency region reaches (no region: that of the "
        "masked image)",
        "fraction",
    ),
    Column("saliency_status", _STATUS),
)
#: Columns of ``<stem>_receptive_field.csv``, in order.
CSV_COLUMNS = names(RECEPTIVE_FIELD_CSV)

#: ``receptive_field_units.csv`` (dataset mode): one row per unit, layer and image.
STATS_UNITS_CSV: Tuple[Column, ...] = (
    Column("image", "image file name as the dataset lists it"),
    Column("layer", "the followed deformable layer"),
    position("unit_x", "the unit's centre, x"),
    position("unit_y", "the unit's centre, y"),
    Column(
        "category",
        "small / medium / large / background (as dilation-stats), or ignored / outside: "
        "counted nowhere",
    ),
    position("erf_radius_50", "radius around the ERF centroid holding 50 % of the gradient mass"),
    position("erf_radius_90", "radius around the ERF centroid holding 90 % of the gradient mass"),
    Column(
        "saliency_area",
        "area of the error-bounded saliency region (empty: no region, see saliency_status)",
        _PX2,
    ),
    Column("saliency_status", _STATUS),
)


def _unit_row(
    role: str, item: ReceptiveFields, u: int, boxes: Optional[np.ndarray]
) -> Dict[str, Any]:
    """The row of unit ``u`` of ``item`` (model ``role``), keyed by :data:`CSV_COLUMNS`."""
    nan = float("nan")
    x, y = (float(v) for v in item.unit_xy[u])
    box_index = unit_box((x, y), boxes) if boxes is not None else None
    box = [nan] * 4 if box_index is None else [float(v) for v in boxes[box_index]]  # type: ignore[index]
    numbers = item.numbers[u]
    rf = [nan] * 4 if item.theoretical is None else [float(v) for v in item.theoretical[u]]
    if item.saliency:
        region = item.saliency[u]
        saliency = [float(v) for v in item.saliency_boxes[u]]
        area = (saliency[2] - saliency[0]) * (saliency[3] - saliency[1])
        error, status = region.relative_error, region.status
    else:
        saliency, area, error, status = [nan] * 4, nan, nan, NOT_SEARCHED
    return {
        "model": role,
        "unit": u,
        "layer": item.layer,
        "channel": "" if item.channel is None else str(item.channel),
        "unit_row": int(item.units[u, 0]),
        "unit_col": int(item.units[u, 1]),
        "unit_x": x,
        "unit_y": y,
        "response": float(item.responses[u]),
        "erf_mass": numbers.mass,
        "erf_centroid_x": numbers.centroid_x,
        "erf_centroid_y": numbers.centroid_y,
        "erf_radius_50": numbers.radius_50,
        "erf_radius_90": numbers.radius_90,
        "box_x1": box[0],
        "box_y1": box[1],
        "box_x2": box[2],
        "box_y2": box[3],
        "erf_mass_in_box": nan if numbers.mass_in_box is None else numbers.mass_in_box,
        "rf_x1": rf[0],
        "rf_y1": rf[1],
        "rf_x2": rf[2],
        "rf_y2": rf[3],
        "saliency_x1": saliency[0],
        "saliency_y1": saliency[1],
        "saliency_x2": saliency[2],
        "saliency_y2": saliency[3],
        "saliency_area": area,
        "saliency_error": error,
        "saliency_status": status,
    }


def units_table(fields: Dict[str, ReceptiveFields], boxes: Optional[np.ndarray] = None) -> "Any":
    """One row per unit and model (``fields``: model role -> its receptive fields), models in
    the given order."""
    import pandas as pd

    rows: List[Dict[str, Any]] = [
        _unit_row(role, item, u, boxes)
        for role, item in fields.items()
        for u in range(item.num_units)
    ]
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


def field_arrays(role: str, item: ReceptiveFields) -> Dict[str, np.ndarray]:
    """The arrays of ``<stem>_erf.npz`` for one model, keyed ``"<role>/..."``."""
    arrays: Dict[str, np.ndarray] = {
        f"{role}/erf": item.erf.numpy(),
        f"{role}/units": item.units.numpy(),
        f"{role}/unit_xy": item.unit_xy.numpy(),
        f"{role}/response": item.responses.numpy(),
        f"{role}/saliency_box": item.saliency_boxes.numpy(),
    }
    if item.theoretical is not None:
        arrays[f"{role}/theoretical_rf"] = item.theoretical.numpy()
    for level in range(1, item.trees.num_levels + 1):
        key = f"{role}/level{level}"
        arrays[f"{key}/x"] = item.trees.xs[level - 1].numpy()
        arrays[f"{key}/y"] = item.trees.ys[level - 1].numpy()
        arrays[f"{key}/mask_weight"] = item.trees.weights[level - 1].numpy()
        if item.point_gradients is not None:
            arrays[f"{key}/grad_x"] = item.point_gradients.grad_x[level - 1].numpy()
            arrays[f"{key}/grad_y"] = item.point_gradients.grad_y[level - 1].numpy()
            arrays[f"{key}/grad_weight"] = item.point_gradients.weights[level - 1].numpy()
    return arrays
