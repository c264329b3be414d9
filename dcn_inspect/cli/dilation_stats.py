"""``dcn-inspect dilation-stats``: the paper's Table 2 on any COCO/VOC dataset
(parses, then calls :func:`dcn_inspect.commands.dilation_stats.dilation_stats`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import typer

from dcn_inspect.cli import options, render
from dcn_inspect.cli.app import app, comma_list

EPILOG = (
    "Example: dcn-inspect dilation-stats  (the bundled demo dataset, sample model)\n\n"
    "Example: dcn-inspect dilation-stats VOCdevkit/VOC2007 --split test --thresholds coco "
    "--units pixels --batch-size 8 --workers 4 --out out/\n\n"
    "Distributed: torchrun --nproc-per-node 4 $(which dcn-inspect) dilation-stats "
    "instances_val2017.json --images val2017/ --device cuda"
)


@app.command("dilation-stats", epilog=EPILOG)
def dilation_stats(
    dataset: Optional[Path] = typer.Argument(
        None,
        metavar="DATASET",
        help="COCO annotation json, Pascal VOC directory, or nothing for the bundled demo dataset.",
        show_default=False,
    ),
    images: Optional[Path] = options.dataset_images(),
    split: Optional[str] = options.split(default_text="default: every annotation"),
    model: Optional[str] = options.model(),
    weights: Optional[Path] = options.weights(),
    layers: Optional[List[str]] = options.layers("to measure (default: all)"),
    thresholds: str = options.thresholds(),
    units: str = typer.Option(
        "cells",
        "--units",
        metavar="cells|pixels",
        help="cells (the layer's input cells) or pixels (original-image pixels).",
    ),
    per_group: bool = typer.Option(
        False,
        "--per-group",
        help="One row per offset group (in its own column) instead of the groups' mean.",
    ),
    per_unit: bool = typer.Option(
        False, "--per-unit", help="Also write dilation_units.csv (one row per unit and layer)."
    ),
    max_images: Optional[int] = options.max_images(),
    batch_size: int = typer.Option(
        1,
        "--batch-size",
        metavar="N",
        help="Images per forward (only images of equal input size are batched).",
    ),
    workers: int = typer.Option(
        2,
        "--workers",
        metavar="N",
        help="DataLoader worker processes decoding images (0: in the main process).",
    ),
    device: str = typer.Option(
        "cpu",
        "--device",
        metavar="DEVICE",
        help="cpu, cuda or cuda:N (under torchrun: each rank its local GPU).",
    ),
    resize: Optional[int] = options.resize(),
    strict: bool = options.strict(),
    out: Path = options.out(),
    max_pixels: int = options.max_pixels("Skip"),
    allow_outside_paths: bool = options.allow_outside_paths(),
) -> None:
    """Effective dilation per deformable layer and object size (the paper's Table 2): CSV, Markdown,
    histogram, summary.json."""
    given = dict(locals())  # the options, named as the library function names its parameters

    from dcn_inspect.commands.dilation_stats import dilation_stats as run

    result = run(**{**given, **dict(layers=comma_list(layers))})
    if result.rank != 0:
        return
    console = render.console()
    console.print(rich_table(result.table, result.units))
    console.print(rich_differences(result.differences, result.units))
    low, high = result.thresholds
    console.print(
        f"thresholds ({result.thresholds_name}): "
        f"small < {low:g} px² <= medium < {high:g} px² <= large"
    )
    by_kind = result.skipped.by_kind()
    line = f"images used: {result.images_used}"
    if by_kind:
        line += (
            f", skipped: {result.skipped.count} ("
            + ", ".join(f"{kind}: {n}" for kind, n in sorted(by_kind.items()))
            + ")"
        )
    console.print(line)
    for name, path in result.files.items():
        console.print(f"{name}: {path}")


def rich_table(table: Any, units: str, title: str = "Effective dilation") -> Any:
    """The Table 2 layout as a rich renderable that fits the console's width: layers as rows (the
    offset group in its own column with ``--per-group``), categories as columns, each cell
    ``mean ± std`` over its 95 % interval ``[low, high]``. When that table is wider than the
    console (long layer names, offset groups, wide values), each layer becomes a small table
    titled with its name, so no layer name or value is broken across lines."""
    from dcn_inspect.report.dilation_stats import table2_rows

    rows = table2_rows(table)
    per_group = "group" in table.columns
    heading = f"{title} ({units}): mean ± std" + (
        ", [95 % CI of the mean]" if "ci_low" in table.columns else ""
    )
    cells = [
        (
            row.layer,
            [str(row.group)] if per_group else [],
            [f"{m}\n{i}" if i != "–" else m for m, i in zip(row.means, row.intervals)],
        )
        for row in rows
    ]
    return _FittedTable(_one_table(heading, cells, per_group), _table_per_layer(heading, cells))


def _category_table(title: str, layer_column: bool, group_column: bool, **kwargs: Any) -> Any:
    from rich import box
    from rich.table import Table

    from dcn_inspect.analysis.size_categories import CATEGORIES

    out = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, **kwargs)
    if layer_column:
        out.add_column("layer", overflow="fold")
    if group_column:
        out.add_column("group", justify="right")
    for category in CATEGORIES:
        out.add_column(category, justify="right", overflow="fold")
    return out


def _one_table(heading: str, cells: List[Tuple[str, List[str], List[str]]], per_group: bool) -> Any:
    """Every layer in one table, the layer's name on its first row."""
    out = _category_table(heading, True, per_group)
    previous = None
    for layer, group, values in cells:
        out.add_row(layer if layer != previous else "", *group, *values)
        previous = layer
    return out


def _table_per_layer(heading: str, cells: List[Tuple[str, List[str], List[str]]]) -> Any:
    """One small table per layer, titled with its name (layer order kept)."""
    from rich.console import Group
    from rich.text import Text

    tables: Dict[str, Any] = {}
    for layer, group, values in cells:
        if layer not in tables:
            tables[layer] = _category_table(layer, False, bool(group), title_justify="left")
        tables[layer].add_row(*group, *values)
    return Group(Text(heading), *tables.values())


class _FittedTable:
    """``wide`` when it fits the console's width unbroken, else ``narrow``."""

    def __init__(self, wide: Any, narrow: Any) -> None:
        self.wide, self.narrow = wide, narrow

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.measure import Measurement

        unbounded = options.update(max_width=10**6)  # the natural width, not clamped to ours
        fits = Measurement.get(console, unbounded, self.wide).maximum <= options.max_width
        yield self.wide if fits else self.narrow


def rich_differences(differences: Any, units: str) -> Any:
    """The differences of category means with their 95 % intervals, one row per layer and pair."""
    from rich import box
    from rich.table import Table

    from dcn_inspect.report.dilation_stats import difference_label, difference_text

    per_group = "group" in differences.columns
    out = Table(
        title=f"Differences of means ({units}), [95 % CI]",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        collapse_padding=True,
    )
    out.add_column("layer", overflow="fold")
    if per_group:
        out.add_column("group", justify="right")
    out.add_column("difference", no_wrap=True)
    out.add_column("value", justify="right", no_wrap=True)
    out.add_column("95 % CI", justify="right", no_wrap=True)
    previous = None
    for _, row in differences.iterrows():
        key = (row["layer"], row["group"] if per_group else None)
        lead = [str(row["layer"]) if key != previous else ""] + (
            [str(row["group"]) if key != previous else ""] if per_group else []
        )
        out.add_row(
            *lead,
            difference_label(row["category_a"], row["category_b"]),
            *difference_text(row),
            end_section=False,
        )
        previous = key
    return out
