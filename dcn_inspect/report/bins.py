"""Figure of ``dcn-inspect bins``: RoIs in yellow, regular bins thin, deformed bins in red (Fig. 7).

Everything is drawn in original-image pixel coordinates (COCO continuous: pixel (r, c) covers
[c, c+1] x [r, r+1]), so the image is shown with ``extent=(0, W, H, 0)``.

- Each deformed bin is linked to its regular bin by a thin connector from the regular bin's
  centre (a dot) to the deformed bin's centre.
- Where the extent the op really pools differs visibly from the RoI as given (deformable PS RoI
  pooling rounds the corners and counts x2, y2 as inclusive pixels: one model-input pixel more,
  which matters for small RoIs), that extent is drawn too; the regular bins tile it.
- Deformed bins, their links and the sampling points carry a thin dark edge
  (:data:`EDGE_COLOUR`), so red bins stay visible on red objects and cyan points on cyan ones.
- A panel holds its RoI, its pooled extent, every regular and deformed bin and every sampling
  point; only the context margin around them is cut to the image and a thin band around it, so
  a large RoI fills its panel, a small one is magnified, and no bin is cut at the panel's edge.
- A legend names every mark; it and the titles fit inside the saved image at any panel count
  (fewer legend columns, or a wider figure, when they would not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from dcn_inspect.report.legends import legend_in_fitting_columns

ROI_COLOUR = "#ffd400"
DEFORMED_COLOUR = "#ff1a1a"
POINT_COLOUR = "#00e5ff"
OP_EXTENT_COLOUR = "#ff8c00"
OUTSIDE_COLOUR = "#404040"
#: The contrasting edge under deformed bins, their links and the sampling points.
EDGE_COLOUR = "#000000"
#: How much wider than a line its edge is (points: the marker's edge width).
EDGE_WIDTH = 0.8

#: Context kept around a panel's RoI and bins, as a fraction of their extent's longer side.
PANEL_MARGIN = 0.12
#: The context margin never extends more than this fraction of the image's longer side beyond
#: the image (what is drawn always shows, with :data:`PANEL_PAD`).
IMAGE_BAND = 0.05
#: Room always kept around what a panel draws, as a fraction of its extent's longer side (a bin
#: on the panel's edge would lose half its line).
PANEL_PAD = 0.02
#: The op's pooled extent is drawn when a side differs from the RoI by more than this
#: fraction of the RoI's longer side (invisible differences are not drawn).
OP_EXTENT_VISIBLE = 0.02

#: Legend text of the op's pooled extent, per head kind.
OP_EXTENT_LABELS = {
    "psroi_pool": "extent the op pools (corners rounded, x2, y2 inclusive: +1 input px)",
    "roi_pool": "extent the op pools",
}

Box = Tuple[float, float, float, float]


@dataclass
class RoIPanel:
    """One RoI with one offset set: boxes are (x1, y1, x2, y2) in original-image pixels."""

    title: str
    roi: Box
    regular: np.ndarray  # [ph, pw, 4]
    deformed: np.ndarray  # [ph, pw, 4]
    points: Optional[np.ndarray] = None  # [N, 2] (x, y)
    roi_label: str = ""  # short name of the RoI, written once per RoI in overlay figures
    op_roi: Optional[Box] = None  # the extent the pooling op really pools (BinGeometry.op_rois)

    def shows_op_extent(self) -> bool:
        """Whether the op's pooled extent differs visibly from the RoI as given."""
        if self.op_roi is None:
            return False
        roi = np.asarray(self.roi, dtype=np.float64)
        size = max(roi[2] - roi[0], roi[3] - roi[1], 1e-9)
        return bool(
            np.abs(np.asarray(self.op_roi, dtype=np.float64) - roi).max() > OP_EXTENT_VISIBLE * size
        )


def _edged(linewidth: float) -> List[object]:
    """Path effects drawing a line of ``linewidth`` over a dark edge :data:`EDGE_WIDTH` wider."""
    return [patheffects.withStroke(linewidth=linewidth + EDGE_WIDTH, foreground=EDGE_COLOUR)]


def _point_style() -> dict:
    """The sampling points' marker: cyan with a dark edge."""
    return {
        "linestyle": "none",
        "marker": "o",
        "markersize": 2.6,
        "markerfacecolor": POINT_COLOUR,
        "markeredgecolor": EDGE_COLOUR,
        "markeredgewidth": 0.3,
    }


def _centres(boxes: np.ndarray) -> np.ndarray:
    flat = boxes.reshape(-1, 4)
    return np.stack([(flat[:, 0] + flat[:, 2]) / 2, (flat[:, 1] + flat[:, 3]) / 2], axis=1)


