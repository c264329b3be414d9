"""Figures of ``dcn-inspect sample-points``: each unit in green, its sampling points in red
(Fig. 5/6).

Everything is drawn in original-image pixel coordinates (COCO continuous: pixel (r, c) covers
[c, c+1] x [r, r+1]), so the image is shown with ``extent=(0, W, H, 0)``.

- Every panel shows the whole image at the same scale (:func:`view_limits`): the image plus a
  grey margin band wide enough for the points that leave the image (at most
  :data:`BAND_MAX` of the image's longer side; points beyond it are pinned to the band's outer
  edge). ``zoom=True`` fits each panel to its own unit's points instead.
- Points outside the map they sample are crosses; with DCNv2 masks a point's opacity follows
  its weight relative to the unit's strongest point; an optional second per-point weight
  (``size_weights``, e.g. a gradient weight) scales the marker area.
- A legend names every mark; titles give the unit in image pixels (x, y), the convention of
  ``at`` and the points CSV, and its category (:func:`panel_title`).

The GIF (:func:`gif_frames`) shows the same view, one labelled frame per unit, on a palette
that reserves the marker colours, so the green unit survives the GIF's 256 colours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from PIL import Image, ImageDraw, ImageFont

from dcn_inspect.analysis.sample_points import SamplingTrees
from dcn_inspect.analysis.unit_selection import Unit, UnitCategory
from dcn_inspect.core.files import atomic_path

UNIT_COLOUR = "#00e000"
POINT_COLOUR = "#ff1a1a"
#: Colours of levels 1, 2, ... above the deepest one (which stays red) with ``color_by_level``.
LEVEL_COLOURS = ("#1e90ff", "#ffd400", "#ff00ff", "#00e5ff", "#ff8c00")
#: The margin band around the image (where points outside the image are drawn).
BAND_COLOUR = "#8c8c8c"

#: The static figure shows at most this many units (the CSV and the GIF have all of them).
MAX_PANELS = 24
#: Longer side of a GIF frame's view (image and band) in pixels.
GIF_SIZE = 512
#: Height of the label strip above every GIF frame in pixels.
GIF_LABEL_HEIGHT = 20
#: Display time of one GIF frame in milliseconds.
GIF_FRAME_MS = 700

#: Width of the margin band as a fraction of the image's longer side: at least BAND_MIN (so
#: markers on the image edge stay whole), at most BAND_MAX (farther points are pinned to it).
BAND_MIN = 0.03
BAND_MAX = 0.2
#: Lowest opacity of a weighted point (weights relative to the unit's strongest point).
MIN_ALPHA = 0.15


def level_colour(level: int, num_levels: int, color_by_level: bool) -> str:
    """Colour of the points of ``level`` (1-based): red for the deepest level."""
    if level == num_levels or not color_by_level:
        return POINT_COLOUR
    return LEVEL_COLOURS[(level - 1) % len(LEVEL_COLOURS)]


def panel_title(index: int, unit: Unit, category: Optional[UnitCategory]) -> str:
    """``unit k at (x, y) = (..)`` in image pixels, then the unit's category and how it was
    chosen."""
    first = f"unit {index} at (x, y) = ({unit.x:.1f}, {unit.y:.1f})"
    if category is None:
        return f"{first}\n{unit.source}"
    if category.name == "background":
        return f"{first}\nbackground" + ("" if unit.source == "background" else f" ({unit.source})")
    label = f" {category.label}" if category.label else ""
    coords = ", ".join(f"{v:g}" for v in category.coords or ())
    chosen = "" if unit.box == category.box else f" ({unit.source})"
    return f"{first}\n{category.name}: box {category.box}{label} [{coords}]{chosen}"


def frame_label(
    index: int, unit_xy: Tuple[float, float], category: Optional[UnitCategory] = None
) -> str:
    """The label of a GIF frame: the unit, its centre in image pixels (and its category)."""
    label = f"unit {index}  (x, y) = ({unit_xy[0]:.1f}, {unit_xy[1]:.1f})"
    if category is not None:
        label += f"  {category.name}" + (
            f" (box {category.box})" if category.box is not None else ""
        )
    return label


# --------------------------------------------------------------------------------------------
# What is drawn where


@dataclass(frozen=True)
class View:
    """Axis limits in image pixels (x right, y down)."""

    x0: float
    x1: float
    y0: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def pin(self, xs: np.ndarray, ys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Points beyond the view moved onto its edge (half a per mille inside, so they are
        drawn)."""
        inset = 5e-4 * max(self.width, self.height)
        return np.clip(xs, self.x0 + inset, self.x1 - inset), np.clip(
            ys, self.y0 + inset, self.y1 - inset
        )


