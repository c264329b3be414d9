"""Figure of ``dcn-inspect attention``: where multi-scale deformable attention looks, and how hard
(Deformable DETR, Fig. 6).

One panel per query (encoder token or decoder object query) and layer: the image, the query's
reference point as a green cross, every sampling point of every head and feature level as a
filled marker coloured by its attention weight, and, for decoder queries, the predicted box with
its class and score.

Everything is drawn in original-image pixel coordinates (COCO continuous: pixel (r, c) covers
[c, c+1] x [r, r+1]), so the image is shown with ``extent=(0, W, H, 0)``; titles give the
reference point as (x, y) in those pixels, the convention of the points CSV.

- One colour map (:data:`WEIGHT_CMAP`) and one normalisation (:func:`weight_norm`: 0 to the
  largest weight drawn anywhere in the figure) for every panel, so colours compare across
  panels; one colour bar, labelled :data:`WEIGHT_LABEL`, for the figure.
- Feature levels are told apart by marker shape (:data:`LEVEL_MARKERS`: circle for level 0,
  the finest, then square, triangle, ...). A panel's points are one collection drawn in
  ascending weight order (the heaviest on top), each with a thin dark edge so it shows on any
  image.
- Every panel shows the whole image at the same scale (:func:`view_limits`): the image plus a
  grey margin band wide enough for the points that leave it, as in ``sample-points`` (at most
  ``BAND_MAX`` of the image's longer side; farther points are pinned to the band's outer edge).
- ``per_head``: one panel per (query panel, head), showing that head's points only, on the same
  colour scale; a row per query panel, a column per head.
- Panels given in query x layer order (the same layers, in the same order, for every query)
  are laid out a row per query and a column per layer; otherwise four to a row. At most
  :data:`MAX_PANELS` panels are drawn, whole rows first (:func:`panels_left_out`).
- The legend (levels, reference point, predicted box, margin band; headed by the figure's
  title) and the colour bar lie inside the saved image at any panel count and image shape: the
  legend takes the columns the width holds, the figure widens when even one column (or a
  panel title) would not fit, and its height is laid out for the legend it carries.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.markers import MarkerStyle
from matplotlib.patches import Patch, Rectangle
from matplotlib.path import Path as MplPath

from dcn_inspect.report.legends import legend_in_fitting_columns
from dcn_inspect.report.sample_points import BAND_COLOUR, BAND_MAX, BAND_MIN, View

__all__ = [
    "MAX_PANELS",
    "AttentionPanel",
    "draw_attention_figure",
    "grid_columns",
    "panel_title",
    "panels_left_out",
    "view_limits",
    "weight_norm",
]

#: Colour map of the attention weights (no green in it: the reference point is green).
WEIGHT_CMAP = "plasma"
#: The colour bar's label.
WEIGHT_LABEL = "attention weight"
#: Marker of feature level 0 (finest), 1, 2, ...; levels beyond the table reuse it in turn.
LEVEL_MARKERS = ("o", "s", "^", "D", "v", "p", "h", "8")
REFERENCE_COLOUR = "#00e000"
BOX_COLOUR = "#00e5ff"
#: Fill of the level markers in the legend (a neutral grey: the colour is the weight's).
LEGEND_FILL = "#c8c8c8"
#: The dark edge around points, the reference cross, the box and its label.
EDGE_COLOUR = "#000000"
EDGE_WIDTH = 0.4

#: The figure draws at most this many panels (whole rows of the layer grid, or of heads).
MAX_PANELS = 24
#: Columns of a figure whose panels do not come in query x layer order.
MAX_COLUMNS = 4
#: The query x layer grid is used up to this many layers; more layers wrap four to a row.
MAX_LAYER_COLUMNS = 8
#: Longer side of a panel's view (image and band), inches.
PANEL_SIZE = 3.2
#: Narrowest panel slot, inches (room for the title beside a tall, narrow image).
MIN_SLOT_WIDTH = 2.2
#: Marker area (points^2) of a sampling point and of the reference cross.
POINT_AREA = 26.0
REFERENCE_AREA = 240.0
TITLE_FONTSIZE = 7
#: A box's label goes above it when the view has this fraction of its height above the box.
BOX_TEXT_ROOM = 0.08
#: Height (inches) of one title line and of the colour bar with its ticks and label.
TITLE_LINE = 0.14
COLOURBAR_HEIGHT = 0.75
#: Longest colour bar, and its thickness, inches.
COLOURBAR_LENGTH = 6.0
COLOURBAR_THICKNESS = 0.15
#: Width (inches) kept free beside the legend.
LEGEND_PAD = 0.2


class AttentionPanel(Protocol):
    """What a panel needs of ``dcn_inspect.analysis.attention.QueryPanel`` (read only): one
    query of one layer, positions in original-image pixels (x, y)."""

    @property
    def query(self) -> int: ...  # index in the call's query sequence
    @property
    def kind(self) -> str: ...  # "encoder" | "decoder"
    @property
    def layer(self) -> str: ...  # the calling module's qualified name
    @property
    def reference(self) -> Optional[Tuple[float, float]]: ...
    @property
    def box(self) -> Optional[Tuple[float, float, float, float]]: ...  # x0, y0, x1, y1
    @property
    def label(self) -> str: ...
    @property
    def points(self) -> pd.DataFrame: ...  # head, feature_level, point, x, y, weight


# --------------------------------------------------------------------------------------------
# Words


def short_layer(name: str) -> str:
    """A layer's name in a title: the calling module's name without a leading ``model.`` and a
    trailing attention module (``...layers.5.encoder_attn`` -> ``decoder.layers.5``)."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "model":
        parts = parts[1:]
    if len(parts) > 1 and parts[-1].lower().endswith(("attn", "attention")):
        parts = parts[:-1]
    return ".".join(parts)


