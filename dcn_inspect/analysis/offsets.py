"""Dense offset maps: what every unit of a deformable layer does with its kernel
(``dcn-inspect offsets``).

A deformable layer's offset field is [B, 2*G*kh*kw, Ho, Wo]: for unit (i, j), offset group g and
kernel point (a, b) (row-major, K = kh*kw), channel ``2*(g*K + a*kw + b)`` holds dy and the next
dx, in cells of the layer's input map (PAPER.md §1). Per unit this module gives, in pixels of
the original image:

- the offset of a kernel point ``(a, b)``: ``(dx * Sx, dy * Sy)`` with ``Sx`` = the input
  frame's stride times the model-input -> original scale (one input cell in image pixels);
- the unit's **mean offset** over its K kernel points: the translation of its sampling grid
  (a symmetric widening or narrowing averages out; the dilation map shows it);
- the **magnitude** (length) of the field shown;
- the **effective dilation** (:func:`dcn_inspect.analysis.dilation.effective_dilation`):
  the mean distance between adjacent sampling points, ``dilation * input stride`` for an
  undeformed filter, more where the receptive field widens.

``group`` follows one offset group (a layer with one group uses it for every channel) or
``"mean"``: the groups' offsets averaged, and the mean of the groups' dilations (as
dilation-stats counts a unit). Each unit covers its output cell in the image: centre from the
layer's output frame, ± half the output stride (:attr:`LayerOffsetMaps.extent`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dcn_inspect.analysis.attention import finest_level
from dcn_inspect.analysis.dilation import effective_dilation
from dcn_inspect.analysis.sample_points import GroupChoice, check_group
from dcn_inspect.capture.attention_calls import AttentionRecord
from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.core.checks import parse_kernel_point  # noqa: F401 - offsets' own option
from dcn_inspect.core.errors import InputError
from dcn_inspect.core.kernel_grid import split_offsets

KernelPoint = Tuple[int, int]


@dataclass
class OffsetField:
    """One offset field in original-image pixels: [Ho, Wo] x and y components."""

    kernel_point: Optional[KernelPoint]  # None: the mean over the unit's kernel points
    dx: np.ndarray
    dy: np.ndarray
    label: Optional[str] = None  # the field's name when not a kernel point's (attention)

    @property
    def magnitude(self) -> np.ndarray:
        return np.hypot(self.dx, self.dy)

    @property
    def name(self) -> str:
        if self.label is not None:
            return self.label
        if self.kernel_point is None:
            return "mean offset of the kernel points"
        return f"kernel point ({self.kernel_point[0]}, {self.kernel_point[1]})"


@dataclass
class LayerOffsetMaps:
    """Dense maps of one deformable layer over the image (original-image pixels)."""

    layer: str
    kernel: Tuple[int, int]
    dilation_setting: Tuple[int, int]
    offset_groups: int
    group: GroupChoice
    extent: Tuple[float, float, float, float]  # x0, x1, y0, y1: outer edges of the units' cells
    cell_px: Tuple[float, float]  # (x, y): one input cell in image pixels
    mean: OffsetField
    points: List[OffsetField] = field(default_factory=list)
    dilation: np.ndarray = field(
        default_factory=lambda: np.zeros((0, 0))
    )  # [Ho, Wo] effective dilation, px
    undeformed_dilation: float = 0.0  # what an undeformed filter scores, px
    #: Why there is no dilation map (NaN ``undeformed_dilation``), as the figure says it.
    no_dilation: str = "no effective dilation (a single kernel point)"

    @property
    def fields(self) -> List[OffsetField]:
        """The mean field, then one per requested kernel point."""
        return [self.mean, *self.points]

    def summary(self) -> Dict[str, Any]:
        """Numbers for ``summary.json``: per field the mean and largest magnitude, and the
        dilation."""
        return {
            "layer": self.layer,
            "kernel": list(self.kernel),
            "dilation": list(self.dilation_setting),
            "offset_groups": self.offset_groups,
            "group": self.group,
            "map_hw": list(self.dilation.shape),
            "extent_xxyy": [round(v, 6) for v in self.extent],
            "input_cell_px": [round(v, 6) for v in self.cell_px],
            "fields": [
                {
                    "field": f.name,
                    "mean_magnitude_px": round(float(f.magnitude.mean()), 6),
                    "max_magnitude_px": round(float(f.magnitude.max()), 6),
                }
                for f in self.fields
            ],
            "effective_dilation_px": None
            if not math.isfinite(self.undeformed_dilation)
            else {
                "mean": round(float(self.dilation.mean()), 6),
                "min": round(float(self.dilation.min()), 6),
                "max": round(float(self.dilation.max()), 6),
                "undeformed": round(self.undeformed_dilation, 6),
            },
        }


def _choose_group(
    values: torch.Tensor, group: GroupChoice, record: DeformConvRecord
) -> torch.Tensor:
    """[G, ...] -> [...]: one group, or the mean over the groups."""
    if group == "mean":
        return values.mean(dim=0)
    g = 0 if values.shape[0] == 1 else int(group)
    if not 0 <= g < values.shape[0]:
        raise InputError(
            f"{group}: layer {record.name} has {values.shape[0]} offset groups "
            f"(0..{values.shape[0] - 1})",
            param="group",
        )
    return values[g]


def check_kernel_points(record: DeformConvRecord, kernel_points: Sequence[KernelPoint]) -> None:
    """Every requested kernel point exists in the layer's kernel."""
    kh, kw = record.geometry.kernel
    for a, b in kernel_points:
        if not (0 <= a < kh and 0 <= b < kw):
            raise InputError(
                f"{a},{b}: layer {record.name} has a {kh}x{kw} kernel "
                f"(rows 0..{kh - 1}, columns 0..{kw - 1})",
                param="kernel_point",
            )


