"""``dcn-inspect models`` and ``dcn-inspect info``: what can be loaded, and what a model's
deformable layers look like, under the names the model's own checkpoint uses. Parsing and
printing only; the work is in :mod:`dcn_inspect.commands.info`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import typer

from dcn_inspect.cli import options
from dcn_inspect.cli.app import app

MODELS_EPILOG = "Example: dcn-inspect models"

INFO_EPILOG = (
    "Examples: dcn-inspect info resnet101-dcn-paper  |  "
    "dcn-inspect info resnet50-dcn-mmdet street.jpg --weights mmdet_dcn_r50.pth  |  "
    "dcn-inspect info detectron2_model_final.pkl street.jpg --resize 0  |  "
    "dcn-inspect info my_model.py:build street.jpg  |  "
    "dcn-inspect --verbose info mmdet_dcn.pth  (also lists the checkpoint's ignored neck/head keys)"
)


@app.command("models", epilog=MODELS_EPILOG)
def models_command() -> None:
    """List the built-in deformable architectures and their bundled weights."""
    from rich.console import Console
    from rich.table import Table

    from dcn_inspect.commands.info import list_architectures

    table = Table(title="dcn-inspect architectures", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("description")
    table.add_column("bundled weights", overflow="fold")
    for row in list_architectures():
        table.add_row(row.name, row.description, row.weights_label)
    console = Console()
    console.print(table)
    console.print(
        "Load one with --model NAME [--weights CHECKPOINT], or pass a checkpoint path "
        "(native, mmdetection, detectron2) or path/to/file.py:function.",
        highlight=False,
    )


def _pair_label(pair: Tuple[float, float], sep: str = "x") -> str:
    first, second = pair
    return f"{first:g}" if first == second else f"{first:g}{sep}{second:g}"


@app.command("info", epilog=INFO_EPILOG)
def info_command(
    model: str = typer.Argument(..., help="Registered architecture, checkpoint path, or path/to/file.py:function."),
    image: Optional[Path] = typer.Argument(None, help="Image to probe: adds offset magnitude statistics per layer."),
    weights: Optional[Path] = options.weights(),
    device: str = options.device(),
    resize: Optional[int] = typer.Option(
        None, "--resize", min=0, help="Shorter image side in pixels before the forward; 0 keeps the image's size. Default: the model's."
    ),
    max_pixels: int = options.max_pixels(),
) -> None:
    """Show a model's deformable layers (kernel, stride, dilation, groups, offset channels, v1/v2,
    feature-frame stride in pixels), its parameter counts and, with an image, offset statistics."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from dcn_inspect.commands.info import model_info
    from dcn_inspect.loading import load_model

    errors = Console(stderr=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=errors,
        transient=True,
        disable=not errors.is_terminal,  # a transient bar still leaves a blank line in logs and pipes
    ) as progress:
        task = progress.add_task("loading model", total=2)
        loaded = load_model(model, weights, device)
        progress.update(task, advance=1, description="probing the deformable layers")
        info = model_info(loaded, image, resize, max_pixels)
        progress.update(task, advance=1)

    console = Console()
    summary = info.model
    header = Table(show_header=False, title=f"model {summary['name']}", title_justify="left")
    header.add_row("architecture", str(summary["arch"] or "-"))
    source = summary["source"]
    if source == "registered" and not summary["checkpoint"]:
        source += " (randomly initialised: no weights given or bundled)"
    header.add_row("source", source)
    if summary["checkpoint"]:
        header.add_row("checkpoint", f"{summary['checkpoint']} (sha256 {summary['checkpoint_sha256'][:16]}…)")
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
    header.add_row("parameters", f"{info.total_parameters:,} ({info.trainable_parameters:,} trainable)")
    header.add_row("deformable convs", f"{info.deformable_parameters:,} parameters + {info.offset_branch_parameters:,} in offset branches")
    console.print(header)

    if not info.layers:
        console.print("No deformable conv layer ran during the probe forward pass.", highlight=False)
    else:
        with_stats = any(layer.offsets is not None for layer in info.layers)
        table = Table(title="deformable layers (strides in model-input pixels; offsets in input-map cells)", title_justify="left")
        for column in ("layer", "type", "kernel", "stride", "dilation", "groups", "offset groups", "offset ch", "v", "in px", "out px", "frame"):
            table.add_column(column, no_wrap=column == "layer", justify="left" if column in ("layer", "type", "frame") else "right")
        if with_stats:
            for column in ("mean |off|", "median", "max", "mean px", "mask"):
                table.add_column(column, justify="right")
        table.add_column("captured as")
        for layer in info.layers:
            row = [
                layer.name,
                layer.module_type,
                f"{layer.kernel[0]}x{layer.kernel[1]}",
                _pair_label(layer.stride),
                _pair_label(layer.dilation),
                str(layer.groups),
                str(layer.offset_groups),
                f"{layer.offset_channels}+{layer.mask_channels}" if layer.mask_channels else str(layer.offset_channels),
                layer.version,
                _pair_label(layer.input_stride_px),
                _pair_label(layer.output_stride_px),
                layer.geometry_method,
            ]
            if with_stats and layer.offsets is not None:
                stats = layer.offsets
                row += [
                    f"{stats.mean_cells:.3f}",
                    f"{stats.median_cells:.3f}",
                    f"{stats.max_cells:.3f}",
                    f"{stats.mean_pixels:.2f}",
                    f"{stats.mean_mask:.3f}" if stats.mean_mask is not None else "-",
                ]
            row.append(layer.captured_by)
            table.add_row(*row)
        console.print(table)
    if info.roi_pools:
        pools = Table(title="deformable RoI pooling (runs only with RoIs)", title_justify="left")
        for column in ("layer", "type", "bins", "spatial scale"):
            pools.add_column(column)
        for pool in info.roi_pools:
            pools.add_row(pool.name, pool.module_type, _pair_label(pool.output_size), f"{pool.spatial_scale:g}")
        console.print(pools)