def box_text(label: str) -> str:
    """The text on a predicted box: what follows the label's first ``": "`` (``query 17: class
    2, score 0.83`` -> ``class 2, score 0.83``), else the whole label."""
    _, sep, tail = label.partition(": ")
    return tail if sep and tail else label


def panel_title(panel: AttentionPanel, head: Optional[int] = None) -> str:
    """``<label> · <layer> · ref (x, y)`` (image pixels), then ``· head h`` for a head's panel."""
    parts = [panel.label, short_layer(panel.layer)]
    if panel.reference is not None:
        x, y = panel.reference
        parts.append(f"ref ({x:.1f}, {y:.1f})")
    if head is not None:
        parts.append(f"head {head}")
    return " · ".join(parts)


def _wrapped(text: str, inches: float) -> str:
    """``text`` in lines of about ``inches`` at the title's font size, broken after a `` · ``
    where it can be (and inside a long name where it must)."""
    width = max(12, int(inches * 72 / (0.56 * TITLE_FONTSIZE)))
    lines: List[str] = []
    for part in text.split(" · "):
        if lines and len(lines[-1]) + 3 + len(part) <= width:
            lines[-1] += " · " + part
        else:
            lines.extend(textwrap.wrap(part, width, break_on_hyphens=False) or [part])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Which panels, where


def _layer_grid(panels: Sequence[AttentionPanel]) -> int:
    """The number of layers when ``panels`` come in query x layer order (each run of that many
    panels one query, its layers in the same order as every other run), else 0."""
    layers = list(dict.fromkeys(panel.layer for panel in panels))
    count = len(layers)
    if count < 2 or count > MAX_LAYER_COLUMNS or len(panels) % count:
        return 0
    for start in range(0, len(panels), count):
        run = panels[start : start + count]
        if [p.layer for p in run] != layers or len({p.query for p in run}) != 1:
            return 0
    return count


def grid_columns(panels: Sequence[AttentionPanel], heads: int, per_head: bool = False) -> int:
    """Columns of the figure: one per head (``per_head``), else one per layer when ``panels``
    come in query x layer order, else up to :data:`MAX_COLUMNS`."""
    if per_head:
        return max(1, heads)
    return _layer_grid(panels) or max(1, min(MAX_COLUMNS, len(panels)))


