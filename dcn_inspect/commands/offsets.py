"""``dcn-inspect offsets``: dense offset maps of every deformable layer over the image.

For each image: one forward under :func:`dcn_inspect.capture.session.probe` -> the layers to show
(:func:`dcn_inspect.capture.records.select_layers`, all by default) -> their maps
(:func:`dcn_inspect.analysis.offsets.layer_offset_maps`: flow, magnitude, effective dilation, in
original-image pixels) -> written as

- ``<stem>_offsets.<fmt>``: per layer (top first) the flow-coloured offset field with its colour
  wheel, the magnitude and the effective dilation over the image, plus a row per requested
  kernel point (:mod:`dcn_inspect.report.offsets`);
- ``offsets.npz``: the captured offset (and mask) fields of those layers with their geometry, in
  the ``sample-points --save-offsets`` layout
  (:func:`~dcn_inspect.commands.common.offset_field_arrays`);
- ``summary.json``: model, checkpoint hash, parameters, per image and layer the maps' numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from dcn_inspect.analysis.offsets import (
    KernelPoint,
    LayerOffsetMaps,
    attention_offset_maps,
    layer_offset_maps,
    parse_kernel_point,
)
from dcn_inspect.analysis.sample_points import GroupChoice, check_group, check_group_fits
from dcn_inspect.capture.attention_calls import ENCODER, AttentionRecord
from dcn_inspect.capture.selection import select_layers
from dcn_inspect.capture.session import probe
from dcn_inspect.commands.common import (
    CommandRun,
    image_list,
    images_of_run,
    offset_field_arrays,
    start_run,
)
from dcn_inspect.commands.options import ImageInput, ModelChoice, OutputOptions
from dcn_inspect.core.defaults import DEFAULT_MAX_PIXELS, DEFAULT_OUT
from dcn_inspect.io.images import to_model_input
from dcn_inspect.io.outputs import write_figure, write_npz
from dcn_inspect.models.loaded_model import LoadedModel

__all__ = ["ImageOffsets", "OffsetsResult", "offsets"]

#: Name of the npz every run writes into ``out``.
NPZ_NAME = "offsets.npz"


@dataclass
class ImageOffsets:
    """What ``offsets`` produced for one image."""

    image: Path
    maps: List[LayerOffsetMaps]  # top layer first
    figure: Path


@dataclass
class OffsetsResult:
    out_dir: Path
    layers: List[str]  # top layer first
    images: List[ImageOffsets]
    npz: Path
    summary: Path
    notes: List[str] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)


def offsets(
    images: Optional[Sequence[Path]] = None,
    model: Union[str, LoadedModel, None] = None,
    weights: Optional[Path] = None,
    layers: Optional[Sequence[str]] = None,
    kernel_point: Sequence[Union[str, KernelPoint]] = (),
    group: GroupChoice = 0,
    resize: Optional[int] = None,
    device: str = "cpu",
    out: Path = Path(DEFAULT_OUT),
    fmt: str = "png",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    strict: bool = False,
) -> OffsetsResult:
    """Dense offset, magnitude and effective-dilation maps of the deformable layers for each image.

    ``kernel_point`` adds the field of kernel point (a, b) (row, column, 0-based) of every
    shown layer; ``group`` follows an offset group or ``"mean"`` averages them. Writes
    ``<stem>_offsets.<fmt>`` per image, ``offsets.npz`` and ``summary.json`` into ``out``.
    """
    output = OutputOptions(out, fmt, progress).checked()
    inputs = ImageInput(resize, max_pixels, device, strict).checked()
    checked_group = check_group(group)
    points: List[KernelPoint] = [
        parse_kernel_point(p) if isinstance(p, str) else (int(p[0]), int(p[1]))
        for p in kernel_point
    ]
    points = list(dict.fromkeys(points))
    image_paths = image_list(images)
    parameters = {
        "images": [str(p) for p in image_paths],
        "layers": list(layers) if layers else None,
        "kernel_point": [list(p) for p in points],
        "group": checked_group,
        "resize": resize,
        "format": output.fmt,
    }
    planned = [Path(out) / f"{p.stem}_offsets.{output.fmt}" for p in image_paths]
    planned.append(Path(out) / NPZ_NAME)
    run = start_run(
        "offsets", parameters, ModelChoice(model, weights), inputs, out, outputs=planned
    )
    shown = _Shown(layers, checked_group, points)
    arrays: Dict[str, np.ndarray] = {}
    with run:
        preprocess = run.loaded.preprocess
        with images_of_run(image_paths, inputs, "offsets", output.progress, preprocess) as (
            readable,
            skipped,
        ):
            done = [
                _image_maps(run, path, image, shown, inputs, output, arrays)
                for path, image in readable
            ]
        npz_path = run.out_dir / NPZ_NAME
        write_npz(npz_path, arrays)
        shown_layers = next((layers for _, _, layers in done), [])
        run.summary["layers"] = shown_layers
        run.summary["conventions"] = CONVENTIONS
        run.summary["images"] = [summary for _, summary, _ in done]
        summary_path = run.finish(skipped)
    results = [item for item, _, _ in done]
    return OffsetsResult(
        run.out_dir, shown_layers, results, npz_path, summary_path, run.notes, skipped.items
    )


@dataclass(frozen=True)
class _Shown:
    """What each image's maps show: the layers (None: all), the offset group, kernel points."""

    layers: Optional[Sequence[str]]
    group: GroupChoice
    kernel_points: List[KernelPoint]