def _draw_panel(ax: object, panel: RoIPanel, draw_roi_label: bool = False) -> None:
    x1, y1, x2, y2 = panel.roi
    ax.add_patch(
        Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=ROI_COLOUR, linewidth=2.0)
    )  # type: ignore[attr-defined]
    if panel.shows_op_extent():
        ox1, oy1, ox2, oy2 = panel.op_roi  # type: ignore[misc]
        ax.add_patch(  # type: ignore[attr-defined]
            Rectangle(
                (ox1, oy1),
                ox2 - ox1,
                oy2 - oy1,
                fill=False,
                edgecolor=OP_EXTENT_COLOUR,
                linewidth=1.2,
                linestyle=(0, (1, 1)),
            )
        )
    for box in panel.regular.reshape(-1, 4):
        ax.add_patch(  # type: ignore[attr-defined]
            Rectangle(
                (box[0], box[1]),
                box[2] - box[0],
                box[3] - box[1],
                fill=False,
                edgecolor=ROI_COLOUR,
                linewidth=0.6,
                linestyle=(0, (3, 2)),
            )
        )
    for box in panel.deformed.reshape(-1, 4):
        ax.add_patch(  # type: ignore[attr-defined]
            Rectangle(
                (box[0], box[1]),
                box[2] - box[0],
                box[3] - box[1],
                fill=False,
                edgecolor=DEFORMED_COLOUR,
                linewidth=1.4,
                path_effects=_edged(1.4),
            )
        )
    starts, ends = _centres(panel.regular), _centres(panel.deformed)
    for (sx, sy), (ex, ey) in zip(starts, ends):
        ax.plot(  # type: ignore[attr-defined]
            [sx, ex],
            [sy, ey],
            color=DEFORMED_COLOUR,
            linewidth=0.7,
            alpha=0.9,
            path_effects=_edged(0.7),
        )
    ax.plot(
        starts[:, 0],
        starts[:, 1],
        linestyle="none",
        marker="o",
        markersize=2.5,
        color=DEFORMED_COLOUR,
        markeredgecolor=EDGE_COLOUR,
        markeredgewidth=0.4,
    )  # type: ignore[attr-defined]
    if panel.points is not None and len(panel.points):
        ax.plot(panel.points[:, 0], panel.points[:, 1], **_point_style())  # type: ignore[attr-defined]
    if draw_roi_label:
        ax.text(
            x1,
            y1,
            panel.roi_label or panel.title,
            color="black",
            fontsize=6,
            va="bottom",
            bbox={"facecolor": ROI_COLOUR, "pad": 1, "linewidth": 0},
        )  # type: ignore[attr-defined]


def panel_limits(panel: RoIPanel, width: int, height: int) -> Tuple[float, float, float, float]:
    """(x_min, x_max, y_min, y_max): the RoI, its pooled extent, every bin and point, always; and
    a margin around them cut to the image plus a band of ``IMAGE_BAND`` of its longer side."""
    parts = [
        np.asarray(panel.roi, dtype=np.float64)[None],
        panel.regular.reshape(-1, 4),
        panel.deformed.reshape(-1, 4),
    ]
    if panel.op_roi is not None:
        parts.append(np.asarray(panel.op_roi, dtype=np.float64)[None])
    boxes = np.concatenate(parts)
    lo_x, lo_y = boxes[:, 0].min(), boxes[:, 1].min()
    hi_x, hi_y = boxes[:, 2].max(), boxes[:, 3].max()
    if panel.points is not None and len(panel.points):
        lo_x, hi_x = min(lo_x, panel.points[:, 0].min()), max(hi_x, panel.points[:, 0].max())
        lo_y, hi_y = min(lo_y, panel.points[:, 1].min()), max(hi_y, panel.points[:, 1].max())
    size = max(hi_x - lo_x, hi_y - lo_y, 8.0)
    margin, pad = PANEL_MARGIN * size, PANEL_PAD * size
    band = IMAGE_BAND * max(width, height)
    # The margin stops at the band; what is drawn (and a pad around it) never does.
    x_min = min(lo_x - pad, max(lo_x - margin, -band))
    x_max = max(hi_x + pad, min(hi_x + margin, width + band))
    y_min = min(lo_y - pad, max(lo_y - margin, -band))
    y_max = max(hi_y + pad, min(hi_y + margin, height + band))
    if x_max <= x_min or y_max <= y_min:  # a degenerate extent on the band's edge
        return lo_x - margin, hi_x + margin, lo_y - margin, hi_y + margin
    return float(x_min), float(x_max), float(y_min), float(y_max)


