"""Figure of ``dcn-inspect receptive-field``: per unit, the ERF heat map over the image, the
saliency region, the theoretical receptive field, the gradient-weighted sampling points and the
unit (DCNv2 §2.1).

Everything is drawn in original-image pixel coordinates (COCO continuous: pixel (r, c) covers
[c, c+1] x [r, r+1]); every panel shows the whole image at the same scale, so panels compare.
Each ERF is divided by its own maximum (one colour bar, 0..1, for all panels, on a square-root
colour scale so the tails of a peaked map show); sampling points are sized and made opaque by
their gradient weight relative to the strongest point of their level in that panel. The legend
and the colour bar's label are laid out for the figure's width (wrapped, fewer legend columns)
so they stay inside the saved image from one panel to many.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

UNIT_COLOUR = "#00e000"
SALIENCY_COLOUR = "#00e5ff"
THEORETICAL_COLOUR = "#ffffff"
#: Point colours of levels 1, 2, 3, ... (level 1 = the unit's own sampling points).
LEVEL_COLOURS = ("#1e90ff", "#ffd400", "#ff1a1a", "#ff00ff", "#ff8c00")
ERF_COLOURMAP = "inferno"
#: Colour scale of the ERF: a power norm shows the tails of a peaked map (0.5: square root).
ERF_GAMMA = 0.5
#: The colour bar's label.
ERF_LABEL = (
    "ERF: sum over colours of |dr/dI|, divided by the panel's maximum (square-root colour scale)"
)
#: Width of one panel, inches.
PANEL_WIDTH = 3.6
#: Figures show at most this many panels (the CSV and npz have every unit).
MAX_PANELS = 24


@dataclass
class PointLevel:
    """The sampling points of one level of one unit's tree: positions and gradient weights."""

    label: str
    xs: np.ndarray
    ys: np.ndarray
    weights: Optional[np.ndarray]  # |dr/dp|; None: not available (drawn uniformly)
    base_size: Optional[float] = None  # marker area at full weight; None: by level (30, 14, 5)


@dataclass
class ErfPanel:
    """One unit under one model."""

    title: str
    erf: np.ndarray  # [H, W]
    unit_xy: Tuple[float, float]
    theoretical: Optional[Tuple[float, float, float, float]]
    saliency: Optional[Tuple[float, float, float, float]]
    levels: List[PointLevel] = field(default_factory=list)


def _sizes_and_alpha(weights: Optional[np.ndarray], base: float) -> Tuple[np.ndarray, np.ndarray]:
    if weights is None or weights.size == 0:
        count = 0 if weights is None else weights.size
        return np.full(count, base), np.full(count, 0.8)
    peak = float(weights.max())
    relative = weights / peak if peak > 0 else np.zeros_like(weights)
    return base * (0.15 + 1.85 * relative), np.clip(0.1 + 0.9 * relative, 0.0, 1.0)


