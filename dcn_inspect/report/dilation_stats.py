"""Figure of ``dcn-inspect dilation-stats``: per-layer distributions of effective dilation by
object-size category (``dilation_hist.png``).

One panel per layer (top layer first), one density curve per category, drawn from the
streaming histograms (no per-unit values are kept). The fine 0.1 % log bins are summed into
at most 60 equal-width display bins (each at least two fine bins wide, so they do not alias)
over the central 99 % of the layer's values; each panel has its own x range. Each curve is
normalised to unit area so categories with very different unit counts compare by shape. The
mean of each category is marked with a dashed line.
"""

from __future__ import annotations

import math
from typing import Dict

import numpy as np
from matplotlib.figure import Figure

from dcn_inspect.analysis.category_stats import CategoryStats
from dcn_inspect.analysis.dilation_stats import CATEGORIES

#: Category colours (colour-blind safe, Okabe-Ito).
COLOURS = {"small": "#0072B2", "medium": "#009E73", "large": "#D55E00", "background": "#7F7F7F"}
DISPLAY_BINS = 60
MIN_DISPLAY_BINS = 8
#: Panels per figure row.
COLUMNS = 3


def display_range(layer_stats: CategoryStats) -> tuple:
    """(low, high) covering the central 99 % of every non-empty category of one layer."""
    lows, highs = [], []
    for c in range(layer_stats.categories):
        if int(layer_stats.count[c]) > 0:
            lows.append(layer_stats.quantile(c, 0.005))
            highs.append(layer_stats.quantile(c, 0.995))
    if not lows:
        return 0.0, 1.0
    low, high = min(lows), max(highs)
    if not high > low:  # constant data: a window around the value
        pad = max(abs(low) * 0.1, 0.5)
        low, high = low - pad, high + pad
    return max(low, 0.0), high


def display_bins(layer_stats: CategoryStats, low: float, high: float) -> int:
    """At most :data:`DISPLAY_BINS`, each at least two fine bins wide (narrower ones alias into combs)."""
    fine_width = max(high, layer_stats.bins.low) * (layer_stats.bins.ratio - 1.0)
    return int(min(DISPLAY_BINS, max(MIN_DISPLAY_BINS, (high - low) // (2.0 * fine_width))))


def category_density(layer_stats: CategoryStats, category: int, edges: np.ndarray) -> np.ndarray:
    """Density over ``edges`` of one category, rebinned from the fine log bins (bin centres)."""
    hist = layer_stats.hist[category].cpu().numpy().astype(np.float64)
    bins = layer_stats.bins
    index = np.arange(bins.count, dtype=np.float64)
    centres = np.where(index == 0, bins.low / 2.0, bins.low * bins.ratio ** (index - 0.5))
    # Values sitting exactly on the min/max (e.g. constant data) are placed at the exact extremes.
    centres = np.clip(
        centres, float(layer_stats.minimum[category]), float(layer_stats.maximum[category])
    )
    counts, _ = np.histogram(centres, bins=edges, weights=hist)
    total = counts.sum()
    return counts / (total * np.diff(edges)) if total > 0 else counts


def draw_dilation_histograms(
    stats: Dict[str, CategoryStats], units: str, thresholds_name: str
) -> Figure:
    """One panel per layer of ``stats`` (in the given order), one curve per category."""
    names = list(stats)
    columns = min(COLUMNS, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / columns))
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows), constrained_layout=True)
    for k, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, k + 1)
        layer_stats = stats[name]
        # Each layer on its own range: deformation differs a lot between layers.
        low, high = display_range(layer_stats)
        edges = np.linspace(low, high, display_bins(layer_stats, low, high) + 1)
        centres = 0.5 * (edges[:-1] + edges[1:])
        for c, category in enumerate(CATEGORIES):
            n = int(layer_stats.count[c])
            if n == 0:
                continue
            density = category_density(layer_stats, c, edges)
            colour = COLOURS[category]
            axes.step(centres, density, where="mid", color=colour, label=f"{category} (n={n})")
            axes.axvline(float(layer_stats.mean[c]), color=colour, linestyle="--", linewidth=0.8)
        axes.set_title(name, fontsize=10)
        axes.set_xlabel(f"effective dilation ({units})")
        axes.set_ylabel("density")
        axes.set_xlim(low, high)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7, frameon=False)
    figure.suptitle(
        f"Effective dilation by object size (thresholds: {thresholds_name}; dashed: mean)",
        fontsize=11,
    )
    return figure
