"""``dcn-inspect models`` and ``dcn-inspect info``: what can be loaded, and what a model's
deformable layers look like, under the names the model's own checkpoint uses. Parsing and
printing only; the work is in :mod:`dcn_inspect.commands.info`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Tuple

import typer

from dcn_inspect.cli import options, render
from dcn_inspect.cli.app import app

MODELS_EPILOG = "Example: dcn-inspect models"

INFO_EPILOG = (
    "Example: dcn-inspect info resnet101-dcn-paper\n\n"
    "Example: dcn-inspect info resnet50-dcn-mmdet street.jpg --weights mmdet_dcn_r50.pth\n\n"
    "Example: dcn-inspect info street.jpg --model detectron2_model_final.pkl --resize 0\n\n"
    "Example: dcn-inspect info my_model.py:build street.jpg\n\n"
    "Example: dcn-inspect --verbose info mmdet_dcn.pth  (also lists the checkpoint's ignored neck/head keys)"
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


def _pair_label(pair: Tuple[float, float], sep: str = "x") -> str:
    first, second = pair
    return f"{first:g}" if first == second else f"{first:g}{sep}{second:g}"


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
            hint = f"the arguments are MODEL [IMAGE], e.g. dcn-inspect info dcn-sample {target}, or give the model with --model: dcn-inspect info {target} --model MODEL"
        raise typer.BadParameter(f"{target} is an image, not a model; {hint}", param_hint="MODEL")
    return target, Path(image) if image is not None else None


@app.command("info", epilog=INFO_EPILOG)
def info_command(
    target: Optional[str] = typer.Argument(
        None,
        metavar="MODEL",
        help="Registered architecture, checkpoint path, or path/to/file.py:function (or --model; default: dcn-sample).",
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
        help="Shorter image side in pixels before the forward; 0 keeps the image's size. Default: the model's.",
    ),
    max_pixels: int = options.max_pixels(),
) -> None:
    """Show a model's deformable layers (kernel, stride, dilation, groups, offset channels, v1/v2, feature-frame stride in pixels), its parameter counts and, with an image, offset statistics."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from dcn_inspect.commands.info import model_info
    from dcn_inspect.models.loading import load_model

    model_spec, image_path = resolve_info_arguments(target, image, model)
    errors = render.console(stderr=True)
    with (
        Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=errors,
            transient=True,
            disable=not errors.is_terminal,  # a transient bar still leaves a blank line in logs and pipes
        ) as progress
    ):
        task = progress.add_task("loading model", total=2)
        loaded = load_model(model_spec, weights, device)
        progress.update(task, advance=1, description="probing the deformable layers")
        info = model_info(loaded, image_path, resize, max_pixels)
        progress.update(task, advance=1)
    console = render.console()
    for renderable in info_renderables(info):
        console.print(renderable)


