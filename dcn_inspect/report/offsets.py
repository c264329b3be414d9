"""Figure of ``dcn-inspect offsets``: dense offset maps of deformable layers over the image.

One row per deformable layer (top layer first), and one more per requested kernel point:

- the offset field as flow colours (:func:`flow_colours`: hue = direction, saturation =
  magnitude up to the field's 98th percentile, white = no offset) with its colour-wheel key
  (:func:`draw_colour_wheel`);
- its magnitude as a heat map with a colour bar (image pixels);
- (layer rows) the effective dilation per unit with a colour bar centred on the undeformed
  filter's value, so where the receptive field widens reads red and where it narrows blue;
  both halves of the bar carry ticks and the undeformed value is labelled
  (:func:`dilation_ticks`).

Every map covers its units' cells in original-image pixels (COCO continuous coordinates) over
the image shown in grey, and every panel has the image's limits: one scale for all panels.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.colors import Normalize, TwoSlopeNorm, hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dcn_inspect.analysis.offsets import LayerOffsetMaps, OffsetField

#: Colour map of the magnitude heat maps.
MAGNITUDE_CMAP = "magma"
#: Diverging colour map of the dilation maps (centred on the undeformed filter's value).
DILATION_CMAP = "RdBu_r"
#: Opacity of a map over the (grey) image.
MAP_ALPHA = 0.85
#: The figure shows at most this many rows (layer and kernel-point fields); the npz has all.
MAX_ROWS = 16


def flow_colours(dx: np.ndarray, dy: np.ndarray, max_magnitude: float) -> np.ndarray:
    """RGB [..., 3] in [0, 1] of offset vectors (image x right, y down): hue = direction
    (``atan2(dy, dx)`` from 0 = right, through down, left, up), saturation = magnitude /
    ``max_magnitude`` (clipped to 1), value 1. A zero offset is white."""
    dx, dy = np.asarray(dx, dtype=np.float64), np.asarray(dy, dtype=np.float64)
    hue = np.mod(np.arctan2(dy, dx), 2 * math.pi) / (2 * math.pi)
    saturation = np.clip(np.hypot(dx, dy) / max(float(max_magnitude), 1e-12), 0.0, 1.0)
    return hsv_to_rgb(np.stack([hue, saturation, np.ones_like(hue)], axis=-1))


#: Percentile of a field's magnitudes shown fully saturated (larger ones saturate too), so a few
#: outliers do not wash the flow image out.
SATURATION_PERCENTILE = 98.0


def flow_scale(field: OffsetField) -> float:
    """The magnitude shown fully saturated: the field's :data:`SATURATION_PERCENTILE` th
    percentile (at least 1e-6 px)."""
    magnitude = field.magnitude
    return max(
        float(np.percentile(magnitude, SATURATION_PERCENTILE)) if magnitude.size else 0.0, 1e-6
    )


def _tick(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2g}"


def _grey(image: np.ndarray) -> np.ndarray:
    grey = image[..., :3].astype(np.float64).mean(axis=-1) / 255.0
    return np.repeat((0.35 + 0.5 * grey)[..., None], 3, axis=-1)


def _map_axes(ax: object, image: np.ndarray, title: str) -> None:
    height, width = image.shape[:2]
    ax.imshow(_grey(image), extent=(0, width, height, 0), interpolation="nearest")  # type: ignore[attr-defined]
    ax.set_xlim(0, width)  # type: ignore[attr-defined]
    ax.set_ylim(height, 0)  # type: ignore[attr-defined]
    ax.set_aspect("equal")  # type: ignore[attr-defined]
    ax.tick_params(labelsize=6, length=2)  # type: ignore[attr-defined]
    ax.set_title(title, fontsize=8)  # type: ignore[attr-defined]


def _imshow_extent(maps: LayerOffsetMaps) -> Tuple[float, float, float, float]:
    x0, x1, y0, y1 = maps.extent
    return (x0, x1, y1, y0)  # imshow: left, right, bottom, top (y down)


def draw_colour_wheel(ax: object, max_magnitude: float) -> None:
    """The flow key: the colour of every offset up to ``max_magnitude`` px, x right, y down."""
    n = 129
    grid = np.linspace(-1.0, 1.0, n)
    gx, gy = np.meshgrid(grid, grid)
    rgba = np.ones((n, n, 4))
    rgba[..., :3] = flow_colours(gx, gy, 1.0)
    rgba[..., 3] = (np.hypot(gx, gy) <= 1.0).astype(np.float64)
    r = max_magnitude
    ax.imshow(rgba, extent=(-r, r, r, -r), interpolation="bilinear")  # type: ignore[attr-defined]
    ax.set_xlim(-1.15 * r, 1.15 * r)  # type: ignore[attr-defined]
    ax.set_ylim(1.15 * r, -1.15 * r)  # type: ignore[attr-defined]
    ax.set_aspect("equal")  # type: ignore[attr-defined]
    ax.set_xticks([-r, 0, r])  # type: ignore[attr-defined]
    ax.set_yticks([-r, 0, r])  # type: ignore[attr-defined]
    labels = [_tick(-r), "0", _tick(r)]
    ax.set_xticklabels(labels)  # type: ignore[attr-defined]
    ax.set_yticklabels(labels)  # type: ignore[attr-defined]
    ax.tick_params(labelsize=6, length=2)  # type: ignore[attr-defined]
    ax.set_xlabel("dx (px, right)", fontsize=6, labelpad=1)  # type: ignore[attr-defined]
    ax.set_ylabel("dy (px, down)", fontsize=6, labelpad=1)  # type: ignore[attr-defined]
    ax.set_title("flow key (saturated\nat and beyond the rim)", fontsize=7)  # type: ignore[attr-defined]


def _rows(maps: Sequence[LayerOffsetMaps]) -> List[Tuple[LayerOffsetMaps, OffsetField]]:
    return [(layer, f) for layer in maps for f in layer.fields]


def draw_offsets_figure(
    image: np.ndarray, maps: Sequence[LayerOffsetMaps], title: str = "", max_rows: int = MAX_ROWS
) -> Figure:
    """Rows of [flow, flow key, magnitude, effective dilation] per layer (kernel-point rows leave
    the dilation out: it belongs to the whole filter), over the image in image pixels."""
    height, width = image.shape[:2]
    rows = _rows(maps)[:max_rows]
    panel = 3.0
    aspect = width / max(height, 1)
    fig = Figure(
        figsize=(3 * panel * 1.15 + 1.6, max(1, len(rows)) * (panel / aspect + 0.45) + 0.4),
        layout="constrained",
    )
    grid = fig.add_gridspec(max(1, len(rows)), 4, width_ratios=[1.0, 0.45, 1.15, 1.15])
    for r, (layer, field) in enumerate(rows):
        scale = flow_scale(field)
        flow_ax = fig.add_subplot(grid[r, 0])
        _map_axes(flow_ax, image, f"{layer.layer}\n{field.name}: direction")
        rgba = np.ones((*field.dx.shape, 4))
        rgba[..., :3] = flow_colours(field.dx, field.dy, scale)
        rgba[..., 3] = MAP_ALPHA
        flow_ax.imshow(rgba, extent=_imshow_extent(layer), interpolation="nearest")
        flow_ax.set_xlim(0, width)
        flow_ax.set_ylim(height, 0)

        draw_colour_wheel(fig.add_subplot(grid[r, 1]), scale)

        magnitude_ax = fig.add_subplot(grid[r, 2])
        _map_axes(magnitude_ax, image, f"{field.name}: magnitude")
        top = max(float(field.magnitude.max()), 1e-6)
        shown = magnitude_ax.imshow(
            field.magnitude,
            extent=_imshow_extent(layer),
            cmap=MAGNITUDE_CMAP,
            norm=Normalize(0.0, top),
            alpha=MAP_ALPHA,
            interpolation="nearest",
        )
        magnitude_ax.set_xlim(0, width)
        magnitude_ax.set_ylim(height, 0)
        bar = fig.colorbar(shown, ax=magnitude_ax, fraction=0.046, pad=0.02)
        bar.set_label("|offset| (image px)", fontsize=7)
        bar.ax.tick_params(labelsize=6)

        if field.kernel_point is None:
            _draw_dilation(fig, fig.add_subplot(grid[r, 3]), image, layer)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def _draw_dilation(fig: Figure, ax: object, image: np.ndarray, layer: LayerOffsetMaps) -> None:
    height, width = image.shape[:2]
    undeformed = layer.undeformed_dilation
    if not math.isfinite(undeformed):  # a 1x1 kernel: no pair of sampling points
        ax.set_title(layer.no_dilation, fontsize=8)  # type: ignore[attr-defined]
        ax.set_axis_off()  # type: ignore[attr-defined]
        return
    _map_axes(ax, image, f"effective dilation (undeformed: {undeformed:.3g} px)")
    values = layer.dilation
    finite = values[np.isfinite(values)]
    tiny = 1e-3 * max(abs(undeformed), 1.0)
    low = min(float(finite.min()) if finite.size else undeformed, undeformed - tiny)
    high = max(float(finite.max()) if finite.size else undeformed, undeformed + tiny)
    shown = ax.imshow(  # type: ignore[attr-defined]
        values,
        extent=_imshow_extent(layer),
        cmap=DILATION_CMAP,
        norm=TwoSlopeNorm(undeformed, low, high),
        alpha=MAP_ALPHA,
        interpolation="nearest",
    )
    ax.set_xlim(0, width)  # type: ignore[attr-defined]
    ax.set_ylim(height, 0)  # type: ignore[attr-defined]
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label("effective dilation (image px)", fontsize=7)
    bar.ax.axhline(undeformed, color="black", linewidth=1.0)
    ticks = dilation_ticks(low, undeformed, high, tiny)
    bar.set_ticks([t for t, _ in ticks], labels=[text for _, text in ticks])
    bar.ax.tick_params(labelsize=6)


def dilation_ticks(
    low: float, undeformed: float, high: float, tiny: float = 0.0
) -> List[Tuple[float, str]]:
    """(value, label) ticks of the diverging dilation bar, each half filling half the bar however
    short its range: the undeformed value ("16 undeformed"), and on each half round values
    clear of it (else the half's end). A half no wider than ``tiny`` holds no unit (the bar
    keeps it so that the norm has two slopes): its end says "none narrower" / "none wider"."""
    ticks: List[float] = [undeformed]
    empty: Dict[float, str] = {}
    for start, end, none in ((low, undeformed, "none narrower"), (undeformed, high, "none wider")):
        span = end - start
        outer = start if end == undeformed else end
        if span <= tiny * (1 + 1e-9):
            ticks.append(outer)
            empty[outer] = none
            continue
        inside = [
            float(t)
            for t in MaxNLocator(nbins=3).tick_values(start, end)
            if start <= t <= end and abs(t - undeformed) > 0.25 * span
        ]
        ticks += inside or [outer]
    ticks.sort()
    texts = [f"{t:.3g}" for t in ticks]
    for digits in range(4, 7):  # as few significant digits as tell the ticks apart
        if len(set(texts)) == len(texts):
            break
        texts = [f"{t:.{digits}g}" for t in ticks]
    return [
        (t, f"{text} undeformed" if t == undeformed else empty.get(t, text))
        for t, text in zip(ticks, texts)
    ]


def rows_left_out(maps: Sequence[LayerOffsetMaps], max_rows: int = MAX_ROWS) -> Optional[int]:
    """How many rows the figure leaves out (None when it shows them all)."""
    total = len(_rows(maps))
    return total - max_rows if total > max_rows else None
