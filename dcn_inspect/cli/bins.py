"""``dcn-inspect bins``: regular versus deformed RoI-pooling bins (parses, then calls
:func:`dcn_inspect.commands.bins.bins`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dcn_inspect.cli import options, render
from dcn_inspect.cli.app import app, print_skipped

EPILOG = (
    "Example: dcn-inspect bins  (the bundled demo images with their annotated boxes)\n\n"
    "Example: dcn-inspect bins photo.jpg --roi 40,30,220,260 --class all --points --out out/\n\n"
    "Example: dcn-inspect bins dcn_inspect/data/demo/annotations.json  "
    "(a dataset: foreground fractions per class)"
)


@app.command(epilog=EPILOG)
def bins(
    images: Optional[List[Path]] = typer.Argument(
        None,
        metavar="IMAGE",
        help="Images, or one dataset (COCO json or VOC directory: every annotated box is an RoI, "
        "foreground table only). Default: the bundled demo images.",
        show_default=False,
    ),
    model: Optional[str] = options.model(),
    weights: Optional[Path] = options.weights(),
    rois: Optional[List[str]] = typer.Option(
        None,
        "--roi",
        metavar="X1,Y1,X2,Y2",
        help="RoI X1,Y1,X2,Y2 in original-image pixels (repeatable).",
    ),
    rois_file: Optional[Path] = typer.Option(
        None, "--rois", metavar="FILE", help="CSV of RoIs with columns x1,y1,x2,y2[,class]."
    ),
    annotations: Optional[Path] = typer.Option(
        None,
        "--annotations",
        metavar="FILE",
        help="COCO json or VOC directory/xml: the image's boxes (all of them) are the RoIs.",
    ),
    boxes: Optional[Path] = options.boxes("each is an RoI (as --boxes of sample-points)"),
    class_choice: str = typer.Option(
        "auto",
        "--class",
        metavar="CLASS",
        help="Offsets of a class-specific head: INDEX or NAME, gt (the RoI's class), "
        "pred (the model's), all, or auto (gt, else pred).",
    ),
    points: bool = typer.Option(
        False, "--points", help="Also draw and write the bilinear sampling points of each bin."
    ),
    overlay: bool = typer.Option(
        False, "--overlay", help="Draw all RoIs on one image instead of one panel each."
    ),
    layer: Optional[str] = typer.Option(
        None,
        "--layer",
        metavar="NAME",
        help="RoI pooling layer to show (default: the first that ran with offsets).",
    ),
    resize: Optional[int] = options.resize(),
    device: str = options.device(),
    out: Path = options.out(),
    fmt: str = options.figure_format(),
    max_pixels: int = options.max_pixels(),
    strict: bool = options.strict(),
    images_dir: Optional[Path] = options.dataset_images("Dataset only"),
    split: Optional[str] = options.split("Dataset only"),
    max_images: Optional[int] = options.max_images("Dataset only"),
    allow_outside_paths: bool = options.allow_outside_paths(),
) -> None:
    """Regular versus deformed RoI-pooling bins (the paper's Fig. 7): CSV, figure and
    summary.json."""
    given = dict(locals())  # the options, named as the library function names its parameters

    from dcn_inspect.commands.bins import bins as run

    result = run(**{**given, **dict(images=images or None, rois=rois or ())})
    console = render.console()
    for item in result.images:
        console.print(f"{item.image.name}: {len(item.rois)} RoI(s) -> {item.csv}, {item.figure}")
    if result.foreground is not None:
        from dcn_inspect.report.tables import foreground_console_table

        console.print(foreground_console_table(result.foreground))
    for name, path in result.files.items():
        console.print(f"{name}: {path}", soft_wrap=True)
    for note in result.notes:
        console.print(f"note: {note}")
    print_skipped(console, result.skipped)
    console.print(f"summary: {result.summary}")