def _unit_extent(trees: SamplingTrees, units: Sequence[int]) -> Tuple[float, float, float, float]:
    lo_x = lo_y = math.inf
    hi_x = hi_y = -math.inf
    index = list(units)
    for level in range(trees.num_levels):
        xs, ys = trees.xs[level][index], trees.ys[level][index]
        if xs.numel():
            lo_x, hi_x = min(lo_x, float(xs.min())), max(hi_x, float(xs.max()))
            lo_y, hi_y = min(lo_y, float(ys.min())), max(hi_y, float(ys.max()))
    if index:
        unit_x, unit_y = trees.unit_xy[index, 0], trees.unit_xy[index, 1]
        lo_x, hi_x = min(lo_x, float(unit_x.min())), max(hi_x, float(unit_x.max()))
        lo_y, hi_y = min(lo_y, float(unit_y.min())), max(hi_y, float(unit_y.max()))
    return lo_x, hi_x, lo_y, hi_y


def view_limits(trees: SamplingTrees, units: Sequence[int], width: int, height: int) -> View:
    """The common view of ``units``' panels: the image plus a band for the points that leave it.

    The band is as wide as the farthest point of any of the units needs, at least
    ``BAND_MIN`` and at most ``BAND_MAX`` of the image's longer side, the same on every side.
    """
    longer = float(max(width, height))
    lo_x, hi_x, lo_y, hi_y = _unit_extent(trees, units)
    overflow = max(0.0, -lo_x, hi_x - width, -lo_y, hi_y - height) if units else 0.0
    band = min(max(overflow + 0.01 * longer, BAND_MIN * longer), BAND_MAX * longer)
    return View(-band, width + band, -band, height + band)


def zoom_limits(trees: SamplingTrees, unit: int, width: int, height: int) -> View:
    """One unit's own view: the image widened to every point of the unit, plus 2 % (``zoom``)."""
    lo_x, hi_x, lo_y, hi_y = _unit_extent(trees, [unit])
    lo_x, hi_x = min(lo_x, 0.0), max(hi_x, float(width))
    lo_y, hi_y = min(lo_y, 0.0), max(hi_y, float(height))
    margin = 0.02 * max(hi_x - lo_x, hi_y - lo_y)
    return View(lo_x - margin, hi_x + margin, lo_y - margin, hi_y + margin)


def _levels_to_draw(trees: SamplingTrees, color_by_level: bool) -> List[int]:
    return list(range(1, trees.num_levels + 1)) if color_by_level else [trees.num_levels]


def _relative(weights: np.ndarray, floor: float) -> np.ndarray:
    """Weights relative to the largest, clipped to [floor, 1]; all ones when they carry no
    information."""
    peak = float(weights.max()) if weights.size else 0.0
    if peak <= 0 or float(weights.min()) == peak:
        return np.ones_like(weights, dtype=np.float64)
    return np.clip(weights / peak, floor, 1.0)


def _is_weighted(trees: SamplingTrees) -> bool:
    """Whether any point's DCNv2 mask weight differs from 1 (a model without masks has all ones)."""
    return any(bool((w != 1).any()) for w in trees.weights)


