"""Figures of ``dcn-inspect sample-points``: each unit in green, its sampling points in red
(Fig. 5/6).

Everything is drawn in original-image pixel coordinates (COCO continuous: pixel (r, c) covers
[c, c+1] x [r, r+1]), so the image is shown with ``extent=(0, W, H, 0)``.

- Every panel shows the whole image at the same scale (:func:`view_limits`): the image plus a
  grey margin band wide enough for the points that leave the image (at most
  :data:`BAND_MAX` of the image's longer side; points beyond it are pinned to the band's outer
  edge). ``zoom=True`` fits each panel to its own unit's points instead (:func:`zoom_limits`).
- Points have a thin black edge (red points stay visible on red objects); points outside the
  map they sample are crosses; with DCNv2 masks a point's opacity follows its weight relative
  to the unit's strongest point; an optional second per-point weight (``size_weights``, e.g. a
  gradient weight) makes the marker area proportional to it (:func:`weighted_areas`), points
  of weight 0 drawn hollow.
- A legend names every mark and always lies inside the saved image (:func:`_add_legend` drops
  columns, then widens the figure, until it fits); titles give the unit in image pixels
  (x, y), the convention of ``at`` and the points CSV, and its category (:func:`panel_title`);
  an optional figure title (e.g. "random weights") heads the legend.

The GIF (:func:`gif_frames`) shows the same view (or, with ``zoom``, each unit's own), one
labelled frame per unit, on a palette that reserves the marker colours, so the green unit
survives the GIF's 256 colours.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from PIL import Image, ImageDraw, ImageFont

from dcn_inspect.analysis.sample_points import SamplingTrees
from dcn_inspect.analysis.unit_selection import Unit, UnitCategory
from dcn_inspect.core.files import atomic_path
from dcn_inspect.report.legends import legend_in_fitting_columns

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
#: Colour and width (points) of the edge around every point, so red points show on red objects.
EDGE_COLOUR = "#000000"
EDGE_WIDTH = 0.4
#: Margin of a zoomed view around its unit's points: this fraction of their extent, at least
#: ZOOM_MIN_MARGIN image pixels.
ZOOM_MARGIN = 0.05
ZOOM_MIN_MARGIN = 1.0
#: Marker area (points^2) of a point of the deepest level and of the levels above it.
DEEPEST_AREA = 6.0
UPPER_AREA = 14.0
#: Width (inches) kept free beside the legend.
LEGEND_PAD = 0.2


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


def zoom_limits(trees: SamplingTrees, unit: int, aspect: float) -> View:
    """One unit's own view (``zoom``): its centre and every one of its points, plus a margin
    (:data:`ZOOM_MARGIN`), widened about their middle to ``aspect`` (width / height) so that
    every panel or frame keeps one shape."""
    lo_x, hi_x, lo_y, hi_y = _unit_extent(trees, [unit])
    margin = max(ZOOM_MARGIN * max(hi_x - lo_x, hi_y - lo_y), ZOOM_MIN_MARGIN)
    width, height = hi_x - lo_x + 2 * margin, hi_y - lo_y + 2 * margin
    width, height = max(width, aspect * height), max(height, width / aspect)
    mid_x, mid_y = 0.5 * (lo_x + hi_x), 0.5 * (lo_y + hi_y)
    return View(mid_x - width / 2, mid_x + width / 2, mid_y - height / 2, mid_y + height / 2)


def _panel_views(
    trees: SamplingTrees, units: Sequence[int], width: int, height: int, zoom: bool
) -> Tuple[View, List[View]]:
    """The common view and each unit's own: the common one, or with ``zoom`` its
    :func:`zoom_limits` at the common view's shape."""
    common = view_limits(trees, units, width, height)
    if not zoom:
        return common, [common for _ in units]
    aspect = common.width / max(common.height, 1e-9)
    return common, [zoom_limits(trees, unit, aspect) for unit in units]


def _levels_to_draw(trees: SamplingTrees, color_by_level: bool) -> List[int]:
    return list(range(1, trees.num_levels + 1)) if color_by_level else [trees.num_levels]


