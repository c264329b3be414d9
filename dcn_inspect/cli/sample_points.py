"""``dcn-inspect sample-points``: sampling trees of chosen units drawn on the image (parses, then
calls
:func:`dcn_inspect.commands.sample_points.sample_points`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dcn_inspect.cli import options, render
from dcn_inspect.cli.app import app, comma_list, print_skipped

EPILOG = (
    "Example: dcn-inspect sample-points  (the bundled images: background, small and large "
    "object units)\n\n"
    "Example: dcn-inspect sample-points photo.jpg --at 320,240 --at 100,80 --levels 3 --gif "
    "--out out/\n\n"
    "Example: dcn-inspect sample-points photo.jpg --boxes photo_boxes.csv --round "
    "--save-offsets out/offsets.npz"
)


@app.command("sample-points", epilog=EPILOG)
def sample_points(
    images: Optional[List[Path]] = options.images("the bundled example images"),
    model: Optional[str] = options.model(),
    weights: Optional[Path] = options.weights(),
    layers: Optional[List[str]] = options.layers(
        "to trace (any order; traced from the last called)"
    ),
    levels: Optional[int] = options.levels("Trace"),
    at: Optional[List[str]] = options.at(
        "Default without --at, --grid, --boxes: a bundled image's annotated boxes, else the "
        "image centre."
    ),
    grid: Optional[int] = options.grid(),
    boxes: Optional[Path] = options.boxes("a unit at each box centre plus one on background"),
    round_positions: bool = options.round_positions("positions"),
    group: str = options.group(
        "Offset group to follow (G), or 'mean' to average the groups' offsets."
    ),
    color_by_level: bool = typer.Option(
        False, "--color-by-level", help="Draw every level in its own colour (deepest stays red)."
    ),
    zoom: bool = typer.Option(
        False,
        "--zoom",
        help="Fit each panel to its own unit's points (default: every panel the whole image at "
        "one scale).",
    ),
    thresholds: str = options.thresholds("for the titles' small/medium/large"),
    grad_weight: bool = typer.Option(
        False,
        "--grad-weight",
        help="Add each point's |d response / d point| (grad_weight column) and size the points "
        "by it.",
    ),
    resize: Optional[int] = options.resize(),
    device: str = options.device(),
    out: Path = options.out(),
    fmt: str = options.figure_format(),
    gif: bool = typer.Option(
        False, "--gif", help="Also write an animated GIF with one frame per unit."
    ),
    save_offsets: Optional[Path] = typer.Option(
        None,
        "--save-offsets",
        metavar="FILE.npz",
        help="Write the captured offset/mask fields with their geometry to FILE.npz (its folder "
        "is created, like --out's).",
    ),
    max_pixels: int = options.max_pixels(),
    strict: bool = options.strict(),
) -> None:
    """Trace the sampling points of chosen units back to the image (the paper's Fig. 5/6): CSV,
    figure, summary.json."""
    given = dict(locals())  # the options, named as the library function names its parameters

    from dcn_inspect.commands.sample_points import sample_points as run

    result = run(**{**given, **dict(images=images or None, layers=comma_list(layers), at=at or ())})
    console = render.console()
    console.print(f"traced layers (top first): {', '.join(result.layers)}")
    for item in result.images:
        outputs = [str(item.csv), str(item.figure)] + ([str(item.gif)] if item.gif else [])
        console.print(
            f"{item.image.name}: {len(item.units)} unit(s), {len(item.table)} points -> "
            f"{', '.join(outputs)}"
        )
    if result.offsets is not None:
        console.print(f"offsets: {result.offsets}")
    for note in result.notes:
        console.print(f"note: {note}")
    print_skipped(console, result.skipped)
    console.print(f"summary: {result.summary}")
