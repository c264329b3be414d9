"""Figure of ``dcn-inspect bins``: RoIs in yellow, regular bins thin, deformed bins in red (Fig. 7).

Everything is drawn in original-image pixel coordinates (COCO continuous: pixel (r, c) covers
[c, c+1] x [r, r+1]), so the image is shown with ``extent=(0, W, H, 0)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

ROI_COLOUR = "#ffd400"
DEFORMED_COLOUR = "#ff1a1a"
POINT_COLOUR = "#00e5ff"

#: Context kept around a panel's RoI and bins, as a fraction of the RoI's longer side.
PANEL_MARGIN = 0.25


@dataclass
class RoIPanel:
    """One RoI with one offset set: boxes are (x1, y1, x2, y2) in original-image pixels."""

    title: str
    roi: Tuple[float, float, float, float]
    regular: np.ndarray  # [ph, pw, 4]
    deformed: np.ndarray  # [ph, pw, 4]
    points: Optional[np.ndarray] = None  # [N, 2] (x, y)
    roi_label: str = ""  # short name of the RoI, written once per RoI in overlay figures


def _draw_panel(ax: object, panel: RoIPanel, draw_roi_label: bool = False) -> None:
    x1, y1, x2, y2 = panel.roi
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=ROI_COLOUR, linewidth=2.0))  # type: ignore[attr-defined]
    for box in panel.regular.reshape(-1, 4):
        ax.add_patch(  # type: ignore[attr-defined]
            Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, edgecolor=ROI_COLOUR, linewidth=0.6, linestyle=(0, (3, 2)))
        )
    for box in panel.deformed.reshape(-1, 4):
        ax.add_patch(  # type: ignore[attr-defined]
            Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, edgecolor=DEFORMED_COLOUR, linewidth=1.4)
        )
    if panel.points is not None and len(panel.points):
        ax.plot(panel.points[:, 0], panel.points[:, 1], linestyle="none", marker=".", markersize=2.5, color=POINT_COLOUR)  # type: ignore[attr-defined]
    if draw_roi_label:
        ax.text(x1, y1, panel.roi_label or panel.title, color="black", fontsize=6, va="bottom", bbox={"facecolor": ROI_COLOUR, "pad": 1, "linewidth": 0})  # type: ignore[attr-defined]


def _panel_limits(panel: RoIPanel, width: int, height: int) -> Tuple[float, float, float, float]:
    """(x_min, x_max, y_min, y_max) covering the RoI, its bins and a margin of context."""
    boxes = np.concatenate([np.asarray(panel.roi, dtype=np.float64)[None], panel.regular.reshape(-1, 4), panel.deformed.reshape(-1, 4)])
    lo_x, lo_y = boxes[:, 0].min(), boxes[:, 1].min()
    hi_x, hi_y = boxes[:, 2].max(), boxes[:, 3].max()
    if panel.points is not None and len(panel.points):
        lo_x, hi_x = min(lo_x, panel.points[:, 0].min()), max(hi_x, panel.points[:, 0].max())
        lo_y, hi_y = min(lo_y, panel.points[:, 1].min()), max(hi_y, panel.points[:, 1].max())
    margin = PANEL_MARGIN * max(hi_x - lo_x, hi_y - lo_y, 8.0)
    return lo_x - margin, hi_x + margin, lo_y - margin, hi_y + margin


def draw_bins_figure(image: np.ndarray, panels: Sequence[RoIPanel], overlay: bool = False, title: str = "") -> Figure:
    """The image with every panel's RoI and bins: one panel each (cropped around the RoI), or all overlaid."""
    height, width = image.shape[:2]
    extent = (0, width, height, 0)
    if overlay or not panels:
        aspect = width / max(height, 1)
        fig_width = min(12.0, 6.0 * aspect)
        fig = Figure(figsize=(fig_width, fig_width / aspect + 0.4), layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
        ax.imshow(image, extent=extent, interpolation="nearest")
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
    columns = min(4, len(panels))
    rows = int(math.ceil(len(panels) / columns))
    fig = Figure(figsize=(3.2 * columns, 3.4 * rows), layout="constrained")
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(rows, columns, k + 1)
        ax.imshow(image, extent=extent, interpolation="nearest")
        _draw_panel(ax, panel)
        x_min, x_max, y_min, y_max = _panel_limits(panel, width, height)
        ax.set_xlim(x_min, x_max)
        ax.set_ylim(y_max, y_min)
        ax.set_aspect("equal")
        ax.set_facecolor("#404040")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(panel.title, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig
