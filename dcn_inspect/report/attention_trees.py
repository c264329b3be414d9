"""Figure of ``dcn-inspect attention --levels D``: an encoder token's sampling tree through the
encoder layers, depth by colour (the attention analogue of the ``sample-points`` figure).

One panel per token: the image in its grey band (the view of
:func:`dcn_inspect.report.attention.view_limits`, every panel at one scale), the token's own
point as a green cross, and the tree's points by depth: the deepest depth red, the others in
``sample-points``' level colours, each point's opacity the square root of its weight relative to
the heaviest point of its depth (the head-mean path weight of
:mod:`dcn_inspect.analysis.attention_trees`), the heaviest drawn last, its dark edge fading with
it. Shallower depths are drawn above deeper ones and larger, so the few points near the token
stay visible over the many of the deepest depth. The legend (one entry per depth with the layer
it samples, the token, the band; headed by the title) lies inside the image.
"""

from __future__ import annotations

import math
from typing import Any, List, Sequence, Tuple

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from dcn_inspect.report.attention import (
    EDGE_COLOUR,
    PANEL_SIZE,
    REFERENCE_AREA,
    REFERENCE_COLOUR,
    AttentionPanel,
    view_limits,
)
from dcn_inspect.report.legends import legend_in_fitting_columns
from dcn_inspect.report.sample_points import BAND_COLOUR, LEVEL_COLOURS, POINT_COLOUR, View

__all__ = ["MAX_TREE_PANELS", "depth_colour", "draw_tree_figure"]

#: The figure shows at most this many tokens (the CSV has all of them).
MAX_TREE_PANELS = 12
#: Marker area of the deepest depth; each shallower depth is drawn larger by this factor.
DEEPEST_AREA = 9.0
SHALLOWER_GROWTH = 2.2
#: Opacity of the lightest points (the heaviest of a depth is opaque).
MIN_ALPHA = 0.05


def depth_colour(depth: int, deepest: int) -> str:
    """The deepest depth red, as ``sample-points`` draws its deepest level; the others in its
    level colours, depth 1 first."""
    return POINT_COLOUR if depth == deepest else LEVEL_COLOURS[(depth - 1) % len(LEVEL_COLOURS)]


def _draw_depth(ax: Any, points: pd.DataFrame, depth: int, deepest: int, view: View) -> None:
    weights = points["weight"].to_numpy(dtype=np.float64)
    order = np.argsort(weights, kind="stable")
    top = float(weights.max()) if weights.size else 1.0
    # Square root: a depth's weights span decades, and a linear ramp hides all but the top few.
    alpha = MIN_ALPHA + (1 - MIN_ALPHA) * np.sqrt(weights[order] / (top if top > 0 else 1.0))
    colours = np.tile(np.asarray(to_rgba(depth_colour(depth, deepest))), (len(order), 1))
    colours[:, 3] = alpha
    # The dark edge fades with the point: thousands of light points must not blacken the image.
    edges = np.tile(np.asarray(to_rgba(EDGE_COLOUR)), (len(order), 1))
    edges[:, 3] = alpha
    xs, ys = view.pin(
        points["x"].to_numpy(dtype=np.float64)[order],
        points["y"].to_numpy(dtype=np.float64)[order],
    )
    area = DEEPEST_AREA * SHALLOWER_GROWTH ** (deepest - depth)
    ax.scatter(
        xs, ys, s=area, c=colours, edgecolors=edges, linewidths=0.3,
        zorder=3 + (deepest - depth),
    )  # fmt: skip


