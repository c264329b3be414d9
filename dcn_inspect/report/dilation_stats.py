"""Reports of ``dcn-inspect dilation-stats``: the Markdown tables (``dilation_table.md``) and
the per-layer distributions of effective dilation by object-size category
(``dilation_hist.png``).

The tables render ``dilation_table.csv`` in the paper's Table 2 layout (:func:`table2_rows`:
layers as rows, top first; categories as columns; ``mean ± std [95 % interval]``) and
``dilation_differences.csv`` as one row per layer (:func:`table_markdown`).

The figure (:func:`draw_dilation_histograms`) has one panel per layer (top layer first), one
density curve per category, drawn from the streaming histograms (no per-unit values are kept).
The fine 0.1 % log bins are summed into at most 60 equal-width display bins (each at least two
fine bins wide, so they do not alias) over the central 99 % of the layer's values; each panel
has its own x range. Each curve is normalised to unit area so categories with very different
unit counts compare by shape. The mean of each category is marked with a dashed line.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

from dcn_inspect.analysis.category_stats import CategoryStats
from dcn_inspect.analysis.size_categories import CATEGORIES

#: Category colours (colour-blind safe, Okabe-Ito).
COLOURS = {"small": "#0072B2", "medium": "#009E73", "large": "#D55E00", "background": "#7F7F7F"}
DISPLAY_BINS = 60
MIN_DISPLAY_BINS = 8
#: Panels per figure row.
COLUMNS = 3
#: One panel's size, inches (axes and the labels around them).
PANEL_WIDTH, PANEL_HEIGHT = 4.2, 3.2
#: Panel title and suptitle font sizes, points.
TITLE_SIZE, SUPTITLE_SIZE = 10, 11
#: Space kept around texts, points.
TEXT_PAD = 4.0


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
    """At most :data:`DISPLAY_BINS`, each at least two fine bins wide (narrower ones alias into
    combs)."""
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
    stats: Dict[str, CategoryStats],
    units: str,
    thresholds_name: str,
    titled: Callable[[str], str] = str,
) -> Figure:
    """One panel per layer of ``stats`` (in the given order), one curve per category; ``titled``
    completes the figure's title (:meth:`~dcn_inspect.models.loaded_model.LoadedModel.titled`
    says "random weights")."""
    names = list(stats)
    columns = min(COLUMNS, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / columns))
    title = titled(
        f"Effective dilation by object size (thresholds: {thresholds_name}; dashed: mean)"
    )
    # Wrapped to the figure's width (about 12 characters of 11 pt text per inch): one panel's
    # figure is narrower than the title.
    title = textwrap.fill(title, width=int(PANEL_WIDTH * columns * 12))
    title_height = (title.count("\n") + 1) * SUPTITLE_SIZE * 1.2 + 2 * TEXT_PAD  # points
    figure = Figure(figsize=(PANEL_WIDTH * columns, PANEL_HEIGHT * rows + title_height / 72))
    axes_list = [figure.add_subplot(rows, columns, k + 1) for k in range(len(names))]
    for axes, name in zip(axes_list, names):
        _draw_layer(axes, name, stats[name], units)
    figure.suptitle(title, fontsize=SUPTITLE_SIZE, y=1 - TEXT_PAD / 72 / figure.get_figheight())
    _place_panels(figure, axes_list, (rows, columns), title_height)
    return figure


def _draw_layer(axes: Axes, name: str, layer_stats: CategoryStats, units: str) -> None:
    """One layer's panel: a density curve and a dashed mean per non-empty category."""
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
    axes.set_title(name, fontsize=TITLE_SIZE)
    axes.set_xlabel(f"effective dilation ({units})")
    axes.set_ylabel("density")
    axes.set_xlim(low, high)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7, frameon=False)


