"""What ``dcn-inspect info`` prints: the model, then one narrow table per concern (deformable
layers, kernel arithmetic, frames, offsets, RoI pooling), every one with the layer name first,
so that no table needs more columns than an 80-column terminal has. Data in
(:class:`dcn_inspect.commands.info.ModelInfo`), rich renderables out."""

from __future__ import annotations

from typing import Any, List, Tuple

from rich import box
from rich.table import Table
from rich.text import Text

__all__ = ["info_renderables"]


def info_renderables(info: Any) -> List[Any]:
    """The renderables ``info`` prints, in order."""
    out: List[Any] = [_model_table(info)]
    if not info.layers and not info.attention:
        out.append(
            Text(
                "No deformable conv layer or deformable attention ran during the probe forward "
                "pass."
            )
        )
    elif info.layers:
        out += _layer_tables(info.layers)
        if any(layer.offsets is not None for layer in info.layers):
            out.append(_offsets_table(info.layers))
    if info.attention:
        out.append(_attention_table(info.attention))
    if info.roi_pools:
        out.append(_roi_pools_table(info.roi_pools))
    return out


def _attention_table(layers: List[Any]) -> Table:
    """Multi-scale deformable attention calls: kind, heads, levels, points, how captured."""
    table = _table(
        "multi-scale deformable attention",
        [
            ("layer", "left"),
            ("kind", "left"),
            ("heads", "right"),
            ("level strides\n(px)", "left"),
            ("points per\nlevel", "left"),
            ("queries", "right"),
            ("captured by", "left"),
        ],
    )
    for layer in layers:
        strides = ", ".join(_pair_label(s) for s in layer.level_strides_px)
        traced = "" if all(m == "hooks" for m in layer.frame_methods) else " (by size)"
        table.add_row(
            layer.name,
            layer.kind,
            str(layer.heads),
            strides + traced,
            ", ".join(map(str, layer.points_per_level)),
            str(layer.queries),
            layer.captured_by,
        )
    return table


def _pair_label(pair: Tuple[float, float], sep: str = "x") -> str:
    first, second = pair
    return f"{first:g}" if first == second else f"{first:g}{sep}{second:g}"


def _table(title: str, columns: List[Tuple[str, str]]) -> Table:
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


def _model_table(info: Any) -> Table:
    """The model: architecture, source, checkpoint, preprocessing, probe input, parameters."""
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
    header.add_row("preprocess", _preprocess_label(summary["preprocess"]))
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
        f"{info.deformable_parameters:,} parameters + {info.offset_branch_parameters:,} in "
        "offset branches",
    )
    return header


def _preprocess_label(pre: Any) -> str:
    fixed = pre.get("fixed_size") or (0, 0)
    size = (
        f"stretched to {fixed[1]}x{fixed[0]} (aspect ratio not kept, "
        if any(fixed)
        else f"resize {pre['resize'] or 'none'}, max {pre['max_size'] or 'none'} "
        f"({pre.get('size_rule', 'round')} sizes, "
    )
    return (
        f"{size}"
        f"{pre.get('interpolation', 'pil-bilinear')}), pad to {pre.get('size_divisor') or 'none'}, "
        f"mean {tuple(round(v, 4) for v in pre['mean'])}, std "
        f"{tuple(round(v, 4) for v in pre['std'])}"
    )


def _layer_tables(layers: List[Any]) -> List[Table]:
    """Deformable layers (type, version, capture), their kernel arithmetic and their frames."""
    kinds = _table(
        "deformable layers",
        [("layer", "left"), ("type", "left"), ("v", "left"), ("captured as", "left")],
    )
    arithmetic = _table(
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
    frames = _table(
        "frames (pixels between cells)",
        [
            ("layer", "left"),
            ("input\ncells", "right"),
            ("output\ncells", "right"),
            ("derived\nby", "left"),
        ],
    )
    for layer in layers:
        kinds.add_row(layer.name, layer.module_type, layer.version, layer.captured_by)
        channels = (
            f"{layer.offset_channels}+{layer.mask_channels}"
            if layer.mask_channels
            else str(layer.offset_channels)
        )
        arithmetic.add_row(
            layer.name,
            f"{layer.kernel[0]}x{layer.kernel[1]}",
            _pair_label(layer.stride),
            _pair_label(layer.dilation),
            str(layer.groups),
            str(layer.offset_groups),
            channels,
        )
        frames.add_row(
            layer.name,
            _pair_label(layer.input_stride_px),
            _pair_label(layer.output_stride_px),
            layer.geometry_method,
        )
    return [kinds, arithmetic, frames]


def _offsets_table(layers: List[Any]) -> Table:
    """|offset| statistics per layer (cells of its input, pixels) and the mean mask."""
    offsets = _table(
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
    for layer in layers:
        stats = layer.offsets
        if stats is None:
            continue
        offsets.add_row(
            layer.name,
            f"{stats.mean_cells:.3f}",
            f"{stats.median_cells:.3f}",
            f"{stats.max_cells:.3f}",
            f"{stats.mean_pixels:.2f}",
            f"{stats.mean_mask:.3f}" if stats.mean_mask is not None else "-",
        )
    return offsets


def _roi_pools_table(pools: List[Any]) -> Table:
    table = _table(
        "deformable RoI pooling (runs only with RoIs)",
        [("layer", "left"), ("type", "left"), ("bins", "right"), ("spatial\nscale", "right")],
    )
    for pool in pools:
        table.add_row(
            pool.name,
            pool.module_type,
            _pair_label(pool.output_size),
            f"{pool.spatial_scale:g}",
        )
    return table
