"""``dcn-inspect dilation-stats``: effective dilation per deformable layer and object size
(the paper's Table 2), streamed over a dataset of any size, on one process or under torchrun.

Pipeline: annotations (:mod:`dcn_inspect.io.annotations`) -> a ``DataLoader`` that decodes and
preprocesses images in worker processes (:class:`~dcn_inspect.io.images.DatasetImages`) ->
batches of images with the SAME model-input size (after the model's own padding to its size
divisor; no padding beyond that, so every unit is exactly what a one-image forward gives,
:func:`size_batches`) -> one forward per batch with the offsets captured
(:mod:`dcn_inspect.capture.session`) ->
:class:`~dcn_inspect.analysis.dilation_stats.DilationAccumulator` (effective dilation and
category of every unit, streaming statistics) -> the ranks merged
(:mod:`dcn_inspect.commands.dilation_ranks`) -> rank 0 writes ``dilation_table.csv``,
``dilation_differences.csv``, ``dilation_table.md`` (:mod:`dcn_inspect.report.dilation_stats`),
``dilation_hist.png``, ``dilation_units.csv`` (``per_unit``,
:mod:`dcn_inspect.commands.dilation_units`) and ``summary.json``.

Frames are derived through the real forward once per model-input size and reused for later
batches of that size.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from dcn_inspect.analysis.category_stats import BINS, CategoryStats
from dcn_inspect.analysis.dilation_stats import UNITS, DilationAccumulator
from dcn_inspect.analysis.dilation_tables import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    DIFFERENCES_CSV,
    TABLE_CSV,
    UNITS_CSV,
    Intervals,
    bootstrap_intervals,
    differences_frame,
    table_frame,
)
from dcn_inspect.analysis.size_categories import resolve_thresholds
from dcn_inspect.capture.selection import select_layers
from dcn_inspect.capture.session import capture_offsets, forward
from dcn_inspect.commands.common import CommandRun, start_run
from dcn_inspect.commands.dilation_ranks import Measured, Merged, merge_ranks
from dcn_inspect.commands.dilation_units import UnitWriter, assemble_units
from dcn_inspect.commands.distributed import World, join_world
from dcn_inspect.commands.options import DatasetOptions, ImageInput, ModelChoice, OutputOptions
from dcn_inspect.core.columns import describe, present
from dcn_inspect.core.defaults import DEFAULT_MAX_PIXELS, DEFAULT_OUT
from dcn_inspect.core.errors import InputError
from dcn_inspect.io.annotations import AnnotatedDataset, ImageAnnotation, load_dataset
from dcn_inspect.io.images import (
    DatasetImages,
    ImageItem,
    SkippedImages,
    check_max_pixels,
    model_input_size,
)
from dcn_inspect.io.outputs import check_out_dir, write_csv, write_figure, write_text
from dcn_inspect.models.loaded_model import LoadedModel

__all__ = [
    "DilationStatsResult",
    "dilation_stats",
    "size_batches",
]

#: The files a run may write into ``out``.
OUTPUT_NAMES = (
    "dilation_table.csv",
    "dilation_differences.csv",
    "dilation_table.md",
    "dilation_hist.png",
    "dilation_units.csv",
    "summary.json",
)


@dataclass
class DilationStatsResult:
    """What :func:`dilation_stats` computed (identical on every rank) and where rank 0 wrote it."""

    table: pd.DataFrame  # dilation_table.csv: means with their bootstrap intervals
    # dilation_differences.csv: differences of category means with intervals
    differences: pd.DataFrame
    # row layer name (top layer first; "<layer>:g<k>" per group) -> statistics
    stats: Dict[str, CategoryStats]
    intervals: Dict[str, Intervals]  # row layer name -> bootstrap intervals over images
    thresholds_name: str
    thresholds: Tuple[float, float]
    units: str
    images_used: int
    skipped: SkippedImages
    out_dir: Optional[Path]
    files: Dict[str, Path] = field(default_factory=dict)
    summary: Dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    wall_seconds: float = 0.0


@dataclass(frozen=True)
class _Options:
    """dilation-stats' own choices (the shared ones are in :mod:`dcn_inspect.commands.options`)."""

    layers: Optional[Sequence[str]]  # layer names to measure; None: every deformable layer
    units: str  # cells or pixels
    per_group: bool  # one row per offset group instead of the groups' mean
    per_unit: bool  # also write dilation_units.csv
    batch_size: int
    workers: int  # DataLoader worker processes
    figure: bool  # write dilation_hist.png
    write: bool  # False when ``out`` is None: compute only, write nothing


