"""``dcn-inspect dilation-stats``: effective dilation per deformable layer and object size
(the paper's Table 2), streamed over a dataset of any size, on one process or under torchrun.

Pipeline: annotations (:mod:`dcn_inspect.io.annotations`) -> a ``DataLoader`` that decodes and
preprocesses images in worker processes (:class:`~dcn_inspect.io.images.DatasetImages`) ->
batches of images with the SAME model-input size (after the model's own padding to its size
divisor; no padding beyond that, so every unit is exactly what a one-image forward gives) -> one forward per batch with the offsets captured (:mod:`dcn_inspect.capture.session`)
-> :class:`~dcn_inspect.analysis.dilation_stats.DilationAccumulator` (effective dilation and category of every
unit, streaming statistics) -> the ranks merged (:mod:`dcn_inspect.commands.distributed`) -> rank 0
writes ``dilation_table.csv``, ``dilation_table.md``, ``dilation_hist.png``,
``dilation_units.csv`` (``per_unit``) and ``summary.json``.

Frames are derived through the real forward once per model-input size and reused for later
batches of that size.
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from dcn_inspect.analysis.category_stats import BINS, CategoryStats
from dcn_inspect.analysis.dilation_stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CATEGORIES,
    CATEGORY_CODES,
    DIFFERENCE_COLUMNS,
    DIFFERENCES_CSV,
    TABLE_COLUMNS,
    TABLE_CSV,
    UNIT_COLUMNS,
    UNITS,
    UNITS_CSV,
    DilationAccumulator,
    Intervals,
    bootstrap_intervals,
    differences_frame,
    resolve_thresholds,
    split_row,
    table_frame,
)
from dcn_inspect.capture.selection import select_layers
from dcn_inspect.capture.session import capture_offsets, forward
from dcn_inspect.commands.common import CommandRun, start_run
from dcn_inspect.commands.distributed import World, join_world
from dcn_inspect.commands.options import ImageInput, ModelChoice
from dcn_inspect.core.columns import describe, format_value, present
from dcn_inspect.core.defaults import DEFAULT_MAX_PIXELS, DEFAULT_OUT
from dcn_inspect.core.errors import InputError
from dcn_inspect.core.geometry import FrameMap
from dcn_inspect.io.annotations import AnnotatedDataset, ImageAnnotation, load_dataset
from dcn_inspect.io.images import (
    DatasetImages,
    ImageItem,
    SkippedImages,
    check_max_pixels,
    check_resize,
    model_input_size,
)
from dcn_inspect.io.outputs import atomic_path, write_csv, write_error, write_figure, write_text
from dcn_inspect.models.loaded_model import LoadedModel

__all__ = [
    "DIFFERENCE_COLUMNS",
    "TABLE_COLUMNS",
    "UNIT_COLUMNS",
    "DilationStatsResult",
    "dilation_stats",
    "size_batches",
    "table_markdown",
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
    differences: (
        pd.DataFrame
    )  # dilation_differences.csv: differences of category means with intervals
    stats: Dict[
        str, CategoryStats
    ]  # row layer name (top layer first; "<layer>:g<k>" per group) -> statistics
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
    _check_options(units, batch_size, workers, max_images, resize, per_unit, out, max_pixels)
    data = load_dataset(dataset, images, split, allow_outside_paths=allow_outside_paths)
    entries = data.images[:max_images] if max_images is not None else data.images
    if not entries:
        raise InputError(f"{data.root}: the dataset has no images")
    areas = np.concatenate([e.areas[~e.ignore] for e in entries])
    thresholds_name, threshold_values = resolve_thresholds(thresholds, areas)
    with join_world(device) as (world, device):
        parameters = {
            "dataset": str(dataset) if dataset is not None else None, "images": images, "split": split,
            "layers": list(layers) if layers else None, "thresholds": thresholds, "units": units,
            "per_group": per_group, "per_unit": per_unit, "max_images": max_images, "batch_size": batch_size,
            "workers": workers, "resize": resize, "strict": strict, "max_pixels": max_pixels,
            "allow_outside_paths": allow_outside_paths,
        }  # fmt: skip
        writes = out is not None and world.is_main
        target = Path(out) if out is not None else Path(DEFAULT_OUT)
        planned = [target / name for name in OUTPUT_NAMES] if writes else []
        with start_run(
            "dilation-stats",
            parameters,
            ModelChoice(model, weights),
            ImageInput(resize, max_pixels, device, strict),
            target,
            create_out=writes,
            outputs=planned,
        ) as run:
            if writes:
                run.outputs.protect("dataset", [data.root, *(entry.path for entry in entries)])
            out_dir = run.out_dir if out is not None else None
            if world.distributed and out_dir is not None:
                world.gather(
                    None
                )  # rank 0 has created the output directory before anyone writes parts
            shard = world.shard(len(entries))
            measured = _measure(
                run,
                entries,
                shard,
                layers,
                threshold_values,
                units,
                per_group,
                per_unit and out_dir is not None,
                batch_size,
                workers,
                resize,
                strict,
                max_pixels,
                progress and world.is_main,
            )
            merged = _merge_ranks(world, measured, entries, strict, per_group)
            if merged.images_used == 0:
                merged.skipped.check_any_used(0, str(data.root))
            intervals = bootstrap_intervals(merged.image_sums)
            result = DilationStatsResult(
                table=table_frame(merged.stats, units, intervals, per_group),
                differences=differences_frame(merged.stats, intervals, units, per_group),
                stats=merged.stats,
                intervals=intervals,
                thresholds_name=thresholds_name,
                thresholds=threshold_values,
                units=units,
                images_used=merged.images_used,
                skipped=merged.skipped,
                out_dir=out_dir,
                rank=world.rank,
                world_size=world.size,
            )
            result.wall_seconds = time.time() - started
            _fill_summary(run, data, entries, merged, result, world, split, per_group)
            if writes:
                result.files = _write_outputs(run, merged, result, figure, per_group)
            result.summary = run.summary.data
            if world.distributed:
                world.gather(None)  # other ranks return only after rank 0 has read their part files
    return result


# --------------------------------------------------------------------------------------------
# Steps


def _check_options(
    units: str,
    batch_size: int,
    workers: int,
    max_images: Optional[int],
    resize: Optional[int],
    per_unit: bool,
    out: Optional[Path],
    max_pixels: int,
) -> None:
    if units not in UNITS:
        raise InputError(f"{units!r}: use cells or pixels", param="units")
    if batch_size < 1:
        raise InputError(f"{batch_size}: must be at least 1", param="batch_size")
    if workers < 0:
        raise InputError(f"{workers}: must be 0 or more", param="workers")
    if workers > max_workers():
        raise InputError(
            f"{workers}: at most {max_workers()} worker processes (4 per CPU core)", param="workers"
        )
    if max_images is not None and max_images < 1:
        raise InputError(f"{max_images}: must be at least 1", param="max_images")
    check_resize(resize)
    check_max_pixels(max_pixels)
    if per_unit and out is None:
        raise InputError("needs an output directory (`out`)", param="per_unit")


def max_workers() -> int:
    """The most DataLoader worker processes a run may start: 4 per CPU core (at least 8)."""
    return max(8, 4 * (os.cpu_count() or 1))


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
    resize: Optional[int],
    max_pixels: int,
    batch_size: int,
    workers: int,
) -> DataLoader:
    """Batches of equal model-input size, decoded in ``workers`` processes."""
    preprocess = run.loaded.preprocess
    input_sizes = [
        model_input_size((entries[i].height, entries[i].width), preprocess, resize)[1]
        for i in shard
    ]
    return DataLoader(
        DatasetImages(entries, shard, preprocess, resize, max_pixels),
        batch_sampler=size_batches(input_sizes, batch_size, max_pixels),
        num_workers=workers,
        collate_fn=_as_list,
        persistent_workers=False,
        multiprocessing_context="fork"
        if workers > 0 and "fork" in torch.multiprocessing.get_all_start_methods()
        else None,
    )


def _as_list(items: List[ImageItem]) -> List[ImageItem]:
    return items


@dataclass
class _Measured:
    """What one rank measured."""

    accumulator: DilationAccumulator
    skipped: SkippedImages
    used: int
    forward_seconds: float
    unit_part: Optional[Path]
    unit_index: List[Tuple[int, int, int]]  # (image index, start, length) in unit_part


def _measure(
    run: CommandRun,
    entries: Sequence[ImageAnnotation],
    shard: List[int],
    layers: Optional[Sequence[str]],
    thresholds: Tuple[float, float],
    units: str,
    per_group: bool,
    per_unit: bool,
    batch_size: int,
    workers: int,
    resize: Optional[int],
    strict: bool,
    max_pixels: int,
    progress: bool,
) -> _Measured:
    """Forward every image of this rank's shard and accumulate its units."""
    from dcn_inspect.io.progress import image_progress

    writer = _UnitWriter(run, entries, per_group) if per_unit else None
    accumulator = DilationAccumulator(
        thresholds, units, per_group, run.device, writer.write_image if writer else None
    )
    skipped = SkippedImages(len(entries), strict)
    selected: Optional[List[str]] = None
    used = 0
    forward_seconds = 0.0
    try:
        with torch.no_grad(), image_progress("dilation-stats", progress, len(shard)) as advance:
            for items in _image_loader(
                run, entries, shard, resize, max_pixels, batch_size, workers
            ):
                for item in items:
                    if item.error is not None:
                        skipped.skip(entries[item.index].file_name, item.error)
                good = [item for item in items if item.error is None]
                if good:
                    batch = torch.stack([item.tensor for item in good]).to(run.device)  # type: ignore[misc]
                    input_hw = (int(batch.shape[-2]), int(batch.shape[-1]))
                    tick = time.perf_counter()
                    with capture_offsets(
                        run.loaded.model, track_frames=accumulator.needs_frames(input_hw)
                    ) as capture:
                        capture.watch_input(batch)
                        forward(run.loaded.model, batch, run.loaded.name)
                    forward_seconds += time.perf_counter() - tick
                    if selected is None:
                        selected = [
                            r.name
                            for r in select_layers(
                                capture.convs,
                                layers,
                                min_kernel_points=2,
                                model_name=run.loaded.name,
                            )
                        ]
                    chosen = [r for r in capture.convs.values() if r.name in selected]
                    accumulator.add(
                        chosen,
                        [entries[item.index] for item in good],
                        [item.index for item in good],
                        input_hw,
                        [item.resized_hw or input_hw for item in good],
                    )
                    used += len(good)
                advance(len(items))
    finally:
        if writer is not None:
            writer.close()
    return _Measured(
        accumulator,
        skipped,
        used,
        forward_seconds,
        writer.path if writer else None,
        writer.index if writer else [],
    )


