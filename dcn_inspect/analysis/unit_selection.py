"""Which units of a deformable layer to analyse: at points, on a grid, at box centres, on
background.

Every command that analyses single units (``sample-points``, ``receptive-field``) chooses them
here, in the top deformable layer's output frame mapped to original-image pixels
(:class:`~dcn_inspect.core.geometry.FrameMap`):

- ``at`` points (x, y): the unit whose centre is nearest, clamped into the map;
- a ``grid`` step: every STEP-th unit in both directions, starting at STEP // 2 (the official
  demo's layout);
- boxes (COCO / VOC annotation or a CSV ``x1,y1,x2,y2[,class]``): the paper's Fig. 6 triplets,
  one background unit (:func:`background_unit`: farthest from every box among the units with
  the most of their sampling tree on the image) then one unit at each box centre, smallest box
  first; for a bundled image with nothing else asked, its bundled annotations;
- otherwise the image centre.

A bundled image's annotations name the categories of the units chosen by ``at`` and ``grid``
too (they add no units there).

Units are kept once (the first reason that chose a unit names it). :func:`unit_category` names
a unit's class for figure titles (the box that chose it, else Table 2's smallest containing
box, else background).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dcn_inspect.analysis.size_categories import CATEGORIES, area_category
from dcn_inspect.core.checks import (  # noqa: F401 - parse_point, check_unit_options: here for callers
    check_point_on_image,
    check_unit_options,
    parse_point,
)
from dcn_inspect.core.errors import InputError, spell_parameters
from dcn_inspect.core.geometry import FrameMap

#: Boxes of one image: [N, 4] (x1, y1, x2, y2) original-image pixels and their labels.
Boxes = Tuple[np.ndarray, List[Optional[str]]]

#: The fraction of each unit's sampling tree on the image: (rows, cols) [N] of top-layer units ->
#: [N] in [0, 1] (:func:`dcn_inspect.analysis.sample_points.tree_on_image`).
TreeOnImage = Callable[[np.ndarray, np.ndarray], np.ndarray]

#: A background unit with at least this fraction of its sampling tree on the image counts as on
#: the image (:func:`background_unit`).
ON_IMAGE = 0.95

#: ``boxes_source`` of a bundled image's own annotations (they choose units only when nothing
#: else does).
BUNDLED_SOURCE = "the bundled annotations"


@dataclass(frozen=True)
class Unit:
    """A unit of the top deformable layer to trace."""

    row: int
    col: int
    x: float  # centre in original-image pixels
    y: float
    source: str  # how it was chosen, short (panel titles)
    detail: str = ""  # more about the choice (summary.json)
    box: Optional[int] = None  # index of the box whose centre chose it
    tree_on_image: Optional[float] = None  # the background unit: fraction of its tree on the image

    def as_dict(self) -> Dict[str, Any]:
        found = {
            "row": self.row,
            "col": self.col,
            "x": self.x,
            "y": self.y,
            "source": self.source,
            "detail": self.detail or self.source,
        }
        if self.box is not None:
            found["box"] = self.box
        if self.tree_on_image is not None:
            found["tree_on_image"] = self.tree_on_image
        return found


@dataclass(frozen=True)
class UnitCategory:
    """Where a unit's centre lies: ``background`` or the size category of its box (Table 2's
    classes)."""

    name: str  # small, medium, large or background
    box: Optional[int]  # index of the box in the image's boxes
    label: Optional[str]
    coords: Optional[Tuple[float, float, float, float]]  # x1, y1, x2, y2 in original-image pixels

    def as_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "box": self.box,
            "box_label": self.label,
            "box_coords": list(self.coords) if self.coords else None,
        }


def _unit(frame: FrameMap, row: int, col: int, source: str, detail: str = "") -> Unit:
    x, y = frame.to_image(float(col), float(row))
    return Unit(row, col, float(x), float(y), source, detail)


def nearest_unit(
    frame: FrameMap, map_hw: Tuple[int, int], x: float, y: float, source: str, detail: str = ""
) -> Unit:
    """The unit whose centre is nearest to image point (x, y), clamped into the map."""
    col, row = frame.to_index(x, y)
    row_i = int(min(max(math.floor(row + 0.5), 0), map_hw[0] - 1))
    col_i = int(min(max(math.floor(col + 0.5), 0), map_hw[1] - 1))
    return _unit(frame, row_i, col_i, source, detail)


def grid_units(frame: FrameMap, map_hw: Tuple[int, int], step: int) -> List[Unit]:
    """Every ``step``-th unit in both directions, starting at ``step // 2`` (the demo's layout)."""
    if step < 1:
        raise InputError(f"{step}: STEP must be a positive number of units", param="grid")
    start = step // 2
    return [
        _unit(frame, row, col, f"grid {step}")
        for row in range(min(start, map_hw[0] - 1), map_hw[0], step)
        for col in range(min(start, map_hw[1] - 1), map_hw[1], step)
    ]