def dilation_stats(
    dataset: Optional[Path] = None,
    images: Optional[Path] = None,
    split: Optional[str] = None,
    model: Union[str, LoadedModel, None] = None,
    weights: Optional[Path] = None,
    layers: Optional[Sequence[str]] = None,
    thresholds: str = "paper",
    units: str = "cells",
    per_group: bool = False,
    per_unit: bool = False,
    max_images: Optional[int] = None,
    batch_size: int = 1,
    workers: int = 2,
    device: str = "cpu",
    resize: Optional[int] = None,
    strict: bool = False,
    out: Optional[Path] = Path(DEFAULT_OUT),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    figure: bool = True,
    allow_outside_paths: bool = False,
) -> DilationStatsResult:
    """Effective dilation of every deformable layer per object-size category over a dataset.

    Writes (rank 0, when ``out`` is given) ``dilation_table.csv`` (with 95 % bootstrap intervals
    of every mean), ``dilation_differences.csv``, ``dilation_table.md``, ``dilation_hist.png``
    (``figure``), ``dilation_units.csv`` (``per_unit``) and ``summary.json``. Returns the merged
    result on every rank.
    """
    started = time.time()
    data_options = DatasetOptions(
        dataset=dataset,
        images_dir=images,
        split=split,
        max_images=max_images,
        thresholds=thresholds,
        allow_outside_paths=allow_outside_paths,
    )
    inputs = ImageInput(resize=resize, max_pixels=max_pixels, device=device, strict=strict)
    output = OutputOptions(
        check_out_dir(out) if out is not None else Path(DEFAULT_OUT), progress=progress
    )
    options = _Options(
        layers, units, per_group, per_unit, batch_size, workers, figure, write=out is not None
    )
    _check_options(options, data_options, inputs)
    chosen = _read_dataset(data_options)
    with join_world(inputs.device) as (world, device):
        inputs = replace(inputs, device=device)
        writes = options.write and world.is_main
        with start_run(
            "dilation-stats",
            _parameters(data_options, inputs, options),
            ModelChoice(model, weights),
            inputs,
            output.out,
            create_out=writes,
            outputs=[output.out / name for name in OUTPUT_NAMES] if writes else [],
        ) as run:
            if writes:
                run.outputs.protect("dataset", [chosen.data.root, *chosen.paths()])
            merged, result = _measure_ranks(run, world, chosen, options, inputs, output.progress)
            result.wall_seconds = time.time() - started
            _fill_summary(run, chosen, merged, result, world, options)
            if writes:
                result.files = _write_outputs(run, merged, result, options)
            result.summary = run.summary.data
            if world.distributed:
                # Other ranks return only after rank 0 has read their part files.
                world.gather(None)
    return result


# --------------------------------------------------------------------------------------------
# Steps


def _check_options(options: _Options, data: DatasetOptions, inputs: ImageInput) -> None:
    """Every option checked before any file is read (in this order: the first error wins)."""
    if options.units not in UNITS:
        raise InputError(f"{options.units!r}: use cells or pixels", param="units")
    if options.batch_size < 1:
        raise InputError(f"{options.batch_size}: must be at least 1", param="batch_size")
    if options.workers < 0:
        raise InputError(f"{options.workers}: must be 0 or more", param="workers")
    if options.workers > max_workers():
        raise InputError(
            f"{options.workers}: at most {max_workers()} worker processes (4 per CPU core)",
            param="workers",
        )
    if data.max_images is not None and data.max_images < 1:
        raise InputError(f"{data.max_images}: must be at least 1", param="max_images")
    inputs.checked()
    check_max_pixels(inputs.max_pixels)
    if options.per_unit and not options.write:
        raise InputError("needs an output directory (`out`)", param="per_unit")


