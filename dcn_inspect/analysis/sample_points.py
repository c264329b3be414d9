"""Sampling trees: where a unit of a deformable layer reads the image, through several layers.

A unit (row i, column j) of the top deformable layer samples its input at its K kernel
points plus the learned offsets (PAPER.md §1). Each of those positions lies on the output of
the previous deformable layer, whose own offsets there give K more positions, and so on:
K^L points for L levels (9, 81, 729 for three 3x3 layers: the paper's Fig. 5/6).

:func:`trace_sampling_trees` computes every point of every tree at once, one tensor step per
level:

1. positions (fractional (row, col) in the current layer's output frame) -> the layer's
   offsets and masks read there by bilinear interpolation with the op's border rule (a read is
   zero unless -1 < y < H and -1 < x < W; corners outside the map contribute zero), so
   points that leave the map keep the regular grid instead of being dropped;
2. sampling locations ``y = r*stride - pad + a*dilation + dy`` (same for x) in the layer's
   input-index frame -> image pixels through the layer's input :class:`FrameMap`;
3. image pixels -> fractional index of the next (lower) deformable layer's output frame.

Like the official demo (and the paper's figure) the tree follows only the deformable layers:
the convs in between are assumed to keep the position (they map through the exact frames, so
strides and paddings between levels are honoured), and the residual path is ignored.
``round_positions=True`` reproduces the demo's rule: every position is rounded to the nearest
cell (half to even, like ``np.round``) before its offsets are read, and the kernel is placed
around that cell. Unlike the demo, no point is ever dropped (the demo skips kernel points that
fall off the map and then pairs the remaining points with the wrong offsets).

A point's weight is the product of the (bilinearly read) DCNv2 masks along its path, 1 for
layers without a mask. Coordinates are continuous image pixels in the COCO convention
((0, 0) = top-left corner of the top-left pixel) of the image the frames are scaled to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.core.checks import check_group
from dcn_inspect.core.columns import Column, names, position, present
from dcn_inspect.core.errors import InputError
from dcn_inspect.core.kernel_grid import kernel_grid

if TYPE_CHECKING:  # pandas comes in when the table is made (points_table)
    import pandas as pd

#: ``<stem>_points.csv``: one row per point, in this column order (README and summary.json describe
#: it from here).
POINTS_CSV: Tuple[Column, ...] = (
    Column("unit", "index of the traced unit (summary.json lists how each was chosen)"),
    position("unit_x", "the traced unit's centre, x"),
    position("unit_y", "the traced unit's centre, y"),
    Column("level", "1 = sampling points of the top deformable layer, ..., L = the deepest level"),
    Column(
        "point", "index within the level: parent * K + kernel point (K kernel points, row-major)"
    ),
    Column("parent", "`point` of the level above (empty at level 1)"),
    Column("layer", "the deformable layer whose sampling point this is"),
    position("x", "the sampling point, x"),
    position("y", "the sampling point, y"),
    Column("weight", "product of the DCNv2 masks along the path (1 without masks)", "0..1"),
    Column(
        "inside",
        "1 if the point lies in the band the op reads (-1 < row < H and -1 < col < W of that "
        "layer's input map), "
        "else 0 (kept, never dropped: offsets read outside a map are zero, as in the op)",
        "0 or 1",
    ),
    Column(
        "grad_weight",
        "|d response / d point| of the unit's response (sum over the top layer's channels at "
        "the unit) with respect to the "
        "point's position: the total derivative, how much the point matters",
        "response per original-image pixel",
        only="grad_weight",
    ),
)
#: Columns of ``<stem>_points.csv`` without ``grad_weight``, in order.
CSV_COLUMNS = names(present(POINTS_CSV))

#: Column added by ``sample-points --grad-weight`` (after the others).
GRAD_WEIGHT_COLUMN = "grad_weight"

#: ``group`` argument: an offset-group index, or "mean" to average the groups' offsets and masks.
GroupChoice = Union[int, str]


@dataclass
class SamplingTrees:
    """All points of the sampling trees of U units through L levels (level 1 = top layer).

    Level ``l`` (1-based) has ``P_l = K_1 * ... * K_l`` points per unit, stored in
    ``xs[l-1]``, ``ys[l-1]``, ``weights[l-1]``, ``inside[l-1]`` as [U, P_l] tensors. Point
    ``p`` of level ``l`` is kernel point ``p % K_l`` of point ``p // K_l`` of level ``l - 1``
    (its parent), kernel points row-major.
    """

    layers: List[str]  # layer name of each level, top first
    kernel_points: List[int]  # K of each level
    units: torch.Tensor  # [U, 2] long: (row, col) in the top layer's output frame
    unit_xy: torch.Tensor  # [U, 2] float64: unit centre (x, y) in image pixels
    xs: List[torch.Tensor]  # per level [U, P_l] float64, image pixels
    ys: List[torch.Tensor]
    weights: List[torch.Tensor]  # per level [U, P_l] float64 in [0, 1]
    inside: List[
        torch.Tensor
    ]  # per level [U, P_l] bool: -1 < y < H and -1 < x < W of the layer's input map
    #: Per level, where its offsets were read: (rows, cols) [U, P_{l-1}] (P_0 = 1: the unit) in the
    #: level's output frame, after rounding with ``round_positions``. Point p of the level is kernel
    #: point p % K_l of the layer's filter at read position p // K_l.
    read_at: List[Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def num_levels(self) -> int:
        return len(self.layers)

    @property
    def num_units(self) -> int:
        return int(self.units.shape[0])

    def points_per_unit(self, level: int) -> int:
        """Number of points of ``level`` (1-based) per unit."""
        return int(self.xs[level - 1].shape[1])

    def parents(self, level: int) -> torch.Tensor:
        """Index of each point's parent in ``level - 1`` ([P_level] long); level >= 2."""
        if level < 2:
            raise ValueError("level-1 points have no parent")
        return torch.arange(self.points_per_unit(level)) // self.kernel_points[level - 1]


