"""``dcn-inspect sample-points``: sampling trees of chosen units drawn on the image (Fig. 5/6).

For each image: one forward under :func:`dcn_inspect.capture.session.probe` (the offsets and masks
the
deformable layers used, and each layer's exact frame) -> the layers to follow
(:func:`dcn_inspect.capture.records.select_layers`) -> the units
(:mod:`dcn_inspect.analysis.unit_selection`) ->
their sampling trees (:func:`dcn_inspect.analysis.sample_points.trace_sampling_trees`) -> written as

- ``<stem>_points.csv``: one row per point (every level, points outside the maps included);
- ``<stem>_sampling.<fmt>``: one panel per unit, the unit green, its deepest points red, every
  panel the whole image at one scale (``zoom``: each fitted to its points), titled with the
  unit's (x, y) and category (sizes by ``thresholds``, as in dilation-stats), with a legend;
- ``<stem>_sampling.gif`` (``gif=True``): one labelled frame per unit;
- ``save_offsets``: an ``.npz`` of the captured offset/mask fields with their geometry;
- ``summary.json``: model, checkpoint hash, layers and their geometry, units, parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dcn_inspect.analysis.sample_points import (
    CSV_COLUMNS,
    POINTS_CSV,
    GroupChoice,
    SamplingTrees,
    check_group,
    points_table,
    trace_sampling_trees,
    tree_on_image,
)
from dcn_inspect.analysis.size_categories import resolve_thresholds
from dcn_inspect.analysis.unit_selection import (
    Boxes,
    Unit,
    UnitCategory,
    boxes_per_image,
    check_unit_options,
    choose_units,
    unit_category,
)
from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.capture.selection import select_layers
from dcn_inspect.capture.session import probe
from dcn_inspect.commands.common import (
    CommandRun,
    check_npz_path,
    image_list,
    images_of_run,
    layer_summary,
    make_parent_dir,
    offset_field_arrays,
    start_run,
)
from dcn_inspect.commands.options import ImageInput, ModelChoice, OutputOptions, UnitOptions
from dcn_inspect.core.columns import describe, present
from dcn_inspect.core.defaults import DEFAULT_LEVELS, DEFAULT_MAX_PIXELS, DEFAULT_OUT
from dcn_inspect.core.errors import InputError, spell_parameters
from dcn_inspect.io.images import ModelInput, to_model_input
from dcn_inspect.io.outputs import write_csv, write_figure, write_npz
from dcn_inspect.models.loaded_model import LoadedModel

if TYPE_CHECKING:  # pandas comes in with the table (points_table), matplotlib to draw
    import pandas as pd

__all__ = ["CSV_COLUMNS", "ImagePoints", "SamplePointsResult", "sample_points"]


@dataclass
class ImagePoints:
    """What ``sample_points`` produced for one image."""

    image: Path
    units: List[Unit]
    categories: List[Optional[UnitCategory]]  # per unit; None when the image has no boxes
    trees: SamplingTrees
    csv: Path
    figure: Path
    gif: Optional[Path]
    table: pd.DataFrame


@dataclass
class SamplePointsResult:
    out_dir: Path
    layers: List[str]  # traced layers, top first
    images: List[ImagePoints]
    summary: Path
    offsets: Optional[Path]
    notes: List[str] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(
        default_factory=list
    )  # images that could not be read: image, kind, reason


@dataclass(frozen=True)
class _Options:
    """The choices of one run, checked: the shared option groups and this command's own."""

    units: UnitOptions  # ``at`` as (x, y) pairs, ``group`` checked
    inputs: ImageInput
    output: OutputOptions  # ``fmt`` normalised
    gif: bool
    color_by_level: bool
    zoom: bool
    thresholds: Tuple[float, float]
    grad_weight: bool = False