def max_workers() -> int:
    """The most DataLoader worker processes a run may start: 4 per CPU core (at least 8)."""
    return max(8, 4 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class _ChosenImages:
    """The dataset read, the images to measure (the first ``max_images``) and the area
    thresholds of their size categories."""

    data: AnnotatedDataset
    split: Optional[str]
    entries: List[ImageAnnotation]
    thresholds_name: str
    thresholds: Tuple[float, float]

    def paths(self) -> List[Path]:
        return [entry.path for entry in self.entries]


def _read_dataset(options: DatasetOptions) -> _ChosenImages:
    """The dataset's annotations, the images to measure and the thresholds (``tertiles``: of
    their non-ignored boxes' areas)."""
    data = load_dataset(
        options.dataset,
        options.images_dir,
        options.split,
        allow_outside_paths=options.allow_outside_paths,
    )
    max_images = options.max_images
    entries = data.images[:max_images] if max_images is not None else data.images
    if not entries:
        raise InputError(f"{data.root}: the dataset has no images")
    areas = np.concatenate([e.areas[~e.ignore] for e in entries])
    name, thresholds = resolve_thresholds(options.thresholds, areas)
    return _ChosenImages(data, options.split, entries, name, thresholds)


def _parameters(data: DatasetOptions, inputs: ImageInput, options: _Options) -> Dict[str, Any]:
    """``summary.json``'s parameters, as the command was given them."""
    return {
        "dataset": str(data.dataset) if data.dataset is not None else None,
        "images": data.images_dir,
        "split": data.split,
        "layers": list(options.layers) if options.layers else None,
        "thresholds": data.thresholds,
        "units": options.units,
        "per_group": options.per_group,
        "per_unit": options.per_unit,
        "max_images": data.max_images,
        "batch_size": options.batch_size,
        "workers": options.workers,
        "resize": inputs.resize,
        "strict": inputs.strict,
        "max_pixels": inputs.max_pixels,
        "allow_outside_paths": data.allow_outside_paths,
    }


def size_batches(
    input_sizes: Sequence[Tuple[int, int]], batch_size: int, max_pixels: int = 0
) -> List[List[int]]:
    """Positions grouped into batches of equal model-input size, at most ``batch_size`` each and,
    with ``max_pixels`` > 0, at most that many pixels together (one forward's memory is bounded
    like one image's; a single image always makes a batch).

    Deterministic: positions are visited in order; a batch is emitted when its size group is
    full, and unfinished groups are emitted at the end in order of their first position.
    """
    open_groups: Dict[Tuple[int, int], List[int]] = {}
    batches: List[List[int]] = []
    for position, size in enumerate(input_sizes):
        fits = max(1, max_pixels // max(1, size[0] * size[1])) if max_pixels > 0 else batch_size
        group = open_groups.setdefault(size, [])
        group.append(position)
        if len(group) >= min(batch_size, fits):
            batches.append(group)
            del open_groups[size]
    batches.extend(open_groups.values())
    return batches


def _image_loader(
    run: CommandRun,
    entries: Sequence[ImageAnnotation],
    shard: List[int],
    inputs: ImageInput,
    options: _Options,
) -> DataLoader:
    """Batches of equal model-input size, decoded in ``options.workers`` processes."""
    preprocess = run.loaded.preprocess
    input_sizes = [
        model_input_size((entries[i].height, entries[i].width), preprocess, inputs.resize)[1]
        for i in shard
    ]
    fork = options.workers > 0 and "fork" in torch.multiprocessing.get_all_start_methods()
    return DataLoader(
        DatasetImages(entries, shard, preprocess, inputs.resize, inputs.max_pixels),
        batch_sampler=size_batches(input_sizes, options.batch_size, inputs.max_pixels),
        num_workers=options.workers,
        collate_fn=_as_list,
        persistent_workers=False,
        multiprocessing_context="fork" if fork else None,
    )


def _as_list(items: List[ImageItem]) -> List[ImageItem]:
    return items


def _measure_ranks(
    run: CommandRun,
    world: World,
    chosen: _ChosenImages,
    options: _Options,
    inputs: ImageInput,
    progress: bool,
) -> Tuple[Merged, DilationStatsResult]:
    """Every rank measures its shard; the ranks merged and turned into tables (on every rank)."""
    entries = chosen.entries
    out_dir = run.out_dir if options.write else None
    if world.distributed and out_dir is not None:
        # Rank 0 has created the output directory before anyone writes parts.
        world.gather(None)
    measured = _measure(
        run,
        entries,
        world.shard(len(entries)),
        chosen.thresholds,
        options,
        inputs,
        per_unit=options.per_unit and out_dir is not None,
        progress=progress and world.is_main,
    )
    merged = merge_ranks(world, measured, entries, inputs.strict, options.per_group)
    if merged.images_used == 0:
        merged.skipped.check_any_used(0, str(chosen.data.root))
    return merged, _result(merged, options, chosen, out_dir, world)


def _measure(
    run: CommandRun,
    entries: Sequence[ImageAnnotation],
    shard: List[int],
    thresholds: Tuple[float, float],
    options: _Options,
    inputs: ImageInput,
    per_unit: bool,
    progress: bool,
) -> Measured:
    """Forward every image of this rank's shard and accumulate its units."""
    from dcn_inspect.io.progress import image_progress

    writer = UnitWriter(run, entries, options.per_group) if per_unit else None
    accumulator = DilationAccumulator(
        thresholds,
        options.units,
        options.per_group,
        run.device,
        writer.write_image if writer else None,
    )
    skipped = SkippedImages(len(entries), inputs.strict)
    layers = _LayerChoice(options.layers)
    used = 0
    forward_seconds = 0.0
    try:
        with torch.no_grad(), image_progress("dilation-stats", progress, len(shard)) as advance:
            for items in _image_loader(run, entries, shard, inputs, options):
                for item in items:
                    if item.error is not None:
                        skipped.skip(entries[item.index].file_name, item.error)
                good = [item for item in items if item.error is None]
                if good:
                    forward_seconds += _add_batch(run, accumulator, layers, entries, good)
                    used += len(good)
                advance(len(items))
    finally:
        if writer is not None:
            writer.close()
    return Measured(
        accumulator,
        skipped,
        used,
        forward_seconds,
        writer.path if writer else None,
        writer.index if writer else [],
    )


@dataclass
class _LayerChoice:
    """The layers to measure: ``requested`` names, resolved against the first forward's layers
    (``selected``), then the same for every batch."""

    requested: Optional[Sequence[str]]
    selected: Optional[List[str]] = None


def _add_batch(
    run: CommandRun,
    accumulator: DilationAccumulator,
    layers: _LayerChoice,
    entries: Sequence[ImageAnnotation],
    good: List[ImageItem],
) -> float:
    """One forward of a batch of equal-size images with the offsets captured, its units added to
    ``accumulator``; returns the forward's seconds."""
    batch = torch.stack([item.tensor for item in good]).to(run.device)  # type: ignore[misc]
    input_hw = (int(batch.shape[-2]), int(batch.shape[-1]))
    tick = time.perf_counter()
    with capture_offsets(
        run.loaded.model, track_frames=accumulator.needs_frames(input_hw)
    ) as capture:
        capture.watch_input(batch)
        forward(run.loaded.model, batch, run.loaded.name)
    seconds = time.perf_counter() - tick
    if layers.selected is None:
        layers.selected = [
            r.name
            for r in select_layers(
                capture.convs, layers.requested, min_kernel_points=2, model_name=run.loaded.name
            )
        ]
    chosen = [r for r in capture.convs.values() if r.name in layers.selected]
    accumulator.add(
        chosen,
        [entries[item.index] for item in good],
        [item.index for item in good],
        input_hw,
        [item.resized_hw or input_hw for item in good],
    )
    return seconds


def _result(
    merged: Merged,
    options: _Options,
    chosen: _ChosenImages,
    out_dir: Optional[Path],
    world: World,
) -> DilationStatsResult:
    """The merged statistics as tables, with their bootstrap intervals over images."""
    intervals = bootstrap_intervals(merged.image_sums)
    units, per_group = options.units, options.per_group
    return DilationStatsResult(
        table=table_frame(merged.stats, units, intervals, per_group),
        differences=differences_frame(merged.stats, intervals, units, per_group),
        stats=merged.stats,
        intervals=intervals,
        thresholds_name=chosen.thresholds_name,
        thresholds=chosen.thresholds,
        units=units,
        images_used=merged.images_used,
        skipped=merged.skipped,
        out_dir=out_dir,
        rank=world.rank,
        world_size=world.size,
    )


def _fill_summary(
    run: CommandRun,
    chosen: _ChosenImages,
    merged: Merged,
    result: DilationStatsResult,
    world: World,
    options: _Options,
) -> None:
    """``summary.json``: the dataset, the images used and skipped, the thresholds, how the
    statistics are computed, the layers measured and the run's speed."""
    summary = run.summary
    data = chosen.data
    summary["dataset"] = {
        "path": str(data.root),
        "format": data.format,
        "split": chosen.split,
        "images_in_dataset": len(data.images),
        "images_selected": len(chosen.entries),
        "categories": data.categories,
        "issues": data.issues,
    }
    summary["images"] = {"used": merged.images_used}
    summary["skipped"] = merged.skipped.summary()
    summary["notes"] = run.notes
    summary["thresholds"] = {
        "name": result.thresholds_name,
        "small_medium_px2": result.thresholds[0],
        "medium_large_px2": result.thresholds[1],
    }
    summary["units"] = result.units
    summary["statistics"] = _statistics_note(options.per_group)
    summary["units_not_counted"] = {
        name: {"ignored_box": c[0], "centre_outside_image": c[1]}
        for name, c in merged.not_counted.items()
    }
    summary["layers"] = [merged.layer_info[name] for name in reversed(list(merged.layer_info))]
    summary["geometry_method"] = sorted(
        {info["geometry"]["method"] for info in merged.layer_info.values()}
    )
    summary["distributed"] = {"world_size": world.size, "backend": world.backend()}
    summary["forward_seconds"] = round(merged.forward_seconds, 3)
    summary["images_per_second"] = (
        round(merged.images_used / result.wall_seconds, 3) if result.wall_seconds > 0 else None
    )


def _statistics_note(per_group: bool) -> Dict[str, Any]:
    """``summary.json`` ``statistics``: how the table's statistics and intervals are computed."""
    return {
        "std": "population (ddof=0)",
        "percentiles": "from fixed log-spaced histograms, clamped to the exact min/max",
        "bins": BINS.as_dict(),
        "offset_groups": "per group" if per_group else "mean of the groups' dilations",
        "confidence_intervals": {
            "level": 0.95,
            "method": "percentile bootstrap over images "
            "(an image's units are correlated, so the image is the sample): "
            "each resample draws the used images with replacement and recomputes every "
            "category mean as "
            "(sum over the drawn images' units) / (their number of units)",
            "resamples": BOOTSTRAP_RESAMPLES,
            "seed": BOOTSTRAP_SEED,
            "differences": "mean of category_a - mean of category_b, "
            "intervals from the same resamples",
        },
    }


def _write_outputs(
    run: CommandRun, merged: Merged, result: DilationStatsResult, options: _Options
) -> Dict[str, Path]:
    """Rank 0: the tables (CSV, Markdown), the histogram figure, the per-unit CSV and
    summary.json."""
    from dcn_inspect.report.dilation_stats import draw_dilation_histograms, table_markdown

    out_dir = run.out_dir
    files = {
        "table_csv": out_dir / "dilation_table.csv",
        "differences_csv": out_dir / "dilation_differences.csv",
        "table_md": out_dir / "dilation_table.md",
    }
    table_columns = present(TABLE_CSV, per_group=options.per_group)
    difference_columns = present(DIFFERENCES_CSV, per_group=options.per_group)
    unit_columns = present(UNITS_CSV, per_group=options.per_group)
    write_csv(files["table_csv"], result.table, table_columns)
    write_csv(files["differences_csv"], result.differences, difference_columns)
    columns = {
        "dilation_table.csv": describe(table_columns),
        "dilation_differences.csv": describe(difference_columns),
    }
    write_text(
        files["table_md"],
        table_markdown(
            result.table,
            result.units,
            result.thresholds_name,
            result.thresholds,
            result.differences,
        ),
    )
    if options.figure:
        files["figure"] = out_dir / "dilation_hist.png"
        write_figure(
            files["figure"],
            draw_dilation_histograms(
                merged.stats, result.units, result.thresholds_name, run.loaded.titled
            ),
            dpi=100,
        )
    if merged.unit_parts:
        files["units_csv"] = assemble_units(
            out_dir / "dilation_units.csv",
            merged.unit_parts,
            merged.unit_index,
            [c.name for c in unit_columns],
        )
        columns["dilation_units.csv"] = describe(unit_columns)
    run.summary["columns"] = columns
    run.summary["outputs"] = sorted(p.name for p in files.values())
    files["summary"] = run.summary.write(out_dir)
    return files
