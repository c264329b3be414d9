"""``dcn-inspect demo-data``: synthetic shape scenes with boxes and polygons, like the bundled demo
dataset.

(The sample weights are trained by ``python sample_weights/train.py``, outside the package.)
"""

from __future__ import annotations

import typer

from dcn_inspect.cli.app import app


@app.command(
    "demo-data",
    epilog="Example: dcn-inspect demo-data shapes/ --n 50 --seed 7 --format voc",
)
def demo_data(
    # A string, not a Path: Path("") would read an unset shell variable as the current folder.
    out: str = typer.Argument(
        ...,
        metavar="OUT",
        help="Output directory (created; existing files with the same names are replaced).",
    ),
    n: int = typer.Option(20, "--n", metavar="N", help="Number of scenes."),
    seed: int = typer.Option(
        0,
        "--seed",
        metavar="N",
        help="Random seed; the same seed gives the same images and annotations.",
    ),
    fmt: str = typer.Option(
        "coco",
        "--format",
        metavar="coco|voc",
        help="coco (annotations.json + images/) or voc "
        "(Annotations/, JPEGImages/, ImageSets/Main/all.txt).",
    ),
    size: int = typer.Option(
        256, "--size", metavar="PIXELS", help="Image width and height in pixels (at least 64)."
    ),
    image_format: str = typer.Option(
        "png",
        "--image-format",
        metavar="png|jpg",
        help="png (exact pixels) or jpg (quality 90, ~5x smaller).",
    ),
) -> None:
    """Generate synthetic shape scenes (disc, square, triangle, cross, star at small/medium/large
    scales on cluttered textured backgrounds) with ground-truth boxes and polygons."""
    from rich.progress import Progress

    from dcn_inspect.core.errors import InputError
    from dcn_inspect.io.datasets.synthetic import SceneConfig, write_dataset
    from dcn_inspect.io.outputs import check_out_dir, prepare_out_dir

    if n < 1:
        raise InputError(f"{n}: need at least one scene", param="n")
    if fmt not in ("coco", "voc"):
        raise InputError(f"{fmt}: expected coco or voc", param="fmt")
    if image_format not in ("png", "jpg"):
        raise InputError(f"{image_format}: expected png or jpg", param="image_format")
    if size < 64:
        raise InputError(f"{size}: images must be at least 64 pixels wide", param="size")
    out_dir = prepare_out_dir(check_out_dir(out))
    config = SceneConfig.for_size(size)
    with Progress() as bar:
        task = bar.add_task("generating scenes", total=n)
        result = write_dataset(
            out_dir,
            n,
            seed,
            fmt,
            config,
            progress=lambda done: bar.update(task, completed=done),
            image_format=image_format,
        )
    typer.echo(f"wrote {n} scenes ({fmt}) to {result}")