def sample_points(
    images: Optional[Sequence[Path]] = None,
    model: Union[str, LoadedModel, None] = None,
    weights: Optional[Path] = None,
    layers: Optional[Sequence[str]] = None,
    levels: Optional[int] = None,
    at: Sequence[Union[str, Tuple[float, float]]] = (),
    grid: Optional[int] = None,
    boxes: Optional[Path] = None,
    round_positions: bool = False,
    group: GroupChoice = 0,
    resize: Optional[int] = None,
    device: str = "cpu",
    out: Path = Path(DEFAULT_OUT),
    fmt: str = "png",
    gif: bool = False,
    save_offsets: Optional[Path] = None,
    color_by_level: bool = False,
    zoom: bool = False,
    thresholds: str = "paper",
    grad_weight: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    strict: bool = False,
) -> SamplePointsResult:
    """Trace the sampling trees of chosen units for each image.

    Writes ``<stem>_points.csv`` and ``<stem>_sampling.<fmt>`` (and ``<stem>_sampling.gif``)
    per image, ``save_offsets`` if given, and ``summary.json`` into ``out``. ``thresholds``
    (as in dilation-stats: ``paper``, ``coco``, ``tertiles`` of the given boxes, or ``A,B``
    px²) sizes the boxes for the panel titles' categories. ``grad_weight`` adds each point's
    |dr/dp| (:func:`dcn_inspect.analysis.receptive_field.sampling_point_gradients`) to the CSV and
    sizes the points by it.
    """
    check_npz_path(save_offsets, "save_offsets")
    image_paths = image_list(images)
    boxes_of_images, boxes_source = boxes_per_image(image_paths, boxes)
    options = _check_options(
        UnitOptions(layers, levels, at, grid, boxes, round_positions, group),
        ImageInput(resize, max_pixels, device, strict),
        OutputOptions(out, fmt, progress),
        (gif, color_by_level, zoom, grad_weight),
        thresholds,
        _all_box_areas(boxes_of_images),
    )
    run = _start(image_paths, options, boxes, save_offsets, ModelChoice(model, weights))
    boxes_of = {path: (b, boxes_source) for path, b in zip(image_paths, boxes_of_images)}
    offsets_arrays: Optional[Dict[str, np.ndarray]] = {} if save_offsets is not None else None
    with run:
        preprocess = run.loaded.preprocess
        with images_of_run(image_paths, options.inputs, "sample-points", progress, preprocess) as (
            readable,
            skipped,
        ):
            traced = [
                _points_of_image(run, path, image, boxes_of[path], options, offsets_arrays)
                for path, image in readable
            ]
        offsets_path = _write_offsets(save_offsets, offsets_arrays)
        traced_layers = next((summary["layers"] for _, summary in traced), None)
        run.summary["layers"] = traced_layers
        run.summary["images"] = [summary for _, summary in traced]
        columns = describe(present(POINTS_CSV, grad_weight=options.grad_weight))
        run.summary["columns"] = {"<stem>_points.csv": columns}
        summary_path = run.finish(skipped)
    return SamplePointsResult(
        run.out_dir,
        [r["name"] for r in traced_layers or []],
        [item for item, _ in traced],
        summary_path,
        offsets_path,
        run.notes,
        skipped.items,
    )


def _start(
    image_paths: Sequence[Path],
    options: _Options,
    boxes: Optional[Path],
    save_offsets: Optional[Path],
    model: ModelChoice,
) -> CommandRun:
    """Load the model and open the run, every planned output checked against the inputs."""
    out = options.output.out
    planned = [Path(out) / name for path in image_paths for name in _output_names(path, options)]
    if save_offsets is not None:
        planned.append(Path(save_offsets))
    parameters = _parameters(image_paths, options, boxes, save_offsets)
    return start_run("sample-points", parameters, model, options.inputs, out, outputs=planned)


def _write_offsets(path: Optional[Path], arrays: Optional[Dict[str, np.ndarray]]) -> Optional[Path]:
    """The captured offset fields of every image as one ``.npz`` (``save_offsets``), if asked."""
    if path is None or arrays is None:
        return None
    make_parent_dir(Path(path), "save_offsets")
    write_npz(Path(path), arrays)
    return Path(path)


def _points_of_image(
    run: CommandRun,
    path: Path,
    image: np.ndarray,
    boxes: Tuple[Optional[Boxes], str],
    options: _Options,
    offsets_arrays: Optional[Dict[str, np.ndarray]],
) -> Tuple[ImagePoints, Dict[str, Any]]:
    """One image: probe, trace the chosen units, write its CSV and figures; its summary entry.
    ``boxes``: the image's boxes (or None) and where they come from."""
    preprocess = run.loaded.preprocess
    model_input = to_model_input(
        image, preprocess, options.inputs.resize, options.inputs.max_pixels
    )
    captured = probe(
        run.loaded.model, model_input.tensor.to(run.device), model_name=run.loaded.name
    )
    records = _traced_records(captured.convs, options, run.loaded.name)
    units, trees = _trace_image(path, model_input, records, boxes[0], boxes[1], options, run.notes)
    categories = [unit_category(u, boxes[0], options.thresholds) for u in units]
    grad_weights = (
        _grad_weights(run, model_input, records, trees, options, path)
        if options.grad_weight
        else None
    )
    item = _write_image_outputs(path, image, units, categories, trees, options, run, grad_weights)
    if offsets_arrays is not None:
        offsets_arrays.update(offset_field_arrays(path.stem, captured.convs, model_input))
    _note_approximate_frames(path, records, run.notes)
    return item, _image_summary(path, model_input, records, units, item)