def _draw_panel(
    ax: Any, image: np.ndarray, panel: AttentionPanel, tree: pd.DataFrame, view: View
) -> None:
    height, width = image.shape[:2]
    ax.add_patch(
        Rectangle(
            (view.x0, view.y0), view.width, view.height, facecolor=BAND_COLOUR,
            edgecolor="none", zorder=0,
        )
    )  # fmt: skip
    ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest", zorder=1)
    deepest = int(tree["depth"].max()) if len(tree) else 1
    for depth in sorted(set(int(d) for d in tree["depth"]), reverse=True):
        _draw_depth(ax, tree[tree["depth"] == depth], depth, deepest, view)
    if panel.reference is not None:
        xs, ys = view.pin(np.array([panel.reference[0]]), np.array([panel.reference[1]]))
        ax.scatter(
            xs, ys, s=REFERENCE_AREA, marker="+", c=REFERENCE_COLOUR, linewidths=2.2,
            zorder=10 + deepest,
        )  # fmt: skip
    ax.set_title(f"{panel.label} · ({panel.reference[0]:.1f}, {panel.reference[1]:.1f})"
                 if panel.reference is not None else panel.label, fontsize=7)  # fmt: skip
    ax.set_xlim(view.x0, view.x1)
    ax.set_ylim(view.y1, view.y0)
    ax.set_aspect("equal")
    ax.set_axis_off()


def _legend(depth_layers: Sequence[Tuple[int, str]]) -> Tuple[List[object], List[str]]:
    deepest = max((d for d, _ in depth_layers), default=1)
    handles: List[object] = []
    labels: List[str] = []
    for depth, layer in depth_layers:
        handles.append(
            Line2D([], [], linestyle="none", marker="o", markersize=6,
                   markerfacecolor=depth_colour(depth, deepest), markeredgecolor=EDGE_COLOUR)
        )  # fmt: skip
        labels.append(f"depth {depth}: points of {layer}")
    handles.append(
        Line2D([], [], linestyle="none", marker="+", markersize=11, markeredgewidth=2.2,
               color=REFERENCE_COLOUR)
    )  # fmt: skip
    labels.append("the token (query)")
    handles.append(Patch(facecolor=BAND_COLOUR, edgecolor="none"))
    labels.append("outside the image (farther points on the band's edge)")
    handles.append(Patch(facecolor="none", edgecolor="none"))
    labels.append("opacity: sqrt(weight / the depth's heaviest)")
    return handles, labels


def draw_tree_figure(
    image: np.ndarray,
    panels: Sequence[Tuple[AttentionPanel, pd.DataFrame]],
    depth_layers: Sequence[Tuple[int, str]],
    title: str,
) -> Figure:
    """One panel per (token panel, its tree rows) (at most :data:`MAX_TREE_PANELS`): the tree's
    points by depth (``depth_layers``: each depth and the layer whose points it holds)."""
    shown = list(panels)[:MAX_TREE_PANELS]
    height, width = image.shape[:2]
    view = view_limits([(tree_panel(p, t), None) for p, t in shown], width, height)
    columns = min(3, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / columns))
    aspect = view.width / max(view.height, 1e-9)
    panel_w, panel_h = (PANEL_SIZE, PANEL_SIZE / aspect) if aspect >= 1 else (
        PANEL_SIZE * aspect, PANEL_SIZE)  # fmt: skip
    fig = Figure(figsize=(max(panel_w * columns, 4.5) + 0.2, 1.0), layout="constrained")
    handles, labels = _legend(depth_layers)
    renderer = FigureCanvasAgg(fig).get_renderer()

    def inches(legend: Any) -> Any:
        return legend.get_window_extent(renderer).transformed(fig.dpi_scale_trans.inverted())

    legend = legend_in_fitting_columns(
        fig, handles, labels, lambda drawn: inches(drawn).width + 0.3 <= fig.get_figwidth(),
        loc="outside upper center", fontsize=8, frameon=False, title=title or None,
        title_fontsize=9,
    )  # fmt: skip
    box = inches(legend)
    fig.set_figwidth(max(fig.get_figwidth(), box.width + 0.3))
    fig.set_figheight(rows * (panel_h + 0.35) + box.height + 0.2)
    grid = fig.add_gridspec(rows, columns)
    for index, (panel, tree) in enumerate(shown):
        ax = fig.add_subplot(grid[index // columns, index % columns])
        _draw_panel(ax, image, panel, tree, view)
    return fig


def tree_panel(panel: AttentionPanel, tree: pd.DataFrame) -> AttentionPanel:
    """``panel`` with the tree's points (what :func:`view_limits` measures the band on)."""

    class _Tree:
        kind = panel.kind
        reference = panel.reference
        box = None
        points = tree

    return _Tree()  # type: ignore[return-value]
