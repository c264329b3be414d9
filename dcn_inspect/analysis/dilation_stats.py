"""Effective dilation of deformable filters by object size (the paper's Table 2).

Effective dilation (PAPER.md §3, Table 2) of a k_h x k_w filter at one output unit is the mean
Euclidean distance between horizontally and vertically adjacent sampling locations of its
grid: ``k_h*(k_w-1) + (k_h-1)*k_w`` pairs (12 for 3x3). An undeformed filter with dilation d
scores exactly d. Distances are measured

- in the layer's input cells (``units="cells"``), or
- in original-image pixels (``units="pixels"``): the input frame maps a cell step to
  ``stride_x`` / ``stride_y`` model-input pixels and the model-input -> original scale
  multiplies those again, so a horizontal step of ``dx`` cells is ``dx * Sx`` pixels.

With several offset groups a unit's dilation is the MEAN OF THE GROUPS' DILATIONS (each group
is a filter of its own that samples its own channels); ``per_group`` keeps them apart.

Units are assigned a category by where their filter centre (the output cell's centre, mapped
through the layer's output frame to the original image) lies, see :func:`unit_categories`.

:class:`DilationAccumulator` streams a dataset into the table: per row layer (or layer and
offset group) a mergeable :class:`~dcn_inspect.analysis.category_stats.CategoryStats`, plus each image's
per-category sums and counts for bootstrap intervals over images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch

from dcn_inspect.analysis.category_stats import (
    BINS,
    CategoryStats,
    CategoryStatsRows,
    bootstrap_means,
)
from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.core.columns import Column, names, position, present
from dcn_inspect.core.errors import InputError
from dcn_inspect.core.geometry import FrameMap, LayerGeometry

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
# Effective dilation
# --------------------------------------------------------------------------------------------


def effective_dilation(
    offset: torch.Tensor,
    kernel: Tuple[int, int],
    dilation: Tuple[int, int],
    cell_size: Tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]] = (1.0, 1.0),
) -> torch.Tensor:
    """Per-group effective dilation [B, G, Ho, Wo] from an offset field [B, 2*G*kh*kw, Ho, Wo].

    ``cell_size = (size_y, size_x)`` is the length of one input cell step in the output unit:
    (1, 1) for cells; for pixels the input frame's strides times the original/model-input
    scale, as floats or as [B] tensors (one scale per image of the batch). The regular grid's
    positions cancel in the differences, so only the kernel offsets ``a*dilation`` and the
    learned ``(dy, dx)`` enter.
    """
    if kernel[0] * kernel[1] < 2:
        raise ValueError(
            f"effective dilation needs at least two kernel points, got kernel {kernel}"
        )
    batch, channels, out_h, out_w = offset.shape
    kh, kw = kernel
    # (dy, dx) of kernel point (a, b) of group g: [B, G, kh, kw, 2, Ho, Wo] (PAPER.md §1 layout).
    view = offset.reshape(batch, channels // (2 * kh * kw), kh, kw, 2, out_h, out_w)
    size_y, size_x = (_per_image(size, offset) for size in cell_size)
    total: Optional[torch.Tensor] = None
    if (
        kw > 1
    ):  # horizontal neighbours (a, b) -> (a, b + 1): one dilation_x step plus the offset change
        step = view[:, :, :, 1:] - view[:, :, :, :-1]
        step[:, :, :, :, 1] += dilation[1]
        total = _step_lengths(step, size_y, size_x).sum(dim=(2, 3))
    if kh > 1:  # vertical neighbours (a, b) -> (a + 1, b)
        step = view[:, :, 1:] - view[:, :, :-1]
        step[:, :, :, :, 0] += dilation[0]
        vertical = _step_lengths(step, size_y, size_x).sum(dim=(2, 3))
        total = vertical if total is None else total.add_(vertical)
    assert total is not None
    return total.div_(kh * (kw - 1) + (kh - 1) * kw)


def _step_lengths(
    step: torch.Tensor, size_y: Union[float, torch.Tensor], size_x: Union[float, torch.Tensor]
) -> torch.Tensor:
    """Euclidean length of steps [B, G, a, b, 2 (dy, dx), Ho, Wo] in cells scaled by the cell size -> [B, G, a, b, Ho, Wo]."""
    dy, dx = step[:, :, :, :, 0], step[:, :, :, :, 1]
    if not (isinstance(size_y, float) and isinstance(size_x, float) and size_y == size_x == 1.0):
        dy, dx = dy * size_y, dx * size_x
    return torch.hypot(dy, dx)


def _per_image(
    size: Union[float, torch.Tensor], offset: torch.Tensor
) -> Union[float, torch.Tensor]:
    if isinstance(size, torch.Tensor):
        return size.to(offset.device, offset.dtype).view(-1, 1, 1, 1, 1, 1)
    return float(size)


# --------------------------------------------------------------------------------------------
# Categories
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
            f"{spec!r}: expected paper, coco, tertiles or two areas 'A,B' in pixels² (e.g. 1024,9216 or 32^2,96^2)",
            param="thresholds",
        )
    values = []
    for part in parts:
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
        values.append(value)
    if not (0 < values[0] < values[1] and all(math.isfinite(v) for v in values)):
        raise InputError(f"{spec!r}: need 0 < A < B", param="thresholds")
    return "custom", (values[0], values[1])


def tertile_thresholds(box_areas: np.ndarray) -> Tuple[float, float]:
    """Areas splitting ``box_areas`` into three equally populated thirds.

    Boxes with ``area < low`` are small, ``low <= area < high`` medium, the rest large; the
    thresholds are the 1/3 and 2/3 quantiles (linear interpolation, numpy's default).
    """
    areas = np.sort(np.asarray(box_areas, dtype=np.float64))
    low, high = np.quantile(areas, [1.0 / 3.0, 2.0 / 3.0])
    return float(low), float(high)


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
    """Category code [Ho, Wo] of every unit of a map whose cells sit at ``frame`` (original-image pixels).

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


# --------------------------------------------------------------------------------------------
# Streaming a dataset into the table
# --------------------------------------------------------------------------------------------

UNITS = ("cells", "pixels")

_DILATION_UNIT = "the `units` column: cells of the layer's input map, or original-image pixels"
_GROUP = Column(
    "group",
    "offset group: one row per group (without it a unit's value is the mean of its groups' dilations)",
    only="per_group",
)

#: ``dilation_table.csv``: one row per row layer (top layer first, groups ascending) x category.
TABLE_CSV: Tuple[Column, ...] = (
    Column("layer", "deformable layer (top layer first)"),
    _GROUP,
    Column(
        "category",
        "small / medium / large (the smallest ground-truth box containing the filter centre, by area) or background",
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
        "lower end of the 95 % confidence interval of the mean (percentile bootstrap over images, seeded)",
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
        "lower end of the 95 % confidence interval of the difference (the same bootstrap resamples as the means)",
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
        "small / medium / large / background, or ignored (inside only crowd / difficult boxes) or outside (centre outside the image): counted nowhere",
    ),
    Column(
        "dilation",
        "the unit's effective dilation",
        "summary.json `units`: cells of the layer's input map, or original-image pixels",
    ),
)
#: Columns of ``dilation_units.csv`` without ``per_group``, in order.
UNIT_COLUMNS = names(present(UNITS_CSV))

#: Bootstrap over images behind every interval: resamples and seed (same inputs, same intervals).
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


class AnnotatedImage(Protocol):
    """What the accumulator needs of an image's annotation (see :class:`~dcn_inspect.io.annotations.ImageAnnotation`)."""

    width: int
    height: int
    boxes: np.ndarray
    ignore: np.ndarray


@dataclass
class LayerInfo:
    """A measured deformable layer, as ``summary.json`` describes it."""

    name: str
    module_type: str
    kernel: Tuple[int, int]
    dilation: Tuple[int, int]
    offset_groups: int
    modulated: bool
    geometry: Dict[str, Any]  # of the first model-input size seen
    op: Optional[str] = None  # op-level capture: the op entry point called
    converted_from: Optional[str] = None  # "DCNv3"/"DCNv4": converted to the standard layout

    def as_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "module_type": self.module_type,
            "kernel": list(self.kernel),
            "dilation": list(self.dilation),
            "offset_groups": self.offset_groups,
            "modulated": self.modulated,
            "op": self.op,
            "converted_from": self.converted_from,
            "geometry": self.geometry,
        }


