"""``dcn-inspect explore``: an interactive, self-contained page per image to explore every unit's
sampling tree (parses, then calls :func:`dcn_inspect.commands.explore.explore`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dcn_inspect.cli import options, render
from dcn_inspect.cli.app import app, comma_list, print_skipped

EPILOG = (
    "Example: dcn-inspect explore dcn_inspect/data/images/scene_00.jpg --out out/  (then open "
    "out/scene_00_explore.html; add #unit=120,80 to the address to open at that unit, "
    "&group=mean to trace the offset groups' mean, &map=1 to draw level 1's offset map)\n\n"
    "Example: dcn-inspect explore photo.jpg --model mask_rcnn_r50_dcn.pth --levels 2\n\n"
    "Example: dcn-inspect explore scene_00.jpg --attention  (encoder tokens of the bundled "
    "attention detector; #token=120,80&layer=encoder.0.self_attn opens at that token)"
)


@app.command("explore", epilog=EPILOG)
def explore(
    images: Optional[List[Path]] = options.images("the bundled example images"),
    model: Optional[str] = options.model(),
    weights: Optional[Path] = options.weights(),
    layers: Optional[List[str]] = options.layers(
        "to follow (any order; traced from the last called)"
    ),
    levels: Optional[int] = options.levels("Follow"),
    resize: Optional[int] = options.resize(),
    device: str = options.device(),
    out: Path = options.out(),
    max_pixels: int = options.max_pixels(),
    strict: bool = options.strict(),
    boxes: Optional[Path] = options.boxes(
        "the page names the shown unit's category (default: the bundled annotations of a "
        "bundled image)"
    ),
    thresholds: str = options.thresholds("for the unit's category"),
    attention: bool = typer.Option(
        False,
        "--attention",
        help="Explore the encoder tokens of multi-scale deformable attention (their sampling "
        "points by head and level) instead of deformable conv units; automatic for a model "
        "with attention and no deformable conv. --layers then names encoder attention layers; "
        "the default model is the bundled attention detector.",
    ),
) -> None:
    """An interactive page per image (one self-contained HTML file, no network): hover or click a
    unit of the top deformable layer to see its sampling tree, its points and their CSV."""
    given = dict(locals())  # the options, named as the library function names its parameters

    from dcn_inspect.commands.explore import explore as run

    result = run(**{**given, **dict(images=images or None, layers=comma_list(layers))})
    console = render.console()
    if any(page.kind == "attention" for page in result.pages):
        console.print(f"encoder attention layers: {', '.join(result.layers)}")
    else:
        console.print(f"followed layers (top first): {', '.join(result.layers)}")
    for page in result.pages:
        rows, cols = page.top_map_hw
        if page.kind == "attention":
            console.print(
                f"{page.image.name}: {rows}x{cols} tokens -> {page.page} "
                f"({page.size_bytes / 1e6:.2f} MB)"
            )
            continue
        console.print(
            f"{page.image.name}: {rows}x{cols} units -> {page.page} "
            f"({page.size_bytes / 1e6:.2f} MB)"
        )
    for note in result.notes:
        console.print(f"note: {note}")
    print_skipped(console, result.skipped)
    console.print(f"summary: {result.summary}")