def background_unit(
    frame: FrameMap,
    map_hw: Tuple[int, int],
    boxes: np.ndarray,
    tree_on_image: TreeOnImage,
) -> Unit:
    """The background unit of the Fig. 6 triplets: in open background, with its tree on the image.

    ``tree_on_image`` gives the fraction of a unit's sampling tree that lies on the image
    (:func:`dcn_inspect.analysis.sample_points.tree_on_image`: its deepest points, traced with
    the run's offsets). A unit is *background* when its centre lies in no box (edges count as
    inside). Among the background units, those with at least :data:`ON_IMAGE` of their tree on
    the image -- or, where the image allows none, those with the largest fraction -- the one
    farthest from every box (distance from its centre to the nearest box rectangle) is chosen;
    when every unit lies in a box, the unit with the most of its tree on the image. Ties go to
    the more central unit, then to the first in row-major order.

    So a corner unit whose tree lies mostly outside the image is never chosen while a background
    unit with more of its tree on the image exists. The chosen unit carries its fraction
    (``Unit.tree_on_image``).
    """
    rows, cols = np.meshgrid(np.arange(map_hw[0]), np.arange(map_hw[1]), indexing="ij")
    xs, ys = frame.to_image(cols.astype(np.float64), rows.astype(np.float64))
    xs, ys = xs.reshape(-1), ys.reshape(-1)
    to_boxes = _distance_to_boxes(xs, ys, boxes)
    background = to_boxes > 0
    pool = np.flatnonzero(background) if background.any() else np.arange(xs.size)
    fraction = np.full(xs.size, -1.0)
    fraction[pool] = np.asarray(
        tree_on_image(pool // map_hw[1], pool % map_hw[1]), dtype=np.float64
    )
    best = float(fraction[pool].max())
    enough = min(ON_IMAGE, best)
    score = np.where(fraction >= enough - 1e-12, to_boxes, -np.inf)
    off_centre = np.hypot(xs - 0.5 * (xs.min() + xs.max()), ys - 0.5 * (ys.min() + ys.max()))
    flat = int(np.lexsort((np.arange(xs.size), off_centre, -fraction, -score))[0])
    row, col = divmod(flat, map_hw[1])
    distance = (
        "no box"
        if not np.isfinite(to_boxes[flat])
        else f"{to_boxes[flat]:.1f} px from the nearest box"
    )
    if not background.any():
        detail = (
            "background: every unit lies in a box; the one with the most of its sampling tree "
            f"on the image ({fraction[flat]:.0%})"
        )
    elif best >= ON_IMAGE:
        detail = (
            f"background: the unit farthest from every box among those with at least "
            f"{ON_IMAGE:.0%} of their sampling tree on the image ({fraction[flat]:.0%}; {distance})"
        )
    else:
        detail = (
            f"background: no background unit has {ON_IMAGE:.0%} of its sampling tree on the "
            f"image; the farthest from every box among those with the most ({best:.0%}; {distance})"
        )
    unit = _unit(frame, row, col, "background", detail)
    return replace(unit, tree_on_image=float(fraction[flat]))


def _distance_to_boxes(xs: np.ndarray, ys: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Distance from each point (x, y) [N] to the nearest box rectangle (0 inside or on an
    edge; infinite without boxes)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(boxes):
        return np.full(xs.size, np.inf)
    gap_x = np.maximum(np.maximum(boxes[:, 0] - xs[:, None], xs[:, None] - boxes[:, 2]), 0.0)
    gap_y = np.maximum(np.maximum(boxes[:, 1] - ys[:, None], ys[:, None] - boxes[:, 3]), 0.0)
    return np.hypot(gap_x, gap_y).min(axis=-1)


def box_units(
    frame: FrameMap,
    map_hw: Tuple[int, int],
    boxes: np.ndarray,
    labels: Sequence[Optional[str]],
    source: str,
    tree_on_image: TreeOnImage,
) -> List[Unit]:
    """Fig. 6 triplets: one background unit (:func:`background_unit`), then one unit at each box
    centre, smallest box first."""
    if len(boxes) == 0:
        return []
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    units = [background_unit(frame, map_hw, boxes, tree_on_image)]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for n in np.argsort(areas, kind="stable"):
        x1, y1, x2, y2 = boxes[n]
        label = f" {labels[n]}" if labels[n] else ""
        detail = (
            f"centre of box {int(n)}{label} [{x1:g},{y1:g},{x2:g},{y2:g}] ({source}), "
            f"area {areas[n]:.0f} px^2"
        )
        short = f"box {int(n)}{label} ({x2 - x1:g}x{y2 - y1:g} px)"
        unit = nearest_unit(frame, map_hw, 0.5 * (x1 + x2), 0.5 * (y1 + y2), short, detail)
        units.append(replace(unit, box=int(n)))
    return units


def unit_category(
    unit: Unit, boxes: Optional[Boxes], thresholds: Tuple[float, float]
) -> Optional[UnitCategory]:
    """The unit's category for panel titles: from the box that chose it, else (Table 2's rule) the
    smallest box containing its centre (edges inclusive), else background; ``None`` without
    boxes."""
    if boxes is None:
        return None
    coords = np.asarray(boxes[0], dtype=np.float64).reshape(-1, 4)
    labels = list(boxes[1])
    if unit.box is not None:
        index: Optional[int] = unit.box
    else:
        inside = (
            (coords[:, 0] <= unit.x)
            & (unit.x <= coords[:, 2])
            & (coords[:, 1] <= unit.y)
            & (unit.y <= coords[:, 3])
        )
        hits = np.flatnonzero(inside)
        areas = (coords[:, 2] - coords[:, 0]) * (coords[:, 3] - coords[:, 1])
        index = int(hits[np.argmin(areas[hits])]) if hits.size else None
    if index is None:
        return UnitCategory("background", None, None, None)
    box = coords[index]
    area = float((box[2] - box[0]) * (box[3] - box[1]))
    name = CATEGORIES[int(area_category(np.array([area]), thresholds)[0])]
    return UnitCategory(
        name,
        index,
        labels[index] if index < len(labels) else None,
        (float(box[0]), float(box[1]), float(box[2]), float(box[3])),
    )


def read_boxes(image_path: Path, boxes_file: Path) -> Optional[Boxes]:
    """Boxes (x1, y1, x2, y2 original pixels, non-ignored) and labels of ``image_path`` from a CSV
    (every box) or a COCO/VOC annotation (``None`` when the image is not listed)."""
    from dcn_inspect.io.annotations import annotation_for_image, read_box_csv

    if boxes_file.suffix.lower() == ".csv":
        return read_box_csv(boxes_file, image=image_path)
    annotation = annotation_for_image(boxes_file, image_path)
    if annotation is None:
        return None
    keep = ~np.asarray(annotation.ignore, dtype=bool)
    return annotation.boxes[keep], [label for label, k in zip(annotation.labels, keep) if k]


def bundled_boxes(image_path: Path) -> Optional[Boxes]:
    """The bundled annotations of ``image_path`` when it is one of the bundled images, else
    ``None``."""
    from dcn_inspect.io.datasets import bundled_images, bundled_images_annotations

    # realpath, not Path.resolve: it does not raise on a symlink loop (the image is then skipped as
    # unreadable).
    if os.path.realpath(image_path) not in {os.path.realpath(p) for p in bundled_images()}:
        return None
    annotations = bundled_images_annotations()
    return read_boxes(image_path, annotations) if annotations.is_file() else None


def choose_units(
    image_path: Path,
    frame: FrameMap,
    map_hw: Tuple[int, int],
    image_hw: Tuple[int, int],
    at: Sequence[Tuple[float, float]],
    grid: Optional[int],
    boxes: Optional[Boxes],
    boxes_source: str,
    notes: List[str],
    tree_on_image: TreeOnImage,
) -> List[Unit]:
    """Units of the top layer (output frame ``frame`` in original pixels) for one image, duplicates
    removed.

    ``boxes`` come from ``boxes`` (``boxes_source`` names it) or from a bundled image's
    annotations (:data:`BUNDLED_SOURCE`), which add units only when ``at`` and ``grid`` chose
    none; with no units at all the image centre is traced. ``tree_on_image`` rates the
    candidates for the background unit (:func:`background_unit`).
    """
    height, width = image_hw
    units: List[Unit] = []
    for x, y in at:
        check_point_on_image(x, y, image_path.name, image_hw)
        units.append(
            nearest_unit(
                frame,
                map_hw,
                x,
                y,
                spell_parameters(f"`at` {x:g},{y:g}"),
                spell_parameters(f"`at` {x:g},{y:g}: the nearest unit, clamped into the map"),
            )
        )
    if grid is not None:
        units.extend(grid_units(frame, map_hw, grid))
    if boxes is not None and not (units and boxes_source == BUNDLED_SOURCE):
        found = box_units(frame, map_hw, boxes[0], boxes[1], boxes_source, tree_on_image)
        if not found:
            notes.append(f"{image_path.name}: {boxes_source} has no box for this image")
        units.extend(found)
    if not units:
        units.append(nearest_unit(frame, map_hw, width / 2, height / 2, "image centre"))
    unique: Dict[Tuple[int, int], Unit] = {}
    for unit in units:
        if (unit.row, unit.col) in unique:
            notes.append(
                f"{image_path.name}: {unit.detail or unit.source} falls on the same unit "
                f"({unit.row}, {unit.col}) as {unique[(unit.row, unit.col)].source}; traced once"
            )
        else:
            unique[(unit.row, unit.col)] = unit
    return list(unique.values())


def boxes_per_image(
    image_paths: Sequence[Path], boxes_file: Optional[Path], use_bundled: bool = True
) -> Tuple[List[Optional[Boxes]], str]:
    """Every image's boxes, read before any work so that a bad annotation fails fast:
    from ``boxes_file`` (every image must be in it), else the bundled annotations of bundled
    images when ``use_bundled``; and a label naming the source for panel titles and notes
    (:data:`BUNDLED_SOURCE` for the bundled annotations: :func:`choose_units` then adds their
    units only when nothing else chose units)."""
    if boxes_file is not None and not Path(boxes_file).exists():
        raise InputError(f"{boxes_file}: file not found", param="boxes")
    found: List[Optional[Boxes]] = []
    for path in image_paths:
        if boxes_file is not None:
            boxes = read_boxes(path, Path(boxes_file))
            if boxes is None:
                raise InputError(
                    f"{boxes_file}: no annotation for image {path.name}", param="boxes"
                )
            found.append(boxes)
        else:
            found.append(bundled_boxes(path) if use_bundled else None)
    source = BUNDLED_SOURCE
    if boxes_file is not None:
        source = spell_parameters(f"`boxes` {boxes_file}")
    return found, source
