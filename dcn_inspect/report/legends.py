"""Legends that stay inside the saved image: the one rule the figures share.

A figure's legend takes as many columns (three at most) as it can while it still fits; a legend
that does not fit even in one column is left in one, and the caller widens the figure (how "fits"
is measured is the caller's: the legend's own width, or everything drawn after the layout).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from matplotlib.figure import Figure

__all__ = ["MAX_LEGEND_COLUMNS", "legend_in_fitting_columns"]

#: The most columns a figure legend is laid out in.
MAX_LEGEND_COLUMNS = 3


def legend_in_fitting_columns(
    fig: Figure,
    handles: Sequence[object],
    labels: Sequence[str],
    fits: Callable[[Any], bool],
    **legend_kwargs: Any,
) -> Any:
    """``fig.legend(handles, labels, **legend_kwargs)`` in the most columns (at most
    :data:`MAX_LEGEND_COLUMNS`) for which ``fits(legend)`` holds, else in one column."""
    for ncols in range(min(MAX_LEGEND_COLUMNS, len(handles)), 0, -1):
        legend = fig.legend(handles, labels, ncols=ncols, **legend_kwargs)
        if ncols == 1 or fits(legend):
            return legend
        legend.remove()
    raise ValueError("a legend needs at least one entry")