def _relative(weights: np.ndarray, floor: float) -> np.ndarray:
    """Weights relative to the largest, clipped to [floor, 1]; all ones when they carry no
    information."""
    peak = float(weights.max()) if weights.size else 0.0
    if peak <= 0 or float(weights.min()) == peak:
        return np.ones_like(weights, dtype=np.float64)
    return np.clip(weights / peak, floor, 1.0)


def weighted_areas(weights: np.ndarray, area: float) -> Tuple[np.ndarray, np.ndarray]:
    """Marker areas proportional to ``weights`` (non-negative): ``area`` for the mean weight, so
    the areas add up to what unweighted markers cover; and which points are hollow (weight 0,
    drawn at ``area``)."""
    weights = np.asarray(weights, dtype=np.float64)
    mean = float(weights.mean()) if weights.size else 0.0
    hollow = ~(weights > 0)
    if mean <= 0:
        return np.full(weights.shape, area), hollow
    return np.where(hollow, area, area * weights / mean), hollow


def _is_weighted(trees: SamplingTrees) -> bool:
    """Whether any point's DCNv2 mask weight differs from 1 (a model without masks has all ones)."""
    return any(bool((w != 1).any()) for w in trees.weights)


def _hex_rgb(colour: str) -> Tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


# --------------------------------------------------------------------------------------------
# The static figure


def _draw_unit(
    ax: Axes,
    trees: SamplingTrees,
    unit: int,
    view: Optional[View],
    color_by_level: bool,
    marker_scale: float,
    size_weights: Optional[Sequence[torch.Tensor]],
) -> None:
    """One unit's points (``view``: pin them into it) and the unit itself."""
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
        edges = np.zeros_like(rgba)
        edges[:, 3] = rgba[:, 3]
        area = marker_scale * (DEEPEST_AREA if level == trees.num_levels else UPPER_AREA)
        size, hollow = np.full(xs.size, area), np.zeros(xs.size, dtype=bool)
        if size_weights is not None:
            size, hollow = weighted_areas(np.asarray(size_weights[level - 1][unit]), area)
        dots, crosses = inside & ~hollow, ~inside & ~hollow
        ax.scatter(
            xs[dots], ys[dots], s=size[dots], c=rgba[dots], marker="o",
            edgecolors=edges[dots], linewidths=EDGE_WIDTH,
        )  # fmt: skip
        if crosses.any():  # a black cross under the coloured one: the edge of a cross
            for colour, width in ((edges[crosses], 0.8 + 2 * EDGE_WIDTH), (rgba[crosses], 0.8)):
                ax.scatter(
                    xs[crosses], ys[crosses], s=size[crosses] * 1.5, c=colour, marker="x",
                    linewidths=width,
                )  # fmt: skip
        if hollow.any():
            ax.scatter(
                xs[hollow], ys[hollow], s=size[hollow], facecolors="none",
                edgecolors=rgba[hollow], marker="o", linewidths=0.7,
            )  # fmt: skip
    x, y = trees.unit_xy[unit].tolist()
    ax.scatter(
        [x], [y], s=60 * marker_scale, c=UNIT_COLOUR, marker="s", edgecolors="black",
        linewidths=0.6, zorder=5,
    )  # fmt: skip


def _dot(colour: str, area: float, alpha: float = 1.0, hollow: bool = False) -> Line2D:
    """A legend handle drawn like a point of the figure of marker area ``area`` (points^2)."""
    return Line2D(
        [], [], linestyle="none", marker="o", markersize=math.sqrt(area), alpha=alpha,
        markerfacecolor="none" if hollow else colour,
        markeredgecolor=colour if hollow else EDGE_COLOUR,
        markeredgewidth=0.7 if hollow else EDGE_WIDTH,
    )  # fmt: skip