def _hex_rgb(colour: str) -> Tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


# --------------------------------------------------------------------------------------------
# The static figure


def _draw_unit(
    ax: object,
    trees: SamplingTrees,
    unit: int,
    view: Optional[View],
    color_by_level: bool,
    marker_scale: float,
    size_weights: Optional[Sequence[torch.Tensor]],
) -> None:
    levels = _levels_to_draw(trees, color_by_level)
    for level in reversed(levels):  # deepest (most numerous) first, upper levels on top
        xs = trees.xs[level - 1][unit].numpy()
        ys = trees.ys[level - 1][unit].numpy()
        if view is not None:
            xs, ys = view.pin(xs, ys)
        inside = trees.inside[level - 1][unit].numpy()
        rgba = np.zeros((xs.size, 4))
        rgba[:, :3] = (
            np.array(_hex_rgb(level_colour(level, trees.num_levels, color_by_level))) / 255.0
        )
        rgba[:, 3] = _relative(trees.weights[level - 1][unit].numpy(), MIN_ALPHA)
        size = marker_scale * (6.0 if level == trees.num_levels else 14.0) * np.ones(xs.size)
        if size_weights is not None:
            size = (
                size
                * 2.0
                * _relative(np.asarray(size_weights[level - 1][unit], dtype=np.float64), 0.05)
            )
        ax.scatter(xs[inside], ys[inside], s=size[inside], c=rgba[inside], marker="o", linewidths=0)  # type: ignore[attr-defined]
        if (~inside).any():
            ax.scatter(
                xs[~inside],
                ys[~inside],
                s=size[~inside] * 1.5,
                c=rgba[~inside],
                marker="x",
                linewidths=0.8,
            )  # type: ignore[attr-defined]
    x, y = trees.unit_xy[unit].tolist()
    ax.scatter(
        [x],
        [y],
        s=60 * marker_scale,
        c=UNIT_COLOUR,
        marker="s",
        edgecolors="black",
        linewidths=0.6,
        zorder=5,
    )  # type: ignore[attr-defined]


def legend_entries(
    trees: SamplingTrees, color_by_level: bool, band: bool, size_label: Optional[str] = None
) -> Tuple[List[object], List[str]]:
    """The figure's legend: unit, sampling points (by level), points outside the map, the margin
    band, the mask-weight opacity key of DCNv2 models and the size key of ``size_weights``."""
    handles: List[object] = [
        Line2D(
            [],
            [],
            linestyle="none",
            marker="s",
            markersize=7,
            color=UNIT_COLOUR,
            markeredgecolor="black",
        )
    ]
    labels = ["unit"]
    for level in _levels_to_draw(trees, color_by_level):
        handles.append(
            Line2D(
                [],
                [],
                linestyle="none",
                marker="o",
                markersize=4,
                color=level_colour(level, trees.num_levels, color_by_level),
            )
        )
        labels.append(f"sampling points, level {level} ({trees.layers[level - 1]})")
    handles.append(Line2D([], [], linestyle="none", marker="x", markersize=5, color=POINT_COLOUR))
    labels.append("point outside the map it samples")
    if band:
        handles.append(Patch(facecolor=BAND_COLOUR, edgecolor="none"))
        labels.append("outside the image (farther points on the band's edge)")
    if _is_weighted(trees):
        for alpha, text in ((1.0, "1"), (0.5, "0.5"), (MIN_ALPHA, f"<= {MIN_ALPHA:g}")):
            handles.append(
                Line2D(
                    [],
                    [],
                    linestyle="none",
                    marker="o",
                    markersize=5,
                    color=POINT_COLOUR,
                    alpha=alpha,
                )
            )
            labels.append(f"mask weight {text} x the unit's largest (opacity)")
    if size_label:
        for scale, text in ((2.0, "largest"), (1.0, "half")):
            handles.append(
                Line2D(
                    [],
                    [],
                    linestyle="none",
                    marker="o",
                    markersize=3.0 * math.sqrt(scale),
                    color=POINT_COLOUR,
                )
            )
            labels.append(f"{size_label}: {text} (marker area)")
    return handles, labels


