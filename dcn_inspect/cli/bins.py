"""``dcn-inspect bins``: regular versus deformed RoI-pooling bins (parses, then calls
:func:`dcn_inspect.commands.bins.bins`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dcn_inspect.cli import options
from dcn_inspect.cli.app import app, print_skipped

EPILOG = (
    "Example: dcn-inspect bins  (the bundled demo images with their annotated boxes)\n\n"
    "Example: dcn-inspect bins photo.jpg --roi 40,30,220,260 --class all --points --out out/"
)


@app.command(epilog=EPILOG)
def bins(
    images: Optional[List[Path]] = options.images("the bundled demo images"),
    model: Optional[str] = options.model(),
    weights: Optional[Path] = options.weights(),
    rois: Optional[List[str]] = typer.Option(None, "--roi", help="RoI X1,Y1,X2,Y2 in original-image pixels (repeatable)."),
    rois_file: Optional[Path] = typer.Option(None, "--rois", help="CSV of RoIs with columns x1,y1,x2,y2[,class]."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="COCO json or VOC directory/xml: the image's boxes are the RoIs."),
    class_choice: str = typer.Option(
        "auto", "--class", help="Offsets of a class-specific head: INDEX or NAME, gt (the RoI's class), pred (the model's), all, or auto (gt, else pred)."
    ),
    points: bool = typer.Option(False, "--points", help="Also draw and write the bilinear sampling points of each bin."),
    overlay: bool = typer.Option(False, "--overlay", help="Draw all RoIs on one image instead of one panel each."),
    layer: Optional[str] = typer.Option(None, "--layer", help="RoI pooling layer to show (default: the first that ran with offsets)."),
    resize: Optional[int] = options.resize(),
    device: str = options.device(),
    out: Path = options.out(),
    fmt: str = options.figure_format(),
    max_pixels: int = options.max_pixels(),
    strict: bool = options.strict(),
) -> None:
    """Regular versus deformed RoI-pooling bins (the paper's Fig. 7): CSV, figure and summary.json."""
    given = dict(locals())  # the options, named as the library function names its parameters
    from rich.console import Console

    from dcn_inspect.commands.bins import bins as run

    result = run(**{**given, **dict(images=images or None, rois=rois or ())})
    console = Console()
    for item in result.images:
        console.print(f"{item.image.name}: {len(item.rois)} RoI(s) -> {item.csv}, {item.figure}")
    for note in result.notes:
        console.print(f"note: {note}")
    print_skipped(console, result.skipped)
    console.print(f"summary: {result.summary}")
