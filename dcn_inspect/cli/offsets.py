"""``dcn-inspect offsets``: dense offset maps of the deformable layers (parses, then calls
:func:`dcn_inspect.commands.offsets.offsets`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dcn_inspect.cli import options, render
from dcn_inspect.cli.app import app, comma_list, print_skipped

EPILOG = (
    "Example: dcn-inspect offsets  (the bundled images, every deformable layer)\n\n"
    "Example: dcn-inspect offsets photo.jpg --layers layer4.2.conv2 "
    "--kernel-point 0,0 --kernel-point 2,2 --out out/\n\n"
    "Example: dcn-inspect offsets photo.jpg --model mask_rcnn_r50_dcn.pth --group mean --format pdf"
)


@app.command("offsets", epilog=EPILOG)
def offsets(
    images: Optional[List[Path]] = options.images("the bundled example images"),
    model: Optional[str] = options.model(),
    weights: Optional[Path] = options.weights(),
    layers: Optional[List[str]] = options.layers("to show (default: all)"),
    kernel_point: Optional[List[str]] = typer.Option(
        None,
        "--kernel-point",
        metavar="A,B",
        help="Also show the offsets of kernel point A,B "
        "(kernel row, column, 0-based; 1,1 = centre of 3x3; repeatable).",
    ),
    group: str = options.group("Offset group to show (G), or 'mean' to average the groups."),
    resize: Optional[int] = options.resize(),
    device: str = options.device(),
    out: Path = options.out(),
    fmt: str = options.figure_format(),
    max_pixels: int = options.max_pixels(),
    strict: bool = options.strict(),
) -> None:
    """Dense offset maps per deformable layer: flow colours, magnitude, effective dilation over the
    image; PNG, npz, summary.json."""
    given = dict(locals())  # the options, named as the library function names its parameters

    from dcn_inspect.commands.offsets import offsets as run

    result = run(
        **{
            **given,
            **dict(
                images=images or None, layers=comma_list(layers), kernel_point=kernel_point or ()
            ),
        }
    )
    console = render.console()
    console.print(f"layers (top first): {', '.join(result.layers)}")
    for item in result.images:
        console.print(f"{item.image.name}: {len(item.maps)} layer(s) -> {item.figure}")
    console.print(f"offsets: {result.npz}")
    for note in result.notes:
        console.print(f"note: {note}")
    print_skipped(console, result.skipped)
    console.print(f"summary: {result.summary}")