def draw_sampling_figure(
    image: np.ndarray,
    trees: SamplingTrees,
    titles: Sequence[str],
    color_by_level: bool = False,
    max_panels: int = MAX_PANELS,
    zoom: bool = False,
    size_weights: Optional[Sequence[torch.Tensor]] = None,
    size_label: Optional[str] = None,
) -> Figure:
    """One panel per unit (side by side, wrapping after 4): the image, the unit, its points, a
    legend.

    Every panel has the same limits and size (the image and its margin band,
    :func:`view_limits`), unless ``zoom`` fits each to its own points. ``size_weights`` (per
    level, [U, P_l], non-negative) scale each point's marker area relative to the unit's
    largest weight; ``size_label`` names them in the legend.
    """
    height, width = image.shape[:2]
    shown = list(range(min(trees.num_units, max_panels)))
    columns = max(1, min(len(shown), 4))
    rows = max(1, math.ceil(len(shown) / columns))
    common = view_limits(trees, shown, width, height)
    aspect = common.width / max(common.height, 1e-6)
    panel_width = 4.0
    handles, labels = legend_entries(
        trees,
        color_by_level,
        band=not zoom,
        size_label=size_label if size_weights is not None else None,
    )
    legend_rows = math.ceil(len(handles) / 3)
    fig = Figure(
        figsize=(
            panel_width * columns,
            rows * (panel_width / aspect + 0.5) + 0.25 * legend_rows + 0.2,
        ),
        layout="constrained",
    )
    marker_scale = 1.0 if trees.points_per_unit(trees.num_levels) <= 729 else 0.5
    for slot, unit in enumerate(shown or [None]):  # type: ignore[list-item]
        ax = fig.add_subplot(rows, columns, slot + 1)
        view = common if (unit is None or not zoom) else zoom_limits(trees, unit, width, height)
        ax.add_patch(
            Rectangle(
                (view.x0, view.y0),
                view.width,
                view.height,
                facecolor=BAND_COLOUR,
                edgecolor="none",
                zorder=0,
            )
        )
        ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest", zorder=1)
        if unit is not None:
            _draw_unit(
                ax, trees, unit, None if zoom else view, color_by_level, marker_scale, size_weights
            )
            ax.set_title(titles[unit], fontsize=8)
        ax.set_xlim(view.x0, view.x1)
        ax.set_ylim(view.y1, view.y0)
        ax.set_aspect("equal")
        ax.set_axis_off()
    fig.legend(
        handles,
        labels,
        loc="outside upper center",
        ncols=min(3, len(handles)),
        fontsize=8,
        frameon=False,
    )
    return fig


# --------------------------------------------------------------------------------------------
# The GIF


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # type: ignore[call-arg,return-value]
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()  # type: ignore[return-value]


def _reserved_colours(trees: SamplingTrees, color_by_level: bool) -> List[Tuple[int, int, int]]:
    colours = [_hex_rgb(UNIT_COLOUR), (0, 0, 0), (255, 255, 255)]
    colours += [
        _hex_rgb(level_colour(level, trees.num_levels, color_by_level))
        for level in _levels_to_draw(trees, color_by_level)
    ]
    return list(dict.fromkeys(colours))


