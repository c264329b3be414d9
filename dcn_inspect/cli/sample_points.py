"""``dcn-inspect sample-points``: sampling trees of chosen units drawn on the image (parses, then calls
:func:`dcn_inspect.sample_points.sample_points`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from dcn_inspect.cli.app import app, print_skipped
from dcn_inspect.images import DEFAULT_MAX_PIXELS

EPILOG = (
    "Example: dcn-inspect sample-points  (the bundled images: background, small and large object units)\n\n"
    "Example: dcn-inspect sample-points photo.jpg --at 320,240 --at 100,80 --levels 3 --gif --out out/\n\n"
    "Example: dcn-inspect sample-points photo.jpg --boxes photo_boxes.csv --round --save-offsets out/offsets.npz"
)


@app.command("sample-points", epilog=EPILOG)
def sample_points(
    images: Optional[List[Path]] = typer.Argument(None, help="Images (default: the bundled example images).", show_default=False),
    model: Optional[str] = typer.Option(None, "--model", help="Registered architecture, checkpoint, or file.py:function (default: dcn-sample)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights for a registered architecture."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated deformable layer names to trace (any order; traced from the last called)."),
    levels: Optional[int] = typer.Option(None, "--levels", help="Trace the last L deformable layers (default: 3)."),
    at: Optional[List[str]] = typer.Option(None, "--at", help="Unit nearest to image point X,Y in original-image pixels (repeatable)."),
    grid: Optional[int] = typer.Option(None, "--grid", help="Every STEP-th unit of the top layer, in both directions."),
    boxes: Optional[Path] = typer.Option(None, "--boxes", help="COCO json, VOC xml/directory or CSV (x1,y1,x2,y2[,class]): a unit at each box centre plus one on background."),
    round_positions: bool = typer.Option(False, "--round", help="Round positions to the nearest cell before reading offsets (the official demo's rule)."),
    group: str = typer.Option("0", "--group", help="Offset group to follow (G), or 'mean' to average the groups' offsets."),
    color_by_level: bool = typer.Option(False, "--color-by-level", help="Draw every level in its own colour (deepest stays red)."),
    resize: Optional[int] = typer.Option(None, "--resize", help="Shorter side of the model input in pixels (0: own size; default: the model's)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    out: Path = typer.Option(Path("dcn-inspect-out"), "--out", help="Output directory."),
    fmt: str = typer.Option("png", "--format", help="Figure format: png, svg or pdf."),
    gif: bool = typer.Option(False, "--gif", help="Also write an animated GIF with one frame per unit."),
    save_offsets: Optional[Path] = typer.Option(None, "--save-offsets", help="Write the captured offset/mask fields with their geometry to FILE.npz."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", help="Refuse larger images (0: no limit)."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image instead of skipping it (several images)."),
) -> None:
    """Trace the sampling points of chosen units back to the image (the paper's Fig. 5/6): CSV, figure, summary.json."""
    from dcn_inspect.sample_points import sample_points as run_sample_points

    layer_names = [name.strip() for name in layers.split(",") if name.strip()] if layers is not None else None
    result = run_sample_points(
        images=images or None,
        model=model,
        weights=weights,
        layers=layer_names,
        levels=levels,
        at=at or (),
        grid=grid,
        boxes=boxes,
        round_positions=round_positions,
        group=group,
        resize=resize,
        device=device,
        out=out,
        fmt=fmt,
        gif=gif,
        save_offsets=save_offsets,
        color_by_level=color_by_level,
        max_pixels=max_pixels,
        strict=strict,
    )
    console = Console()
    console.print(f"traced layers (top first): {', '.join(result.layers)}")
    for item in result.images:
        outputs = [str(item.csv), str(item.figure)] + ([str(item.gif)] if item.gif else [])
        console.print(f"{item.image.name}: {len(item.units)} unit(s), {len(item.table)} points -> {', '.join(outputs)}")
    if result.offsets is not None:
        console.print(f"offsets: {result.offsets}")
    for note in result.notes:
        console.print(f"note: {note}")
    print_skipped(console, result.skipped)
    console.print(f"summary: {result.summary}")