@dataclass
class _BatchCategories:
    """Categories of one batch's units on one output map (see :meth:`DilationAccumulator._categories`)."""

    frames: List[FrameMap]  # per image: the map's output frame in original-image pixels
    codes_np: np.ndarray  # [B, Ho, Wo] category codes (negative: counted nowhere)
    keep: Optional[
        torch.Tensor
    ]  # [counted] long: positions of the counted units in [B*Ho*Wo] (None: all of them)
    codes: torch.Tensor  # [counted] long category
    slots_np: np.ndarray  # [counted] int64: image * categories + category
    image_counts: np.ndarray  # [B, categories] counted units per image
    not_counted: np.ndarray  # [ignored box, centre outside the image] unit counts


#: Values (rows x counted units) held before they are folded into the statistics: small batches
#: are folded together, so the statistics cost a fixed number of tensor operations per fold.
PENDING_VALUES = 1 << 17


@dataclass
class _Pending:
    """One batch's measured values of a group of rows, not yet folded into the statistics."""

    names: Tuple[str, ...]
    values: torch.Tensor  # [rows, counted] float64
    categories: "_BatchCategories"
    indices: List[int]


#: ``on_image_units(image index, [(row name, output frame in original pixels, codes [Ho, Wo], dilations [Ho, Wo])])``
UnitSink = Callable[[int, List[Tuple[str, FrameMap, np.ndarray, np.ndarray]]], None]


