"""Regular versus deformed RoI-pooling bins (the paper's Fig. 7): the bin geometry.

A deformable (PS) RoI pooling layer splits every RoI into k x k bins and moves each bin by
``gamma * normalised offset * (RoI width, RoI height)`` (PAPER.md §2). This module takes the
RoIs and normalised offsets that the pooling layer actually received in the model's own
forward (its :class:`~dcn_inspect.capture.records.RoIPoolRecord`; nothing is recomputed by a second
code path) and lays out the regular and the deformed bins exactly as the op does:

- deformable PS RoI pooling (R-FCN, MSRA op): RoI corners rounded to integers, feature-cell
  extent ``[round(x1)*scale - 0.5, (round(x2)+1)*scale - 0.5]`` (width at least 0.1 cell),
  offsets ``trans`` [R, 2*classes, part, part] x first, bin (i, j) reads part cell
  ``(floor(i*part/k), floor(j*part/k))``, ``sample_per_part``^2 samples per bin starting at
  the bin's top-left corner;
- deformable RoI pooling (mmcv layout): extent ``[x1*scale - 0.5, x2*scale - 0.5]``, offsets
  [R, 2, ph, pw] x first, ``sampling_ratio``^2 samples per bin centred in sub-cells.

Both ops read the pooled map at feature index ``u = x * scale - 0.5`` for model-input pixel
``x``, so feature index ``u`` is model-input pixel ``(u + 0.5) / scale``; the CSV uses that op
convention and ``summary.json`` records how it compares with the frame the probe derived for
the pooled map. Model-input pixels become original-image pixels through the resize scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from dcn_inspect.capture.records import RoIPoolRecord
from dcn_inspect.core.columns import Column, names, position
from dcn_inspect.core.errors import InputError
from dcn_inspect.core.geometry import FrameMap

_OP_CONVENTION = (
    "as the pooling op lays it out "
    "(feature index u <-> model-input pixel (u + 0.5) / spatial_scale)"
)

#: ``<stem>_bins.csv``: one row per (RoI, class, bin), in this column order.
BINS_CSV: Tuple[Column, ...] = (
    Column(
        "roi",
        "index of the RoI in the image "
        "(RoIs given one by one first, then those of a file, then annotated boxes)",
    ),
    Column("class", "whose offsets: class name or index, `agnostic` for class-agnostic offsets"),
    Column("bin_row", "bin row i (down)"),
    Column("bin_col", "bin column j (right)"),
    position("x1", "the regular bin's left edge, " + _OP_CONVENTION),
    position("y1", "the regular bin's top edge"),
    position("x2", "the regular bin's right edge"),
    position("y2", "the regular bin's bottom edge"),
    Column(
        "dx_norm",
        "the network's normalised offset of the bin, x (x first, as the op reads it)",
        "dimensionless",
    ),
    Column("dy_norm", "the network's normalised offset of the bin, y", "dimensionless"),
    position("dx", "the bin's shift, x = gamma * dx_norm * RoI width"),
    position("dy", "the bin's shift, y = gamma * dy_norm * RoI height"),
    position("bx1", "the deformed bin's left edge (regular bin + shift)"),
    position("by1", "the deformed bin's top edge"),
    position("bx2", "the deformed bin's right edge"),
    position("by2", "the deformed bin's bottom edge"),
    Column(
        "fg_regular",
        "fraction of the regular bin's sampling points on the RoI's object mask "
        "(empty without a mask)",
        "0..1",
    ),
    Column(
        "fg_deformed",
        "fraction of the deformed bin's sampling points on the RoI's object mask "
        "(empty without a mask)",
        "0..1",
    ),
)
#: Columns of ``<stem>_bins.csv``, in order.
CSV_COLUMNS = names(BINS_CSV)

#: ``<stem>_bin_points.csv`` (written with ``points=True``): one row per bilinear sampling point.
BIN_POINTS_CSV: Tuple[Column, ...] = (
    Column("roi", "index of the RoI in the image"),
    Column("class", "whose offsets (as in the bins CSV)"),
    Column("bin_row", "bin row i (down)"),
    Column("bin_col", "bin column j (right)"),
    Column("point", "index of the sampling point in the bin (row-major)"),
    position("x", "the sampling point of the deformed bin, x"),
    position("y", "the sampling point of the deformed bin, y"),
    Column(
        "inside",
        "1 if the op reads the point from the feature map, 0 if it falls outside",
        "0 or 1",
    ),
)
#: Columns of ``<stem>_bin_points.csv``, in order.
POINT_COLUMNS = names(BIN_POINTS_CSV)

#: Class-column value for offsets shared by all classes.
AGNOSTIC = "agnostic"


@dataclass
class BinGeometry:
    """Bins of R RoIs (one class choice each) in model-input pixels, as the op lays them out.

    Arrays are float64: ``regular``/``deformed`` [R, ph, pw, 4] (x1, y1, x2, y2), ``offset_norm``
    [R, ph, pw, 2] (dx^, dy^), ``shift`` [R, ph, pw, 2] (dx, dy). ``points`` holds per RoI the
    sampling points [ph, pw, S, 2] (x, y) and ``inside`` [ph, pw, S] whether the op reads them;
    ``regular_points`` the points the op would read with zero offsets (same layout).
    """

    regular: np.ndarray
    offset_norm: np.ndarray
    shift: np.ndarray
    deformed: np.ndarray
    points: List[np.ndarray]
    inside: List[np.ndarray]
    op_rois: np.ndarray  # [R, 4] the RoI extent the op pools, in model-input pixels
    regular_points: Optional[List[np.ndarray]] = None

    def undeformed_points(self, row: int) -> np.ndarray:
        """Sampling points of row set ``row``'s regular bins [ph, pw, S, 2]."""
        if self.regular_points is not None:
            return self.regular_points[row]
        return self.points[row] - self.shift[row][:, :, None, :]

    def scaled(self, sx: float, sy: float) -> "BinGeometry":
        """The same bins in an image scaled by (sx, sy) (model input -> original image)."""
        box_scale = np.array([sx, sy, sx, sy])
        xy_scale = np.array([sx, sy])
        return BinGeometry(
            regular=self.regular * box_scale,
            offset_norm=self.offset_norm.copy(),
            shift=self.shift * xy_scale,
            deformed=self.deformed * box_scale,
            points=[p * xy_scale for p in self.points],
            inside=[m.copy() for m in self.inside],
            op_rois=self.op_rois * box_scale,
            regular_points=None
            if self.regular_points is None
            else [p * xy_scale for p in self.regular_points],
        )