@dataclass
class _Merged:
    """All ranks' measurements merged (identical on every rank)."""

    stats: Dict[str, CategoryStats]
    image_sums: Dict[
        str, List[Tuple[int, Any, Any]]
    ]  # row -> every image's (index, sums, counts), all ranks
    layer_info: Dict[str, Dict[str, Any]]
    not_counted: Dict[str, List[int]]
    skipped: SkippedImages
    images_used: int
    forward_seconds: float
    unit_parts: List[Path]
    unit_index: List[Tuple[int, int, int, int]]  # (image index, rank, start, length)


def _merge_ranks(
    world: World,
    measured: _Measured,
    entries: Sequence[ImageAnnotation],
    strict: bool,
    per_group: bool,
) -> _Merged:
    """Gather every rank's state and merge it in rank order (a single process merges itself)."""
    gathered = world.gather(
        {
            "state": measured.accumulator.state(),
            "skipped": measured.skipped.items,
            "used": measured.used,
            "unit_part": measured.unit_part,
            "unit_index": measured.unit_index,
            "forward_seconds": measured.forward_seconds,
        }
    )
    layer_info: Dict[str, Dict[str, Any]] = {}
    for payload in gathered:
        for name, info in payload["state"]["layers"].items():
            layer_info.setdefault(name, info)
    merged: Dict[str, CategoryStats] = {
        name: CategoryStats(len(CATEGORIES), BINS) for name in _row_order(gathered, per_group)
    }
    not_counted: Dict[str, List[int]] = {}
    image_sums: Dict[str, List[Tuple[int, Any, Any]]] = {name: [] for name in merged}
    for payload in gathered:
        for name, state in payload["state"]["stats"].items():
            merged[name].merge_(CategoryStats.from_state(state, BINS))
        for name, rows in payload["state"]["image_sums"].items():
            image_sums[name].extend(rows)
        for name, counts in payload["state"]["not_counted"].items():
            previous = not_counted.get(name, [0, 0])
            not_counted[name] = [previous[0] + counts[0], previous[1] + counts[1]]
    skipped = SkippedImages(len(entries), strict)
    position = {entry.file_name: i for i, entry in enumerate(entries)}
    skipped.items = sorted(
        (item for payload in gathered for item in payload["skipped"]),
        key=lambda item: position.get(item["image"], 0),
    )
    return _Merged(
        stats=merged,
        image_sums=image_sums,
        layer_info=layer_info,
        not_counted=not_counted,
        skipped=skipped,
        images_used=sum(payload["used"] for payload in gathered),
        forward_seconds=sum(payload["forward_seconds"] for payload in gathered),
        unit_parts=[
            payload["unit_part"] for payload in gathered if payload["unit_part"] is not None
        ],
        unit_index=[
            (image, rank, start, length)
            for rank, payload in enumerate(gathered)
            for image, start, length in payload["unit_index"]
        ],
    )