def legend_entries(
    trees: SamplingTrees,
    color_by_level: bool,
    band: bool,
    size_label: Optional[str] = None,
    band_label: str = "outside the image (farther points on the band's edge)",
) -> Tuple[List[object], List[str]]:
    """The figure's legend: unit, sampling points (by level), points outside the map, the margin
    band, the mask-weight opacity key of DCNv2 models and the size key of ``size_weights``
    (marker areas as drawn for the deepest level: the unit's mean weight, 4 times it, 0)."""
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
        handles.append(_dot(level_colour(level, trees.num_levels, color_by_level), 16.0))
        labels.append(f"sampling points, level {level} ({trees.layers[level - 1]})")
    handles.append(Line2D([], [], linestyle="none", marker="x", markersize=5, color=POINT_COLOUR))
    labels.append("point outside the map it samples")
    if band:
        handles.append(Patch(facecolor=BAND_COLOUR, edgecolor="none"))
        labels.append(band_label)
    if _is_weighted(trees):
        for alpha, text in ((1.0, "1"), (0.5, "0.5"), (MIN_ALPHA, f"<= {MIN_ALPHA:g}")):
            handles.append(_dot(POINT_COLOUR, 25.0, alpha))
            labels.append(f"mask weight {text} x the unit's largest (opacity)")
    if size_label:
        area = DEEPEST_AREA * _marker_scale(trees)
        for scale, text in ((4.0, "4 x the unit's mean"), (1.0, "the unit's mean")):
            handles.append(_dot(POINT_COLOUR, scale * area))
            labels.append(f"{size_label} = {text} (marker area proportional)")
        handles.append(_dot(POINT_COLOUR, area, hollow=True))
        labels.append(f"{size_label} = 0 (hollow)")
    return handles, labels


def _marker_scale(trees: SamplingTrees) -> float:
    """Markers shrink for trees of more than 729 deepest points."""
    return 1.0 if trees.points_per_unit(trees.num_levels) <= 729 else 0.5