def layer_offset_maps(
    record: DeformConvRecord,
    scale_to_original: Tuple[float, float] = (1.0, 1.0),
    group: GroupChoice = 0,
    kernel_points: Sequence[KernelPoint] = (),
    batch_index: int = 0,
) -> LayerOffsetMaps:
    """The offset, magnitude and effective-dilation maps of one captured layer, in image pixels.

    ``scale_to_original`` = (sx, sy) takes the record's model-input frames to the original image
    (``ModelInput.scale_to_original``). Computed in float64.
    """
    group = check_group(group)
    check_kernel_points(record, kernel_points)
    geometry = record.geometry
    kh, kw = geometry.kernel
    sx, sy = (float(v) for v in scale_to_original)
    cell_x, cell_y = geometry.input_frame.stride_x * sx, geometry.input_frame.stride_y * sy
    offset = record.offset[batch_index : batch_index + 1].detach().cpu().to(torch.float64)
    dy, dx = split_offsets(offset, geometry.kernel)  # [1, G, K, Ho, Wo] input cells
    dy = _choose_group(dy[0], group, record) * cell_y  # [K, Ho, Wo] image pixels
    dx = _choose_group(dx[0], group, record) * cell_x
    mean = OffsetField(None, dx.mean(dim=0).numpy(), dy.mean(dim=0).numpy())
    points = [
        OffsetField((a, b), dx[a * kw + b].numpy(), dy[a * kw + b].numpy())
        for a, b in kernel_points
    ]

    if kh * kw >= 2:
        per_group = effective_dilation(
            offset, geometry.kernel, geometry.dilation, (cell_y, cell_x)
        )[0]  # [G, Ho, Wo]
        dilation = _choose_group(per_group, group, record).numpy()
        zero = torch.zeros(1, 2 * kh * kw, 1, 1, dtype=torch.float64)
        undeformed = float(
            effective_dilation(zero, geometry.kernel, geometry.dilation, (cell_y, cell_x)).item()
        )
    else:  # a 1x1 deformable conv has no pair of sampling points
        dilation = np.full(mean.dx.shape, math.nan)
        undeformed = math.nan

    out_frame = geometry.output_frame.scaled(sx, sy)
    out_h, out_w = geometry.output_hw
    x0, y0 = out_frame.to_image(-0.5, -0.5)
    x1, y1 = out_frame.to_image(out_w - 0.5, out_h - 0.5)
    return LayerOffsetMaps(
        layer=record.name,
        kernel=(kh, kw),
        dilation_setting=tuple(geometry.dilation),  # type: ignore[arg-type]
        offset_groups=record.offset_groups,
        group=group,
        extent=(float(x0), float(x1), float(y0), float(y1)),
        cell_px=(cell_x, cell_y),
        mean=mean,
        points=points,
        dilation=dilation,
        undeformed_dilation=undeformed,
    )


def attention_offset_maps(
    record: AttentionRecord,
    scale_to_original: Tuple[float, float] = (1.0, 1.0),
    batch_index: int = 0,
) -> LayerOffsetMaps:
    """The attention-weighted mean displacement of the encoder queries of one multi-scale
    deformable attention call, over the tokens of its finest level, in original-image pixels.

    A query's displacement is, per head, the attention-weighted mean of (sampling point -
    reference point of the point's level), then averaged over the heads (each head's weights
    sum to 1): the translation of where the query looks. Needs every token of the finest level
    (a capture that kept them all) and the call's reference points.
    """
    level = finest_level(record.spatial_shapes)
    height, width = record.spatial_shapes[level]
    start = record.level_start[level]
    wanted = torch.arange(start, start + height * width)
    if record.queries.numel() != record.query_count or record.kind != "encoder":
        raise ValueError(f"{record.name}: needs every encoder token of the call")
    refs = record.references_in_input()
    if refs is None:
        raise ValueError(f"{record.name}: the call's reference points were not captured")
    sx, sy = (float(v) for v in scale_to_original)
    xs, ys = record.points_in_input()  # [B, Q, H, P]
    weights = record.weights[batch_index, wanted].double()  # [Q, H, P]
    dx = ((xs[batch_index, wanted] - refs[0][batch_index, wanted][:, None, :]) * weights).sum(-1)
    dy = ((ys[batch_index, wanted] - refs[1][batch_index, wanted][:, None, :]) * weights).sum(-1)
    mean = OffsetField(
        None,
        (dx.mean(-1) * sx).reshape(height, width).numpy(),
        (dy.mean(-1) * sy).reshape(height, width).numpy(),
        label="attention-weighted mean displacement",
    )
    frame = record.level_frames[level].scaled(sx, sy)
    x0, y0 = frame.to_image(-0.5, -0.5)
    x1, y1 = frame.to_image(width - 0.5, height - 0.5)
    return LayerOffsetMaps(
        layer=record.name,
        kernel=(1, 1),
        dilation_setting=(1, 1),
        offset_groups=record.heads,
        group="mean",
        extent=(float(x0), float(x1), float(y0), float(y1)),
        cell_px=(frame.stride_x, frame.stride_y),
        mean=mean,
        dilation=np.full((height, width), math.nan),
        undeformed_dilation=math.nan,
        no_dilation="attention: its spread is measured by `attention`",
    )
