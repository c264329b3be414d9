"""``dcn-inspect models`` and ``dcn-inspect info``: what can be loaded, and what a model's
deformable layers look like, under the names the model's own checkpoint uses. Parsing and
printing only; the work is in :mod:`dcn_inspect.commands.info`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import typer

from dcn_inspect.cli import options, render
from dcn_inspect.cli.app import app

MODELS_EPILOG = "Example: dcn-inspect models"

INFO_EPILOG = (
    "Example: dcn-inspect info resnet101-dcn-paper\n\n"
    "Example: dcn-inspect info resnet50-dcn-mmdet street.jpg --weights mmdet_dcn_r50.pth\n\n"
    "Example: dcn-inspect info street.jpg --model detectron2_model_final.pkl --resize 0\n\n"
    "Example: dcn-inspect info my_model.py:build street.jpg\n\n"
    "Example: dcn-inspect --verbose info mmdet_dcn.pth  (also lists the checkpoint's ignored "
    "neck/head keys)"
)


@app.command("models", epilog=MODELS_EPILOG)
def models_command() -> None:
    """List the built-in deformable architectures and their bundled weights."""
    from rich.table import Table

    from dcn_inspect.commands.info import list_architectures

    table = Table(title="dcn-inspect architectures", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("description")
    table.add_column("bundled weights", overflow="fold")
    for row in list_architectures():
        table.add_row(row.name, row.description, row.weights_label)
    console = render.console()
    console.print(table)
    console.print(
        "Load one with --model NAME [--weights CHECKPOINT], or pass a checkpoint path "
        "(native, mmdetection, detectron2) or path/to/file.py:function.",
        highlight=False,
    )


#: File suffixes that name an image, not a model (to explain ``info IMAGE`` without a model).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _looks_like_image(text: Optional[str]) -> bool:
    return text is not None and Path(text).suffix.lower() in IMAGE_SUFFIXES


def resolve_info_arguments(
    target: Optional[str], image: Optional[str], model: Optional[str]
) -> Tuple[Optional[str], Optional[Path]]:
    """``info [MODEL] [IMAGE]`` or ``info [IMAGE] --model MODEL`` -> (model, image); a usage error
    that explains the order when an image stands where the model goes."""
    if model is not None:
        if image is not None:
            raise typer.BadParameter(
                f"{target} {image}: with --model {model}, give at most one argument, the IMAGE",
                param_hint="IMAGE",
            )
        return model, Path(target) if target is not None else None
    if _looks_like_image(target):
        if image is not None and not _looks_like_image(image):
            hint = f"the order is MODEL IMAGE: dcn-inspect info {image} {target}"
        else:
            hint = (
                "the arguments are MODEL [IMAGE], e.g. dcn-inspect info dcn-sample "
                f"{target}, or give the model with --model: dcn-inspect info {target} "
                "--model MODEL"
            )
        raise typer.BadParameter(f"{target} is an image, not a model; {hint}", param_hint="MODEL")
    return target, Path(image) if image is not None else None


@app.command("info", epilog=INFO_EPILOG)
def info_command(
    target: Optional[str] = typer.Argument(
        None,
        metavar="MODEL",
        help="Registered architecture, checkpoint path, path/to/file.py:function or hf:DIR "
        "(or --model; default: dcn-sample).",
        show_default=False,
    ),
    image: Optional[str] = typer.Argument(
        None,
        metavar="IMAGE",
        help="Image to probe: adds offset magnitude statistics per layer.",
        show_default=False,
    ),
    model: Optional[str] = options.model(),
    weights: Optional[Path] = options.weights(),
    device: str = options.device(),
    resize: Optional[int] = typer.Option(
        None,
        "--resize",
        min=0,
        metavar="PIXELS",
        help="Shorter image side in pixels before the forward; 0 keeps the image's size. "
        "Default: the model's.",
    ),
    max_pixels: int = options.max_pixels(),
) -> None:
    """Show a model's deformable layers (kernel, stride, dilation, groups, offset channels, v1/v2,
    feature-frame stride in pixels), its parameter counts and, with an image, offset statistics."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from dcn_inspect.commands.info import model_info
    from dcn_inspect.models.loading import load_model

    model_spec, image_path = resolve_info_arguments(target, image, model)
    errors = render.console(stderr=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=errors,
        transient=True,
        # a transient bar still leaves a blank line in logs and pipes
        disable=not errors.is_terminal,
    ) as progress:
        task = progress.add_task("loading model", total=2)
        loaded = load_model(model_spec, weights, device)
        progress.update(task, advance=1, description="probing the deformable layers")
        info = model_info(loaded, image_path, resize, max_pixels)
        progress.update(task, advance=1)
    console = render.console()
    from dcn_inspect.report.info import info_renderables

    for renderable in info_renderables(info):
        console.print(renderable)