# --------------------------------------------------------------------------------------------
# Steps


def _check_options(
    units: UnitOptions,
    inputs: ImageInput,
    output: OutputOptions,
    flags: Tuple[bool, bool, bool, bool],
    thresholds: str,
    box_areas: np.ndarray,
) -> _Options:
    """The run's options checked, in the order their errors are reported; ``flags`` = (gif,
    color_by_level, zoom, grad_weight)."""
    output = output.checked()
    _, threshold_values = resolve_thresholds(thresholds, box_areas)
    inputs = inputs.checked()
    checked_group = check_group(units.group)
    points_at = check_unit_options(units.at, units.grid)
    if units.levels is not None and units.levels < 1:
        raise InputError(f"{units.levels}: must be at least 1", param="levels")
    if units.layers and units.levels is not None:
        raise InputError("and `levels`: give one or the other", param="layers")
    gif, color_by_level, zoom, grad_weight = flags
    checked_units = replace(units, at=points_at, group=checked_group)
    return _Options(
        checked_units, inputs, output, gif, color_by_level, zoom, threshold_values, grad_weight
    )


def _all_box_areas(boxes_of_images: Sequence[Optional[Boxes]]) -> np.ndarray:
    """The areas of every box of every image (for ``tertiles`` thresholds)."""
    areas = [_box_areas(b) for b in boxes_of_images if b is not None]
    return np.concatenate(areas or [np.zeros(0)])


def _box_areas(boxes: Boxes) -> np.ndarray:
    coords = np.asarray(boxes[0], dtype=np.float64).reshape(-1, 4)
    return (coords[:, 2] - coords[:, 0]) * (coords[:, 3] - coords[:, 1])


def _parameters(
    image_paths: Sequence[Path],
    options: _Options,
    boxes: Optional[Path],
    save_offsets: Optional[Path],
) -> Dict[str, Any]:
    return {
        "images": [str(p) for p in image_paths],
        "layers": list(options.units.layers) if options.units.layers else None,
        "levels": options.units.levels,
        "at": [list(p) for p in options.units.at],
        "grid": options.units.grid,
        "boxes": boxes,
        "round": options.units.round_positions,
        "group": options.units.group,
        "resize": options.inputs.resize,
        "format": options.output.fmt,
        "gif": options.gif,
        "save_offsets": save_offsets,
        "color_by_level": options.color_by_level,
        "grad_weight": options.grad_weight,
        "zoom": options.zoom,
        "thresholds": list(options.thresholds),
    }


def _output_names(path: Path, options: _Options) -> List[str]:
    """The files :func:`_write_image_outputs` writes for ``path`` (in the output directory)."""
    return [f"{path.stem}_points.csv", f"{path.stem}_sampling.{options.output.fmt}"] + (
        [f"{path.stem}_sampling.gif"] if options.gif else []
    )


def _traced_records(
    convs: Dict[str, DeformConvRecord], options: _Options, model_name: str
) -> List[DeformConvRecord]:
    """The layers to trace, top (last called) first."""
    chosen = select_layers(
        convs,
        options.units.layers,
        options.units.levels,
        default_count=DEFAULT_LEVELS,
        model_name=model_name,
    )
    return list(reversed(chosen))


def _trace_image(
    path: Path,
    model_input: ModelInput,
    records: List[DeformConvRecord],
    boxes: Optional[Boxes],
    boxes_source: str,
    options: _Options,
    notes: List[str],
) -> Tuple[List[Unit], SamplingTrees]:
    sx, sy = model_input.scale_to_original
    top = records[0]
    top_frame = top.geometry.output_frame.scaled(sx, sy)
    on_image = tree_on_image(
        records,
        model_input.original_hw,
        options.units.group,
        options.units.round_positions,
        (sx, sy),
    )
    units = choose_units(
        path,
        top_frame,
        top.geometry.output_hw,
        model_input.original_hw,
        options.units.at,
        options.units.grid,
        boxes,
        boxes_source,
        notes,
        on_image,
    )
    trees = trace_sampling_trees(
        records,
        torch.tensor([[u.row, u.col] for u in units], dtype=torch.long),
        group=options.units.group,
        round_positions=options.units.round_positions,
        scale_to_original=(sx, sy),
    )
    return units, trees