def _row_order(gathered: Sequence[Dict[str, Any]], per_group: bool) -> List[str]:
    """Row layers top first: reverse call order of the deformable layers; groups ascending."""
    call_order: List[str] = []
    for payload in gathered:
        for name in payload["state"]["layers"]:
            if name not in call_order:
                call_order.append(name)
    rows: List[str] = []
    present = {name for payload in gathered for name in payload["state"]["stats"]}
    for name in reversed(call_order):
        if per_group:
            groups = sorted(
                (r for r in present if r.startswith(name + ":g")),
                key=lambda r: int(r.rsplit(":g", 1)[1]),
            )
            rows.extend(groups)
        elif name in present:
            rows.append(name)
    return rows


def _fill_summary(
    run: CommandRun,
    data: AnnotatedDataset,
    entries: Sequence[ImageAnnotation],
    merged: _Merged,
    result: DilationStatsResult,
    world: World,
    split: Optional[str],
    per_group: bool,
) -> None:
    summary = run.summary
    summary["dataset"] = {
        "path": str(data.root),
        "format": data.format,
        "split": split,
        "images_in_dataset": len(data.images),
        "images_selected": len(entries),
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
    summary["statistics"] = {
        "std": "population (ddof=0)",
        "percentiles": "from fixed log-spaced histograms, clamped to the exact min/max",
        "bins": BINS.as_dict(),
        "offset_groups": "per group" if per_group else "mean of the groups' dilations",
        "confidence_intervals": {
            "level": 0.95,
            "method": "percentile bootstrap over images (an image's units are correlated, so the image is the sample): "
            "each resample draws the used images with replacement and recomputes every category mean as "
            "(sum over the drawn images' units) / (their number of units)",
            "resamples": BOOTSTRAP_RESAMPLES,
            "seed": BOOTSTRAP_SEED,
            "differences": "mean of category_a - mean of category_b, intervals from the same resamples",
        },
    }
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


def _write_outputs(
    run: CommandRun, merged: _Merged, result: DilationStatsResult, figure: bool, per_group: bool
) -> Dict[str, Path]:
    """Rank 0: the tables (CSV, Markdown), the histogram figure, the per-unit CSV and summary.json."""
    out_dir = run.out_dir
    files = {
        "table_csv": out_dir / "dilation_table.csv",
        "differences_csv": out_dir / "dilation_differences.csv",
        "table_md": out_dir / "dilation_table.md",
    }
    table_columns = present(TABLE_CSV, per_group=per_group)
    difference_columns = present(DIFFERENCES_CSV, per_group=per_group)
    unit_columns = present(UNITS_CSV, per_group=per_group)
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
    if figure:
        from dcn_inspect.report.dilation_stats import draw_dilation_histograms

        files["figure"] = out_dir / "dilation_hist.png"
        write_figure(
            files["figure"],
            draw_dilation_histograms(merged.stats, result.units, result.thresholds_name),
            dpi=100,
        )
    if merged.unit_parts:
        files["units_csv"] = _assemble_units(
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


# --------------------------------------------------------------------------------------------
# Per-unit rows


_UNIT_COLUMN = {column.name: column for column in UNITS_CSV}


def _unit_rows(
    image: str, row: str, frame: FrameMap, codes: np.ndarray, values: np.ndarray, per_group: bool
) -> List[List[str]]:
    """The ``dilation_units.csv`` rows of one image and row layer, as text (:data:`UNITS_CSV` formats)."""
    out_h, out_w = codes.shape
    xs, ys = frame.to_image(np.arange(out_w, dtype=np.float64), np.arange(out_h, dtype=np.float64))
    x_text = [format_value(float(x), _UNIT_COLUMN["unit_x"]) for x in xs]
    y_text = [format_value(float(y), _UNIT_COLUMN["unit_y"]) for y in ys]
    layer, group = split_row(row) if per_group else (row, None)
    lead = [image, layer] if group is None else [image, layer, str(group)]
    dilation = _UNIT_COLUMN["dilation"]
    return [
        [
            *lead,
            x_text[j],
            y_text[i],
            CATEGORY_CODES[int(codes[i, j])],
            format_value(float(values[i, j]), dilation),
        ]
        for i in range(out_h)
        for j in range(out_w)
    ]


class _UnitWriter:
    """Streams one rank's per-unit rows to a part file private to this run (a scratch file of the
    run: removed at its end whatever happens); remembers where each image's rows are, so rank 0
    can write them in dataset order whatever the batching and sharding."""

    def __init__(
        self, run: CommandRun, entries: Sequence[ImageAnnotation], per_group: bool
    ) -> None:
        fd, self.path = run.outputs.scratch_file(
            run.out_dir, prefix=".dilation_units.", suffix=".part"
        )
        self.out_dir = run.out_dir
        self.handle = os.fdopen(fd, "wb")
        self.entries = entries
        self.per_group = per_group
        self.index: List[Tuple[int, int, int]] = []  # (image index, start, length)

    def write_image(
        self, index: int, layers: List[Tuple[str, FrameMap, np.ndarray, np.ndarray]]
    ) -> None:
        rows: List[List[str]] = []
        for layer, frame, codes, values in layers:
            rows.extend(
                _unit_rows(
                    self.entries[index].file_name, layer, frame, codes, values, self.per_group
                )
            )
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        data = buffer.getvalue().encode("utf-8")
        try:
            start = self.handle.tell()
            self.handle.write(data)
        except OSError as exc:
            raise write_error(self.out_dir, exc, "the per-unit rows") from None
        self.index.append((index, start, len(data)))

    def close(self) -> None:
        if self.handle.closed:
            return
        try:
            self.handle.close()
        except OSError as exc:
            raise write_error(self.out_dir, exc, "the per-unit rows") from None


def _assemble_units(
    path: Path, parts: List[Path], index: List[Tuple[int, int, int, int]], header: List[str]
) -> Path:
    """``dilation_units.csv`` from the ranks' part files, in dataset order; the parts are removed."""
    handles: Dict[int, Any] = {}
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                handle.write((",".join(header) + "\n").encode("utf-8"))
                for _, rank, start, length in sorted(index):
                    if rank not in handles:
                        handles[rank] = open(parts[rank], "rb")
                    handles[rank].seek(start)
                    handle.write(handles[rank].read(length))
    finally:
        for part in handles.values():
            part.close()
        _remove_parts(parts)
    return path


def _remove_parts(parts: Sequence[Path]) -> None:
    for part in parts:
        if part.exists():
            part.unlink()


# --------------------------------------------------------------------------------------------
# Table layouts


@dataclass(frozen=True)
class Table2Row:
    """One row of the paper's Table 2 layout: a layer (and offset group), and per category the
    text ``mean ± std`` and its 95 % interval ``[low, high]`` ("–" where the category is empty)."""

    layer: str
    group: Optional[int]
    means: List[str]
    intervals: List[str]


def table2_rows(table: pd.DataFrame) -> List[Table2Row]:
    """``dilation_table.csv`` rows in the Table 2 layout (layers top first, categories as columns)."""
    keys = ["layer", "group"] if "group" in table.columns else ["layer"]
    rows: List[Table2Row] = []
    for key, part in table.groupby(keys, sort=False):
        layer, group = (
            (key[0], int(key[1]))
            if len(keys) == 2
            else (key[0] if isinstance(key, tuple) else key, None)
        )
        means, intervals = [], []
        for category in CATEGORIES:
            row = part[part["category"] == category].iloc[0]
            empty = row["count"] == 0
            means.append("–" if empty else f"{row['mean']:.2f} ± {row['std']:.2f}")
            intervals.append(
                "–"
                if empty or "ci_low" not in row or pd.isna(row["ci_low"])
                else f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
            )
        rows.append(Table2Row(str(layer), group, means, intervals))
    return rows


def difference_label(first: str, second: str) -> str:
    return f"{first} − {second}"


def difference_text(row: Any) -> Tuple[str, str]:
    """A ``dilation_differences.csv`` row as text: the difference and its interval ("–" if undefined)."""
    if pd.isna(row["difference"]):
        return "–", "–"
    interval = "–" if pd.isna(row["ci_low"]) else f"[{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"
    return f"{row['difference']:+.2f}", interval


def table_markdown(
    table: pd.DataFrame,
    units: str,
    thresholds_name: str,
    thresholds: Tuple[float, float],
    differences: Optional[pd.DataFrame] = None,
    title: str = "Effective dilation",
) -> str:
    """The paper's Table 2 layout: layers as rows (top first), categories as columns,
    ``mean ± std [95 % interval of the mean]`` (intervals where the table has them); then the
    differences of means with their intervals."""
    per_group = "group" in table.columns
    with_intervals = "ci_low" in table.columns
    lead = "| layer | group | " if per_group else "| layer | "
    lines = [
        f"# {title} (mean ± std{' [95 % confidence interval of the mean]' if with_intervals else ''}, {units})",
        "",
        lead + " | ".join(CATEGORIES) + " |",
        "|---|" + ("---:|" if per_group else "") + "---:|" * len(CATEGORIES),
    ]
    for row in table2_rows(table):
        cells = [
            mean if interval == "–" else f"{mean} {interval}"
            for mean, interval in zip(row.means, row.intervals)
        ]
        lines.append(
            f"| {row.layer} | "
            + (f"{row.group} | " if per_group else "")
            + " | ".join(cells)
            + " |"
        )
    counts = table.groupby("category", sort=False)["count"].max()
    lines += [
        "",
        "Units per category (largest layer): "
        + ", ".join(f"{c} {int(counts.get(c, 0))}" for c in CATEGORIES)
        + ".",
        f"Categories by box area in original-image pixels² ({thresholds_name}): small < {thresholds[0]:g} <= medium < {thresholds[1]:g} <= large;",
        "background = filter centre inside no ground-truth box. Units inside only crowd/difficult boxes are not counted.",
    ]
    if with_intervals:
        lines.append(
            "Intervals: percentile bootstrap over images (summary.json `statistics.confidence_intervals`)."
        )
    lines += [
        "",
    ]
    if differences is not None and len(differences):
        pairs = list(dict.fromkeys(zip(differences["category_a"], differences["category_b"])))
        lines += [
            f"## Differences of means ({units}, 95 % confidence interval)",
            "",
            lead + " | ".join(difference_label(a, b) for a, b in pairs) + " |",
            "|---|" + ("---:|" if per_group else "") + "---:|" * len(pairs),
        ]
        keys = ["layer", "group"] if per_group else ["layer"]
        for key, part in differences.groupby(keys, sort=False):
            layer = key[0] if isinstance(key, tuple) else key
            texts = [
                " ".join(difference_text(row)) if not pd.isna(row["difference"]) else "–"
                for _, row in part.iterrows()
            ]
            lines.append(
                f"| {layer} | "
                + (f"{int(key[1])} | " if per_group else "")
                + " | ".join(texts)
                + " |"
            )
        lines.append("")
    return "\n".join(lines)
