"""``dcn-inspect attention``: the sampling points of multi-scale deformable attention (parses,
then calls :func:`dcn_inspect.commands.attention.attention` or, with ``--stats``,
:func:`dcn_inspect.commands.attention_stats.attention_stats`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import typer

from dcn_inspect.cli import options, render
from dcn_inspect.cli.app import app, comma_list, print_skipped
from dcn_inspect.cli.receptive_field import _refuse
from dcn_inspect.core.defaults import DEFAULT_ATTENTION_MODEL

EPILOG = (
    "Example: dcn-inspect attention  (the bundled images, dcn-attn-sample: the top 4 object "
    "queries by class score, every decoder layer)\n\n"
    "Example: dcn-inspect attention photo.jpg --model hf:deformable-detr/ --top 8\n\n"
    "Example: dcn-inspect attention photo.jpg --model detr.py:build --query 17 --per-head\n\n"
    "Example: dcn-inspect attention photo.jpg --model hf:rtdetr/ --queries encoder --at 320,240 "
    "--feature-level 1\n\n"
    "Example: dcn-inspect attention --stats --model detr.py:build --max-images 50  (spread, "
    "level shares and weight inside the matched box per object size, bundled demo dataset)"
)


# The command's own options (the shared ones come from cli/options.py).
QUERIES_OPTION = typer.Option(
    None,
    "--queries",
    metavar="decoder|encoder",
    help="Object queries of the decoder's cross-attention, or tokens of the encoder's "
    "self-attention (default: decoder when the model has one).",
)
QUERY_OPTION = typer.Option(
    None, "--query", metavar="I", help="Decoder query I (0-based; repeatable)."
)
TOP_OPTION = typer.Option(
    4,
    "--top",
    metavar="N",
    help="Without --query: the N decoder queries with the highest class score.",
)
AT_OPTION = typer.Option(
    None,
    "--at",
    metavar="X,Y",
    help="Encoder token nearest to image point X,Y in original-image pixels (repeatable; "
    "default: the image centre).",
)
FEATURE_LEVEL_OPTION = typer.Option(
    None,
    "--feature-level",
    metavar="L",
    help="Feature level of the --at tokens (0 = the call's first; default: the finest).",
)
LAYERS_OPTION = typer.Option(
    None,
    "--layers",
    metavar="NAME[,NAME...]",
    help="Attention layer(s) to show (default: every one of the chosen kind); "
    "comma-separated and/or repeated.",
)
LEVELS_OPTION = typer.Option(
    None,
    "--levels",
    metavar="D",
    help="Encoder queries: also trace each token's sampling tree through D encoder layers "
    "(default: 2, or 1 with one encoder layer; 1: no tree).",
)
MIN_WEIGHT_OPTION = typer.Option(
    0.0,
    "--min-weight",
    metavar="W",
    help="Keep only tree points of path weight >= W (a point's subtree weighs no more).",
)
MERGE_OPTION = typer.Option(
    False,
    "--merge",
    help="Expand each token reached once in the tree (paths into it summed): deep trees "
    "stay small.",
)
PER_HEAD_OPTION = typer.Option(
    False, "--per-head", help="One panel per attention head instead of all heads together."
)
IMAGES_ARGUMENT = typer.Argument(
    None,
    metavar="IMAGE",
    help="Images (default: the bundled example images); with --stats, the DATASET: a COCO json "
    "or VOC directory (default: the bundled demo dataset).",
    show_default=False,
)
STATS_OPTION = typer.Option(
    False,
    "--stats",
    help="Dataset mode: attention spread, feature-level shares and weight inside the matched box "
    "per layer and object size (dilation-stats layout).",
)
IMAGES_DIR_OPTION = options.dataset_images("With --stats")
SPLIT_OPTION = options.split("With --stats")
THRESHOLDS_OPTION = options.thresholds(scope="With --stats")
MAX_IMAGES_OPTION = options.max_images("With --stats")

#: Options only the dataset mode reads, with their defaults.
_STATS_ONLY = {"images_dir": None, "split": None, "thresholds": "paper", "max_images": None}
#: Options only the image mode reads, with their defaults.
_IMAGES_ONLY = {
    "queries": None, "query": None, "top": 4, "at": None, "feature_level": None, "layers": None,
    "levels": None, "min_weight": 0.0, "merge": False, "per_head": False, "fmt": "png",
}  # fmt: skip


@app.command("attention", epilog=EPILOG)
def attention(
    images: Optional[List[Path]] = IMAGES_ARGUMENT,
    model: Optional[str] = options.model(DEFAULT_ATTENTION_MODEL),
    weights: Optional[Path] = options.weights(),
    queries: Optional[str] = QUERIES_OPTION,
    query: Optional[List[int]] = QUERY_OPTION,
    top: int = TOP_OPTION,
    at: Optional[List[str]] = AT_OPTION,
    feature_level: Optional[int] = FEATURE_LEVEL_OPTION,
    layers: Optional[List[str]] = LAYERS_OPTION,
    levels: Optional[int] = LEVELS_OPTION,
    min_weight: float = MIN_WEIGHT_OPTION,
    merge: bool = MERGE_OPTION,
    per_head: bool = PER_HEAD_OPTION,
    stats: bool = STATS_OPTION,
    images_dir: Optional[Path] = IMAGES_DIR_OPTION,
    split: Optional[str] = SPLIT_OPTION,
    thresholds: str = THRESHOLDS_OPTION,
    max_images: Optional[int] = MAX_IMAGES_OPTION,
    resize: Optional[int] = options.resize(),
    device: str = options.device(),
    out: Path = options.out(),
    fmt: str = options.figure_format(),
    max_pixels: int = options.max_pixels(),
    strict: bool = options.strict(),
) -> None:
    """Sampling points of multi-scale deformable attention (Deformable DETR's Fig. 6) for chosen
    queries of every attention layer: CSV, figure, summary.json."""
    given = dict(locals())  # the options, named as the library function names its parameters
    if given.pop("stats"):
        _run_stats(given)
        return
    _refuse(given, _STATS_ONLY, "stats", needed=True)
    for name in _STATS_ONLY:
        given.pop(name)
    from dcn_inspect.commands.attention import attention as run

    result = run(
        **{
            **given,
            **dict(
                images=images or None, layers=comma_list(layers), query=query or (), at=at or ()
            ),
        }
    )
    console = render.console()
    console.print(f"attention layers: {', '.join(result.layers)}")
    for item in result.images:
        console.print(
            f"{item.image.name}: {item.kind} queries {', '.join(map(str, item.queries))}, "
            f"{len(item.table)} points -> {item.csv}, {item.figure}"
        )
        if item.tree_csv is not None:
            console.print(
                f"  sampling trees: {len(item.tree)} points -> {item.tree_csv}, {item.tree_figure}"
            )
    for note in result.notes:
        console.print(f"note: {note}")
    print_skipped(console, result.skipped)
    console.print(f"summary: {result.summary}")


def _run_stats(given: Dict[str, Any]) -> None:
    """The dataset mode: ``attention_stats`` on the one DATASET, its tables printed."""
    from dcn_inspect.core.errors import InputError

    _refuse(given, _IMAGES_ONLY, "stats")
    images = given.pop("images")
    if images and len(images) > 1:
        raise InputError(
            f"{len(images)} paths given: the dataset mode takes one DATASET (a COCO json or a "
            "VOC directory)",
            param="images",
        )
    for name in _IMAGES_ONLY:
        given.pop(name)
    from dcn_inspect.cli.dilation_stats import rich_table
    from dcn_inspect.commands.attention_stats import MEASURES, attention_stats, measure_tables

    result = attention_stats(dataset=images[0] if images else None, **given)
    if result.rank != 0:
        return
    console = render.console()
    for kind, measure, table, _ in measure_tables(result):
        console.print(rich_table(table, MEASURES[measure], f"Attention {measure}, {kind} queries"))
    low, high = result.thresholds
    console.print(
        f"thresholds ({result.thresholds_name}): small < {low:g} px² <= medium < {high:g} px² "
        f"<= large; images used: {result.images_used}"
    )
    for note in result.notes:
        console.print(f"note: {note}")
    print_skipped(console, result.skipped.items)
    for name, path in result.files.items():
        console.print(f"{name}: {path}")