def _grad_weights(
    run: CommandRun,
    model_input: ModelInput,
    records: List[DeformConvRecord],
    trees: SamplingTrees,
    options: _Options,
    path: Path,
) -> Optional[List[torch.Tensor]]:
    """|dr/dp| of every point (per level [U, P_l]), r = the unit's response (sum over the top
    layer's channels)."""
    from dcn_inspect.analysis.receptive_field import sampling_point_gradients

    gradients = sampling_point_gradients(
        run.loaded.model, model_input.tensor.to(run.device), [r.name for r in records], trees,
        group=options.units.group, scale_to_original=model_input.scale_to_original,
    )  # fmt: skip
    if gradients is None:
        run.notes.append(
            f"{path.name}: a traced layer's op could not be re-run to reproduce its output: no "
            "grad_weight column"
        )
        return None
    return gradients.weights


def _write_image_outputs(
    path: Path,
    image: np.ndarray,
    units: List[Unit],
    categories: List[Optional[UnitCategory]],
    trees: SamplingTrees,
    options: _Options,
    run: CommandRun,
    grad_weights: Optional[List[torch.Tensor]] = None,
) -> ImagePoints:
    from dcn_inspect.report.sample_points import (
        MAX_PANELS,
        draw_sampling_figure,
        frame_label,
        gif_frames,
        panel_title,
        write_sampling_gif,
    )

    table = points_table(trees, grad_weights)
    csv_path = run.out_dir / f"{path.stem}_points.csv"
    write_csv(csv_path, table, present(POINTS_CSV, grad_weight=grad_weights is not None))
    titles = [panel_title(k, u, c) for k, (u, c) in enumerate(zip(units, categories))]
    figure_path = run.out_dir / f"{path.stem}_sampling.{options.output.fmt}"
    size_label = "grad_weight |dr/dp|" if grad_weights is not None else None
    write_figure(
        figure_path,
        draw_sampling_figure(
            image,
            trees,
            titles,
            options.color_by_level,
            zoom=options.zoom,
            size_weights=grad_weights,
            size_label=size_label,
            title=_figure_title(run.loaded),
        ),
        dpi=100,
    )
    if trees.num_units > MAX_PANELS:
        also = " and GIF have" if options.gif else " has"
        run.notes.append(
            f"{path.name}: the figure shows the first {MAX_PANELS} of {trees.num_units} units; "
            f"the CSV{also} all"
        )
    gif_path = None
    if options.gif:
        gif_path = run.out_dir / f"{path.stem}_sampling.gif"
        labels = [frame_label(k, (u.x, u.y), c) for k, (u, c) in enumerate(zip(units, categories))]
        if run.loaded.random_weights:
            labels = [f"{label}  random weights" for label in labels]
        frames = gif_frames(image, trees, options.color_by_level, labels=labels, zoom=options.zoom)
        write_sampling_gif(gif_path, frames)
    return ImagePoints(path, units, categories, trees, csv_path, figure_path, gif_path, table)


def _figure_title(loaded: LoadedModel) -> Optional[str]:
    """The figure's title: says so when the model runs with random weights."""
    if not loaded.random_weights:
        return None
    return spell_parameters(
        f"{loaded.name}: random weights (no `weights` given), the offsets are untrained"
    )


def _note_approximate_frames(
    path: Path, records: Sequence[DeformConvRecord], notes: List[str]
) -> None:
    approximate = [r.name for r in records if r.geometry.method != "hooks"]
    if approximate:
        notes.append(
            f"{path.name}: frames of {', '.join(approximate)} inferred from map sizes "
            "(the forward could not be followed there); positions are approximate"
        )


def _image_summary(
    path: Path,
    model_input: ModelInput,
    records: Sequence[DeformConvRecord],
    units: List[Unit],
    item: ImagePoints,
) -> Dict[str, Any]:
    sx, sy = model_input.scale_to_original
    table = item.table
    return {
        "image": str(path),
        "original_hw": list(model_input.original_hw),
        "input_hw": list(model_input.input_hw),
        "scale_to_original": [sx, sy],
        "top_layer_map_hw": list(records[0].geometry.output_hw),
        "layers": [layer_summary(level, r) for level, r in enumerate(records, start=1)],
        "units": [
            {"unit": k, **u.as_dict(), "category": c.as_dict() if c else None}
            for k, (u, c) in enumerate(zip(units, item.categories))
        ],
        "points": int(len(table)),
        "points_outside": int(len(table) - int(table["inside"].sum())),
        "outputs": [item.csv.name, item.figure.name] + ([item.gif.name] if item.gif else []),
    }