def _image_maps(
    run: CommandRun,
    path: Path,
    image: np.ndarray,
    shown: _Shown,
    inputs: ImageInput,
    output: OutputOptions,
    arrays: Dict[str, np.ndarray],
) -> Tuple[ImageOffsets, Dict[str, Any], List[str]]:
    """One image: probe, the maps of every shown layer, its figure and its fields (into
    ``arrays``); returns the result, its summary entry and the layers shown."""
    model_input = to_model_input(image, run.loaded.preprocess, inputs.resize, inputs.max_pixels)
    captured = probe(
        run.loaded.model, model_input.tensor.to(run.device), model_name=run.loaded.name
    )
    attention = _encoder_attention(captured.capture.attention, shown.layers)
    convs_wanted = (
        None
        if shown.layers is None
        else [n for n in shown.layers if n not in captured.capture.attention]
    )
    chosen = (
        []
        if attention and (not captured.convs or convs_wanted == [])
        else select_layers(
            captured.convs, convs_wanted, default_count=None, model_name=run.loaded.name
        )
    )
    records = list(reversed(chosen))
    check_group_fits(shown.group, records)
    maps = [
        layer_offset_maps(r, model_input.scale_to_original, shown.group, shown.kernel_points)
        for r in records
    ] + [attention_offset_maps(r, model_input.scale_to_original) for r in reversed(attention)]
    arrays.update(offset_field_arrays(path.stem, {r.name: r for r in records}, model_input))
    title = run.loaded.titled(f"{path.name}: offsets in image pixels")
    figure_path = _write_figure(path, image, maps, output.fmt, run.out_dir, run.notes, title)
    summary = {
        "image": str(path),
        "original_hw": list(model_input.original_hw),
        "input_hw": list(model_input.input_hw),
        "scale_to_original": list(model_input.scale_to_original),
        "layers": [m.summary() for m in maps],
        "geometry_method": {
            **{r.name: r.geometry.method for r in records},
            **{r.name: list(r.frame_methods) for r in attention},
        },
        "outputs": [figure_path.name, NPZ_NAME],
    }
    shown_names = [r.name for r in records] + [r.name for r in reversed(attention)]
    return ImageOffsets(path, maps, figure_path), summary, shown_names


def _encoder_attention(
    records: Dict[str, AttentionRecord], layers: Optional[Sequence[str]]
) -> List[AttentionRecord]:
    """The encoder attention calls to draw (all, or those named in ``layers``), call order:
    decoder queries have no map to draw a field over."""
    return [
        r for r in records.values() if r.kind == ENCODER and (layers is None or r.name in layers)
    ]


#: ``summary.json``'s ``conventions``: what the maps' numbers mean.
CONVENTIONS = {
    "pixels": "original-image pixels, COCO continuous coordinates ((0,0) = top-left "
    "corner of the top-left pixel, x right, y down)",
    "offset_px": "offset (dx, dy) in input cells times the layer's input-frame stride "
    "and the model-input -> original scale",
    "mean_offset": "mean over the unit's kernel points of their offsets (the "
    "translation of its sampling grid)",
    "flow_colour": "hue = direction (0 = right, then down, left, up), saturation = "
    "magnitude / the field's largest, white = 0",
    "effective_dilation_px": "mean distance between horizontally and vertically "
    "adjacent sampling points (dilation-stats' measure), "
    "image pixels",
    "group": "an offset group index, or 'mean': offsets averaged over groups and the "
    "mean of the groups' dilations",
}


def _write_figure(
    path: Path,
    image: np.ndarray,
    maps: List[LayerOffsetMaps],
    fmt: str,
    out_dir: Path,
    notes: List[str],
    title: str,
) -> Path:
    from dcn_inspect.report.offsets import MAX_ROWS, draw_offsets_figure, rows_left_out

    left_out = rows_left_out(maps)
    if left_out:
        notes.append(
            f"{path.name}: the figure shows the first {MAX_ROWS} layer / kernel-point rows "
            f"({left_out} left out); the npz has every layer"
        )
    figure_path = out_dir / f"{path.stem}_offsets.{fmt}"
    write_figure(
        figure_path,
        draw_offsets_figure(image, maps, title=title),
        dpi=100,
    )
    return figure_path