def _place_panels(
    figure: Figure, axes_list: List[Axes], grid: Tuple[int, int], title_height: float
) -> None:
    """Margins from the texts' measured sizes: the widest tick labels of any panel, one line of
    tick labels, axis label and panel title; ``title_height`` (points) on top for the suptitle.

    A fixed layout computed once: matplotlib's constrained layout measured every tick of every
    panel in an extra draw, a second of a 13-panel figure's saving (``bench/commands.py``).
    """
    rows, columns = grid
    width, height = figure.get_figwidth() * 72, figure.get_figheight() * 72  # points
    label_size = FontProperties(size=mpl.rcParams["axes.labelsize"]).get_size_in_points()
    tick_size = FontProperties(size=mpl.rcParams["ytick.labelsize"]).get_size_in_points()
    tick_room = mpl.rcParams["ytick.major.size"] + mpl.rcParams["ytick.major.pad"]
    label_room = label_size * 1.2 + mpl.rcParams["axes.labelpad"]
    figure.subplots_adjust(left=0.1, right=0.9)  # positions for the locators; final below
    renderer, font = RendererAgg(1, 1, 72), FontProperties(size=tick_size)  # 72 dpi: points
    widest_y = max([_widest_tick_label(a.yaxis, renderer, font) for a in axes_list] + [0.0])
    widest_x = max([_widest_tick_label(a.xaxis, renderer, font) for a in axes_list] + [0.0])
    left = TEXT_PAD + label_room + tick_room + widest_y
    right = TEXT_PAD + widest_x / 2  # a tick at the right end is centred on the frame's edge
    bottom = TEXT_PAD + label_room + tick_room + tick_size * 1.2
    top = TEXT_PAD + mpl.rcParams["axes.titlepad"] + TITLE_SIZE * 1.2
    cell_width, cell_height = width / columns, (height - title_height) / rows
    axes_width, axes_height = cell_width - left - right, cell_height - top - bottom
    figure.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - (title_height + top) / height,
        wspace=(left + right) / axes_width,
        hspace=(top + bottom) / axes_height,
    )


def _widest_tick_label(axis: Axis, renderer: RendererAgg, font: FontProperties) -> float:
    """Width (``renderer``'s pixels) of the widest tick label ``axis`` will draw: its locator
    and formatter on its view limits, as the draw calls them."""
    low, high = sorted(axis.get_view_interval())
    locations = [v for v in axis.get_major_locator()() if low <= v <= high]
    labels = axis.get_major_formatter().format_ticks(locations)
    sizes = [renderer.get_text_width_height_descent(t, font, ismath="$" in t) for t in labels]
    return max([float(size[0]) for size in sizes] + [0.0])


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table2Row:
    """One row of the paper's Table 2 layout: a layer (and offset group), and per category the
    text ``mean ± std`` and its 95 % interval ``[low, high]`` ("–" where the category is
    empty)."""

    layer: str
    group: Optional[int]
    means: List[str]
    intervals: List[str]


def table2_rows(table: pd.DataFrame) -> List[Table2Row]:
    """``dilation_table.csv`` rows in the Table 2 layout (layers top first, categories as
    columns)."""
    keys = ["layer", "group"] if "group" in table.columns else ["layer"]
    rows: List[Table2Row] = []
    for key, part in table.groupby(keys, sort=False):
        layer, group = (
            (key[0], int(key[1]))
            if len(keys) == 2
            else (key[0] if isinstance(key, tuple) else key, None)
        )
        means, intervals = [], []
        for category in CATEGORIES:
            row = part[part["category"] == category].iloc[0]
            empty = row["count"] == 0
            means.append("–" if empty else f"{row['mean']:.2f} ± {row['std']:.2f}")
            intervals.append(
                "–"
                if empty or "ci_low" not in row or pd.isna(row["ci_low"])
                else f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
            )
        rows.append(Table2Row(str(layer), group, means, intervals))
    return rows


def difference_label(first: str, second: str) -> str:
    return f"{first} − {second}"


def difference_text(row: Any) -> Tuple[str, str]:
    """A ``dilation_differences.csv`` row as text: the difference and its interval ("–" if
    undefined)."""
    if pd.isna(row["difference"]):
        return "–", "–"
    interval = "–" if pd.isna(row["ci_low"]) else f"[{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"
    return f"{row['difference']:+.2f}", interval


