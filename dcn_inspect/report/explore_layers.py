"""The explorer page's optional layers (``dcn-inspect explore``, conv page):

- **offset groups**: the fields of every offset group of the followed layers and of their mean
  (:func:`group_fields`), so the page traces with the chosen one as
  ``sample-points --group G|mean`` does; above :data:`FIELD_BYTES_LIMIT` only group 0 and the mean
  are embedded;
- **dense offset maps**: per followed layer (and group choice) the flow colours of its mean
  offset field, exactly the flow panel of ``dcn-inspect offsets``
  (:func:`~dcn_inspect.analysis.offsets.layer_offset_maps`,
  :func:`~dcn_inspect.report.offsets.flow_colours` saturated at
  :func:`~dcn_inspect.report.offsets.flow_scale`), one PNG ``data:`` URI per map, drawn by the
  page over the map's extent (:func:`offset_map_payload`);
- **categories**: with boxes (the bundled annotations of a bundled image, or ``boxes``), each
  top-layer unit's category as sample-points' panel titles give it
  (:func:`~dcn_inspect.analysis.unit_selection.unit_category`): the index of the box whose
  text the page shows, -1 for background (:func:`category_payload`).
"""

from __future__ import annotations

import base64
import io
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from dcn_inspect.analysis.offsets import layer_offset_maps
from dcn_inspect.analysis.sample_points import GroupChoice, layer_field
from dcn_inspect.analysis.unit_selection import Boxes, Unit, UnitCategory, unit_category
from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.report.offsets import MAP_ALPHA, flow_colours, flow_scale

#: Above this many bytes of embedded fields (all groups, base64), only group 0 and the mean are
#: embedded.
FIELD_BYTES_LIMIT = 15_000_000


def group_choices(records: Sequence[DeformConvRecord]) -> List[str]:
    """The offset-group choices valid for every followed layer ("0".."G-1", "mean"); empty when
    no layer has more than one group (a layer with one group uses it for every index)."""
    widest = max((r.offset_groups for r in records), default=1)
    if widest <= 1:
        return []
    valid = [
        g for g in range(widest) if all(r.offset_groups in (1, widest) or g < r.offset_groups
                                        for r in records)
    ]  # fmt: skip
    return [str(g) for g in valid] + ["mean"]


def _field_bytes(record: DeformConvRecord) -> int:
    """Bytes of one field of ``record`` as the page embeds it (float32, base64)."""
    channels = (3 if record.mask is not None else 2) * record.kernel_points
    out_h, out_w = record.offset.shape[-2:]
    return 4 * ((channels * out_h * out_w * 4 + 2) // 3)


def _encoded(values: torch.Tensor) -> str:
    """float64 values (a mean is taken in float64, as sample-points does) as base64 float32."""
    return base64.b64encode(values.detach().cpu().numpy().astype("<f4").tobytes()).decode("ascii")


def _key(choice: str) -> GroupChoice:
    return "mean" if choice == "mean" else int(choice)


def group_fields(
    records: Sequence[DeformConvRecord], limit: int = FIELD_BYTES_LIMIT
) -> Tuple[List[str], List[Dict[str, str]], Optional[str]]:
    """(the group choices embedded, per layer its fields of the choices other than "0" (layers
    with one group: none, the page uses group 0's), a note when groups were left out)."""
    choices = group_choices(records)
    note = None
    if choices:
        total = sum(_field_bytes(r) * (len(choices) if r.offset_groups > 1 else 1) for r in records)
        if total > limit:
            note = (
                f"the fields of all {len(choices) - 1} offset groups would take "
                f"{total / 1e6:.1f} MB (over {limit / 1e6:g} MB): only group 0 and the mean "
                "are embedded"
            )
            choices = ["0", "mean"]
    extra = [
        {
            c: _encoded(layer_field(r, 0, _key(c)))
            for c in choices
            if c != "0" and r.offset_groups > 1
        }
        for r in records
    ]
    return choices, extra, note


def flow_image(record: DeformConvRecord, scale: Tuple[float, float], group: GroupChoice) -> Any:
    """The flow colours of the layer's mean offset field (uint8 RGB [Ho, Wo, 3]) as the offsets
    figure's flow panel draws them, and the map's (x0, x1, y0, y1) extent in image pixels."""
    maps = layer_offset_maps(record, scale, group)
    rgb = flow_colours(maps.mean.dx, maps.mean.dy, flow_scale(maps.mean))
    return np.round(rgb * 255.0).astype(np.uint8), maps.extent


def _png_uri(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def offset_map_payload(
    records: Sequence[DeformConvRecord], scale: Tuple[float, float], choices: Sequence[str]
) -> List[Dict[str, Any]]:
    """Per followed layer: its flow map per group choice (layers with one group: "0" only, the
    page falls back to it), the extent it covers and the opacity to draw it with."""
    found = []
    for record in records:
        keys = [c for c in choices if record.offset_groups > 1] or ["0"]
        uris = {}
        extent: Tuple[float, ...] = ()
        for key in keys:
            rgb, extent = flow_image(record, scale, _key(key))
            uris[key] = _png_uri(rgb)
        found.append({"maps": uris, "extent": [float(v) for v in extent], "alpha": MAP_ALPHA})
    return found


def category_text(category: UnitCategory) -> str:
    """The category line of sample-points' panel title (without how the unit was chosen)."""
    if category.name == "background":
        return "background"
    label = f" {category.label}" if category.label else ""
    coords = ", ".join(f"{v:g}" for v in category.coords or ())
    return f"{category.name}: box {category.box}{label} [{coords}]"


def unit_box_indices(unit_xy: np.ndarray, boxes: Boxes) -> np.ndarray:
    """Per unit centre (x, y) [N, 2] the box sample-points' category names for it: the smallest
    box containing the centre (edges inclusive, the first of equal ones), -1 = background."""
    coords = np.asarray(boxes[0], dtype=np.float64).reshape(-1, 4)
    if coords.shape[0] == 0:
        return np.full(len(unit_xy), -1, dtype=np.int64)
    xs, ys = unit_xy[:, :1], unit_xy[:, 1:2]
    inside = (
        (coords[:, 0] <= xs) & (xs <= coords[:, 2]) & (coords[:, 1] <= ys) & (ys <= coords[:, 3])
    )
    areas = (coords[:, 2] - coords[:, 0]) * (coords[:, 3] - coords[:, 1])
    masked = np.where(inside, areas[None, :], np.inf)
    return np.where(inside.any(axis=1), masked.argmin(axis=1), -1)


def category_payload(
    top: DeformConvRecord,
    scale: Tuple[float, float],
    boxes: Optional[Boxes],
    source: str,
    thresholds: Tuple[float, float],
) -> Optional[Dict[str, Any]]:
    """The boxes (their category text and coords) and, per top-layer unit row-major, the index
    of its box (-1: background); None without boxes."""
    if boxes is None:
        return None
    frame = top.geometry.output_frame.scaled(*scale)
    height, width = top.geometry.output_hw
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    xs, ys = frame.to_image(
        cols.reshape(-1).astype(np.float64), rows.reshape(-1).astype(np.float64)
    )
    indices = unit_box_indices(np.stack([np.asarray(xs), np.asarray(ys)], axis=1), boxes)
    coords = np.asarray(boxes[0], dtype=np.float64).reshape(-1, 4)
    texts = []
    for index, box in enumerate(coords):
        centre = Unit(0, 0, float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2, "", box=index)
        category = unit_category(centre, boxes, thresholds)
        texts.append({"text": category_text(category), "coords": [float(v) for v in box]})
    return {"source": source, "boxes": texts, "units": [int(v) for v in indices]}
