"""The reports' tables as text: each table's cells are written once, then drawn as Markdown (the
files the commands write, the sample weights' model card) or as a rich table (the console).

A table is a header (one name per column) and rows of cells (strings). :func:`markdown_table`
draws it in one of two rules: with alignment (``|---|---:|``, ``align`` one letter per column,
``l`` or ``r``) or plain (``| --- | --- |``, the model card's tables).

The foreground table (``bins``; the paper's Fig. 7 measured, a row per ground-truth class and
the overall row, columns :data:`dcn_inspect.analysis.bins_foreground.TABLE_COLUMNS`) reads

    class | RoIs | images | regular bins | deformed bins | gain [95 % CI] | RoIs improved

with the number of RoIs and of the images they come from, the mean fractions of sampling
points on the object's mask in % (one decimal), the gain ``fg_deformed - fg_regular`` in
percentage points (signed, one decimal) followed by its 95 % bootstrap interval ``[low, high]``
(left out when the interval is not finite or the row's RoIs come from fewer than
:data:`~dcn_inspect.analysis.bins_foreground.MIN_INTERVAL_IMAGES` images: a bootstrap over one
image has no spread), and the share of RoIs whose deformed bins score higher in whole %.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, List, Mapping, Optional, Sequence, Union

from dcn_inspect.analysis.bins_foreground import MIN_INTERVAL_IMAGES

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "FOREGROUND_CONSOLE_HEADER",
    "FOREGROUND_HEADER",
    "FOREGROUND_TITLE",
    "foreground_cells",
    "foreground_console_table",
    "foreground_markdown",
    "foreground_measure_cells",
    "foreground_rows",
    "markdown_table",
]

#: One row of the foreground table: ``group``, ``rois``, ``images``, ``fg_regular``,
#: ``fg_deformed``, ``gain``, ``gain_ci_low``, ``gain_ci_high``, ``improved`` (fractions, 0..1).
Row = Mapping[str, Any]

#: The foreground table's title on the console.
FOREGROUND_TITLE = "Bin sampling points on the object's mask (mean over RoIs)"
#: Its columns in ``foreground_table.md``, and their alignment.
FOREGROUND_HEADER = (
    "class",
    "RoIs",
    "images",
    "regular bins",
    "deformed bins",
    "gain [95 % CI]",
    "RoIs improved",
)
FOREGROUND_ALIGN = "lrrrrlr"
#: Its columns on the console (short, and drawn without outer edges or inner rules, so the
#: table fits 80 columns), and their alignment.
FOREGROUND_CONSOLE_HEADER = (
    "class",
    "RoIs",
    "images",
    "regular",
    "deformed",
    "gain [95% CI]",
    "improved",
)
FOREGROUND_CONSOLE_ALIGN = "lrrrrrr"


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[str]], align: Optional[str] = None
) -> str:
    """``| a | b |`` lines: the header, the rule, one line per row; no final newline.

    ``align``: one letter per column, ``l`` (``---``) or ``r`` (``---:``), drawn as
    ``|---|---:|``; ``None``: the plain rule ``| --- | --- |``.
    """
    if align is None:
        rule = "| " + " | ".join("---" for _ in header) + " |"
    else:
        rule = "|" + "".join(("---:" if side == "r" else "---") + "|" for side in align)
    lines = [_markdown_line(header), rule]
    lines.extend(_markdown_line(cells) for cells in rows)
    return "\n".join(lines)


def _markdown_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def foreground_measure_cells(row: Row) -> List[str]:
    """The measured cells of one row: regular and deformed fraction (%), gain (pt) with its
    interval (none when not finite, or when ``row`` counts fewer than
    :data:`~dcn_inspect.analysis.bins_foreground.MIN_INTERVAL_IMAGES` ``images``), RoIs
    improved (%)."""
    low, high = row["gain_ci_low"], row["gain_ci_high"]
    enough = row.get("images", MIN_INTERVAL_IMAGES) >= MIN_INTERVAL_IMAGES
    shown = enough and _finite(low) and _finite(high)
    interval = f" [{100 * low:+.1f}, {100 * high:+.1f}]" if shown else ""
    return [
        f"{100 * row['fg_regular']:.1f} %",
        f"{100 * row['fg_deformed']:.1f} %",
        f"{100 * row['gain']:+.1f} pt{interval}",
        f"{100 * row['improved']:.0f} %",
    ]


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


def foreground_cells(row: Row) -> List[str]:
    """One row of the foreground table as its cells: class, RoIs, images, then the measured
    cells."""
    return [
        str(row["group"]),
        str(row["rois"]),
        str(row["images"]),
        *foreground_measure_cells(row),
    ]


def foreground_rows(table: Union["pd.DataFrame", Iterable[Row]]) -> List[List[str]]:
    """Every row of a foreground table (a DataFrame, or rows as mappings) as cells."""
    records = table.to_dict("records") if hasattr(table, "to_dict") else table
    return [foreground_cells(row) for row in records]


def foreground_markdown(table: "pd.DataFrame", model: str, dataset: str) -> str:
    """``foreground_table.md``: a caption naming the model and the dataset, then the table."""
    caption = (
        "Fraction of RoI-bin sampling points on the object's mask, "
        f"`{model}` on `{dataset}` (mean over RoIs)."
    )
    body = markdown_table(FOREGROUND_HEADER, foreground_rows(table), FOREGROUND_ALIGN)
    return f"{caption}\n\n{body}\n"


def foreground_console_table(table: "pd.DataFrame") -> Any:
    """The foreground table as a rich ``Table`` for the console."""
    from rich import box
    from rich.table import Table

    out = Table(title=FOREGROUND_TITLE, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    for name, side in zip(FOREGROUND_CONSOLE_HEADER, FOREGROUND_CONSOLE_ALIGN):
        out.add_column(name, justify="right" if side == "r" else "left")
    for cells in foreground_rows(table):
        out.add_row(*cells)
    return out