@dataclass(frozen=True)
class HeadInfo:
    """What the bins depend on in one captured pooling layer."""

    layer: str
    module_type: str
    kind: str  # "psroi_pool" or "roi_pool"
    spatial_scale: float
    pooled_hw: Tuple[int, int]
    gamma: float  # trans_std for PS pooling
    num_classes: int  # offset sets per RoI (1: class-agnostic)
    has_offsets: bool
    params: Dict[str, Any]

    @property
    def class_agnostic(self) -> bool:
        return self.num_classes == 1

    def op_frame(self) -> FrameMap:
        """Feature index -> model-input pixel as the op uses it: x = (u + 0.5) / spatial_scale."""
        stride = 1.0 / self.spatial_scale
        return FrameMap(stride, stride, 0.5 * stride, 0.5 * stride)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "layer": self.layer,
            "module_type": self.module_type,
            "head_type": "deformable PS RoI pooling (R-FCN)"
            if self.kind == "psroi_pool"
            else "deformable RoI pooling (mmcv)",
            "kind": self.kind,
            "spatial_scale": self.spatial_scale,
            "pooled_size": list(self.pooled_hw),
            "gamma": self.gamma,
            "gamma_name": "trans_std" if self.kind == "psroi_pool" else "gamma",
            "offset_classes": self.num_classes,
            "class_agnostic": self.class_agnostic,
            "has_offsets": self.has_offsets,
            "params": self.params,
        }


def head_info(record: RoIPoolRecord) -> HeadInfo:
    """Read the pooling parameters and offset layout from a captured pooling call."""
    params = dict(record.params)
    if record.kind == "psroi_pool":
        pooled = int(params["pooled_size"])
        gamma = float(params["trans_std"])
        num_classes = 1 if record.offset is None else int(record.offset.shape[1]) // 2
        pooled_hw = (pooled, pooled)
    elif record.kind == "roi_pool":
        size = params["output_size"]
        pooled_hw = (int(size[0]), int(size[1]))
        gamma = float(params["gamma"])
        num_classes = 1
    else:
        raise InputError(f"layer {record.name}: unsupported RoI pooling kind {record.kind!r}")
    return HeadInfo(
        layer=record.name,
        module_type=record.module_type,
        kind=record.kind,
        spatial_scale=float(params["spatial_scale"]),
        pooled_hw=pooled_hw,
        gamma=gamma,
        num_classes=num_classes,
        has_offsets=record.offset is not None,
        params=params,
    )