def layer_field(
    record: DeformConvRecord,
    batch_index: int = 0,
    group: GroupChoice = 0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The offsets (and mask) a tree reads from one layer: [2K (+K), Ho, Wo] = dy's, dx's (,
    masks)."""
    kernel_points = record.kernel_points
    groups = record.offset_groups
    out_h, out_w = record.offset.shape[-2:]
    offset = record.offset[batch_index].to(dtype).reshape(groups, kernel_points, 2, out_h, out_w)
    mask = (
        None
        if record.mask is None
        else record.mask[batch_index].to(dtype).reshape(groups, kernel_points, out_h, out_w)
    )
    if group == "mean":
        offset = offset.mean(dim=0)
        mask = None if mask is None else mask.mean(dim=0)
    else:
        # A layer with one offset group uses it for every input channel, so it is every group.
        g = 0 if groups == 1 else int(group)
        if not 0 <= g < groups:
            raise InputError(
                f"{group}: layer {record.name} has {groups} offset groups (0..{groups - 1})",
                param="group",
            )
        offset = offset[g]
        mask = None if mask is None else mask[g]
    parts = [offset[:, 0], offset[:, 1]]
    if mask is not None:
        parts.append(mask)
    return torch.cat(parts, dim=0)


def read_field(field: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Bilinear read of ``field`` [C, H, W] at fractional positions [N] with the op's border rule ->
    [N, C].

    Same values as :func:`dcn_inspect.ops.reference.bilinear_zero_border` (zero unless
    -1 < y < H and -1 < x < W; corners outside the map contribute zero), laid out for this use:
    the field is read as a [H*W + 1, C] table (the extra row is the zero of outside corners), so
    every corner is one row lookup instead of C scattered gathers.
    """
    channels, height, width = field.shape
    table = torch.cat(
        [field.permute(1, 2, 0).reshape(height * width, channels), field.new_zeros(1, channels)]
    )
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    band = (rows > -1) & (rows < height) & (cols > -1) & (cols < width)
    top, left = torch.floor(rows), torch.floor(cols)
    fy, fx = rows - top, cols - left
    top_i, left_i = (
        top.clamp(-2, height + 1).long(),
        left.clamp(-2, width + 1).long(),
    )  # clamped: no overflow far outside
    out = field.new_zeros(rows.shape[0], channels)
    for dy, dx, weight in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        y, x = top_i + dy, left_i + dx
        inside = band & (y >= 0) & (y < height) & (x >= 0) & (x < width)
        index = torch.where(inside, y * width + x, height * width)
        out += table[index] * weight[:, None]
    return out


def check_group_fits(group: GroupChoice, records: Sequence[DeformConvRecord]) -> GroupChoice:
    """:func:`check_group`, and an error when no layer of ``records`` has that offset group (a
    layer with one group uses it for every group index, so only an index beyond them all is
    wrong)."""
    group = check_group(group)
    if group == "mean" or not records:
        return group
    widest = max(records, key=lambda record: record.offset_groups)  # the first of the widest
    count = widest.offset_groups
    if group >= count:
        among = (
            " (the most of the layers)" if any(r.offset_groups != count for r in records) else ""
        )
        raise InputError(
            f"{group}: layer {widest.name} has {count} offset "
            f"group{'s' if count > 1 else ''}{among} "
            f"(use {'0' if count == 1 else f'0..{count - 1}'} or mean)",
            param="group",
        )
    return group


def trace_sampling_trees(
    records: Sequence[DeformConvRecord],
    units: torch.Tensor,
    *,
    batch_index: int = 0,
    group: GroupChoice = 0,
    round_positions: bool = False,
    scale_to_original: Tuple[float, float] = (1.0, 1.0),
) -> SamplingTrees:
    """Trace the sampling trees of ``units`` through ``records`` (top layer first).

    ``units`` is [U, 2] integer (row, col) in the top layer's output frame. ``group`` picks
    the offset group to follow (layers with a single group use it) or ``"mean"`` averages the
    groups' offsets and masks. ``scale_to_original`` = (sx, sy) scales the model-input frames
    of the records to the original image (``ModelInput.scale_to_original``). Computed in
    float64; no Python loop over units or points.
    """
    if not records:
        raise ValueError("trace_sampling_trees needs at least one deformable layer")
    group = check_group_fits(group, records)
    top = records[0]
    units = _checked_units(top, units, batch_index)
    dtype = torch.float64
    sx, sy = float(scale_to_original[0]), float(scale_to_original[1])
    num_units = units.shape[0]

    unit_x, unit_y = top.geometry.output_frame.to_image(
        units[:, 1].to(dtype), units[:, 0].to(dtype)
    )
    # Current positions: [U, N] fractional (row, col) in the current layer's output frame.
    rows = units[:, :1].to(dtype)
    cols = units[:, 1:].to(dtype)
    weight = torch.ones(num_units, 1, dtype=dtype)

    xs: List[torch.Tensor] = []
    ys: List[torch.Tensor] = []
    weights: List[torch.Tensor] = []
    inside: List[torch.Tensor] = []
    read_at: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for level, record in enumerate(records):
        geometry = record.geometry
        if round_positions:
            rows, cols = torch.round(rows), torch.round(cols)
        read_at.append((rows, cols))
        values = layer_field(record, batch_index, group, dtype).cpu()
        sample_y, sample_x, weight = _level_samples(record, values, rows, cols, weight)
        in_h, in_w = geometry.input_hw
        inside.append((sample_y > -1) & (sample_y < in_h) & (sample_x > -1) & (sample_x < in_w))
        image_x, image_y = geometry.input_frame.to_image(sample_x, sample_y)
        xs.append(image_x * sx)
        ys.append(image_y * sy)
        weights.append(weight)
        if level + 1 < len(records):
            cols, rows = records[level + 1].geometry.output_frame.to_index(image_x, image_y)

    return SamplingTrees(
        layers=[r.name for r in records],
        kernel_points=[r.kernel_points for r in records],
        units=units,
        unit_xy=torch.stack([unit_x * sx, unit_y * sy], dim=1),
        xs=xs,
        ys=ys,
        weights=weights,
        inside=inside,
        read_at=read_at,
    )


def _checked_units(top: DeformConvRecord, units: torch.Tensor, batch_index: int) -> torch.Tensor:
    """``units`` as [U, 2] long (row, col) on the CPU; an error for a unit outside the top
    layer's output map or a batch index outside its batch."""
    if not 0 <= batch_index < top.offset.shape[0]:
        raise ValueError(f"batch_index {batch_index} outside the batch of {top.offset.shape[0]}")
    units = torch.as_tensor(units, dtype=torch.long).reshape(-1, 2).cpu()
    out_h, out_w = top.geometry.output_hw
    if units.numel() and (
        units[:, 0].min() < 0
        or units[:, 0].max() >= out_h
        or units[:, 1].min() < 0
        or units[:, 1].max() >= out_w
    ):
        raise ValueError(f"units outside the {out_h}x{out_w} output map of {top.name}")
    return units


def _level_samples(
    record: DeformConvRecord,
    values_field: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    weight: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level of the trees: the sampling locations of filters centred at the fractional
    output positions (``rows``, ``cols``: [U, N]) of ``record``, in its input-index frame, and
    the path weights times the masks read there. Returns ``(sample_y, sample_x, weight)``, each
    [U, N*K] (parent-major, kernel points row-major)."""
    geometry = record.geometry
    kernel_points = record.kernel_points
    num_units, parents = rows.shape
    values = read_field(values_field, rows, cols).reshape(
        num_units, parents, values_field.shape[0]
    )  # [U, N, C]
    dy, dx = values[..., :kernel_points], values[..., kernel_points : 2 * kernel_points]
    grid_y, grid_x = kernel_grid(geometry.kernel, geometry.dilation, dtype=rows.dtype)
    sample_y = rows[..., None] * geometry.stride[0] - geometry.padding[0] + grid_y + dy  # [U, N, K]
    sample_x = cols[..., None] * geometry.stride[1] - geometry.padding[1] + grid_x + dx
    points = parents * kernel_points
    if record.mask is not None:
        weight = (weight[..., None] * values[..., 2 * kernel_points :]).reshape(num_units, points)
    else:
        weight = weight.repeat_interleave(kernel_points, dim=1)
    return sample_y.reshape(num_units, points), sample_x.reshape(num_units, points), weight


def tree_half_extent(
    records: Sequence[DeformConvRecord], scale_to_original: Tuple[float, float] = (1.0, 1.0)
) -> Tuple[float, float]:
    """Half the theoretical receptive field (x, y) of a top-layer unit through ``records`` (top
    first), in image pixels: how far its undeformed sampling tree reaches from the unit's centre.

    Every kernel point of a layer with kernel k and dilation d lies ``(a - (k-1)/2) * d`` input
    cells from the unit's centre (the frames put the centre in the kernel's middle), so level
    l adds ``(k-1)/2 * d * input stride``; the deepest points read cells of the deepest input
    map, half a cell more. Like the trees, only the traced deformable layers count (the layers
    below them and the residual path do not).
    """
    sx, sy = (float(v) for v in scale_to_original)
    reach_x = reach_y = 0.0
    for record in records:
        geometry = record.geometry
        reach_y += (
            (geometry.kernel[0] - 1) / 2 * geometry.dilation[0] * geometry.input_frame.stride_y * sy
        )
        reach_x += (
            (geometry.kernel[1] - 1) / 2 * geometry.dilation[1] * geometry.input_frame.stride_x * sx
        )
    if records:
        deepest = records[-1].geometry.input_frame
        reach_x += deepest.stride_x * sx / 2
        reach_y += deepest.stride_y * sy / 2
    return reach_x, reach_y


def tree_on_image(
    records: Sequence[DeformConvRecord],
    image_hw: Tuple[int, int],
    group: GroupChoice = 0,
    round_positions: bool = False,
    scale_to_original: Tuple[float, float] = (1.0, 1.0),
    max_points: int = 1 << 18,
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A function from top-layer units (rows, cols [N]) to the fraction of each unit's sampling
    tree on the image: of its deepest points (:func:`trace_sampling_trees` with these options,
    as the CSV lists them), those with 0 <= x <= W and 0 <= y <= H of the original image
    (``image_hw`` = (H, W)). Traced in chunks of at most ``max_points`` deepest points.
    (:func:`dcn_inspect.analysis.unit_selection.background_unit` chooses by it.)"""
    height, width = image_hw
    per_unit = int(np.prod([record.kernel_points for record in records]))
    chunk = max(1, max_points // max(per_unit, 1))

    def fraction(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        cells = np.stack([np.asarray(rows), np.asarray(cols)], axis=1).astype(np.int64)
        found = np.zeros(len(cells))
        for start in range(0, len(cells), chunk):
            trees = trace_sampling_trees(
                records,
                torch.from_numpy(cells[start : start + chunk]),
                group=group,
                round_positions=round_positions,
                scale_to_original=scale_to_original,
            )
            xs, ys = trees.xs[-1], trees.ys[-1]
            on = (xs >= 0) & (xs <= width) & (ys >= 0) & (ys <= height)
            found[start : start + chunk] = on.double().mean(dim=1).numpy()
        return found

    return fraction


def points_table(
    trees: SamplingTrees, grad_weights: Optional[Sequence[torch.Tensor]] = None
) -> pd.DataFrame:
    """One row per point, units outermost, then levels, then points (the CSV's row order).

    ``grad_weights`` (per level [U, P_l], e.g. from
    :func:`dcn_inspect.analysis.receptive_field.sampling_point_gradients`)
    adds the :data:`GRAD_WEIGHT_COLUMN` column.
    """
    import pandas as pd

    names = CSV_COLUMNS + ([GRAD_WEIGHT_COLUMN] if grad_weights is not None else [])
    columns: Dict[str, List[np.ndarray]] = {name: [] for name in names}
    num_units = trees.num_units
    unit_index = np.arange(num_units)
    for level in range(1, trees.num_levels + 1):
        count = trees.points_per_unit(level)
        columns["unit"].append(np.repeat(unit_index, count))
        columns["unit_x"].append(np.repeat(trees.unit_xy[:, 0].numpy(), count))
        columns["unit_y"].append(np.repeat(trees.unit_xy[:, 1].numpy(), count))
        columns["level"].append(np.full(num_units * count, level))
        columns["point"].append(np.tile(np.arange(count), num_units))
        parent = (
            trees.parents(level).numpy().astype(np.float64) if level > 1 else np.full(count, np.nan)
        )
        columns["parent"].append(np.tile(parent, num_units))
        columns["layer"].append(np.full(num_units * count, trees.layers[level - 1], dtype=object))
        columns["x"].append(trees.xs[level - 1].numpy().reshape(-1))
        columns["y"].append(trees.ys[level - 1].numpy().reshape(-1))
        columns["weight"].append(trees.weights[level - 1].numpy().reshape(-1))
        columns["inside"].append(trees.inside[level - 1].numpy().reshape(-1).astype(np.int64))
        if grad_weights is not None:
            columns[GRAD_WEIGHT_COLUMN].append(grad_weights[level - 1].numpy().reshape(-1))
    table = pd.DataFrame(
        {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in columns.items()}
    )
    table["parent"] = table["parent"].astype("Int64")  # integers, empty at level 1
    # Units outermost: a stable sort keeps levels and points in order within each unit.
    order = np.argsort(table["unit"].to_numpy(), kind="stable")
    return table.iloc[order].reset_index(drop=True)