def _add_legend(
    fig: Figure, handles: List[object], labels: List[str], title: Optional[str] = None
) -> float:
    """The legend above the panels, headed by the figure's ``title`` (wrapped to the figure's
    width), in as many columns (at most 3) as the width holds; a figure too narrow for one
    column is widened. Returns the legend's height in inches."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    if title:  # about 0.55 em per character
        title = textwrap.fill(title, max(20, int(fig.get_figwidth() * 72 / (0.55 * 9))))

    def needed(legend: Any) -> float:
        return legend.get_window_extent(renderer).width / fig.dpi + LEGEND_PAD

    legend = legend_in_fitting_columns(
        fig, handles, labels, lambda legend: needed(legend) <= fig.get_figwidth(),
        loc="outside upper center", fontsize=8, frameon=False, title=title, title_fontsize=9,
    )  # fmt: skip
    fig.set_figwidth(max(fig.get_figwidth(), needed(legend)))
    return float(legend.get_window_extent(renderer).height / fig.dpi)


def draw_sampling_figure(
    image: np.ndarray,
    trees: SamplingTrees,
    titles: Sequence[str],
    color_by_level: bool = False,
    max_panels: int = MAX_PANELS,
    zoom: bool = False,
    size_weights: Optional[Sequence[torch.Tensor]] = None,
    size_label: Optional[str] = None,
    title: Optional[str] = None,
) -> Figure:
    """One panel per unit (side by side, wrapping after 4): the image, the unit, its points, a
    legend (inside the figure at any panel count) headed by the figure's ``title``, if given.

    Every panel has the same limits and size (the image and its margin band,
    :func:`view_limits`), unless ``zoom`` fits each to its own points (:func:`zoom_limits`).
    ``size_weights`` (per level, [U, P_l], non-negative) make each point's marker area
    proportional to its weight (:func:`weighted_areas`: the unit's mean weight gets the usual
    area, weight 0 is hollow); ``size_label`` names them in the legend.
    """
    height, width = image.shape[:2]
    shown = list(range(min(trees.num_units, max_panels)))
    columns = max(1, min(len(shown), 4))
    rows = max(1, math.ceil(len(shown) / columns))
    common, views = _panel_views(trees, shown, width, height, zoom)
    aspect = common.width / max(common.height, 1e-6)
    panel_width = 4.0
    off_image = any(v.x0 < 0 or v.y0 < 0 or v.x1 > width or v.y1 > height for v in views)
    handles, labels = legend_entries(
        trees,
        color_by_level,
        band=not zoom or off_image,
        size_label=size_label if size_weights is not None else None,
        band_label="outside the image"
        if zoom
        else "outside the image (farther points on the band's edge)",
    )
    fig = Figure(figsize=(panel_width * columns, 1.0), layout="constrained")
    legend_height = _add_legend(fig, handles, labels, title)
    fig.set_figheight(rows * (panel_width / aspect + 0.5) + legend_height + 0.2)
    for slot, unit in enumerate(shown or [None]):  # type: ignore[list-item]
        ax = fig.add_subplot(rows, columns, slot + 1)
        view = common if unit is None else views[slot]
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
            pin = None if zoom else view
            _draw_unit(ax, trees, unit, pin, color_by_level, _marker_scale(trees), size_weights)
            ax.set_title(titles[unit], fontsize=8)
        ax.set_xlim(view.x0, view.x1)
        ax.set_ylim(view.y1, view.y0)
        ax.set_aspect("equal")
        ax.set_axis_off()
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


def _frame_views(
    trees: SamplingTrees, image_hw: Tuple[int, int], size: int, zoom: bool
) -> Tuple[Tuple[int, int], List[View]]:
    """The GIF's view size (width, height in frame pixels, without the label strip) and each
    unit's view: the static figure's common view (``zoom``: each unit's own, in its shape)."""
    units = list(range(trees.num_units))
    common, views = _panel_views(trees, units, image_hw[1], image_hw[0], zoom)
    scale = _frame_scale(common, size)
    return (max(1, round(common.width * scale)), max(1, round(common.height * scale))), views


def _frame_scale(view: View, size: int) -> float:
    """Frame pixels per image pixel of a GIF frame showing ``view`` (longer side ``size``)."""
    return size / max(view.width, view.height)


def _render_view(
    image: np.ndarray, view: View, canvas_wh: Tuple[int, int], scale: float
) -> Image.Image:
    """The image seen through ``view`` at ``canvas_wh`` pixels, the margin band around it."""
    height, width = image.shape[:2]
    canvas = Image.new("RGB", canvas_wh, _hex_rgb(BAND_COLOUR))
    shown = Image.fromarray(image).resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR
    )
    canvas.paste(shown, (round(-view.x0 * scale), round(-view.y0 * scale)))
    return canvas


def _zoomed_view(image: np.ndarray, view: View, canvas_wh: Tuple[int, int]) -> Image.Image:
    """Like :func:`_render_view` for a zoomed view: only the part of the image in it is scaled."""
    return Image.fromarray(image).transform(
        canvas_wh,
        Image.Transform.EXTENT,
        (view.x0, view.y0, view.x1, view.y1),
        Image.BILINEAR,
        fillcolor=_hex_rgb(BAND_COLOUR),
    )