def round_half_away(values: np.ndarray) -> np.ndarray:
    """C ``round()``: halves go away from zero (2.5 -> 3, -2.5 -> -3), unlike ``np.round``."""
    return np.sign(values) * np.floor(np.abs(values) + 0.5)


def _psroi_geometry(record: RoIPoolRecord, class_index: np.ndarray) -> BinGeometry:
    params = record.params
    scale = float(params["spatial_scale"])
    pooled = int(params["pooled_size"])
    part = int(params["part_size"])
    per_part = int(params["sample_per_part"])
    trans_std = float(params["trans_std"])
    height, width = record.input_hw
    rois = record.rois[:, 1:].detach().cpu().to(torch.float64).numpy()
    num_rois = rois.shape[0]

    # The op rounds the corners half away from zero (C round(), as the MSRA kernel and our
    # native kernel do) and treats x2 as an inclusive pixel index, hence the +1; a degenerate
    # RoI keeps a 0.1-cell extent.
    corners = round_half_away(rois)
    start_x = corners[:, 0] * scale - 0.5
    start_y = corners[:, 1] * scale - 0.5
    roi_w = np.maximum((corners[:, 2] + 1) * scale - 0.5 - start_x, 0.1)
    roi_h = np.maximum((corners[:, 3] + 1) * scale - 0.5 - start_y, 0.1)
    bin_w, bin_h = roi_w / pooled, roi_h / pooled

    index = np.arange(pooled, dtype=np.float64)
    shape = (num_rois, pooled, pooled)
    reg_x1 = np.broadcast_to(
        start_x[:, None, None] + index[None, None, :] * bin_w[:, None, None], shape
    )  # bin column j
    reg_y1 = np.broadcast_to(
        start_y[:, None, None] + index[None, :, None] * bin_h[:, None, None], shape
    )  # bin row i

    norm = np.zeros((num_rois, pooled, pooled, 2))
    if record.offset is not None:
        trans = record.offset.detach().cpu().to(torch.float64).numpy()
        num_classes = trans.shape[1] // 2
        trans = trans.reshape(num_rois, num_classes, 2, part, part)
        part_cell = (np.arange(pooled) * part) // pooled
        chosen = trans[np.arange(num_rois), class_index]  # [R, 2, part, part]
        picked = chosen[:, :, part_cell][:, :, :, part_cell]  # [R, 2, k, k]
        norm = picked.transpose(0, 2, 3, 1).copy()
    shift_x = trans_std * norm[..., 0] * roi_w[:, None, None]
    shift_y = trans_std * norm[..., 1] * roi_h[:, None, None]

    # Samples start at the deformed bin's top-left corner, spaced bin/sample_per_part.
    steps = np.arange(per_part, dtype=np.float64) / per_part

    def grid(r: int, dx: Any, dy: Any) -> Tuple[np.ndarray, np.ndarray]:
        xs = (reg_x1[r] + dx)[:, :, None, None] + steps[None, None, None, :] * bin_w[r]
        ys = (reg_y1[r] + dy)[:, :, None, None] + steps[None, None, :, None] * bin_h[r]
        return np.broadcast_arrays(xs, ys)  # type: ignore[return-value]

    points, inside, regular_points = [], [], []
    for r in range(num_rois):
        xs, ys = grid(r, shift_x[r], shift_y[r])
        inside.append(
            ((xs >= -0.5) & (xs <= width - 0.5) & (ys >= -0.5) & (ys <= height - 0.5)).reshape(
                pooled, pooled, -1
            )
        )
        points.append(np.stack([xs, ys], axis=-1).reshape(pooled, pooled, -1, 2))
        regular_points.append(np.stack(grid(r, 0.0, 0.0), axis=-1).reshape(pooled, pooled, -1, 2))
    op_rois = np.stack([start_x, start_y, start_x + roi_w, start_y + roi_h], axis=1)
    return _to_pixels(
        reg_x1,
        reg_y1,
        bin_w,
        bin_h,
        norm,
        shift_x,
        shift_y,
        points,
        inside,
        op_rois,
        scale,
        regular_points,
    )


