"""Figures of ``dcn-inspect sample-points``: each unit in green, its sampling points in red (Fig. 5/6).

Everything is drawn in original-image pixel coordinates (COCO continuous: pixel (r, c) covers
[c, c+1] x [r, r+1]), so the image is shown with ``extent=(0, W, H, 0)``. Points outside the
map they sample are drawn as crosses; with DCNv2 masks a point's opacity follows its weight.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image, ImageDraw

from dcn_inspect.outputs import atomic_path
from dcn_inspect.tracing import SamplingTrees

UNIT_COLOUR = "#00e000"
POINT_COLOUR = "#ff1a1a"
#: Colours of levels 1, 2, ... above the deepest one (which stays red) with ``color_by_level``.
LEVEL_COLOURS = ("#1e90ff", "#ffd400", "#ff00ff", "#00e5ff", "#ff8c00")

#: The static figure shows at most this many units (the CSV and the GIF have all of them).
MAX_PANELS = 24
#: Longer side of a GIF frame in pixels.
GIF_SIZE = 512
#: Display time of one GIF frame in milliseconds.
GIF_FRAME_MS = 700


def level_colour(level: int, num_levels: int, color_by_level: bool) -> str:
    """Colour of the points of ``level`` (1-based): red for the deepest level."""
    if level == num_levels or not color_by_level:
        return POINT_COLOUR
    return LEVEL_COLOURS[(level - 1) % len(LEVEL_COLOURS)]


def _alphas(weights: np.ndarray) -> np.ndarray:
    """Opacity per point: 1 without masks, else weight relative to the unit's strongest point (min 0.15)."""
    peak = float(weights.max()) if weights.size else 0.0
    if peak <= 0 or np.all(weights == 1):
        return np.ones_like(weights)
    return np.clip(weights / peak, 0.15, 1.0)


def _levels_to_draw(trees: SamplingTrees, color_by_level: bool) -> List[int]:
    return list(range(1, trees.num_levels + 1)) if color_by_level else [trees.num_levels]


def _draw_unit(ax: object, trees: SamplingTrees, unit: int, color_by_level: bool, marker_scale: float) -> None:
    levels = _levels_to_draw(trees, color_by_level)
    for level in reversed(levels):  # deepest (most numerous) first, upper levels on top
        xs = trees.xs[level - 1][unit].numpy()
        ys = trees.ys[level - 1][unit].numpy()
        inside = trees.inside[level - 1][unit].numpy()
        colour = level_colour(level, trees.num_levels, color_by_level)
        rgba = np.zeros((xs.size, 4))
        rgba[:, :3] = np.array(_hex_rgb(colour)) / 255.0
        rgba[:, 3] = _alphas(trees.weights[level - 1][unit].numpy())
        size = marker_scale * (6.0 if level == trees.num_levels else 14.0)
        ax.scatter(xs[inside], ys[inside], s=size, c=rgba[inside], marker="o", linewidths=0)  # type: ignore[attr-defined]
        if (~inside).any():
            ax.scatter(xs[~inside], ys[~inside], s=size * 1.5, c=rgba[~inside], marker="x", linewidths=0.8)  # type: ignore[attr-defined]
    x, y = trees.unit_xy[unit].tolist()
    ax.scatter([x], [y], s=60 * marker_scale, c=UNIT_COLOUR, marker="s", edgecolors="black", linewidths=0.6)  # type: ignore[attr-defined]


def _limits(trees: SamplingTrees, units: Sequence[int], width: int, height: int) -> Tuple[float, float, float, float]:
    """The image, widened to show every point of ``units`` (points may leave the image), plus a small margin."""
    lo_x, hi_x, lo_y, hi_y = 0.0, float(width), 0.0, float(height)
    for level in range(trees.num_levels):
        xs = trees.xs[level][list(units)]
        ys = trees.ys[level][list(units)]
        if xs.numel():
            lo_x, hi_x = min(lo_x, float(xs.min())), max(hi_x, float(xs.max()))
            lo_y, hi_y = min(lo_y, float(ys.min())), max(hi_y, float(ys.max()))
    margin = 0.02 * max(hi_x - lo_x, hi_y - lo_y)  # markers on the edge stay whole
    return lo_x - margin, hi_x + margin, lo_y - margin, hi_y + margin


