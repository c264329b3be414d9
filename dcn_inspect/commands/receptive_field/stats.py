"""``dcn-inspect receptive-field --stats``: a gradient-based Table 2 -- the ERF 90 % radius and
the saliency-region area per followed layer and object-size category, over a dataset
(:func:`receptive_field_stats`).

Units: in every image and followed layer, one at each non-ignored ground-truth box centre and
one background unit (:func:`dcn_inspect.analysis.unit_selection.box_units`; the image centre
when the image has no box); each unit's category is the one ``dilation-stats`` gives its cell
(:func:`dcn_inspect.analysis.size_categories.unit_categories`). Each layer's units are analysed
with that layer alone followed. The per-category statistics are mergeable
(:class:`~dcn_inspect.analysis.category_stats.CategoryStats`), written in the dilation-stats
layout; radii in original-image pixels, areas in original-image pixels². A unit without a
saliency region (the masked image already meets the error bound) counts in the radius table
only; ``summary.json`` counts them per layer, with the saliency search's masked forwards per
unit and the relative error it reached (over all layers and per layer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch

from dcn_inspect.analysis.category_stats import BINS, CategoryStats, LogBins
from dcn_inspect.analysis.dilation_tables import category_table_columns, table_frame
from dcn_inspect.analysis.receptive_field.fields import ReceptiveFields, receptive_fields
from dcn_inspect.analysis.receptive_field.saliency import (
    DEFAULT_SALIENCY_ERROR,
    FOUND,
    MAX_FORWARDS_PER_UNIT,
    SaliencyRegion,
    saliency_cost,
)
from dcn_inspect.analysis.receptive_field.table import NOT_SEARCHED, STATS_UNITS_CSV
from dcn_inspect.analysis.sample_points import tree_on_image
from dcn_inspect.analysis.size_categories import (
    CATEGORIES,
    CATEGORY_CODES,
    resolve_thresholds,
    unit_categories,
)
from dcn_inspect.analysis.unit_selection import box_units, nearest_unit
from dcn_inspect.capture.gradients import DEFAULT_BATCH_SIZE, GradientForward
from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.commands.common import CommandRun, start_run
from dcn_inspect.commands.options import (
    DatasetOptions,
    ImageInput,
    ModelChoice,
    OutputOptions,
    UnitOptions,
)
from dcn_inspect.commands.receptive_field.choices import (
    RESPONSE_DEFINITION,
    SALIENCY_SCHEDULE,
    FieldOptions,
    check_options,
    followed_records,
)
from dcn_inspect.core.columns import describe, names
from dcn_inspect.core.defaults import DEFAULT_MAX_PIXELS, DEFAULT_OUT
from dcn_inspect.core.errors import InputError
from dcn_inspect.io.annotations import load_dataset
from dcn_inspect.io.images import ImageError, ModelInput, SkippedImages, read_model_input
from dcn_inspect.io.outputs import write_csv, write_text
from dcn_inspect.io.progress import image_progress
from dcn_inspect.models.loaded_model import LoadedModel
from dcn_inspect.report.dilation_stats import table_markdown

__all__ = ["STATS_UNIT_COLUMNS", "ReceptiveFieldStatsResult", "receptive_field_stats"]

#: Columns of ``receptive_field_units.csv`` (stats mode).
STATS_UNIT_COLUMNS = names(STATS_UNITS_CSV)

#: Histogram of the saliency areas (px², up to 1e9: CategoryStats' default bins stop at 1e5).
AREA_BINS_HIGH = 1e9

#: The files the dataset mode writes (besides ``summary.json``).
_OUTPUT_NAMES = (
    "erf_radius_table.csv",
    "erf_radius_table.md",
    "saliency_area_table.csv",
    "saliency_area_table.md",
    "receptive_field_units.csv",
)


@dataclass
class ReceptiveFieldStatsResult:
    """The tables of :func:`receptive_field_stats` and where they were written."""

    # dilation-stats layout: layer, category, count, mean, std, median, p10, p90, units
    radius_table: pd.DataFrame
    area_table: pd.DataFrame
    thresholds_name: str
    thresholds: Tuple[float, float]
    images_used: int
    skipped: Any
    out_dir: Path
    files: Dict[str, Path] = field(default_factory=dict)
    # per layer: units left out of the area table (no saliency region)
    without_region: Dict[str, int] = field(default_factory=dict)


@dataclass
class _Tally:
    """What the images add up to: per followed layer the ERF radius and saliency area
    statistics per category, and one row per unit (``receptive_field_units.csv``)."""

    radius: Dict[str, CategoryStats] = field(default_factory=dict)
    area: Dict[str, CategoryStats] = field(default_factory=dict)
    area_bins: LogBins = field(default_factory=lambda: LogBins(high=AREA_BINS_HIGH))
    rows: List[List[Any]] = field(default_factory=list)
    followed: List[str] = field(default_factory=list)  # layer names, top first
    used: int = 0  # images measured
    without_region: Dict[str, int] = field(default_factory=dict)  # per layer: no saliency region
    saliency: Dict[str, List[SaliencyRegion]] = field(default_factory=dict)  # per layer

    def add(self, image: str, layer: str, item: ReceptiveFields, codes: torch.Tensor) -> None:
        """The units of one image and layer (``codes``: their category codes)."""
        radii = torch.tensor([n.radius_90 for n in item.numbers], dtype=torch.float64)
        finite = torch.isfinite(radii)
        self.radius.setdefault(layer, CategoryStats(len(CATEGORIES), BINS)).update(
            radii[finite], codes[finite]
        )
        area = self.area.setdefault(layer, CategoryStats(len(CATEGORIES), self.area_bins))
        self.without_region.setdefault(layer, 0)
        self.saliency.setdefault(layer, []).extend(item.saliency)
        if item.saliency:
            boxes = item.saliency_boxes
            sizes = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            region = torch.tensor([r.status == FOUND for r in item.saliency], dtype=torch.bool)
            area.update(sizes[region], codes[region])
            self.without_region[layer] += int((~region).sum())
        else:  # no saliency search (`no_saliency`): no areas, no unit counted as without one
            sizes = torch.full((item.num_units,), float("nan"), dtype=torch.float64)
        for k in range(item.num_units):
            x, y = (float(v) for v in item.unit_xy[k])
            numbers = item.numbers[k]
            category = CATEGORY_CODES[int(codes[k])]
            self.rows.append(
                [
                    image,
                    layer,
                    x,
                    y,
                    category,
                    numbers.radius_50,
                    numbers.radius_90,
                    float(sizes[k]),
                    item.saliency[k].status if item.saliency else NOT_SEARCHED,
                ]
            )


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
    background unit (:func:`dcn_inspect.analysis.unit_selection.box_units`); each unit's
    category is the one ``dilation-stats`` gives its cell
    (:func:`dcn_inspect.analysis.size_categories.unit_categories`: the smallest box containing
    the centre decides small / medium / large by area, no box = background, crowd /
    difficult-only and off-image centres count nowhere). Writes ``erf_radius_table.csv|md``,
    ``saliency_area_table.csv|md`` (the dilation-stats layout), ``receptive_field_units.csv``
    and ``summary.json``.
    """
    started = time.time()
    data_options = DatasetOptions(dataset, images_dir, split, max_images, thresholds)
    inputs = ImageInput(resize, max_pixels, device, strict)
    units, own, output = check_options(
        UnitOptions(layers, levels),
        FieldOptions(channel, saliency_error, saliency_step, batch_size),
        inputs,
        OutputOptions(out, "png", progress),
    )
    data, entries = _dataset_entries(data_options)
    areas = np.concatenate([e.areas[~e.ignore] for e in entries])
    thresholds_name, threshold_values = resolve_thresholds(data_options.thresholds, areas)
    run = start_run(
        "receptive-field --stats",
        _parameters(data_options, units, own, inputs),
        ModelChoice(model, weights),
        inputs,
        output.out,
        outputs=[Path(output.out) / n for n in _OUTPUT_NAMES],
    )
    with run:
        tally, skipped = _measure(
            run, entries, units, own, inputs, threshold_values, output.progress
        )
        skipped.check_any_used(tally.used, str(data.root))
        return _write_stats(
            run,
            data,
            len(entries),
            data_options,
            tally,
            skipped,
            own,
            (thresholds_name, threshold_values),
            started,
        )


