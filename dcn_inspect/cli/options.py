"""The options every command shares, defined once (``options.model()`` in a command's signature).

Functions, so every command gets its own option object. No torch here: ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from dcn_inspect.core.defaults import (
    BYTES_PER_PIXEL,
    DEFAULT_MAX_PIXELS,
    DEFAULT_OUT,
    MACHINE_MEMORY_BYTES,
    MEMORY_SHARE_PER_IMAGE,
)


def model(default: str = "dcn-sample") -> Any:
    return typer.Option(
        None,
        "--model",
        metavar="MODEL",
        help="Registered architecture, checkpoint, file.py:function, or hf:DIR (a HuggingFace "
        f"save_pretrained folder, loaded offline) (default: {default}).",
    )


def weights() -> Any:
    return typer.Option(
        None,
        "--weights",
        metavar="FILE",
        help="Weights for a registered architecture or a user file.",
    )


def device() -> Any:
    return typer.Option("cpu", "--device", metavar="DEVICE", help="cpu, cuda or cuda:N.")


def resize() -> Any:
    return typer.Option(
        None,
        "--resize",
        metavar="PIXELS",
        help="Shorter side of the model input in pixels (0: own size; default: the model's).",
    )


def _path_or_empty(text: Any) -> Any:
    """A path; ``""`` stays ``""`` (not ``.``) so the library refuses it (an unset variable)."""
    return Path(text) if str(text) else ""


def out() -> Any:
    return typer.Option(
        Path(DEFAULT_OUT), "--out", metavar="DIR", help="Output directory.", parser=_path_or_empty
    )


def figure_format() -> Any:
    return typer.Option(
        "png", "--format", metavar="png|svg|pdf", help="Figure format: png, svg or pdf."
    )


def max_pixels(verb: str = "Refuse") -> Any:
    return typer.Option(
        DEFAULT_MAX_PIXELS,
        "--max-pixels",
        metavar="N",
        help=(
            f"{verb} images whose pixels (width*height), or whose model input after resizing, "
            "exceed this; 0: no limit. It bounds memory: "
            f"~{BYTES_PER_PIXEL} bytes per model-input pixel at the forward's peak, so the default "
            f"keeps one image within {MEMORY_SHARE_PER_IMAGE:.0%} of a "
            f"{MACHINE_MEMORY_BYTES // 2**30} GB machine."
        ),
    )


def strict() -> Any:
    return typer.Option(
        False,
        "--strict",
        help="Stop at the first image that cannot be used instead of skipping it.",
    )


def layers(what: str) -> Any:
    return typer.Option(
        None,
        "--layers",
        metavar="NAME[,NAME...]",
        help=f"Deformable layer(s) {what}; comma-separated and/or repeated.",
    )


def boxes(what: str) -> Any:
    return typer.Option(
        None,
        "--boxes",
        metavar="FILE",
        help="The image's boxes: COCO json, VOC xml/directory or CSV x1,y1,x2,y2[,class] "
        f"(crowd/difficult boxes left out): {what}.",
    )


def images(default_text: str) -> Any:
    return typer.Argument(
        None, metavar="IMAGE", help=f"Images (default: {default_text}).", show_default=False
    )


def allow_outside_paths() -> Any:
    return typer.Option(
        False,
        "--allow-outside-paths",
        help="Read image files a dataset names outside its folder "
        "(absolute or ../ paths in COCO / VOC files).",
    )


# Unit selection: sample-points and receptive-field choose their units the same way
# (dcn_inspect.analysis.unit_selection); the same options, worded for each command.


def levels(verb: str) -> Any:
    return typer.Option(
        None, "--levels", metavar="L", help=f"{verb} the last L deformable layers (default: 3)."
    )


def at(default_text: str = "") -> Any:
    return typer.Option(
        None,
        "--at",
        metavar="X,Y",
        help="Unit nearest to image point X,Y in original-image pixels (repeatable)."
        + (f" {default_text}" if default_text else ""),
    )


def grid() -> Any:
    return typer.Option(
        None,
        "--grid",
        metavar="STEP",
        help="Every STEP-th unit of the top layer, in both directions.",
    )


def round_positions(what: str) -> Any:
    return typer.Option(
        False,
        "--round",
        help=f"Round {what} to the nearest cell before reading offsets (the official demo's rule).",
    )


def group(help_text: str) -> Any:
    return typer.Option("0", "--group", metavar="G|mean", help=help_text)


# Datasets (COCO json / VOC directory): dilation-stats, bins DATASET, receptive-field --stats.
# ``scope`` prefixes the help of options that only apply in a dataset mode ("With --stats").


def _scoped(scope: str, text: str) -> str:
    if not scope:
        return text
    lowered = (
        text[0].lower() + text[1:] if text[1:2].islower() else text
    )  # "Image folder", not "VOC"
    return f"{scope}: {lowered}"


def dataset_images(scope: str = "", *aliases: str) -> Any:
    return typer.Option(
        None,
        "--images",
        *aliases,
        metavar="DIR",
        help=_scoped(scope, "Image folder (default: next to the COCO json / VOC JPEGImages/)."),
    )


def split(scope: str = "", default_text: str = "") -> Any:
    return typer.Option(
        None,
        "--split",
        metavar="NAME",
        help=_scoped(
            scope,
            "VOC ImageSets/Main/<split>.txt" + (f" ({default_text})." if default_text else "."),
        ),
    )


def max_images(scope: str = "") -> Any:
    return typer.Option(
        None,
        "--max-images",
        metavar="N",
        help=_scoped(scope, "Use only the first N images (default: all)."),
    )


def thresholds(for_what: str = "", scope: str = "") -> Any:
    what = f"Box-area split{' ' + for_what if for_what else ''}"
    text = f"{what}: paper (96²,224²), coco (32²,96²), tertiles, or A,B in pixels²."
    return typer.Option(
        "paper", "--thresholds", metavar="paper|coco|tertiles|A,B", help=_scoped(scope, text)
    )