def _palette_image(
    view: Image.Image, reserved: Sequence[Tuple[int, int, int]]
) -> Tuple[Image.Image, Dict[Tuple[int, int, int], int]]:
    """``view`` (with its label strip) as a palette image whose last slots are the ``reserved``
    colours, and their indices."""
    canvas = Image.new("RGB", (view.width, view.height + GIF_LABEL_HEIGHT), _hex_rgb(BAND_COLOUR))
    canvas.paste(view, (0, GIF_LABEL_HEIGHT))
    free = 256 - len(reserved)
    base = canvas.quantize(colors=free, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    palette = (base.getpalette() or [])[: 3 * free]
    palette += [0] * (3 * free - len(palette))
    for colour in reserved:
        palette += list(colour)
    base.putpalette(palette)
    return base, {colour: free + k for k, colour in enumerate(reserved)}


def gif_frames(
    image: np.ndarray,
    trees: SamplingTrees,
    color_by_level: bool = False,
    size: int = GIF_SIZE,
    labels: Optional[Sequence[str]] = None,
    zoom: bool = False,
) -> List[Image.Image]:
    """One frame per unit, like the official demo's animation, each labelled (``labels``, default
    :func:`frame_label`) in a strip above the view of the static figure (image and margin band;
    ``zoom``: the unit's own view, as in the zoomed figure).

    Frames are palette images: the image's colours quantised to the slots left after the marker
    colours (unit green, point colours, black, white), which are drawn by their own palette
    index, so a GIF writer cannot merge them into the image's colours. Points have a black
    edge, as in the figure.
    """
    canvas_wh, views = _frame_views(trees, image.shape[:2], size, zoom)
    reserved = _reserved_colours(trees, color_by_level)
    scales = [_frame_scale(view, size) for view in views]
    shared = None
    if not zoom:
        shared = _palette_image(_render_view(image, views[0], canvas_wh, scales[0]), reserved)
    font = _font(13)
    frames: List[Image.Image] = []
    for unit in range(trees.num_units):
        base, index = shared or _palette_image(
            _zoomed_view(image, views[unit], canvas_wh), reserved
        )
        frame = base.copy()
        draw = ImageDraw.Draw(frame)
        draw.rectangle((0, 0, canvas_wh[0], GIF_LABEL_HEIGHT - 1), fill=index[(0, 0, 0)])
        xy = (float(trees.unit_xy[unit, 0]), float(trees.unit_xy[unit, 1]))
        text = labels[unit] if labels is not None else frame_label(unit, xy)
        draw.text((4, 3), text, fill=index[(255, 255, 255)], font=font)
        _draw_frame_points(draw, trees, unit, views[unit], scales[unit], color_by_level, index)
        frames.append(frame)
    return frames


def _draw_frame_points(
    draw: ImageDraw.ImageDraw,
    trees: SamplingTrees,
    unit: int,
    view: View,
    scale: float,
    color_by_level: bool,
    index: Dict[Tuple[int, int, int], int],
) -> None:
    """One unit's points (pinned into ``view``, ``scale`` frame pixels per image pixel) and the
    unit on a frame of :func:`gif_frames`."""
    black = index[(0, 0, 0)]
    radius = 2.0 if trees.points_per_unit(trees.num_levels) <= 729 else 1.2
    for level in reversed(_levels_to_draw(trees, color_by_level)):
        colour = index[_hex_rgb(level_colour(level, trees.num_levels, color_by_level))]
        r = radius if level == trees.num_levels else radius * 1.6
        xs, ys = view.pin(trees.xs[level - 1][unit].numpy(), trees.ys[level - 1][unit].numpy())
        inside = trees.inside[level - 1][unit].numpy()
        for x, y, on_map in zip(
            (xs - view.x0) * scale, (ys - view.y0) * scale + GIF_LABEL_HEIGHT, inside
        ):
            if on_map:
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=black)
            else:
                draw.line((x - r, y - r, x + r, y + r), fill=colour)
                draw.line((x - r, y + r, x + r, y - r), fill=colour)
    x, y = trees.unit_xy[unit].tolist()
    ux, uy = (x - view.x0) * scale, (y - view.y0) * scale + GIF_LABEL_HEIGHT
    draw.rectangle((ux - 5, uy - 5, ux + 5, uy + 5), fill=black)
    draw.rectangle((ux - 4, uy - 4, ux + 4, uy + 4), fill=index[_hex_rgb(UNIT_COLOUR)])


def gif_position(
    trees: SamplingTrees,
    image_hw: Tuple[int, int],
    x: float,
    y: float,
    size: int = GIF_SIZE,
    unit: int = 0,
    zoom: bool = False,
) -> Tuple[float, float]:
    """Where image point (x, y) lands in a frame of :func:`gif_frames` (frame pixels; with
    ``zoom``, in the frame of ``unit``)."""
    canvas_wh, views = _frame_views(trees, image_hw, size, zoom)
    view = views[unit]
    scale = _frame_scale(view, size)
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