def _roi_pool_geometry(record: RoIPoolRecord) -> BinGeometry:
    params = record.params
    scale = float(params["spatial_scale"])
    pooled_h, pooled_w = (int(v) for v in params["output_size"])
    sampling_ratio = int(params["sampling_ratio"])
    gamma = float(params["gamma"])
    height, width = record.input_hw
    rois32 = record.rois[:, 1:].detach().cpu()
    rois = rois32.to(torch.float64).numpy()
    num_rois = rois.shape[0]

    start_x = rois[:, 0] * scale - 0.5
    start_y = rois[:, 1] * scale - 0.5
    roi_w = rois[:, 2] * scale - 0.5 - start_x
    roi_h = rois[:, 3] * scale - 0.5 - start_y
    bin_w, bin_h = roi_w / pooled_w, roi_h / pooled_h
    cols = np.arange(pooled_w, dtype=np.float64)
    rows = np.arange(pooled_h, dtype=np.float64)
    shape = (num_rois, pooled_h, pooled_w)
    reg_x1 = np.broadcast_to(
        start_x[:, None, None] + cols[None, None, :] * bin_w[:, None, None], shape
    )
    reg_y1 = np.broadcast_to(
        start_y[:, None, None] + rows[None, :, None] * bin_h[:, None, None], shape
    )

    norm = np.zeros((num_rois, pooled_h, pooled_w, 2))
    if record.offset is not None:
        norm = record.offset.detach().cpu().to(torch.float64).numpy().transpose(0, 2, 3, 1).copy()
    shift_x = gamma * norm[..., 0] * roi_w[:, None, None]
    shift_y = gamma * norm[..., 1] * roi_h[:, None, None]

    # The adaptive grid is ceil(roi_size / pooled) computed by the op in the RoIs' own dtype;
    # mirror that arithmetic so the sample count matches at exact integer boundaries.
    s32 = rois32 * scale - 0.5
    roi_w32, roi_h32 = s32[:, 2] - s32[:, 0], s32[:, 3] - s32[:, 1]
    points, inside, regular_points = [], [], []
    for r in range(num_rois):
        grid_h = (
            sampling_ratio if sampling_ratio > 0 else int(math.ceil(float(roi_h32[r]) / pooled_h))
        )
        grid_w = (
            sampling_ratio if sampling_ratio > 0 else int(math.ceil(float(roi_w32[r]) / pooled_w))
        )
        grid_h, grid_w = max(grid_h, 0), max(grid_w, 0)
        fy = (np.arange(grid_h, dtype=np.float64) + 0.5) / max(grid_h, 1)
        fx = (np.arange(grid_w, dtype=np.float64) + 0.5) / max(grid_w, 1)
        xs = (reg_x1[r] + shift_x[r])[:, :, None, None] + fx[None, None, None, :] * bin_w[r]
        ys = (reg_y1[r] + shift_y[r])[:, :, None, None] + fy[None, None, :, None] * bin_h[r]
        xs, ys = np.broadcast_arrays(xs, ys)
        # mmcv's bilinear read is zero only beyond one cell outside the map (RoIAlign rule).
        inside.append(
            ((ys >= -1) & (ys <= height) & (xs >= -1) & (xs <= width)).reshape(
                pooled_h, pooled_w, -1
            )
        )
        points.append(np.stack([xs, ys], axis=-1).reshape(pooled_h, pooled_w, -1, 2))
        rx = reg_x1[r][:, :, None, None] + fx[None, None, None, :] * bin_w[r]
        ry = reg_y1[r][:, :, None, None] + fy[None, None, :, None] * bin_h[r]
        regular_points.append(
            np.stack(np.broadcast_arrays(rx, ry), axis=-1).reshape(pooled_h, pooled_w, -1, 2)
        )
    op_rois = np.stack([start_x, start_y, start_x + roi_w, start_y + roi_h], axis=1)
    return _to_pixels(
        reg_x1,
        reg_y1,
        bin_w,
        bin_h,
        norm,
        shift_x,
        shift_y,
        points,
        inside,
        op_rois,
        scale,
        regular_points,
    )


