"""``dcn-inspect bins``: regular versus deformed RoI-pooling bins (parses, then calls :func:`dcn_inspect.bins.bins`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from dcn_inspect.cli.app import app, print_skipped
from dcn_inspect.images import DEFAULT_MAX_PIXELS

EPILOG = (
    "Example: dcn-inspect bins  (the bundled demo images with their annotated boxes)\n\n"
    "Example: dcn-inspect bins photo.jpg --roi 40,30,220,260 --class all --points --out out/"
)


@app.command(epilog=EPILOG)
def bins(
    images: Optional[List[Path]] = typer.Argument(None, help="Images (default: the bundled demo images).", show_default=False),
    model: Optional[str] = typer.Option(None, "--model", help="Registered architecture, checkpoint, or file.py:function (default: dcn-sample)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights for a registered architecture."),
    roi: Optional[List[str]] = typer.Option(None, "--roi", help="RoI X1,Y1,X2,Y2 in original-image pixels (repeatable)."),
    rois: Optional[Path] = typer.Option(None, "--rois", help="CSV of RoIs with columns x1,y1,x2,y2[,class]."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="COCO json or VOC directory/xml: the image's boxes are the RoIs."),
    class_choice: str = typer.Option(
        "auto", "--class", help="Offsets of a class-specific head: INDEX or NAME, gt (the RoI's class), pred (the model's), all, or auto (gt, else pred)."
    ),
    points: bool = typer.Option(False, "--points", help="Also draw and write the bilinear sampling points of each bin."),
    overlay: bool = typer.Option(False, "--overlay", help="Draw all RoIs on one image instead of one panel each."),
    layer: Optional[str] = typer.Option(None, "--layer", help="RoI pooling layer to show (default: the first that ran with offsets)."),
    resize: Optional[int] = typer.Option(None, "--resize", help="Shorter side of the model input in pixels (0: own size; default: the model's)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    out: Path = typer.Option(Path("dcn-inspect-out"), "--out", help="Output directory."),
    fmt: str = typer.Option("png", "--format", help="Figure format: png, svg or pdf."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", help="Refuse larger images (0: no limit)."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image instead of skipping it (several images)."),
) -> None:
    """Regular versus deformed RoI-pooling bins (the paper's Fig. 7): CSV, figure and summary.json."""
    from dcn_inspect.bins import bins as run_bins

    result = run_bins(
        images=images or None,
        model=model,
        weights=weights,
        rois=roi or (),
        rois_file=rois,
        annotations=annotations,
        class_choice=class_choice,
        points=points,
        overlay=overlay,
        layer=layer,
        resize=resize,
        device=device,
        out=out,
        fmt=fmt,
        max_pixels=max_pixels,
        strict=strict,
    )
    console = Console()
    for item in result.images:
        console.print(f"{item.image.name}: {len(item.rois)} RoI(s) -> {item.csv}, {item.figure}")
    for note in result.notes:
        console.print(f"note: {note}")
    print_skipped(console, result.skipped)
    console.print(f"summary: {result.summary}")