def _shown_count(panels: Sequence[AttentionPanel], heads: int, per_head: bool) -> int:
    """How many of ``panels`` the figure draws: whole rows, at most :data:`MAX_PANELS` panels
    (at least one row)."""
    if per_head:
        return min(len(panels), max(1, MAX_PANELS // max(1, heads)))
    columns = grid_columns(panels, heads)
    return min(len(panels), max(1, MAX_PANELS // columns) * columns)


def panels_left_out(
    panels: Sequence[AttentionPanel], heads: int, per_head: bool = False
) -> Optional[int]:
    """How many of ``panels`` the figure leaves out (None when it draws them all)."""
    left = len(panels) - _shown_count(panels, heads, per_head)
    return left if left > 0 else None


def _slots(
    panels: Sequence[AttentionPanel], heads: int, per_head: bool
) -> List[Tuple[AttentionPanel, Optional[int]]]:
    """The drawn (panel, head) pairs in reading order (head None: every head)."""
    shown = panels[: _shown_count(panels, heads, per_head)]
    if per_head:
        return [(panel, head) for panel in shown for head in range(max(1, heads))]
    return [(panel, None) for panel in shown]


def _points(panel: AttentionPanel, head: Optional[int]) -> pd.DataFrame:
    points = panel.points
    return points if head is None else points[points["head"].to_numpy() == head]


def weight_norm(weights: Sequence[np.ndarray]) -> Normalize:
    """The figure's one colour scale: 0 to the largest weight drawn (1 when there is none)."""
    tops = [float(np.nanmax(w)) for w in weights if np.size(w) and not np.isnan(w).all()]
    top = max(tops, default=0.0)
    return Normalize(vmin=0.0, vmax=top if top > 0 else 1.0)


def view_limits(
    slots: Sequence[Tuple[AttentionPanel, Optional[int]]], width: int, height: int
) -> View:
    """The common view of every panel: the image plus a band as wide as the farthest point,
    reference or box beyond it needs (at least ``BAND_MIN``, at most ``BAND_MAX`` of the image's
    longer side, the same on every side)."""
    longer = float(max(width, height))
    overflow = 0.0
    for panel, head in slots:
        points = _points(panel, head)
        xs = [points["x"].to_numpy(dtype=np.float64)]
        ys = [points["y"].to_numpy(dtype=np.float64)]
        if panel.reference is not None:
            xs.append(np.array([panel.reference[0]]))
            ys.append(np.array([panel.reference[1]]))
        if panel.box is not None:
            xs.append(np.array(panel.box[0::2], dtype=np.float64))
            ys.append(np.array(panel.box[1::2], dtype=np.float64))
        x, y = np.concatenate(xs), np.concatenate(ys)
        x, y = x[np.isfinite(x)], y[np.isfinite(y)]
        if x.size:
            overflow = max(overflow, -float(x.min()), float(x.max()) - width)
        if y.size:
            overflow = max(overflow, -float(y.min()), float(y.max()) - height)
    band = min(max(overflow + 0.01 * longer, BAND_MIN * longer), BAND_MAX * longer)
    return View(-band, width + band, -band, height + band)


# --------------------------------------------------------------------------------------------
# One panel


def level_marker(level: int) -> str:
    return LEVEL_MARKERS[level % len(LEVEL_MARKERS)]


def _marker_path(marker: str) -> MplPath:
    """The path ``scatter`` draws for ``marker`` (one unit across: ``s`` is its area)."""
    style = MarkerStyle(marker)
    return style.get_path().transformed(style.get_transform())


def _edged(linewidth: float) -> List[Any]:
    return [patheffects.withStroke(linewidth=linewidth + 1.6, foreground=EDGE_COLOUR)]


def _draw_points(ax: Axes, points: pd.DataFrame, view: View, norm: Normalize, levels: int) -> Any:
    """A panel's points as one collection: coloured by weight through the figure's ``norm``,
    shaped by level, in ascending weight order (the heaviest on top), pinned into ``view``."""
    weights = points["weight"].to_numpy(dtype=np.float64)
    order = np.argsort(weights, kind="stable")
    xs, ys = view.pin(
        points["x"].to_numpy(dtype=np.float64)[order],
        points["y"].to_numpy(dtype=np.float64)[order],
    )
    feature_levels = points["feature_level"].to_numpy()[order]
    bad = (feature_levels < 0) | (feature_levels >= levels)
    if bad.any():
        raise ValueError(f"feature level {int(feature_levels[bad][0])} not in 0..{levels - 1}")
    collection = ax.scatter(
        xs, ys, c=weights[order], cmap=WEIGHT_CMAP, norm=norm, s=POINT_AREA, marker="o",
        edgecolors=EDGE_COLOUR, linewidths=EDGE_WIDTH, zorder=3,
    )  # fmt: skip
    paths = [_marker_path(level_marker(level)) for level in range(levels)]
    if len(xs):
        collection.set_paths([paths[int(level)] for level in feature_levels])
    return collection


def _draw_box(ax: Axes, box: Tuple[float, float, float, float], text: str, view: View) -> None:
    """The predicted box, with its class and score on its top-left corner: above the box where
    the view has room for it, else inside."""
    x0, y0, x1, y1 = box
    ax.add_patch(
        Rectangle(
            (x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=BOX_COLOUR, linewidth=1.4,
            path_effects=_edged(1.4), zorder=2,
        )
    )  # fmt: skip
    above = y0 - view.y0 > BOX_TEXT_ROOM * view.height
    ax.text(
        x0, y0, text, fontsize=6, color="black", va="bottom" if above else "top", ha="left",
        clip_on=True, zorder=4,
        bbox={"facecolor": BOX_COLOUR, "edgecolor": "none", "pad": 1.0, "alpha": 0.85},
    )  # fmt: skip


def _draw_reference(ax: Axes, reference: Tuple[float, float], view: View) -> None:
    """The reference point (pinned into ``view``): a large green cross with a dark edge."""
    xs, ys = view.pin(np.array([reference[0]]), np.array([reference[1]]))
    ax.scatter(
        xs, ys, s=REFERENCE_AREA, marker="+", c=REFERENCE_COLOUR,
        linewidths=2.2, path_effects=_edged(2.2), zorder=5,
    )  # fmt: skip


def _has_box(panel: AttentionPanel) -> bool:
    """Whether ``panel`` shows a predicted box (decoder queries only)."""
    return panel.box is not None and panel.kind == "decoder"


def _draw_panel(
    ax: Axes,
    image: np.ndarray,
    slot: Tuple[AttentionPanel, Optional[int]],
    view: View,
    norm: Normalize,
    levels: int,
    title: str,
) -> None:
    """The image in its band, the box (decoder), the points and the reference point."""
    height, width = image.shape[:2]
    ax.add_patch(
        Rectangle(
            (view.x0, view.y0), view.width, view.height, facecolor=BAND_COLOUR,
            edgecolor="none", zorder=0,
        )
    )  # fmt: skip
    ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest", zorder=1)
    panel, head = slot
    if _has_box(panel):
        _draw_box(ax, panel.box, box_text(panel.label), view)
    _draw_points(ax, _points(panel, head), view, norm, levels)
    if panel.reference is not None:
        _draw_reference(ax, panel.reference, view)
    ax.set_title(title, fontsize=TITLE_FONTSIZE)


# --------------------------------------------------------------------------------------------
# The figure


def legend_entries(levels: int, boxes: bool) -> Tuple[List[object], List[str]]:
    """Levels by marker shape, the reference point, the predicted box (when drawn), the band."""
    handles: List[object] = []
    labels: List[str] = []
    for level in range(levels):
        handles.append(
            Line2D(
                [], [], linestyle="none", marker=level_marker(level), markersize=6,
                markerfacecolor=LEGEND_FILL, markeredgecolor=EDGE_COLOUR, markeredgewidth=0.6,
            )
        )  # fmt: skip
        extreme = " (finest)" if level == 0 else " (coarsest)" if level == levels - 1 else ""
        labels.append(f"level {level}{extreme}")
    handles.append(
        Line2D(
            [], [], linestyle="none", marker="+", markersize=11, markeredgewidth=2.2,
            color=REFERENCE_COLOUR, path_effects=_edged(2.2),
        )
    )  # fmt: skip
    labels.append("reference point")
    if boxes:
        handles.append(Patch(facecolor="none", edgecolor=BOX_COLOUR, linewidth=1.4))
        labels.append("predicted box")
    handles.append(Patch(facecolor=BAND_COLOUR, edgecolor="none"))
    labels.append("outside the image (farther points on the band's edge)")
    return handles, labels


def _add_colourbar(fig: Figure, spec: Any, norm: Normalize) -> Any:
    """The figure's one colour bar, in the grid row ``spec`` below the panels (a cell of the
    layout, so its ticks and label stay inside the figure): centred at the row's top,
    :data:`COLOURBAR_THICKNESS` thick and 80 % of the figure's width long, at most
    :data:`COLOURBAR_LENGTH` inches."""
    share = min(0.8, COLOURBAR_LENGTH / fig.get_figwidth())
    row = fig.add_subplot(spec, label="colour bar row")
    row.set_axis_off()
    cax = row.inset_axes([(1 - share) / 2, 0.0, share, 1.0], label="<colorbar>")
    cax.set_box_aspect(COLOURBAR_THICKNESS / (share * fig.get_figwidth()))
    cax.set_anchor("N")
    bar = fig.colorbar(
        ScalarMappable(norm=norm, cmap=WEIGHT_CMAP), cax=cax, orientation="horizontal"
    )
    bar.set_label(WEIGHT_LABEL, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return bar


def _add_legend(fig: Figure, handles: List[object], labels: List[str], title: str) -> float:
    """The legend above the panels, headed by ``title``, in as many columns (at most three) as
    the figure's width holds; a figure too narrow for even one column is widened. Returns the
    legend's height in inches."""
    renderer = FigureCanvasAgg(fig).get_renderer()

    def inches(legend: Any) -> Any:
        return legend.get_window_extent(renderer).transformed(fig.dpi_scale_trans.inverted())

    legend = legend_in_fitting_columns(
        fig, handles, labels, lambda drawn: inches(drawn).width + LEGEND_PAD <= fig.get_figwidth(),
        loc="outside upper center", fontsize=8, frameon=False, title=title or None,
        title_fontsize=9,
    )  # fmt: skip
    box = inches(legend)
    fig.set_figwidth(max(fig.get_figwidth(), box.width + LEGEND_PAD))
    return float(box.height)


def _panel_size(view: View) -> Tuple[float, float]:
    """(slot width, view height) of a panel in inches: the view's longer side is
    :data:`PANEL_SIZE`; a slot is never narrower than :data:`MIN_SLOT_WIDTH`."""
    aspect = view.width / max(view.height, 1e-9)
    if aspect >= 1:
        return max(PANEL_SIZE, MIN_SLOT_WIDTH), PANEL_SIZE / aspect
    return max(PANEL_SIZE * aspect, MIN_SLOT_WIDTH), PANEL_SIZE


def draw_attention_figure(
    image: np.ndarray,
    panels: Sequence[AttentionPanel],
    levels: int,
    heads: int,
    title: str,
    per_head: bool = False,
) -> Figure:
    """Deformable DETR's Fig. 6 for ``panels`` (at most :data:`MAX_PANELS` drawn): the image
    (H, W, 3 uint8 RGB) with each query's reference point, sampling points (colour = weight on
    one scale for the figure, shape = feature level of ``levels``) and predicted box; ``per_head``
    gives each of the ``heads`` its own panel. One colour bar, and a legend headed by ``title``,
    inside the saved image."""
    height, width = image.shape[:2]
    slots = _slots(list(panels), heads, per_head)
    columns = grid_columns(list(panels), heads, per_head) if slots else 1
    columns = min(columns, max(1, len(slots)))
    rows = max(1, math.ceil(len(slots) / columns))
    view = view_limits(slots, width, height)
    norm = weight_norm([_points(p, h)["weight"].to_numpy(dtype=np.float64) for p, h in slots])
    slot_width, view_height = _panel_size(view)
    titles = [_wrapped(panel_title(p, h), slot_width - 0.1) for p, h in slots]
    title_lines = max([t.count("\n") + 1 for t in titles], default=0)
    handles, labels = legend_entries(levels, any(_has_box(p) for p, _ in slots))
    fig = Figure(figsize=(slot_width * columns + 0.2, 1.0), layout="constrained")
    legend_title = textwrap.fill(title, max(20, int(fig.get_figwidth() * 72 / (0.55 * 9))))
    legend_height = _add_legend(fig, handles, labels, legend_title)
    row_height = view_height + TITLE_LINE * title_lines + 0.15
    fig.set_figheight(rows * row_height + COLOURBAR_HEIGHT + legend_height + 0.1)
    grid = fig.add_gridspec(
        rows + 1, columns, height_ratios=[view_height] * rows + [COLOURBAR_THICKNESS]
    )
    for index, slot in enumerate(slots or [None]):  # type: ignore[list-item]
        ax = fig.add_subplot(grid[index // columns, index % columns])
        if slot is None:
            ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest")
        else:
            _draw_panel(ax, image, slot, view, norm, levels, titles[index])
        ax.set_xlim(view.x0, view.x1)
        ax.set_ylim(view.y1, view.y0)
        ax.set_aspect("equal")
        ax.set_axis_off()
        ax.set_xticks([])  # no ticks to lay out (the layout measures them even when hidden)
        ax.set_yticks([])
    _add_colourbar(fig, grid[rows, :], norm)
    return fig