def _dataset_entries(data_options: DatasetOptions) -> Tuple[Any, Sequence[Any]]:
    """The dataset and its images in use (the first ``max_images``); an error when there are
    none."""
    max_images = data_options.max_images
    if max_images is not None and max_images < 1:
        raise InputError(f"{max_images}: must be at least 1", param="max_images")
    data = load_dataset(data_options.dataset, data_options.images_dir, data_options.split)
    entries = data.images[:max_images] if max_images is not None else data.images
    if not entries:
        raise InputError(f"{data.root}: the dataset has no images")
    return data, entries


def _parameters(
    data: DatasetOptions, units: UnitOptions, own: FieldOptions, inputs: ImageInput
) -> Dict[str, Any]:
    """``summary.json``'s parameters, as given (``saliency_error`` as a float)."""
    return {
        "dataset": str(data.dataset) if data.dataset is not None else None,
        "images_dir": data.images_dir,
        "split": data.split,
        "layers": list(units.layers) if units.layers else None,
        "levels": units.levels,
        "thresholds": data.thresholds,
        "channel": own.channel,
        "saliency_error": own.saliency_error,
        "saliency_step": own.saliency_step,
        "max_images": data.max_images,
        "batch_size": own.batch_size,
        "resize": inputs.resize,
        "strict": inputs.strict,
        "max_pixels": inputs.max_pixels,
    }