def _draw_panel(
    ax: object, image_grey: np.ndarray, panel: ErfPanel, norm: colors.Normalize, point_scale: float
) -> None:
    height, width = panel.erf.shape
    extent = (0, width, height, 0)
    ax.imshow(image_grey, extent=extent, cmap="gray", vmin=0, vmax=255, interpolation="nearest")  # type: ignore[attr-defined]
    peak = float(panel.erf.max()) if panel.erf.size else 0.0
    relative = panel.erf / peak if peak > 0 else np.zeros_like(panel.erf)
    scaled = np.asarray(norm(relative), dtype=np.float64)
    rgba = colormaps[ERF_COLOURMAP](scaled)
    rgba[..., 3] = np.clip(0.15 + 1.7 * scaled, 0.0, 0.9) * (
        relative > 0
    )  # zero gradient: the image shows through
    ax.imshow(rgba, extent=extent, interpolation="nearest")  # type: ignore[attr-defined]
    if panel.theoretical is not None:
        x1, y1, x2, y2 = panel.theoretical
        ax.add_patch(
            Rectangle(
                (x1, y1),
                x2 - x1,
                y2 - y1,
                fill=False,
                edgecolor=THEORETICAL_COLOUR,
                linewidth=1.0,
                linestyle=(0, (4, 3)),
            )
        )  # type: ignore[attr-defined]
    if panel.saliency is not None:
        x1, y1, x2, y2 = panel.saliency
        ax.add_patch(
            Rectangle(
                (x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=SALIENCY_COLOUR, linewidth=1.6
            )
        )  # type: ignore[attr-defined]
    for index in reversed(range(len(panel.levels))):  # deepest (most numerous) first
        level = panel.levels[index]
        base = point_scale * (
            level.base_size
            if level.base_size is not None
            else 30.0
            if index == 0
            else 14.0
            if index == 1
            else 5.0
        )
        sizes, alphas = _sizes_and_alpha(level.weights, base)
        rgba = np.zeros((level.xs.size, 4))
        rgba[:, :3] = colors.to_rgb(LEVEL_COLOURS[index % len(LEVEL_COLOURS)])
        rgba[:, 3] = alphas
        ax.scatter(level.xs, level.ys, s=sizes, c=rgba, marker="o", linewidths=0)  # type: ignore[attr-defined]
    ax.scatter(
        [panel.unit_xy[0]],
        [panel.unit_xy[1]],
        s=50 * point_scale,
        c=UNIT_COLOUR,
        marker="s",
        edgecolors="black",
        linewidths=0.6,
    )  # type: ignore[attr-defined]
    ax.set_xlim(0, width)  # type: ignore[attr-defined]
    ax.set_ylim(height, 0)  # type: ignore[attr-defined]
    ax.set_title(panel.title, fontsize=7)  # type: ignore[attr-defined]
    ax.set_axis_off()  # type: ignore[attr-defined]


def _text_width(inches: float, fontsize: float) -> int:
    """About how many characters of ``fontsize`` points fit across ``inches``."""
    return max(20, int(inches * 72 / (0.56 * fontsize)))


def _wrapped(text: str, inches: float, fontsize: float) -> str:
    """``text`` with each line wrapped to ``inches`` (long words, such as paths, broken)."""
    width = _text_width(inches, fontsize)
    return "\n".join(
        textwrap.fill(line, width, break_long_words=True, break_on_hyphens=False) or line
        for line in text.split("\n")
    )


@dataclass
class _Legend:
    """The legend's entries and how many columns the figure's width holds."""

    handles: List[object]
    labels: List[str]
    title: Optional[str]
    columns: int

    @property
    def rows(self) -> int:
        return math.ceil(len(self.handles) / self.columns) + (1 if self.title else 0)


#: The legend's labels of the unit marker, the theoretical receptive field and the saliency box.
LEGEND_LABELS = ("unit", "theoretical receptive field", "saliency region")


def _legend(
    shown: Sequence[ErfPanel], figure_width: float, names: Sequence[str] = LEGEND_LABELS
) -> _Legend:
    """The unit, the two boxes and the first panel's point levels, in as many columns (at most
    3) as ``figure_width`` inches hold; ``names`` labels the first three (an empty one: left
    out)."""
    level_labels = [level.label for level in (shown[0].levels if shown else [])]
    handles: List[object] = [
        Line2D(
            [],
            [],
            linestyle="none",
            marker="s",
            markersize=6,
            markerfacecolor=UNIT_COLOUR,
            markeredgecolor="black",
        ),
        Patch(facecolor="none", edgecolor=THEORETICAL_COLOUR, linestyle="--"),
        Patch(facecolor="none", edgecolor=SALIENCY_COLOUR),
    ]
    kept = [i for i, name in enumerate(names) if name]
    handles = [handles[i] for i in kept]
    labels = [names[i] for i in kept]
    for index, label in enumerate(level_labels):
        handles.append(
            Line2D(
                [],
                [],
                linestyle="none",
                marker="o",
                markersize=5,
                color=LEVEL_COLOURS[index % len(LEVEL_COLOURS)],
            )
        )
        labels.append(_wrapped(label, figure_width - 0.6, 7))
    # a column is as wide as the longest label line (plus its marker and spacing)
    column = max(len(line) for label in labels for line in label.split("\n")) + 8
    columns = max(1, min(len(handles), 3, _text_width(figure_width, 7) // column))
    title = "points: size and opacity follow |dr/dp|" if level_labels else None
    return _Legend(handles, labels, title, columns)


def _add_legend(fig: Figure, legend: _Legend) -> None:
    """The legend below the panels."""
    drawn = fig.legend(
        legend.handles,
        legend.labels,
        loc="outside lower center",
        ncols=legend.columns,
        fontsize=7,
        frameon=True,
        title=legend.title,
        title_fontsize=7,
    )
    drawn.get_frame().set_facecolor("#808080")


def draw_receptive_field_figure(
    image: np.ndarray,
    panels: Sequence[ErfPanel],
    columns: int = 4,
    max_panels: int = MAX_PANELS,
    legend_labels: Sequence[str] = LEGEND_LABELS,
) -> Figure:
    """Panels side by side (``columns`` per row; 2 for a model compared with another: one row per
    unit). The figure is tall enough for the panels' titles, the colour bar and the legend at
    its width; ``legend_labels`` names the unit marker and the two boxes (see :func:`_legend`)."""
    shown = list(panels[:max_panels])
    height, width = image.shape[:2]
    grey = (
        image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        if image.ndim == 3
        else image.astype(np.float64)
    )
    grey = 40.0 + 0.6 * grey  # dimmed so the heat map reads
    columns = max(1, min(columns, len(shown) or 1))
    rows = max(1, math.ceil(len(shown) / columns))
    aspect = width / max(height, 1)
    figure_width = PANEL_WIDTH * columns
    titles = [_wrapped(panel.title, PANEL_WIDTH - 0.1, 7) for panel in shown]
    title_lines = max([t.count("\n") + 1 for t in titles] or [0])
    label = _wrapped(ERF_LABEL, figure_width - 0.2, 8)
    # a box no panel draws (no saliency search, no theoretical field) has no legend entry
    drawn = (
        True,
        any(p.theoretical is not None for p in shown),
        any(p.saliency is not None for p in shown),
    )
    legend_labels = [name if keep else "" for name, keep in zip(legend_labels, drawn)]
    legend = _legend(shown, figure_width, legend_labels)
    # per row: the panel and its title (7 pt lines); below: colour bar, its label, the legend
    below = 0.55 + 0.16 * (label.count("\n") + 1) + 0.17 * legend.rows
    fig = Figure(
        figsize=(
            figure_width,
            rows * (PANEL_WIDTH / aspect + 0.14 * title_lines + 0.17) + below,
        ),
        layout="constrained",
    )
    norm = colors.PowerNorm(gamma=ERF_GAMMA, vmin=0.0, vmax=1.0)
    axes = []
    point_scale = 1.0 if max(height, width) <= 600 else 0.6
    for slot, panel in enumerate(shown or [None]):  # type: ignore[list-item]
        ax = fig.add_subplot(rows, columns, slot + 1)
        axes.append(ax)
        if panel is None:
            ax.imshow(grey, extent=(0, width, height, 0), cmap="gray", vmin=0, vmax=255)
            ax.set_axis_off()
            continue
        _draw_panel(ax, grey, panel, norm, point_scale)
        ax.set_title(titles[slot], fontsize=7)
    colourbar = fig.colorbar(
        ScalarMappable(norm=norm, cmap=ERF_COLOURMAP),
        ax=axes,
        location="bottom",
        shrink=0.6,
        aspect=40,
        pad=0.01,
    )
    colourbar.set_label(label, fontsize=8)
    colourbar.ax.tick_params(labelsize=7)
    _add_legend(fig, legend)
    return fig