def draw_sampling_figure(
    image: np.ndarray,
    trees: SamplingTrees,
    titles: Sequence[str],
    color_by_level: bool = False,
    max_panels: int = MAX_PANELS,
) -> Figure:
    """One panel per unit (side by side, wrapping after 4): the image, the unit, its points."""
    height, width = image.shape[:2]
    shown = list(range(min(trees.num_units, max_panels)))
    columns = max(1, min(len(shown), 4))
    rows = max(1, math.ceil(len(shown) / columns))
    lo_x, hi_x, lo_y, hi_y = _limits(trees, shown, width, height)  # sizes the panels; each is fitted to its own points
    aspect = (hi_x - lo_x) / max(hi_y - lo_y, 1e-6)
    panel_width = 4.0
    fig = Figure(figsize=(panel_width * columns, rows * (panel_width / aspect + 0.35)), layout="constrained")
    marker_scale = 1.0 if trees.points_per_unit(trees.num_levels) <= 729 else 0.5
    for slot, unit in enumerate(shown or [None]):  # type: ignore[list-item]
        ax = fig.add_subplot(rows, columns, slot + 1)
        ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest")
        limits = (0.0, float(width), 0.0, float(height))
        if unit is not None:
            _draw_unit(ax, trees, unit, color_by_level, marker_scale)
            ax.set_title(titles[unit], fontsize=8)
            limits = _limits(trees, [unit], width, height)
        ax.set_xlim(limits[0], limits[1])
        ax.set_ylim(limits[3], limits[2])
        ax.set_axis_off()
    if color_by_level and trees.num_levels > 1:
        handles = [
            Line2D([], [], linestyle="none", marker="o", markersize=5, color=level_colour(level, trees.num_levels, True))
            for level in range(1, trees.num_levels + 1)
        ]
        labels = [f"level {level}: {trees.layers[level - 1]}" for level in range(1, trees.num_levels + 1)]
        fig.legend(handles, labels, loc="outside upper center", ncols=len(handles), fontsize=8, frameon=False)
    return fig


def _hex_rgb(colour: str) -> Tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def gif_frames(image: np.ndarray, trees: SamplingTrees, color_by_level: bool = False, size: int = GIF_SIZE) -> List[Image.Image]:
    """One frame per unit, like the official demo's animation: the image (longer side ``size``), unit and points.

    Points outside the image are not visible in a frame; the static figure shows them.
    """
    height, width = image.shape[:2]
    scale = size / max(height, width)
    frame_hw = (max(1, round(height * scale)), max(1, round(width * scale)))
    base = Image.fromarray(image).resize((frame_hw[1], frame_hw[0]), Image.BILINEAR)
    radius = 2.0 if trees.points_per_unit(trees.num_levels) <= 729 else 1.2
    frames: List[Image.Image] = []
    for unit in range(trees.num_units):
        frame = base.copy()
        draw = ImageDraw.Draw(frame)
        for level in reversed(_levels_to_draw(trees, color_by_level)):
            colour = _hex_rgb(level_colour(level, trees.num_levels, color_by_level))
            r = radius if level == trees.num_levels else radius * 1.6
            xs = (trees.xs[level - 1][unit] * scale).tolist()
            ys = (trees.ys[level - 1][unit] * scale).tolist()
            for x, y in zip(xs, ys):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        ux, uy = (trees.unit_xy[unit] * scale).tolist()
        draw.rectangle((ux - 4, uy - 4, ux + 4, uy + 4), fill=_hex_rgb(UNIT_COLOUR), outline=(0, 0, 0))
        frames.append(frame)
    return frames


def write_sampling_gif(path: Path, frames: Sequence[Image.Image], frame_ms: int = GIF_FRAME_MS) -> None:
    """Write the frames as a looping GIF, atomically."""
    if not frames:
        raise ValueError("no frames to write")
    with atomic_path(Path(path)) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=list(frames[1:]), duration=frame_ms, loop=0)
