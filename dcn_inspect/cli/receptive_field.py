"""``dcn-inspect receptive-field``: effective receptive fields, gradient-weighted sampling points
and error-bounded saliency regions (parses, then calls
:func:`dcn_inspect.commands.receptive_field.receptive_field` or, with ``--stats``,
:func:`dcn_inspect.commands.receptive_field.receptive_field_stats`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import typer

from dcn_inspect.cli import options, render
from dcn_inspect.cli.app import app, comma_list, print_skipped
from dcn_inspect.core.errors import InputError

EPILOG = (
    "Example: dcn-inspect receptive-field  (the bundled images: background, small and large "
    "object units)\n\n"
    "Example: dcn-inspect receptive-field photo.jpg --at 320,240 --channel 7 "
    "--saliency-error 0.05 --out out/\n\n"
    "Example: dcn-inspect receptive-field scene.jpg --compare-model dcn-sample-dilated  "
    "(deformable vs plain, side by side)\n\n"
    "Example: dcn-inspect receptive-field --stats --max-images 5  (ERF radius and saliency area "
    "per object size, bundled dataset)\n\n"
    "Example: dcn-inspect receptive-field photo.jpg --model hf:deformable-detr/ --queries decoder "
    "--top 2  (ERF of object queries, attention points weighted by |dr/dp|)"
)

#: Options that only the dataset mode reads, with their defaults.
_STATS_ONLY = {"images_dir": None, "split": None, "thresholds": "paper", "max_images": None}
#: Options that only the image mode reads, with their defaults.
_IMAGES_ONLY = {
    "at": None,
    "grid": None,
    "boxes": None,
    "group": "0",
    "round_positions": False,
    "compare_model": None,
    "compare_weights": None,
    "fmt": "png",
}


#: Options that only the query mode (``--queries``) reads, with their defaults.
_QUERIES_ONLY = {"query": [], "top": 4}
#: Options of the unit modes that the query mode does not read, with their defaults.
_UNITS_ONLY = {
    "layers": None,
    "levels": None,
    "grid": None,
    "boxes": None,
    "channel": None,
    "group": "0",
    "round_positions": False,
    "saliency_error": 0.1,
    "saliency_step": None,
    "no_saliency": False,
    "compare_model": None,
    "compare_weights": None,
    "batch_size": 8,
    **_STATS_ONLY,
}

# --------------------------------------------------------------------------------------------
# This command's own options

NO_SALIENCY_OPTION = typer.Option(
    False,
    "--no-saliency",
    help="Skip the saliency search (up to 12 masked forwards per unit): the ERF and the "
    "gradient-weighted sampling points only (faster; the saliency columns stay empty, "
    "saliency_status not_searched).",
)
QUERIES_OPTION = typer.Option(
    None,
    "--queries",
    metavar="decoder|encoder",
    help="Receptive fields of multi-scale deformable attention queries instead of units: object "
    "queries of the decoder (r: the top class's logit) or encoder tokens at --at (r: the sum of "
    "the last encoder attention's output at the token).",
)
QUERY_OPTION = typer.Option(
    None, "--query", metavar="I", help="With --queries decoder: query I (0-based; repeatable)."
)
TOP_OPTION = typer.Option(
    4,
    "--top",
    metavar="N",
    help="With --queries decoder, without --query: the N queries with the highest class score.",
)


def _images() -> Any:
    return typer.Argument(
        None,
        metavar="IMAGE",
        help="Images (default: the bundled example images); with --stats, the DATASET: a COCO "
        "json or VOC directory (default: the bundled demo dataset).",
        show_default=False,
    )


def _channel() -> Any:
    return typer.Option(
        None,
        "--channel",
        metavar="C",
        help="The response is this channel's value (default: the sum over the layer's channels).",
    )


def _saliency_error() -> Any:
    return typer.Option(
        0.1,
        "--saliency-error",
        metavar="FRACTION",
        help="Relative error bound of the saliency region (0.1 = 10 %), found in at most 12 "
        "masked forwards per unit, guided by the unit's gradient on the input.",
    )


def _saliency_step() -> Any:
    return typer.Option(
        None,
        "--saliency-step",
        metavar="PIXELS",
        help="Resolution of the saliency search in model-input pixels: box edges on its "
        "multiples (default: the layer's stride).",
    )


def _compare_model() -> Any:
    return typer.Option(
        None,
        "--compare-model",
        metavar="MODEL",
        help="A second model (e.g. dcn-sample-dilated) on the same units, drawn side by side.",
    )


def _compare_weights() -> Any:
    return typer.Option(
        None,
        "--compare-weights",
        metavar="FILE",
        help="Weights of the --compare-model architecture.",
    )


def _stats() -> Any:
    return typer.Option(
        False,
        "--stats",
        help="Dataset mode: ERF 90 % radius and saliency area per layer and object size "
        "(dilation-stats layout).",
    )


def _batch_size() -> Any:
    return typer.Option(
        8,
        "--batch-size",
        metavar="N",
        help="Units per backward pass (and masked images per forward).",
    )


# --------------------------------------------------------------------------------------------
# The command


@app.command("receptive-field", epilog=EPILOG)
def receptive_field(
    images: Optional[List[Path]] = _images(),
    model: Optional[str] = options.model(),
    weights: Optional[Path] = options.weights(),
    layers: Optional[List[str]] = options.layers("to follow (the units belong to the last called)"),
    levels: Optional[int] = options.levels("Follow"),
    at: Optional[List[str]] = options.at(),
    grid: Optional[int] = options.grid(),
    boxes: Optional[Path] = options.boxes("a unit at each box centre plus one on background"),
    channel: Optional[int] = _channel(),
    group: str = options.group("Offset group the sampling trees follow (G), or 'mean'."),
    round_positions: bool = options.round_positions("tree positions"),
    saliency_error: float = _saliency_error(),
    saliency_step: Optional[int] = _saliency_step(),
    no_saliency: bool = NO_SALIENCY_OPTION,
    compare_model: Optional[str] = _compare_model(),
    compare_weights: Optional[Path] = _compare_weights(),
    stats: bool = _stats(),
    images_dir: Optional[Path] = options.dataset_images("With --stats", "--image-dir"),
    split: Optional[str] = options.split("With --stats"),
    thresholds: str = options.thresholds(scope="With --stats"),
    max_images: Optional[int] = options.max_images("With --stats"),
    batch_size: int = _batch_size(),
    queries: Optional[str] = QUERIES_OPTION,
    query: Optional[List[int]] = QUERY_OPTION,
    top: int = TOP_OPTION,
    resize: Optional[int] = options.resize(),
    device: str = options.device(),
    out: Path = options.out(),
    fmt: str = options.figure_format(),
    max_pixels: int = options.max_pixels(),
    strict: bool = options.strict(),
) -> None:
    """Effective receptive field, gradient-weighted sampling points and error-bounded saliency
    region of chosen units (DCNv2 §2.1): figure, CSV, npz, summary.json."""
    given = dict(locals())  # the options, named as the library functions name their parameters

    given.pop("stats")
    given["layers"] = comma_list(layers)
    if queries is not None:
        _run_queries(given, stats)
        return
    _refuse(given, _QUERIES_ONLY, "queries", needed=True)
    for name in _QUERIES_ONLY:
        given.pop(name)
    given.pop("queries")
    if given.pop("no_saliency"):
        _refuse(given, {"saliency_error": 0.1, "saliency_step": None}, "no_saliency")
        given["saliency_error"] = None  # the library's "no saliency search"
    if stats:
        _run_stats(given)
    else:
        _run_images(given)


def _run_stats(given: Dict[str, Any]) -> None:
    """The dataset mode: ``receptive_field_stats`` on the one DATASET, its tables printed."""
    _refuse(given, _IMAGES_ONLY, "stats")
    images = given.pop("images")
    if images and len(images) > 1:
        raise InputError(
            f"{len(images)} paths given: the dataset mode takes one DATASET (a COCO json or a "
            "VOC directory)",
            param="images",
        )
    from dcn_inspect.commands.receptive_field import receptive_field_stats

    for name in _IMAGES_ONLY:
        given.pop(name)
    searched = given.get("saliency_error") is not None
    result = receptive_field_stats(dataset=images[0] if images else None, **given)
    console = render.console()
    console.print(
        _StatsTable(
            result.radius_table,
            "ERF radius holding 90 % of the gradient mass (original-image pixels)",
            decimals=2,
        )
    )
    if searched:  # no areas with `no_saliency`
        console.print(
            _StatsTable(result.area_table, "Saliency region area (original-image pixels²)", 0)
        )
    without = sum(result.without_region.values())
    if without:
        console.print(
            f"{without} unit(s) without a saliency region (the masked image already meets the "
            "error bound) left out of the area table: "
            + ", ".join(f"{layer} {n}" for layer, n in result.without_region.items() if n)
        )
    low, high = result.thresholds
    console.print(
        f"thresholds ({result.thresholds_name}): small < {low:g} px² <= medium < {high:g} px² "
        f"<= large; images used: {result.images_used}"
    )
    for name, path in result.files.items():
        console.print(f"{name}: {path}")


def _run_images(given: Dict[str, Any]) -> None:
    """The image mode: ``receptive_field`` on the images, its outputs and notes printed."""
    _refuse(given, _STATS_ONLY, "stats", needed=True)
    from dcn_inspect.commands.receptive_field import receptive_field as run

    for name in _STATS_ONLY:
        given.pop(name)
    result = run(**{**given, **dict(images=given["images"] or None, at=given["at"] or ())})
    console = render.console()
    console.print(f"followed layers (top first): {', '.join(result.layers)}")
    for item in result.images:
        console.print(
            f"{item.image.name}: {len(item.units)} unit(s) -> {item.csv}, {item.npz}, {item.figure}"
        )
    for note in result.notes:
        console.print(f"note: {note}")
    print_skipped(console, result.skipped)
    console.print(f"summary: {result.summary}")


def _run_queries(given: Dict[str, Any], stats: bool) -> None:
    """The query mode: ``query_receptive_field`` on the images, its outputs printed."""
    if stats:
        raise InputError("is not read with `queries`", param="stats")
    _refuse(given, _UNITS_ONLY, "queries")
    from dcn_inspect.commands.receptive_field.query_mode import query_receptive_field

    for name in _UNITS_ONLY:
        given.pop(name)
    result = query_receptive_field(
        **{
            **given,
            **dict(
                images=given["images"] or None, at=given["at"] or (), query=given["query"] or ()
            ),
        }
    )
    console = render.console()
    console.print(f"attention layers: {', '.join(result.layers)}")
    for item in result.images:
        console.print(
            f"{item.image.name}: {item.kind} queries {', '.join(map(str, item.queries))} -> "
            f"{item.csv}, {item.npz}, {item.figure}"
        )
        for c in item.correlations:
            console.print(
                f"  {c['query']} {c['layer']}: spearman(weight, |dr/dp|) {c['spearman']:.3f}, "
                f"gradient share of the top-weight quarter {c['top_quarter_share']:.3f}"
            )
    for note in result.notes:
        console.print(f"note: {note}")
    print_skipped(console, result.skipped)
    console.print(f"summary: {result.summary}")


class _StatsTable:
    """A per-layer, per-category table of ``--stats`` (dilation-stats layout) on the console:
    one row per layer, ``mean ± std`` per category (``decimals`` places); when that is wider
    than the console, each layer's name on its own line above its row, so that no layer name
    or value is ever broken across lines."""

    def __init__(self, table: Any, title: str, decimals: int) -> None:
        from dcn_inspect.analysis.size_categories import CATEGORIES

        self.title = f"{title}: mean ± std"
        self.rows: Dict[str, List[str]] = {}
        for layer, part in table.groupby("layer", sort=False):
            cells = []
            for category in CATEGORIES:
                row = part[part["category"] == category].iloc[0]
                empty = row["count"] == 0
                cells.append(
                    "–" if empty else f"{row['mean']:.{decimals}f} ± {row['std']:.{decimals}f}"
                )
            self.rows[str(layer)] = cells

    def _table(self, with_layers: bool) -> Any:
        from rich import box
        from rich.table import Table

        from dcn_inspect.analysis.size_categories import CATEGORIES

        out = Table(
            box=box.SIMPLE_HEAD,
            padding=(0, 1),
            collapse_padding=True,
            pad_edge=False,
            show_edge=with_layers,
        )
        if with_layers:
            out.add_column("layer", no_wrap=True)
        for category in CATEGORIES:
            out.add_column(category, justify="right", no_wrap=True)
        for layer, cells in self.rows.items():
            out.add_row(*([layer] if with_layers else []), *cells)
        return out

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.measure import Measurement
        from rich.text import Text

        yield Text(self.title)
        wide = self._table(with_layers=True)
        unbounded = options.update(max_width=10**6)  # its natural width, not clamped to ours
        if Measurement.get(console, unbounded, wide).maximum <= options.max_width:
            yield wide
            return
        for layer, cells in self.rows.items():
            yield Text(layer, no_wrap=True, overflow="ignore")
            single = _StatsTable.__new__(_StatsTable)
            single.rows = {layer: cells}
            yield single._table(with_layers=False)


def _refuse(given: dict, defaults: dict, mode: str, needed: bool = False) -> None:
    """Options of the other mode given by the user: one-line error naming the first."""
    for name, default in defaults.items():
        if given.get(name) not in (default, None, [], ()):
            where = f"needs `{mode}`" if needed else f"is not read with `{mode}`"
            raise InputError(f"{where}", param=name)
