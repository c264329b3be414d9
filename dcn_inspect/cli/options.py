"""The options every command shares, defined once (``options.model()`` in a command's signature).

Functions, so every command gets its own option object. No torch here: ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from dcn_inspect.defaults import BYTES_PER_PIXEL, DEFAULT_MAX_PIXELS, DEFAULT_OUT, MACHINE_MEMORY_BYTES, MEMORY_SHARE_PER_IMAGE


def model() -> Any:
    return typer.Option(None, "--model", metavar="MODEL", help="Registered architecture, checkpoint, or file.py:function (default: dcn-sample).")


def weights() -> Any:
    return typer.Option(None, "--weights", metavar="FILE", help="Weights for a registered architecture or a user file.")


def device() -> Any:
    return typer.Option("cpu", "--device", metavar="DEVICE", help="cpu, cuda or cuda:N.")


def resize() -> Any:
    return typer.Option(None, "--resize", metavar="PIXELS", help="Shorter side of the model input in pixels (0: own size; default: the model's).")


def out() -> Any:
    return typer.Option(Path(DEFAULT_OUT), "--out", metavar="DIR", help="Output directory.")


def figure_format() -> Any:
    return typer.Option("png", "--format", metavar="png|svg|pdf", help="Figure format: png, svg or pdf.")


def max_pixels(verb: str = "Refuse") -> Any:
    return typer.Option(
        DEFAULT_MAX_PIXELS,
        "--max-pixels",
        metavar="N",
        help=(
            f"{verb} images whose pixels (width*height), or whose model input after resizing, exceed this; 0: no limit. "
            f"It bounds memory: ~{BYTES_PER_PIXEL} bytes per model-input pixel at the forward's peak, so the default "
            f"keeps one image within {MEMORY_SHARE_PER_IMAGE:.0%} of a {MACHINE_MEMORY_BYTES // 2**30} GB machine."
        ),
    )


def strict() -> Any:
    return typer.Option(False, "--strict", help="Stop at the first image that cannot be used instead of skipping it.")


def layers(what: str) -> Any:
    return typer.Option(None, "--layers", metavar="NAME[,NAME...]", help=f"Deformable layer(s) {what}; comma-separated and/or repeated.")


def boxes(what: str) -> Any:
    return typer.Option(None, "--boxes", metavar="FILE", help=f"The image's boxes: COCO json, VOC xml/directory or CSV x1,y1,x2,y2[,class] (crowd/difficult boxes left out): {what}.")


def images(default_text: str) -> Any:
    return typer.Argument(None, metavar="IMAGE", help=f"Images (default: {default_text}).", show_default=False)


def allow_outside_paths() -> Any:
    return typer.Option(
        False, "--allow-outside-paths", help="Read image files a dataset names outside its folder (absolute or ../ paths in COCO / VOC files)."
    )
