"""``dcn-inspect receptive-field``: effective receptive fields, gradient-weighted sampling points and
error-bounded saliency regions of chosen units (DCNv2 §2.1), for images or, with ``stats``, a dataset.

For each image: one forward with gradients to the model input
(:class:`~dcn_inspect.analysis.receptive_field.GradientForward`, offsets captured as in every command)
-> the layers to follow (:func:`dcn_inspect.capture.records.select_layers`, the top one holds the units)
-> the units (:mod:`dcn_inspect.analysis.unit_selection`, as sample-points chooses them) -> their
receptive fields (:func:`dcn_inspect.analysis.receptive_field.receptive_fields`) -> for ``compare_model``
the same image positions under a second model -> written as

- ``<stem>_receptive_field.csv``: one row per unit (and model);
- ``<stem>_erf.npz``: the ERF maps and the gradient-weighted trees;
- ``<stem>_receptive_field.<fmt>``: one panel per unit (and model);
- ``summary.json``: models, layers, units, the response's definition, parameters.

:func:`receptive_field_stats` runs the same analysis on the units of a dataset's boxes (one at
each box centre, one background unit) of every followed layer and tabulates the ERF 90 % radius
and the saliency area per object-size category, in the layout and with the thresholds of
``dilation-stats``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch

from dcn_inspect.analysis.category_stats import BINS, CategoryStats, LogBins
from dcn_inspect.analysis.dilation_stats import (
    CATEGORIES,
    CATEGORY_CODES,
    category_table_columns,
    resolve_thresholds,
    table_frame,
    unit_categories,
)
from dcn_inspect.analysis.receptive_field import (
    CSV_COLUMNS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_SALIENCY_ERROR,
    RECEPTIVE_FIELD_CSV,
    STATS_UNITS_CSV,
    GradientForward,
    ReceptiveFields,
    erf_memory_bytes,
    field_arrays,
    receptive_fields,
    units_table,
    unusable_layers,
)
from dcn_inspect.analysis.sample_points import GroupChoice, check_group, tree_half_extent
from dcn_inspect.analysis.unit_selection import (
    Boxes,
    Unit,
    box_units,
    boxes_per_image,
    check_unit_options,
    choose_units,
    nearest_unit,
)
from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.capture.selection import select_layers
from dcn_inspect.commands.common import (
    CommandRun,
    image_list,
    images_of_run,
    start_run,
)
from dcn_inspect.commands.dilation_stats import table_markdown
from dcn_inspect.commands.options import ImageInput, ModelChoice, check_figure_format
from dcn_inspect.core.columns import describe, names
from dcn_inspect.core.defaults import DEFAULT_LEVELS, DEFAULT_MAX_PIXELS, DEFAULT_OUT
from dcn_inspect.core.errors import InputError
from dcn_inspect.io.annotations import load_dataset
from dcn_inspect.io.images import (
    ImageError,
    ModelInput,
    SkippedImages,
    check_resize,
    read_model_input,
    to_model_input,
)
from dcn_inspect.io.outputs import write_csv, write_figure, write_npz, write_text
from dcn_inspect.io.progress import image_progress
from dcn_inspect.models.loaded_model import LoadedModel
from dcn_inspect.models.loading import open_model

__all__ = [
    "CSV_COLUMNS",
    "ImageFields",
    "ReceptiveFieldResult",
    "receptive_field",
    "RESPONSE_DEFINITION",
]

#: The ERF maps of one image may take at most this many bytes (float32, units x H x W).
MAX_ERF_BYTES = 2 * 1024**3

#: How summary.json and the README define the response.
RESPONSE_DEFINITION = (
    "r = sum over channels of the layer's output at the unit (its op's output, before any norm or activation), "
    "or the value of channel `channel` when given; ERF = sum over colour channels of |dr/dI| per 8-bit intensity level of "
    "each original-image pixel (through the linearised bilinear resize and the normalisation); gradient weight of a "
    "sampling point = |dr/dp| per original-image pixel (total derivative)"
)

SALIENCY_SCHEDULE = (
    "masking value: the dataset mean (zero after normalisation); model-input pixels outside the box are masked. "
    "Boxes move in multiples of saliency_step model-input pixels (default: the layer's output stride). "
    "1) square windows centred on the unit, half-sizes step*2^k, until one passes (the whole image always does); "
    "2) bisection of the half-size between the last failing and the first passing square; "
    "3) each side (left, top, right, bottom) in turn moved inward by the largest multiple of step that still passes (bisection). "
    "A box passes when |r_box - r| <= saliency_error * |r|."
)


@dataclass
class ImageFields:
    """What ``receptive_field`` produced for one image."""

    image: Path
    units: List[Unit]
    fields: Dict[str, ReceptiveFields]  # "model" (and "compare") -> receptive fields
    csv: Path
    npz: Path
    figure: Path
    table: pd.DataFrame


@dataclass
class ReceptiveFieldResult:
    out_dir: Path
    layers: List[str]  # followed layers, top first (the units belong to the first)
    images: List[ImageFields]
    summary: Path
    notes: List[str] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Options:
    layers: Optional[Sequence[str]]
    levels: Optional[int]
    at: List[Tuple[float, float]]
    grid: Optional[int]
    channel: Optional[int]
    group: GroupChoice
    round_positions: bool
    saliency_error: float
    saliency_step: Optional[int]
    batch_size: int
    resize: Optional[int]
    fmt: str


def receptive_field(
    images: Optional[Sequence[Path]] = None,
    model: Union[str, LoadedModel, None] = None,
    weights: Optional[Path] = None,
    layers: Optional[Sequence[str]] = None,
    levels: Optional[int] = None,
    at: Sequence[Union[str, Tuple[float, float]]] = (),
    grid: Optional[int] = None,
    boxes: Optional[Path] = None,
    channel: Optional[int] = None,
    group: GroupChoice = 0,
    round_positions: bool = False,
    saliency_error: float = DEFAULT_SALIENCY_ERROR,
    saliency_step: Optional[int] = None,
    compare_model: Union[str, LoadedModel, None] = None,
    compare_weights: Optional[Path] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    resize: Optional[int] = None,
    device: str = "cpu",
    out: Path = Path(DEFAULT_OUT),
    fmt: str = "png",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    strict: bool = False,
) -> ReceptiveFieldResult:
    """Receptive fields of chosen units of the top followed layer, for each image.

    Writes ``<stem>_receptive_field.csv``, ``<stem>_erf.npz`` and ``<stem>_receptive_field.<fmt>``
    per image and ``summary.json`` into ``out``. ``compare_model`` runs a second model (e.g.
    ``dcn-sample-dilated``) on the same image positions: its layers of the same names (regular
    convs count as deformable ones with zero offsets).
    """
    options = _check_options(
        layers,
        levels,
        at,
        grid,
        channel,
        group,
        round_positions,
        saliency_error,
        saliency_step,
        batch_size,
        resize,
        fmt,
    )
    image_paths = image_list(images)
    boxes_of_images, boxes_source = boxes_per_image(
        image_paths, boxes, use_bundled=not options.at and grid is None
    )
    parameters = _parameters(image_paths, options, boxes, compare_model, compare_weights)
    planned = [Path(out) / name for path in image_paths for name in _output_names(path, options)]
    inputs = ImageInput(options.resize, max_pixels, device, strict)
    run = start_run(
        "receptive-field", parameters, ModelChoice(model, weights), inputs, out, outputs=planned
    )
    results: List[ImageFields] = []
    per_image: List[Dict[str, Any]] = []
    followed: List[str] = []
    boxes_of = dict(zip(image_paths, boxes_of_images))
    with run:
        compare = None
        if compare_model is not None:
            compare, _ = open_model(compare_model, compare_weights, str(run.device))
            run.outputs.protect(
                "compare_weights" if compare_weights is not None else "compare_model",
                [compare.checkpoint],
            )
            run.summary["compare_model"] = compare.summary()
            run.summary["compare_checkpoint_sha256"] = compare.checkpoint_sha256
        run.summary["response"] = {
            "definition": RESPONSE_DEFINITION,
            "channel": "sum over channels" if channel is None else channel,
        }
        run.summary["saliency"] = {"error": options.saliency_error, "schedule": SALIENCY_SCHEDULE}
        with images_of_run(
            image_paths, inputs, "receptive-field", progress, run.loaded.preprocess
        ) as (readable, skipped):
            for path, image in readable:
                item, summary = _analyse_image(
                    path,
                    image,
                    boxes_of[path],
                    boxes_source,
                    options,
                    run,
                    compare,
                    progress,
                    max_pixels,
                )
                followed = followed or item.fields["model"].levels
                results.append(item)
                per_image.append(summary)
        run.summary["layers"] = followed
        run.summary["images"] = per_image
        run.summary["columns"] = {"<stem>_receptive_field.csv": describe(RECEPTIVE_FIELD_CSV)}
        summary_path = run.finish(skipped)
    return ReceptiveFieldResult(
        run.out_dir, followed, results, summary_path, run.notes, skipped.items
    )


# --------------------------------------------------------------------------------------------
# Steps


def _check_options(
    layers: Optional[Sequence[str]],
    levels: Optional[int],
    at: Sequence[Union[str, Tuple[float, float]]],
    grid: Optional[int],
    channel: Optional[int],
    group: GroupChoice,
    round_positions: bool,
    saliency_error: float,
    saliency_step: Optional[int],
    batch_size: int,
    resize: Optional[int],
    fmt: str,
) -> _Options:
    fmt = check_figure_format(fmt)
    check_resize(resize)
    points = check_unit_options(at, grid)
    if levels is not None and levels < 1:
        raise InputError(f"{levels}: must be at least 1", param="levels")
    if layers and levels is not None:
        raise InputError("and `levels`: give one or the other", param="layers")
    if channel is not None and channel < 0:
        raise InputError(f"{channel}: channels are numbered from 0", param="channel")
    if not (0.0 <= saliency_error < 1.0):
        raise InputError(
            f"{saliency_error}: the relative error bound must be in [0, 1)", param="saliency_error"
        )
    if saliency_step is not None and saliency_step < 1:
        raise InputError(
            f"{saliency_step}: the search resolution must be at least 1 pixel",
            param="saliency_step",
        )
    if batch_size < 1:
        raise InputError(f"{batch_size}: must be at least 1", param="batch_size")
    group = check_group(group)
    return _Options(
        layers,
        levels,
        points,
        grid,
        channel,
        group,
        round_positions,
        float(saliency_error),
        saliency_step,
        batch_size,
        resize,
        fmt,
    )


def _parameters(
    image_paths: Sequence[Path],
    options: _Options,
    boxes: Optional[Path],
    compare_model: Any,
    compare_weights: Optional[Path],
) -> Dict[str, Any]:
    return {
        "images": [str(p) for p in image_paths],
        "layers": list(options.layers) if options.layers else None,
        "levels": options.levels,
        "at": [list(p) for p in options.at],
        "grid": options.grid,
        "boxes": boxes,
        "channel": options.channel,
        "group": options.group,
        "round": options.round_positions,
        "saliency_error": options.saliency_error,
        "saliency_step": options.saliency_step,
        "compare_model": compare_model
        if not isinstance(compare_model, LoadedModel)
        else compare_model.name,
        "compare_weights": compare_weights,
        "batch_size": options.batch_size,
        "resize": options.resize,
        "format": options.fmt,
    }


def followed_records(
    forward: GradientForward, options: _Options, model_name: str
) -> List[DeformConvRecord]:
    """The layers to follow, top (last called) first."""
    chosen = select_layers(
        forward.deformable_records(),
        options.layers,
        options.levels,
        default_count=DEFAULT_LEVELS,
        model_name=model_name,
    )
    return list(reversed(chosen))


def _analyse_image(
    path: Path,
    image: np.ndarray,
    boxes: Optional[Boxes],
    boxes_source: str,
    options: _Options,
    run: CommandRun,
    compare: Optional[LoadedModel],
    progress: bool,
    max_pixels: int,
) -> Tuple[ImageFields, Dict[str, Any]]:
    from dcn_inspect.io.progress import image_progress

    model_input = to_model_input(image, run.loaded.preprocess, options.resize, max_pixels)
    forward = GradientForward(run.loaded.model, model_input.tensor.to(run.device))
    records = followed_records(forward, options, run.loaded.name)
    sx, sy = model_input.scale_to_original
    top = records[0]
    clearance = tree_half_extent(
        records, (sx, sy)
    )  # as sample-points: the background unit keeps its tree on the image
    units = choose_units(
        path,
        top.geometry.output_frame.scaled(sx, sy),
        top.geometry.output_hw,
        model_input.original_hw,
        options.at,
        options.grid,
        boxes,
        boxes_source,
        run.notes,
        clearance,
    )
    _check_memory(path, len(units) * (2 if compare is not None else 1), model_input.original_hw)
    box_array = None if boxes is None else np.asarray(boxes[0], dtype=np.float64).reshape(-1, 4)
    fields: Dict[str, ReceptiveFields] = {}
    total = len(units) * (2 if compare is not None else 1)
    with image_progress(f"{path.name}: units", progress, total) as advance:
        fields["model"] = _fields(
            forward,
            records,
            [(u.row, u.col) for u in units],
            model_input,
            run.loaded,
            options,
            box_array,
            advance,
        )
        if compare is not None:
            fields["compare"], compare_units = _compare_fields(
                image,
                units,
                [r.name for r in records],
                compare,
                options,
                run.device,
                box_array,
                advance,
                max_pixels,
            )
    for role, item in fields.items():
        run.notes.extend(f"{path.name} ({role}): {note}" for note in item.notes)
    _note_approximate_frames(path, records, run.notes)
    item = _write_image_outputs(path, image, units, fields, box_array, options, run)
    summary = _image_summary(path, model_input, records, units, fields, item)
    if compare is not None:
        summary["compare_units"] = [u.as_dict() for u in compare_units]
    return item, summary


def _check_memory(path: Path, units: int, original_hw: Tuple[int, int]) -> None:
    needed = erf_memory_bytes(units, original_hw)
    if needed > MAX_ERF_BYTES:
        raise InputError(
            f"{path.name}: {units} units x {original_hw[1]}x{original_hw[0]} pixels of ERF maps need {needed / 1024**3:.1f} GiB "
            f"(limit {MAX_ERF_BYTES / 1024**3:.0f} GiB): choose fewer units (`at`, `grid`) or a smaller image"
        )


def _fields(
    forward: GradientForward,
    records: Sequence[DeformConvRecord],
    cells: Sequence[Tuple[int, int]],
    model_input: ModelInput,
    loaded: LoadedModel,
    options: _Options,
    boxes: Optional[np.ndarray],
    advance: Any,
) -> ReceptiveFields:
    return receptive_fields(
        forward,
        records,
        torch.tensor(cells, dtype=torch.long).reshape(-1, 2),
        model_input.original_hw,
        loaded.preprocess.std,
        channel=options.channel,
        group=options.group,
        round_positions=options.round_positions,
        saliency_error=options.saliency_error,
        saliency_step=options.saliency_step,
        boxes=boxes,
        batch_size=options.batch_size,
        on_batch=advance,
    )


def _compare_fields(
    image: np.ndarray,
    units: Sequence[Unit],
    names: Sequence[str],
    compare: LoadedModel,
    options: _Options,
    device: torch.device,
    boxes: Optional[np.ndarray],
    advance: Any,
    max_pixels: int,
) -> Tuple[ReceptiveFields, List[Unit]]:
    """The same image positions under the compare model, through its layers of the same names."""
    missing = list(unusable_layers(compare.model, names))
    if missing:
        raise InputError(
            f"{compare.name}: no layer named {', '.join(missing)} (the followed layers of the model)",
            param="compare_model",
        )
    model_input = to_model_input(image, compare.preprocess, options.resize, max_pixels)
    forward = GradientForward(compare.model, model_input.tensor.to(device), regular=list(names))
    found = forward.records
    problems = unusable_layers(compare.model, names, found=list(found))
    if problems:
        raise InputError(
            f"{compare.name}: "
            + "; ".join(f"layer {name}: {problem}" for name, problem in problems.items()),
            param="compare_model",
        )
    records = [found[name] for name in names]
    sx, sy = model_input.scale_to_original
    top = records[0]
    frame = top.geometry.output_frame.scaled(sx, sy)
    compare_units = [
        nearest_unit(frame, top.geometry.output_hw, u.x, u.y, u.source, u.detail) for u in units
    ]
    fields = _fields(
        forward,
        records,
        [(u.row, u.col) for u in compare_units],
        model_input,
        compare,
        options,
        boxes,
        advance,
    )
    return fields, compare_units


def _note_approximate_frames(
    path: Path, records: Sequence[DeformConvRecord], notes: List[str]
) -> None:
    approximate = [r.name for r in records if r.geometry.method != "hooks"]
    if approximate:
        notes.append(
            f"{path.name}: frames of {', '.join(approximate)} inferred from map sizes (the forward could not be followed there); positions are approximate"
        )


def _panels(
    units: Sequence[Unit], fields: Dict[str, ReceptiveFields], names: Dict[str, str]
) -> List[Any]:
    from dcn_inspect.report.receptive_field import MAX_PANELS, ErfPanel, PointLevel

    panels = []
    for u, unit in enumerate(units):
        for role, item in fields.items():
            if len(panels) >= MAX_PANELS:
                break
            levels = []
            for level in range(1, item.trees.num_levels + 1):
                weights = (
                    None
                    if item.point_gradients is None
                    else item.point_gradients.weights[level - 1][u].numpy()
                )
                levels.append(
                    PointLevel(
                        f"level {level}: {item.levels[level - 1]}",
                        item.trees.xs[level - 1][u].numpy(),
                        item.trees.ys[level - 1][u].numpy(),
                        weights,
                    )
                )
            x, y = (float(v) for v in item.unit_xy[u])
            numbers = item.numbers[u]
            prefix = f"{names[role]}: " if len(fields) > 1 else ""
            title = f"{prefix}unit {u} ({x:.0f}, {y:.0f}) {unit.source}\nERF r90 {numbers.radius_90:.0f} px"
            saliency = None
            if item.saliency:
                saliency = tuple(float(v) for v in item.saliency_boxes[u])
                area = (saliency[2] - saliency[0]) * (saliency[3] - saliency[1])
                title += f", saliency {area:.0f} px²"
            theoretical = (
                None if item.theoretical is None else tuple(float(v) for v in item.theoretical[u])
            )
            panels.append(
                ErfPanel(title, item.erf[u].numpy(), (x, y), theoretical, saliency, levels)
            )  # type: ignore[arg-type]
    return panels


def _output_names(path: Path, options: _Options) -> List[str]:
    """The files :func:`_write_image_outputs` writes for ``path`` (in the output directory)."""
    return [
        f"{path.stem}_receptive_field.csv",
        f"{path.stem}_erf.npz",
        f"{path.stem}_receptive_field.{options.fmt}",
    ]


def _write_image_outputs(
    path: Path,
    image: np.ndarray,
    units: List[Unit],
    fields: Dict[str, ReceptiveFields],
    boxes: Optional[np.ndarray],
    options: _Options,
    run: CommandRun,
) -> ImageFields:
    from dcn_inspect.report.receptive_field import MAX_PANELS, draw_receptive_field_figure

    table = units_table(fields, boxes)
    csv_path = run.out_dir / f"{path.stem}_receptive_field.csv"
    write_csv(csv_path, table, RECEPTIVE_FIELD_CSV)
    arrays: Dict[str, np.ndarray] = {}
    for role, item in fields.items():
        arrays.update(field_arrays(role, item))
    arrays["meta"] = np.array(
        json.dumps(
            {
                "response": RESPONSE_DEFINITION,
                "layers": {role: item.levels for role, item in fields.items()},
                "coordinates": "original-image pixels",
            },
            sort_keys=True,
        )
    )
    npz_path = run.out_dir / f"{path.stem}_erf.npz"
    write_npz(npz_path, arrays)
    names = {
        "model": run.loaded.name,
        "compare": str(run.summary.data.get("compare_model", {}).get("name", "compare")),
    }
    panels = _panels(units, fields, names)
    figure_path = run.out_dir / f"{path.stem}_receptive_field.{options.fmt}"
    write_figure(
        figure_path,
        draw_receptive_field_figure(image, panels, columns=2 if len(fields) > 1 else 4),
        dpi=100,
    )
    if len(units) * len(fields) > MAX_PANELS:
        run.notes.append(
            f"{path.name}: the figure shows the first {MAX_PANELS} panels; the CSV and npz have every unit"
        )
    return ImageFields(path, units, fields, csv_path, npz_path, figure_path, table)


def _image_summary(
    path: Path,
    model_input: ModelInput,
    records: Sequence[DeformConvRecord],
    units: List[Unit],
    fields: Dict[str, ReceptiveFields],
    item: ImageFields,
) -> Dict[str, Any]:
    model_fields = fields["model"]
    return {
        "image": str(path),
        "original_hw": list(model_input.original_hw),
        "input_hw": list(model_input.input_hw),
        "scale_to_original": list(model_input.scale_to_original),
        "layers": [
            {
                "level": level,
                "name": r.name,
                "module_type": r.module_type,
                "geometry": r.geometry.as_dict(),
            }
            for level, r in enumerate(records, start=1)
        ],
        "units": [{"unit": k, **u.as_dict()} for k, u in enumerate(units)],
        "saliency_evaluations": {
            role: [r.evaluations for r in f.saliency] for role, f in fields.items()
        },
        "point_gradients": model_fields.point_gradients is not None,
        "outputs": [item.csv.name, item.npz.name, item.figure.name],
    }


# --------------------------------------------------------------------------------------------
# Over a dataset: ERF radius and saliency area per object size (a gradient-based Table 2)

#: Columns of ``receptive_field_units.csv`` (stats mode).
STATS_UNIT_COLUMNS = names(STATS_UNITS_CSV)

#: Histogram of the saliency areas (px², up to 1e9: CategoryStats' default bins stop at 1e5).
AREA_BINS_HIGH = 1e9


@dataclass
class ReceptiveFieldStatsResult:
    """The tables of :func:`receptive_field_stats` and where they were written."""

    radius_table: (
        pd.DataFrame
    )  # dilation-stats layout: layer, category, count, mean, std, median, p10, p90, units
    area_table: pd.DataFrame
    thresholds_name: str
    thresholds: Tuple[float, float]
    images_used: int
    skipped: Any
    out_dir: Path
    files: Dict[str, Path] = field(default_factory=dict)


def receptive_field_stats(
    dataset: Optional[Path] = None,
    images_dir: Optional[Path] = None,
    split: Optional[str] = None,
    model: Union[str, LoadedModel, None] = None,
    weights: Optional[Path] = None,
    layers: Optional[Sequence[str]] = None,
    levels: Optional[int] = None,
    thresholds: str = "paper",
    channel: Optional[int] = None,
    saliency_error: float = DEFAULT_SALIENCY_ERROR,
    saliency_step: Optional[int] = None,
    max_images: Optional[int] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    resize: Optional[int] = None,
    device: str = "cpu",
    out: Path = Path(DEFAULT_OUT),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    strict: bool = False,
) -> ReceptiveFieldStatsResult:
    """ERF 90 % radius and saliency-region area per followed layer and object-size category.

    Units: in every image and followed layer, one at each ground-truth box centre and one
    background unit (:func:`dcn_inspect.analysis.unit_selection.box_units`); each unit's category is the
    one ``dilation-stats`` gives its cell (:func:`dcn_inspect.analysis.dilation_stats.unit_categories`: the
    smallest box containing the centre decides small / medium / large by area, no box =
    background, crowd / difficult-only and off-image centres count nowhere). Writes
    ``erf_radius_table.csv|md``, ``saliency_area_table.csv|md`` (the dilation-stats layout),
    ``receptive_field_units.csv`` and ``summary.json``.
    """
    started = time.time()
    options = _check_options(
        layers,
        levels,
        (),
        None,
        channel,
        0,
        False,
        saliency_error,
        saliency_step,
        batch_size,
        resize,
        "png",
    )
    if max_images is not None and max_images < 1:
        raise InputError(f"{max_images}: must be at least 1", param="max_images")
    data = load_dataset(dataset, images_dir, split)
    entries = data.images[:max_images] if max_images is not None else data.images
    if not entries:
        raise InputError(f"{data.root}: the dataset has no images")
    areas = np.concatenate([e.areas[~e.ignore] for e in entries])
    thresholds_name, threshold_values = resolve_thresholds(thresholds, areas)
    parameters = {
        "dataset": str(dataset) if dataset is not None else None, "images_dir": images_dir, "split": split,
        "layers": list(layers) if layers else None, "levels": levels, "thresholds": thresholds, "channel": channel,
        "saliency_error": options.saliency_error, "saliency_step": saliency_step, "max_images": max_images,
        "batch_size": batch_size, "resize": resize, "strict": strict, "max_pixels": max_pixels,
    }  # fmt: skip
    names = [
        "erf_radius_table.csv",
        "erf_radius_table.md",
        "saliency_area_table.csv",
        "saliency_area_table.md",
        "receptive_field_units.csv",
    ]
    run = start_run(
        "receptive-field --stats",
        parameters,
        ModelChoice(model, weights),
        ImageInput(resize, max_pixels, device, strict),
        out,
        outputs=[Path(out) / n for n in names],
    )
    with run:
        return _stats_run(
            run,
            data,
            entries,
            options,
            thresholds_name,
            threshold_values,
            strict,
            max_pixels,
            progress,
            split,
            channel,
            started,
        )


def _stats_run(
    run: CommandRun,
    data: Any,
    entries: Sequence[Any],
    options: _Options,
    thresholds_name: str,
    threshold_values: Tuple[float, float],
    strict: bool,
    max_pixels: int,
    progress: bool,
    split: Optional[str],
    channel: Optional[int],
    started: float,
) -> "ReceptiveFieldStatsResult":
    """The measuring and writing of :func:`receptive_field_stats` (inside its run)."""
    radius: Dict[str, CategoryStats] = {}
    area: Dict[str, CategoryStats] = {}
    area_bins = LogBins(high=AREA_BINS_HIGH)
    rows: List[List[Any]] = []
    skipped = SkippedImages(len(entries), strict)
    used = 0
    followed: List[str] = []
    with image_progress("receptive-field --stats", progress, len(entries)) as advance:
        for entry in entries:
            try:
                if entry.path is None:
                    raise ImageError(
                        f"{entry.file_name}: image file not found", "image file not found"
                    )
                _, model_input = read_model_input(
                    entry.path,
                    run.loaded.preprocess,
                    options.resize,
                    max_pixels,
                    (entry.height, entry.width),
                )
            except ImageError as exc:
                skipped.skip(entry.file_name, exc)
                advance()
                continue
            forward = GradientForward(run.loaded.model, model_input.tensor.to(run.device))
            records = followed_records(forward, options, run.loaded.name)
            followed = followed or [r.name for r in records]
            sx, sy = model_input.scale_to_original
            kept = ~np.asarray(entry.ignore, dtype=bool)
            for record in records:
                frame = record.geometry.output_frame.scaled(sx, sy)
                codes_map = unit_categories(
                    frame,
                    record.geometry.output_hw,
                    (entry.width, entry.height),
                    entry.boxes,
                    entry.ignore,
                    threshold_values,
                )
                labels = [entry.labels[i] for i in np.nonzero(kept)[0]]
                units = box_units(
                    frame,
                    record.geometry.output_hw,
                    entry.boxes[kept],
                    labels,
                    (entry.height, entry.width),
                    "annotations",
                    tree_half_extent([record], (sx, sy)),
                )
                if not units:
                    units = [
                        nearest_unit(
                            frame,
                            record.geometry.output_hw,
                            entry.width / 2,
                            entry.height / 2,
                            "image centre",
                        )
                    ]
                cells = list(dict.fromkeys((u.row, u.col) for u in units))
                codes = torch.tensor(
                    [int(codes_map[row, col]) for row, col in cells], dtype=torch.long
                )
                item = receptive_fields(
                    forward, [record], torch.tensor(cells, dtype=torch.long), model_input.original_hw, run.loaded.preprocess.std,
                    channel=options.channel, saliency_error=options.saliency_error, saliency_step=options.saliency_step, batch_size=options.batch_size,
                )  # fmt: skip
                radii = torch.tensor([n.radius_90 for n in item.numbers], dtype=torch.float64)
                sizes = (item.saliency_boxes[:, 2] - item.saliency_boxes[:, 0]) * (
                    item.saliency_boxes[:, 3] - item.saliency_boxes[:, 1]
                )
                finite = torch.isfinite(radii)
                radius.setdefault(record.name, CategoryStats(len(CATEGORIES), BINS)).update(
                    radii[finite], codes[finite]
                )
                area.setdefault(record.name, CategoryStats(len(CATEGORIES), area_bins)).update(
                    sizes, codes
                )
                for k, (row, col) in enumerate(cells):
                    x, y = (float(v) for v in item.unit_xy[k])
                    numbers = item.numbers[k]
                    rows.append(
                        [
                            entry.file_name,
                            record.name,
                            x,
                            y,
                            CATEGORY_CODES[int(codes[k])],
                            numbers.radius_50,
                            numbers.radius_90,
                            float(sizes[k]),
                        ]
                    )
            used += 1
            advance()
    skipped.check_any_used(used, str(data.root))
    order = [name for name in followed if name in radius]
    radius_table = table_frame({name: radius[name] for name in order}, "original-image pixels")
    area_table = table_frame({name: area[name] for name in order}, "original-image pixels^2")
    out_dir = run.out_dir
    files = {
        "radius_csv": out_dir / "erf_radius_table.csv",
        "radius_md": out_dir / "erf_radius_table.md",
        "area_csv": out_dir / "saliency_area_table.csv",
        "area_md": out_dir / "saliency_area_table.md",
        "units_csv": out_dir / "receptive_field_units.csv",
    }
    radius_columns = category_table_columns(
        "ERF radius holding 90 % of sum_colour |dr/dI| around its centroid", "original-image pixels"
    )
    area_columns = category_table_columns(
        f"error-bounded saliency region area (error {options.saliency_error:g})",
        "original-image pixels²",
    )
    write_csv(files["radius_csv"], radius_table, radius_columns)
    write_text(
        files["radius_md"],
        table_markdown(
            radius_table,
            "original-image pixels",
            thresholds_name,
            threshold_values,
            title="ERF radius holding 90 % of the gradient mass",
        ),
    )
    write_csv(files["area_csv"], area_table, area_columns)
    write_text(
        files["area_md"],
        table_markdown(
            area_table,
            "original-image pixels²",
            thresholds_name,
            threshold_values,
            title=f"Saliency region area (error {options.saliency_error:g})",
        ),
    )
    write_csv(files["units_csv"], pd.DataFrame(rows, columns=STATS_UNIT_COLUMNS), STATS_UNITS_CSV)
    run.summary["columns"] = {
        "erf_radius_table.csv": describe(radius_columns),
        "saliency_area_table.csv": describe(area_columns),
        "receptive_field_units.csv": describe(STATS_UNITS_CSV),
    }
    run.summary["dataset"] = {
        "path": str(data.root),
        "format": data.format,
        "split": split,
        "images_selected": len(entries),
        "issues": data.issues,
    }
    run.summary["images"] = {"used": used}
    run.summary["layers"] = order
    run.summary["thresholds"] = {
        "name": thresholds_name,
        "small_medium_px2": threshold_values[0],
        "medium_large_px2": threshold_values[1],
    }
    run.summary["units"] = (
        "one at each non-ignored box centre and one background unit per image and layer (the unit_selection of sample-points --boxes); categories as dilation-stats"
    )
    run.summary["response"] = {
        "definition": RESPONSE_DEFINITION,
        "channel": "sum over channels" if channel is None else channel,
    }
    run.summary["saliency"] = {"error": options.saliency_error, "schedule": SALIENCY_SCHEDULE}
    run.summary["outputs"] = sorted(p.name for p in files.values())
    run.summary["wall_seconds_measured"] = round(time.time() - started, 3)
    files["summary"] = run.finish(skipped)
    return ReceptiveFieldStatsResult(
        radius_table, area_table, thresholds_name, threshold_values, used, skipped, out_dir, files
    )