class DilationAccumulator:
    """Effective dilation of every unit of every measured layer, streamed over batches.

    Per row (a layer, or ``"<layer>:g<k>"`` with ``per_group``): a :class:`CategoryStats`
    (:attr:`stats`; the rows are kept and updated together, one set of tensor operations per
    batch and group of layers with the same output cells), the units counted in no category (:attr:`not_counted`: ignored-box and
    centre-outside-image counts) and every image's per-category sums and counts
    (:attr:`image_sums`, for bootstrap intervals). Frames are taken from the first batch of
    each model-input size, whose forward must have followed the frames
    (:meth:`needs_frames`); later batches of that size reuse them.
    """

    def __init__(
        self,
        thresholds: Tuple[float, float],
        units: str = "cells",
        per_group: bool = False,
        device: Union[torch.device, str] = "cpu",
        on_image_units: Optional[UnitSink] = None,
    ) -> None:
        if units not in UNITS:
            raise InputError(f"{units!r}: use cells or pixels", param="units")
        self.thresholds = thresholds
        self.units = units
        self.per_group = per_group
        self.device = torch.device(device)
        self.on_image_units = on_image_units
        self._rows = CategoryStatsRows(
            len(CATEGORIES), BINS, self.device
        )  # the statistics of every row, updated together
        self._row_index: Dict[str, int] = {}  # row name -> its row in _rows (top layer first)
        self.not_counted: Dict[str, np.ndarray] = {}  # layer -> [ignored, outside] unit counts
        self.layers: Dict[str, LayerInfo] = {}  # call order
        self._image_sums: Dict[
            str, List[Tuple[int, np.ndarray, np.ndarray]]
        ] = {}  # row -> [(image index, sums, counts)]
        # Batches measured but not yet folded into the statistics: small batches are folded
        # together (a fixed number of tensor operations per fold, whatever the batch size).
        self._pending: List[_Pending] = []
        self._pending_values = 0
        self._geometries: Dict[Tuple[int, int], Dict[str, LayerGeometry]] = {}

    @property
    def stats(self) -> Dict[str, CategoryStats]:
        """Row name (top layer first) -> its statistics (copies, on CPU)."""
        self.flush()
        return {name: self._rows.row(index) for name, index in self._row_index.items()}

    @property
    def image_sums(self) -> Dict[str, List[Tuple[int, np.ndarray, np.ndarray]]]:
        """Row name -> every image's (dataset index, per-category sums, per-category counts)."""
        self.flush()
        return self._image_sums

    def needs_frames(self, input_hw: Tuple[int, int]) -> bool:
        """Whether the next batch of this model-input size must be run with frames followed."""
        return tuple(input_hw) not in self._geometries

    def add(
        self,
        records: Sequence[DeformConvRecord],
        entries: Sequence[AnnotatedImage],
        indices: Sequence[int],
        input_hw: Tuple[int, int],
        content_hw: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> None:
        """Add one batch: the ``records`` of its forward (call order) for ``entries`` (dataset ``indices``).

        ``content_hw``: each image's resized size inside the (padded) model input of ``input_hw``
        (default: no padding). The original / model-input scale is original / resized size, so
        units in the padding map beyond the image and count in no category.
        """
        input_hw = (int(input_hw[0]), int(input_hw[1]))
        if input_hw not in self._geometries:
            self._geometries[input_hw] = {r.name: r.geometry for r in records}
        geometries = self._geometries[input_hw]
        for record in records:
            if record.name not in self.layers:
                geometry = geometries[record.name]
                self.layers[record.name] = LayerInfo(
                    record.name, record.module_type, geometry.kernel, geometry.dilation, record.offset_groups, record.modulated, geometry.as_dict(),
                    record.op, record.converted_from,
                )  # fmt: skip
        # Original / model-input scale of every image (images of one batch share the input size only).
        content = list(content_hw) if content_hw is not None else [input_hw] * len(entries)
        scale_x = [entry.width / hw[1] for entry, hw in zip(entries, content)]
        scale_y = [entry.height / hw[0] for entry, hw in zip(entries, content)]
        top_first = list(reversed(records))
        for record in top_first:
            self._register_rows(record)
        # Layers whose output cells coincide share their units' categories: their rows are
        # measured together (one set of tensor operations per group, whatever its size).
        groups: Dict[Tuple[Any, Tuple[int, int]], List[DeformConvRecord]] = {}
        for record in top_first:
            geometry = geometries[record.name]
            groups.setdefault((geometry.output_frame, geometry.output_hw), []).append(record)
        per_image: List[List[Tuple[str, FrameMap, np.ndarray, np.ndarray]]] = [[] for _ in entries]
        for (frame, output_hw), members in groups.items():
            categories = self._categories(frame, output_hw, entries, scale_x, scale_y)
            names: List[str] = []
            parts: List[torch.Tensor] = []
            for record, dilations in zip(
                members, self._dilations(members, geometries, scale_x, scale_y)
            ):  # [B, G, Ho, Wo] each
                counts = self.not_counted.setdefault(record.name, np.zeros(2, dtype=np.int64))
                counts += categories.not_counted
                if self.per_group:
                    names += [f"{record.name}:g{g}" for g in range(dilations.shape[1])]
                    parts.append(dilations.transpose(0, 1))
                else:
                    names.append(record.name)
                    parts.append(
                        (dilations[:, 0] if dilations.shape[1] == 1 else dilations.mean(dim=1))[
                            None
                        ]
                    )
            values = torch.cat(parts) if len(parts) > 1 else parts[0]  # [rows, B, Ho, Wo]
            self._hold(names, values, categories, indices)
            if self.on_image_units is not None:
                host = values.cpu().numpy()
                for k, name in enumerate(names):
                    for b in range(len(entries)):
                        per_image[b].append(
                            (name, categories.frames[b], categories.codes_np[b], host[k, b])
                        )
        if self.on_image_units is not None:
            for index, layers in zip(indices, per_image):
                self.on_image_units(index, layers)

    def _register_rows(self, record: DeformConvRecord) -> None:
        names = (
            [f"{record.name}:g{g}" for g in range(record.offset_groups)]
            if self.per_group
            else [record.name]
        )
        new = [name for name in names if name not in self._row_index]
        for name in new:
            self._row_index[name] = len(self._row_index)
        if new:
            self._rows.add_rows(len(new))

    def _dilations(
        self,
        records: Sequence[DeformConvRecord],
        geometries: Dict[str, LayerGeometry],
        scale_x: List[float],
        scale_y: List[float],
    ) -> List[torch.Tensor]:
        """Effective dilation [B, G, Ho, Wo] of every unit of each layer, in this accumulator's
        units; layers of the same shape are measured in one call (their offsets stacked)."""
        shapes = {
            (
                geometries[r.name].kernel,
                geometries[r.name].dilation,
                self._cell_strides(geometries[r.name]),
                r.offset.shape,
                r.offset.dtype,
            )
            for r in records
        }
        if len(records) > 1 and len(shapes) == 1:
            offsets = torch.cat([r.offset for r in records])
            together = self._measure(
                offsets, geometries[records[0].name], scale_x * len(records), scale_y * len(records)
            )
            return list(together.view(len(records), -1, *together.shape[1:]).unbind(0))
        return [self._measure(r.offset, geometries[r.name], scale_x, scale_y) for r in records]

    def _cell_strides(self, geometry: LayerGeometry) -> Tuple[float, float]:
        return (
            (1.0, 1.0)
            if self.units == "cells"
            else (geometry.input_frame.stride_y, geometry.input_frame.stride_x)
        )

    def _measure(
        self,
        offset: torch.Tensor,
        geometry: LayerGeometry,
        scale_x: List[float],
        scale_y: List[float],
    ) -> torch.Tensor:
        if self.units == "cells":
            cell: Tuple[Any, Any] = (1.0, 1.0)
        else:  # one cell step in original-image pixels, per image
            cell = (
                geometry.input_frame.stride_y * torch.tensor(scale_y, dtype=torch.float64),
                geometry.input_frame.stride_x * torch.tensor(scale_x, dtype=torch.float64),
            )
        # Distances in float32 or the offsets' own wider precision (~1e-7 relative); the
        # statistics accumulate in float64.
        offset = offset if offset.dtype == torch.float64 else offset.float()
        return effective_dilation(offset, geometry.kernel, geometry.dilation, cell)

    def _categories(
        self,
        frame: FrameMap,
        output_hw: Tuple[int, int],
        entries: Sequence[AnnotatedImage],
        scale_x: List[float],
        scale_y: List[float],
    ) -> "_BatchCategories":
        """The categories of a batch's units on one output map, prepared once for every layer
        and row that shares the map: codes, and which image and category each counted unit adds to."""
        frames = [frame.scaled(sx, sy) for sx, sy in zip(scale_x, scale_y)]
        codes_np = np.stack(
            [
                unit_categories(
                    f,
                    output_hw,
                    (entry.width, entry.height),
                    entry.boxes,
                    entry.ignore,
                    self.thresholds,
                )
                for f, entry in zip(frames, entries)
            ]
        )
        slots_np = (np.arange(len(entries))[:, None, None] * len(CATEGORIES) + codes_np).reshape(-1)
        keep_np = codes_np.reshape(-1) >= 0
        all_kept = bool(keep_np.all())
        image_counts = np.bincount(
            slots_np[keep_np], minlength=len(entries) * len(CATEGORIES)
        ).reshape(len(entries), len(CATEGORIES))
        return _BatchCategories(
            frames=frames,
            codes_np=codes_np,
            keep=None if all_kept else torch.from_numpy(np.flatnonzero(keep_np)).to(self.device),
            codes=torch.from_numpy(codes_np.reshape(-1)[keep_np]).to(self.device),
            slots_np=slots_np[keep_np],
            image_counts=image_counts,
            not_counted=np.array(
                [(codes_np == IGNORED).sum(), (codes_np == OUTSIDE).sum()], dtype=np.int64
            ),
        )

    def _hold(
        self,
        names: List[str],
        values: torch.Tensor,
        categories: "_BatchCategories",
        indices: Sequence[int],
    ) -> None:
        """Keep one group's counted values [rows, counted] until enough are held to fold them in."""
        flat = values.reshape(values.shape[0], -1).to(self.device, torch.float64)
        kept = flat if categories.keep is None else flat.index_select(1, categories.keep)
        self._pending.append(_Pending(tuple(names), kept, categories, list(indices)))
        self._pending_values += kept.numel()
        if self._pending_values >= PENDING_VALUES:
            self.flush()

    def flush(self) -> None:
        """Fold the held batches into the statistics and the per-image sums (in the order they
        came; consecutive batches of the same rows in one go)."""
        pending, self._pending, self._pending_values = self._pending, [], 0
        start = 0
        while start < len(pending):
            stop = start + 1
            while stop < len(pending) and pending[stop].names == pending[start].names:
                stop += 1
            self._fold(pending[start:stop])
            start = stop

    def _fold(self, held: Sequence["_Pending"]) -> None:
        """Batches of the same rows into their statistics and each image's per-category sums and
        counts (units in no category left out)."""
        names = held[0].names
        categories = len(CATEGORIES)
        # Every held image gets its own slots: image position (over the held batches) * categories + category.
        firsts = np.cumsum([0] + [len(item.indices) for item in held[:-1]])
        slots_np = np.concatenate(
            [item.categories.slots_np + first * categories for item, first in zip(held, firsts)]
        )
        codes = (
            torch.cat([item.categories.codes for item in held])
            if len(held) > 1
            else held[0].categories.codes
        )
        values = (
            torch.cat([item.values for item in held], dim=1) if len(held) > 1 else held[0].values
        )  # [rows, counted]
        image_counts = np.concatenate(
            [item.categories.image_counts for item in held]
        )  # [images, categories]
        indices = [index for item in held for index in item.indices]
        rows, images = values.shape[0], len(indices)
        slots = torch.from_numpy(slots_np).to(self.device)
        row_slots = (
            torch.arange(rows, device=self.device)[:, None] * (images * categories) + slots
        )  # [rows, counted]
        image_sums = torch.bincount(
            row_slots.view(-1), weights=values.reshape(-1), minlength=rows * images * categories
        )
        image_sums = image_sums.view(rows, images, categories)
        counts = torch.from_numpy(image_counts.sum(axis=0)).to(self.device)
        self._rows.update(
            [self._row_index[name] for name in names], values, codes, counts, image_sums.sum(dim=1)
        )
        sums_np = image_sums.cpu().numpy()
        for k, name in enumerate(names):
            self._image_sums.setdefault(name, []).extend(
                (int(index), sums_np[k, b], image_counts[b]) for b, index in enumerate(indices)
            )

    def state(self) -> Dict[str, Any]:
        """A picklable CPU copy, for merging the ranks of a distributed run."""
        return {
            "stats": {name: stats.state() for name, stats in self.stats.items()},
            "not_counted": {name: counts.tolist() for name, counts in self.not_counted.items()},
            "layers": {name: info.as_dict() for name, info in self.layers.items()},
            "image_sums": {
                name: [(i, s.tolist(), c.tolist()) for i, s, c in rows]
                for name, rows in self.image_sums.items()
            },
        }


def split_row(row: str) -> Tuple[str, Optional[int]]:
    """A row name -> (layer, offset group or None): ``"<layer>:g<k>"`` is group k of a layer (``per_group``)."""
    layer, sep, group = row.rpartition(":g")
    if sep and group.isdigit():
        return layer, int(group)
    return row, None


@dataclass
class Intervals:
    """Bootstrap 95 % intervals of one row's category means [categories, 2] and of the
    :data:`DIFFERENCES` of them ({(a, b): (low, high)}, category indices)."""

    means: np.ndarray
    differences: Dict[Tuple[int, int], Tuple[float, float]]


def image_arrays(rows: Sequence[Tuple[int, Any, Any]]) -> Tuple[np.ndarray, np.ndarray]:
    """``DilationAccumulator.image_sums`` rows of one table row -> (sums, counts) [images, categories]
    in image-index order (so any batching or sharding gives the same arrays)."""
    ordered = sorted(rows, key=lambda row: row[0])
    sums = np.array([row[1] for row in ordered], dtype=np.float64).reshape(-1, len(CATEGORIES))
    counts = np.array([row[2] for row in ordered], dtype=np.float64).reshape(-1, len(CATEGORIES))
    return sums, counts


def bootstrap_intervals(
    image_sums: Dict[str, Sequence[Tuple[int, Any, Any]]],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Dict[str, Intervals]:
    """Per row: 95 % intervals of the category means and of their :data:`DIFFERENCES`, resampling
    whole images (:func:`~dcn_inspect.analysis.category_stats.bootstrap_means`, the same seed for every row)."""
    index = {name: i for i, name in enumerate(CATEGORIES)}
    pairs = [(index[a], index[b]) for a, b in DIFFERENCES]
    out: Dict[str, Intervals] = {}
    for row, rows in image_sums.items():
        sums, counts = image_arrays(rows)
        means, differences = bootstrap_means(sums, counts, pairs, resamples=resamples, seed=seed)
        out[row] = Intervals(means, differences)
    return out


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