def _measure(
    run: CommandRun,
    entries: Sequence[Any],
    units: UnitOptions,
    own: FieldOptions,
    inputs: ImageInput,
    threshold_values: Tuple[float, float],
    progress: bool,
) -> Tuple[_Tally, SkippedImages]:
    """Every usable image's units measured into one :class:`_Tally`; unusable images skipped
    (or, with ``strict``, an error)."""
    tally = _Tally()
    skipped = SkippedImages(len(entries), inputs.strict)
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
                    inputs.resize,
                    inputs.max_pixels,
                    (entry.height, entry.width),
                )
            except ImageError as exc:
                skipped.skip(entry.file_name, exc)
                advance()
                continue
            forward = GradientForward(run.loaded.model, model_input.tensor.to(run.device))
            records = followed_records(forward, units, run.loaded.name)
            tally.followed = tally.followed or [r.name for r in records]
            for record in records:
                cells, codes = _layer_units(record, entry, model_input, threshold_values)
                item = receptive_fields(
                    forward,
                    [record],
                    torch.tensor(cells, dtype=torch.long),
                    model_input.original_hw,
                    run.loaded.preprocess.std,
                    channel=own.channel,
                    saliency_error=own.saliency_error,
                    saliency_step=own.saliency_step,
                    batch_size=own.batch_size,
                    content_hw=model_input.content_hw,
                    keep_graph=record is not records[-1],  # freed after the last layer's
                )
                tally.add(entry.file_name, record.name, item, codes)
            tally.used += 1
            advance()
    return tally, skipped


def _layer_units(
    record: DeformConvRecord,
    entry: Any,
    model_input: ModelInput,
    threshold_values: Tuple[float, float],
) -> Tuple[List[Tuple[int, int]], torch.Tensor]:
    """The cells (row, col) of one layer's units in one image -- one at each non-ignored box
    centre and one background unit, else the image centre; duplicates once -- and their
    category codes."""
    sx, sy = model_input.scale_to_original
    kept = ~np.asarray(entry.ignore, dtype=bool)
    frame = record.geometry.output_frame.scaled(sx, sy)
    output_hw = record.geometry.output_hw
    codes_map = unit_categories(
        frame,
        output_hw,
        (entry.width, entry.height),
        entry.boxes,
        entry.ignore,
        threshold_values,
    )
    labels = [entry.labels[i] for i in np.nonzero(kept)[0]]
    units = box_units(
        frame,
        output_hw,
        entry.boxes[kept],
        labels,
        "annotations",
        tree_on_image([record], (entry.height, entry.width), scale_to_original=(sx, sy)),
    )
    if not units:
        units = [nearest_unit(frame, output_hw, entry.width / 2, entry.height / 2, "image centre")]
    cells = list(dict.fromkeys((u.row, u.col) for u in units))
    codes = torch.tensor([int(codes_map[row, col]) for row, col in cells], dtype=torch.long)
    return cells, codes