def legend_entries(
    panels: Sequence[RoIPanel], op_extent_label: str = OP_EXTENT_LABELS["roi_pool"]
) -> Tuple[List[object], List[str]]:
    """The legend: RoI, regular bins, deformed bins, their links, and (when drawn) the op's pooled
    extent and the sampling points."""
    handles: List[object] = [
        Line2D([], [], color=ROI_COLOUR, linewidth=2.0),
        Line2D([], [], color=ROI_COLOUR, linewidth=0.8, linestyle=(0, (3, 2))),
        Line2D([], [], color=DEFORMED_COLOUR, linewidth=1.4, path_effects=_edged(1.4)),
        Line2D(
            [],
            [],
            color=DEFORMED_COLOUR,
            linewidth=0.7,
            marker="o",
            markersize=2.5,
            markevery=[0],
            markeredgecolor=EDGE_COLOUR,
            markeredgewidth=0.4,
            path_effects=_edged(0.7),
        ),
    ]
    labels = ["RoI", "regular bins", "deformed bins", "bin shift (from its regular bin's centre)"]
    if any(panel.shows_op_extent() for panel in panels):
        handles.append(Line2D([], [], color=OP_EXTENT_COLOUR, linewidth=1.2, linestyle=(0, (1, 1))))
        labels.append(op_extent_label)
    if any(panel.points is not None and len(panel.points) for panel in panels):
        handles.append(Line2D([], [], **{**_point_style(), "markersize": 4.0}))
        labels.append("sampling points")
    return handles, labels


def draw_bins_figure(
    image: np.ndarray,
    panels: Sequence[RoIPanel],
    overlay: bool = False,
    title: str = "",
    op_extent_label: str = OP_EXTENT_LABELS["roi_pool"],
) -> Figure:
    """The image with every panel's RoI and bins: one panel each (cropped around the RoI), or all
    overlaid; a legend (``op_extent_label`` names the op's pooled extent) and the titles inside
    the figure (:func:`fit_legend`)."""
    handles, labels = legend_entries(panels, op_extent_label)
    if overlay or not panels:
        fig = _overlay_figure(image, panels, title)
        fit_legend(fig, handles, labels, "outside upper center")
    else:
        fig = _panels_figure(image, panels, title)
        fit_legend(fig, handles, labels, "outside lower center")
    return fig


def _overlay_figure(image: np.ndarray, panels: Sequence[RoIPanel], title: str) -> Figure:
    """All RoIs on one image, each labelled once."""
    height, width = image.shape[:2]
    aspect = width / max(height, 1)
    fig_width = min(12.0, 6.0 * aspect)
    fig = Figure(figsize=(max(fig_width, 6.0), fig_width / aspect + 1.0), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest")
    labelled = set()
    for panel in panels:
        # Several offset sets of one RoI share its label (one text per RoI box).
        key = (panel.roi_label, tuple(panel.roi))
        _draw_panel(ax, panel, draw_roi_label=len(panels) > 1 and key not in labelled)
        labelled.add(key)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def _panels_figure(image: np.ndarray, panels: Sequence[RoIPanel], title: str) -> Figure:
    """One panel per RoI (and offset set), four to a row, each cropped by :func:`panel_limits`."""
    height, width = image.shape[:2]
    columns = min(4, len(panels))
    rows = int(math.ceil(len(panels) / columns))
    fig = Figure(figsize=(3.2 * columns, 3.4 * rows + 0.6), layout="constrained")
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(rows, columns, k + 1)
        ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest")
        _draw_panel(ax, panel)
        x_min, x_max, y_min, y_max = panel_limits(panel, width, height)
        ax.set_xlim(x_min, x_max)
        ax.set_ylim(y_max, y_min)
        ax.set_aspect("equal")
        ax.set_facecolor(OUTSIDE_COLOUR)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(panel.title, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


#: What may overhang the figure's sides before the legend is laid out again (inches: a hair,
#: for rounding; the constrained layout keeps its own pad inside the figure).
OVERHANG = 1e-3


def fit_legend(fig: Figure, handles: Sequence[object], labels: Sequence[str], loc: str) -> None:
    """Add the legend at ``loc`` in as many columns (three at most) as keep it, and every title,
    inside the figure; where even one column (or a title) is wider, widen the figure."""
    legend_in_fitting_columns(
        fig,
        handles,
        labels,
        lambda _: _overflow(fig) <= OVERHANG,
        loc=loc,
        fontsize=8,
        frameon=False,
    )
    for _ in range(3):  # the layout changes with the width: measure again
        excess = _overflow(fig)
        if excess <= OVERHANG:
            return
        fig.set_figwidth(fig.get_figwidth() + excess + 0.1)


def _overflow(fig: Figure) -> float:
    """By how many inches what is drawn (legend and titles included) overhangs the figure's
    sides, after the layout; at most :data:`OVERHANG` when everything is inside."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    fig.draw_without_rendering()
    drawn = fig.get_tightbbox(canvas.get_renderer())
    return max(0.0, -drawn.x0) + max(0.0, drawn.x1 - fig.get_figwidth())