def gif_frames(
    image: np.ndarray,
    trees: SamplingTrees,
    color_by_level: bool = False,
    size: int = GIF_SIZE,
    labels: Optional[Sequence[str]] = None,
) -> List[Image.Image]:
    """One frame per unit, like the official demo's animation, each labelled (``labels``, default
    :func:`frame_label`) in a strip above the view of the static figure (image and margin band).

    Frames are palette images sharing one palette: the image's colours quantised to the slots
    left after the marker colours (unit green, point colours, black, white), which are drawn by
    their own palette index, so a GIF writer cannot merge them into the image's colours.
    """
    height, width = image.shape[:2]
    view = view_limits(trees, list(range(trees.num_units)), width, height)
    scale = size / max(view.width, view.height)
    canvas_w = max(1, round(view.width * scale))
    canvas_h = max(1, round(view.height * scale)) + GIF_LABEL_HEIGHT
    canvas = Image.new("RGB", (canvas_w, canvas_h), _hex_rgb(BAND_COLOUR))
    shown = Image.fromarray(image).resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR
    )
    canvas.paste(shown, (round(-view.x0 * scale), round(-view.y0 * scale) + GIF_LABEL_HEIGHT))

    reserved = _reserved_colours(trees, color_by_level)
    free = 256 - len(reserved)
    base = canvas.quantize(colors=free, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    palette = (base.getpalette() or [])[: 3 * free]
    palette += [0] * (3 * free - len(palette))
    for colour in reserved:
        palette += list(colour)
    base.putpalette(palette)
    index = {colour: free + k for k, colour in enumerate(reserved)}
    black, white, green = index[(0, 0, 0)], index[(255, 255, 255)], index[_hex_rgb(UNIT_COLOUR)]

    font = _font(13)
    radius = 2.0 if trees.points_per_unit(trees.num_levels) <= 729 else 1.2
    frames: List[Image.Image] = []
    for unit in range(trees.num_units):
        frame = base.copy()
        draw = ImageDraw.Draw(frame)
        draw.rectangle((0, 0, canvas_w, GIF_LABEL_HEIGHT - 1), fill=black)
        xy = (float(trees.unit_xy[unit, 0]), float(trees.unit_xy[unit, 1]))
        draw.text(
            (4, 3),
            labels[unit] if labels is not None else frame_label(unit, xy),
            fill=white,
            font=font,
        )
        for level in reversed(_levels_to_draw(trees, color_by_level)):
            colour = index[_hex_rgb(level_colour(level, trees.num_levels, color_by_level))]
            r = radius if level == trees.num_levels else radius * 1.6
            xs, ys = view.pin(trees.xs[level - 1][unit].numpy(), trees.ys[level - 1][unit].numpy())
            inside = trees.inside[level - 1][unit].numpy()
            for x, y, on_map in zip(
                (xs - view.x0) * scale, (ys - view.y0) * scale + GIF_LABEL_HEIGHT, inside
            ):
                if on_map:
                    draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
                else:
                    draw.line((x - r, y - r, x + r, y + r), fill=colour)
                    draw.line((x - r, y + r, x + r, y - r), fill=colour)
        ux, uy = (xy[0] - view.x0) * scale, (xy[1] - view.y0) * scale + GIF_LABEL_HEIGHT
        draw.rectangle((ux - 5, uy - 5, ux + 5, uy + 5), fill=black)
        draw.rectangle((ux - 4, uy - 4, ux + 4, uy + 4), fill=green)
        frames.append(frame)
    return frames


def gif_position(
    trees: SamplingTrees, image_hw: Tuple[int, int], x: float, y: float, size: int = GIF_SIZE
) -> Tuple[float, float]:
    """Where image point (x, y) lands in a frame of :func:`gif_frames` (frame pixels)."""
    view = view_limits(trees, list(range(trees.num_units)), image_hw[1], image_hw[0])
    scale = size / max(view.width, view.height)
    return (x - view.x0) * scale, (y - view.y0) * scale + GIF_LABEL_HEIGHT


def write_sampling_gif(
    path: Path, frames: Sequence[Image.Image], frame_ms: int = GIF_FRAME_MS
) -> None:
    """Write the frames as a looping GIF, atomically, keeping their palette as it is."""
    if not frames:
        raise ValueError("no frames to write")
    with atomic_path(Path(path)) as tmp:
        frames[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=list(frames[1:]),
            duration=frame_ms,
            loop=0,
            optimize=False,
        )