def _write_area_table(
    files: Dict[str, Path],
    area_table: pd.DataFrame,
    own: FieldOptions,
    thresholds: Tuple[str, Tuple[float, float]],
) -> Optional[Tuple[Any, ...]]:
    """The saliency area table (CSV and markdown) and its columns; without a saliency search
    (`no_saliency`) nothing (and its files leave ``files``)."""
    if own.saliency_error is None:
        del files["area_csv"], files["area_md"]
        return None
    columns = category_table_columns(
        f"error-bounded saliency region area (error {own.saliency_error:g})",
        "original-image pixels²",
    )
    write_csv(files["area_csv"], area_table, columns)
    write_text(
        files["area_md"],
        table_markdown(
            area_table,
            "original-image pixels²",
            thresholds[0],
            thresholds[1],
            title=f"Saliency region area (error {own.saliency_error:g})",
        ),
    )
    return tuple(columns)


def _write_stats(
    run: CommandRun,
    data: Any,
    selected: int,
    data_options: DatasetOptions,
    tally: _Tally,
    skipped: SkippedImages,
    own: FieldOptions,
    thresholds: Tuple[str, Tuple[float, float]],
    started: float,
) -> ReceptiveFieldStatsResult:
    """The two tables (CSV and markdown), the units CSV and ``summary.json``."""
    thresholds_name, threshold_values = thresholds
    order = [name for name in tally.followed if name in tally.radius]
    radius_table = table_frame(
        {name: tally.radius[name] for name in order}, "original-image pixels"
    )
    area_table = table_frame({name: tally.area[name] for name in order}, "original-image pixels^2")
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
    area_columns = _write_area_table(files, area_table, own, thresholds)
    units_frame = pd.DataFrame(tally.rows, columns=STATS_UNIT_COLUMNS)
    write_csv(files["units_csv"], units_frame, STATS_UNITS_CSV)
    run.summary["columns"] = {
        "erf_radius_table.csv": describe(radius_columns),
        **({"saliency_area_table.csv": describe(area_columns)} if area_columns else {}),
        "receptive_field_units.csv": describe(STATS_UNITS_CSV),
    }
    _fill_summary(run, data, selected, data_options, tally, order, own, thresholds)
    run.summary["outputs"] = sorted(p.name for p in files.values())
    run.summary["wall_seconds_measured"] = round(time.time() - started, 3)
    files["summary"] = run.finish(skipped)
    return ReceptiveFieldStatsResult(
        radius_table,
        area_table,
        thresholds_name,
        threshold_values,
        tally.used,
        skipped,
        out_dir,
        files,
        {name: tally.without_region.get(name, 0) for name in order},
    )


def _fill_summary(
    run: CommandRun,
    data: Any,
    selected: int,
    data_options: DatasetOptions,
    tally: _Tally,
    order: List[str],
    own: FieldOptions,
    thresholds: Tuple[str, Tuple[float, float]],
) -> None:
    """``summary.json``: the dataset, images used, layers, thresholds, units, the response's
    definition and the saliency search."""
    thresholds_name, threshold_values = thresholds
    run.summary["dataset"] = {
        "path": str(data.root),
        "format": data.format,
        "split": data_options.split,
        "images_selected": selected,
        "issues": data.issues,
    }
    run.summary["images"] = {"used": tally.used}
    run.summary["layers"] = order
    run.summary["thresholds"] = {
        "name": thresholds_name,
        "small_medium_px2": threshold_values[0],
        "medium_large_px2": threshold_values[1],
    }
    run.summary["units"] = (
        "one at each non-ignored box centre and one background unit per image and layer (the "
        "unit_selection of sample-points --boxes); categories as dilation-stats"
    )
    run.summary["response"] = {
        "definition": RESPONSE_DEFINITION,
        "channel": "sum over channels" if own.channel is None else own.channel,
    }
    saliency: Dict[str, Any] = {
        "searched": own.saliency_error is not None,
        "error": own.saliency_error,
        "schedule": SALIENCY_SCHEDULE,
        # left out of saliency_area_table: the masked image already meets the bound
        "units_without_region": {name: tally.without_region.get(name, 0) for name in order},
    }
    if own.saliency_error is not None:  # its cost and the error reached, all layers and each
        every = [r for name in order for r in tally.saliency.get(name, [])]
        saliency.update(
            {
                "error_bound": own.saliency_error,
                "max_forwards_per_unit": MAX_FORWARDS_PER_UNIT,
                **saliency_cost(every),
                "per_layer": {name: saliency_cost(tally.saliency.get(name, [])) for name in order},
            }
        )
    run.summary["saliency"] = saliency