def info_renderables(info: Any) -> List[Any]:
    """What ``info`` prints, as rich renderables that fit 80 columns: the model, then one narrow
    table per concern (layers, kernel arithmetic, frames, offsets), every one with the layer
    name first, so no table needs more columns than a terminal has."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    def table(title: str, columns: List[Tuple[str, str]]) -> Table:
        out = Table(
            title=title,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            padding=(0, 1),
            collapse_padding=True,
        )
        for header, justify in columns:
            out.add_column(header, justify=justify, overflow="fold")  # type: ignore[arg-type]
        return out

    summary = info.model
    header = Table(
        show_header=False,
        title=f"model {summary['name']}",
        title_justify="left",
        box=box.SIMPLE,
        padding=(0, 1),
    )
    header.add_column(no_wrap=True)
    header.add_column(overflow="fold")
    header.add_row("architecture", str(summary["arch"] or "-"))
    source = summary["source"]
    if source == "registered" and not summary["checkpoint"]:
        source += " (randomly initialised: no weights given or bundled)"
    header.add_row("source", source)
    if summary["checkpoint"]:
        header.add_row("checkpoint", str(summary["checkpoint"]))
        header.add_row("sha256", str(summary["checkpoint_sha256"]))
    pre = summary["preprocess"]
    header.add_row(
        "preprocess",
        f"resize {pre['resize'] or 'none'}, max {pre['max_size'] or 'none'} ({pre.get('size_rule', 'round')} sizes, "
        f"{pre.get('interpolation', 'pil-bilinear')}), pad to {pre.get('size_divisor') or 'none'}, "
        f"mean {tuple(round(v, 4) for v in pre['mean'])}, std {tuple(round(v, 4) for v in pre['std'])}",
    )
    imported = summary.get("import") or {}
    if imported.get("layer_names"):
        header.add_row("layer names", str(imported["layer_names"]))
    probe_label = f"{info.probe_input_hw[1]}x{info.probe_input_hw[0]} model-input pixels"
    if info.image is not None and info.original_hw is not None:
        probe_label += f" from {info.image} ({info.original_hw[1]}x{info.original_hw[0]})"
    else:
        probe_label += " (blank image)"
    header.add_row("probe", probe_label)
    header.add_row(
        "parameters", f"{info.total_parameters:,} ({info.trainable_parameters:,} trainable)"
    )
    header.add_row(
        "deformable convs",
        f"{info.deformable_parameters:,} parameters + {info.offset_branch_parameters:,} in offset branches",
    )
    out: List[Any] = [header]
    if not info.layers:
        out.append(Text("No deformable conv layer ran during the probe forward pass."))
    else:
        layers = table(
            "deformable layers",
            [("layer", "left"), ("type", "left"), ("v", "left"), ("captured as", "left")],
        )
        arithmetic = table(
            "kernel arithmetic (in input cells)",
            [
                ("layer", "left"),
                ("kernel", "right"),
                ("stride", "right"),
                ("dilation", "right"),
                ("groups", "right"),
                ("offset\ngroups", "right"),
                ("offset\nchannels", "right"),
            ],
        )
        frames = table(
            "frames (pixels between cells)",
            [
                ("layer", "left"),
                ("input\ncells", "right"),
                ("output\ncells", "right"),
                ("derived\nby", "left"),
            ],
        )
        for layer in info.layers:
            layers.add_row(layer.name, layer.module_type, layer.version, layer.captured_by)
            channels = (
                f"{layer.offset_channels}+{layer.mask_channels}"
                if layer.mask_channels
                else str(layer.offset_channels)
            )
            arithmetic.add_row(
                layer.name, f"{layer.kernel[0]}x{layer.kernel[1]}", _pair_label(layer.stride), _pair_label(layer.dilation),
                str(layer.groups), str(layer.offset_groups), channels,
            )  # fmt: skip
            frames.add_row(
                layer.name,
                _pair_label(layer.input_stride_px),
                _pair_label(layer.output_stride_px),
                layer.geometry_method,
            )
        out += [layers, arithmetic, frames]
        if any(layer.offsets is not None for layer in info.layers):
            offsets = table(
                "offsets (|offset| in input cells)",
                [
                    ("layer", "left"),
                    ("mean", "right"),
                    ("median", "right"),
                    ("max", "right"),
                    ("mean\npixels", "right"),
                    ("mean\nmask", "right"),
                ],
            )
            for layer in info.layers:
                stats = layer.offsets
                if stats is None:
                    continue
                offsets.add_row(
                    layer.name, f"{stats.mean_cells:.3f}", f"{stats.median_cells:.3f}", f"{stats.max_cells:.3f}", f"{stats.mean_pixels:.2f}",
                    f"{stats.mean_mask:.3f}" if stats.mean_mask is not None else "-",
                )  # fmt: skip
            out.append(offsets)
    if info.roi_pools:
        pools = table(
            "deformable RoI pooling (runs only with RoIs)",
            [("layer", "left"), ("type", "left"), ("bins", "right"), ("spatial\nscale", "right")],
        )
        for pool in info.roi_pools:
            pools.add_row(
                pool.name,
                pool.module_type,
                _pair_label(pool.output_size),
                f"{pool.spatial_scale:g}",
            )
        out.append(pools)
    return out