def _to_pixels(
    reg_x1: np.ndarray,
    reg_y1: np.ndarray,
    bin_w: np.ndarray,
    bin_h: np.ndarray,
    norm: np.ndarray,
    shift_x: np.ndarray,
    shift_y: np.ndarray,
    points: List[np.ndarray],
    inside: List[np.ndarray],
    op_rois: np.ndarray,
    scale: float,
    regular_points: Optional[List[np.ndarray]] = None,
) -> BinGeometry:
    """Feature-cell geometry -> model-input pixels with the op's convention
    x = (u + 0.5) / scale."""

    def px(u: np.ndarray) -> np.ndarray:
        return (u + 0.5) / scale

    reg_x2 = reg_x1 + bin_w[:, None, None]
    reg_y2 = reg_y1 + bin_h[:, None, None]
    regular = np.stack([px(reg_x1), px(reg_y1), px(reg_x2), px(reg_y2)], axis=-1)
    shift = np.stack([shift_x / scale, shift_y / scale], axis=-1)
    deformed = np.stack(
        [px(reg_x1 + shift_x), px(reg_y1 + shift_y), px(reg_x2 + shift_x), px(reg_y2 + shift_y)],
        axis=-1,
    )
    return BinGeometry(
        regular=regular,
        offset_norm=norm,
        shift=shift,
        deformed=deformed,
        points=[px(p) for p in points],
        inside=[m.copy() for m in inside],
        op_rois=px(op_rois),
        regular_points=None if regular_points is None else [px(p) for p in regular_points],
    )


def roi_bins(record: RoIPoolRecord, class_index: Optional[Sequence[int]] = None) -> BinGeometry:
    """Regular and deformed bins of every RoI of a captured pooling call, in model-input pixels.

    ``class_index`` chooses, per RoI, whose offsets to use when the PS head's offsets are
    class-specific (``trans`` with 2*C channels); ignored for class-agnostic offsets.
    """
    num_rois = int(record.rois.shape[0])
    if record.kind == "psroi_pool":
        info = head_info(record)
        if class_index is None or info.class_agnostic:
            chosen = np.zeros(num_rois, dtype=np.int64)
        else:
            chosen = np.asarray(class_index, dtype=np.int64).reshape(-1)
            if chosen.shape[0] != num_rois:
                raise ValueError(f"class_index has {chosen.shape[0]} entries for {num_rois} RoIs")
            bad = [int(c) for c in chosen if not 0 <= c < info.num_classes]
            if bad:
                raise InputError(
                    f"class index {bad[0]} is outside 0..{info.num_classes - 1} "
                    f"of layer {record.name}",
                    param="class_choice",
                )
        return _psroi_geometry(record, chosen)
    if record.kind == "roi_pool":
        return _roi_pool_geometry(record)
    raise InputError(f"layer {record.name}: unsupported RoI pooling kind {record.kind!r}")


def bins_table(
    geometry: BinGeometry,
    rows: Sequence[Tuple[int, str]],
    fg_regular: Optional[np.ndarray] = None,
    fg_deformed: Optional[np.ndarray] = None,
) -> pd.DataFrame:
    """The CSV table: one row per (RoI row set, bin), columns :data:`CSV_COLUMNS`.

    ``rows[k] = (roi, class label)`` names the k-th RoI row set of ``geometry``;
    ``fg_regular`` / ``fg_deformed`` [sets, ph, pw] are the bins' foreground fractions
    (:mod:`dcn_inspect.analysis.bins_foreground`; NaN where the RoI has no object mask, all NaN
    when omitted).
    """
    count, pooled_h, pooled_w = geometry.regular.shape[:3]
    per_set = pooled_h * pooled_w
    bin_row, bin_col = np.meshgrid(np.arange(pooled_h), np.arange(pooled_w), indexing="ij")
    columns: Dict[str, Any] = {
        "roi": np.repeat([roi for roi, _ in rows], per_set).astype(np.int64),
        "class": np.repeat(np.array([label for _, label in rows], dtype=object), per_set),
        "bin_row": np.tile(bin_row.reshape(-1), count),
        "bin_col": np.tile(bin_col.reshape(-1), count),
    }
    flat = {
        "regular": geometry.regular.reshape(-1, 4),
        "norm": geometry.offset_norm.reshape(-1, 2),
        "shift": geometry.shift.reshape(-1, 2),
        "deformed": geometry.deformed.reshape(-1, 4),
    }
    for k, name in enumerate(("x1", "y1", "x2", "y2")):
        columns[name] = flat["regular"][:, k]
    columns["dx_norm"], columns["dy_norm"] = flat["norm"][:, 0], flat["norm"][:, 1]
    columns["dx"], columns["dy"] = flat["shift"][:, 0], flat["shift"][:, 1]
    for k, name in enumerate(("bx1", "by1", "bx2", "by2")):
        columns[name] = flat["deformed"][:, k]
    missing = np.full(count * per_set, np.nan)
    columns["fg_regular"] = (
        missing if fg_regular is None else np.asarray(fg_regular, dtype=np.float64).reshape(-1)
    )
    columns["fg_deformed"] = (
        missing if fg_deformed is None else np.asarray(fg_deformed, dtype=np.float64).reshape(-1)
    )
    return pd.DataFrame(columns, columns=CSV_COLUMNS)