def table_markdown(
    table: pd.DataFrame,
    units: str,
    thresholds_name: str,
    thresholds: Tuple[float, float],
    differences: Optional[pd.DataFrame] = None,
    title: str = "Effective dilation",
) -> str:
    """The paper's Table 2 layout: layers as rows (top first), categories as columns,
    ``mean ± std [95 % interval of the mean]`` (intervals where the table has them); then the
    differences of means with their intervals."""
    lines = _means_markdown(table, units, title)
    lines += _categories_legend(table, thresholds_name, thresholds)
    if differences is not None and len(differences):
        lines += _differences_markdown(differences, units, "group" in table.columns)
    return "\n".join(lines)


def _means_markdown(table: pd.DataFrame, units: str, title: str) -> List[str]:
    """The title and the Table 2 rows: ``mean ± std [interval]`` per layer and category."""
    per_group = "group" in table.columns
    interval_note = " [95 % confidence interval of the mean]" if "ci_low" in table.columns else ""
    lines = [
        f"# {title} (mean ± std{interval_note}, {units})",
        "",
        _lead(per_group) + " | ".join(CATEGORIES) + " |",
        _rule(per_group, len(CATEGORIES)),
    ]
    for row in table2_rows(table):
        cells = [
            mean if interval == "–" else f"{mean} {interval}"
            for mean, interval in zip(row.means, row.intervals)
        ]
        lines.append(
            f"| {row.layer} | "
            + (f"{row.group} | " if per_group else "")
            + " | ".join(cells)
            + " |"
        )
    return lines


def _categories_legend(
    table: pd.DataFrame, thresholds_name: str, thresholds: Tuple[float, float]
) -> List[str]:
    """Units per category, what the categories mean and where the intervals come from."""
    counts = table.groupby("category", sort=False)["count"].max()
    lines = [
        "",
        "Units per category (largest layer): "
        + ", ".join(f"{c} {int(counts.get(c, 0))}" for c in CATEGORIES)
        + ".",
        f"Categories by box area in original-image pixels² ({thresholds_name}): "
        f"small < {thresholds[0]:g} <= medium < {thresholds[1]:g} <= large;",
        "background = filter centre inside no ground-truth box. "
        "Units inside only crowd/difficult boxes are not counted.",
    ]
    if "ci_low" in table.columns:
        lines.append(
            "Intervals: percentile bootstrap over images "
            "(summary.json `statistics.confidence_intervals`)."
        )
    return lines + [""]


def _differences_markdown(differences: pd.DataFrame, units: str, per_group: bool) -> List[str]:
    """The differences of category means with their intervals, one row per layer (and group
    with ``per_group``)."""
    pairs = list(dict.fromkeys(zip(differences["category_a"], differences["category_b"])))
    lines = [
        f"## Differences of means ({units}, 95 % confidence interval)",
        "",
        _lead(per_group) + " | ".join(difference_label(a, b) for a, b in pairs) + " |",
        _rule(per_group, len(pairs)),
    ]
    keys = ["layer", "group"] if per_group else ["layer"]
    for key, part in differences.groupby(keys, sort=False):
        layer = key[0] if isinstance(key, tuple) else key
        texts = [
            " ".join(difference_text(row)) if not pd.isna(row["difference"]) else "–"
            for _, row in part.iterrows()
        ]
        lines.append(
            f"| {layer} | " + (f"{int(key[1])} | " if per_group else "") + " | ".join(texts) + " |"
        )
    return lines + [""]


def _lead(per_group: bool) -> str:
    """A Markdown table's first header cells: the layer, and the group with ``per_group``."""
    return "| layer | group | " if per_group else "| layer | "


def _rule(per_group: bool, columns: int) -> str:
    """A Markdown header rule: the layer left-aligned, the group and ``columns`` right-aligned."""
    return "|---|" + ("---:|" if per_group else "") + "---:|" * columns