def points_table(geometry: BinGeometry, rows: Sequence[Tuple[int, str]]) -> pd.DataFrame:
    """One row per sampling point of every deformed bin, columns :data:`POINT_COLUMNS`."""
    frames = []
    for k, (roi, label) in enumerate(rows):
        pts, inside = geometry.points[k], geometry.inside[k]
        pooled_h, pooled_w, samples = pts.shape[:3]
        bin_row, bin_col, point = np.meshgrid(
            np.arange(pooled_h), np.arange(pooled_w), np.arange(samples), indexing="ij"
        )
        frames.append(
            pd.DataFrame(
                {
                    "roi": np.full(bin_row.size, roi, dtype=np.int64),
                    "class": np.full(bin_row.size, label, dtype=object),
                    "bin_row": bin_row.reshape(-1),
                    "bin_col": bin_col.reshape(-1),
                    "point": point.reshape(-1),
                    "x": pts[..., 0].reshape(-1),
                    "y": pts[..., 1].reshape(-1),
                    "inside": inside.reshape(-1).astype(np.int64),
                },
                columns=POINT_COLUMNS,
            )
        )
    if not frames:
        return pd.DataFrame(columns=POINT_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def select_rows(geometry: BinGeometry, picks: Sequence[int]) -> BinGeometry:
    index = np.asarray(picks, dtype=np.int64)
    return BinGeometry(
        regular=geometry.regular[index],
        offset_norm=geometry.offset_norm[index],
        shift=geometry.shift[index],
        deformed=geometry.deformed[index],
        points=[geometry.points[k] for k in picks],
        inside=[geometry.inside[k] for k in picks],
        op_rois=geometry.op_rois[index],
        regular_points=None
        if geometry.regular_points is None
        else [geometry.regular_points[k] for k in picks],
    )


def frame_comparison(info: HeadInfo, frame: Optional[FrameMap]) -> Dict[str, Any]:
    """How the op's index convention relates to the frame the probe derived for the pooled map."""
    op = info.op_frame()
    result: Dict[str, Any] = {
        "csv_convention": "op: feature index u <-> model-input pixel (u + 0.5) / spatial_scale",
        "op_frame": op.as_dict(),
        "probe_frame": None if frame is None else frame.as_dict(),
    }
    if frame is not None:
        result["probe_minus_op_px"] = {
            "offset_x": frame.offset_x - op.offset_x,
            "offset_y": frame.offset_y - op.offset_y,
            "stride_x": frame.stride_x - op.stride_x,
            "stride_y": frame.stride_y - op.stride_y,
        }
        result["agree"] = bool(
            abs(frame.offset_x - op.offset_x) < 1e-9
            and abs(frame.offset_y - op.offset_y) < 1e-9
            and abs(frame.stride_x - op.stride_x) < 1e-9
            and abs(frame.stride_y - op.stride_y) < 1e-9
        )
    return result


def geometry_for_rows(
    record: RoIPoolRecord, rows: Sequence[Tuple[int, int, str]], info: HeadInfo
) -> BinGeometry:
    """Bins for every ``(roi, class index, how chosen)`` row: one geometry per distinct class,
    rows picked."""
    if info.class_agnostic:
        return roi_bins(record)
    classes = sorted({c for _, c, _ in rows})
    per_class = {c: roi_bins(record, [c] * int(record.rois.shape[0])) for c in classes}
    parts = [select_rows(per_class[c], [roi]) for roi, c, _ in rows]
    return BinGeometry(
        regular=np.concatenate([p.regular for p in parts]),
        offset_norm=np.concatenate([p.offset_norm for p in parts]),
        shift=np.concatenate([p.shift for p in parts]),
        deformed=np.concatenate([p.deformed for p in parts]),
        points=[p.points[0] for p in parts],
        inside=[p.inside[0] for p in parts],
        op_rois=np.concatenate([p.op_rois for p in parts]),
        regular_points=None
        if any(p.regular_points is None for p in parts)
        else [p.regular_points[0] for p in parts],  # type: ignore[index]
    )
