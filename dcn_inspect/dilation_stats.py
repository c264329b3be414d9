"""``dcn-inspect dilation-stats``: effective dilation per deformable layer and object size
(the paper's Table 2), streamed over a dataset of any size, on one process or under torchrun.

Pipeline: annotations (:mod:`dcn_inspect.annotations`) -> a ``DataLoader`` that decodes and
preprocesses images in worker processes -> batches of images with the SAME model-input size
(no padding: padding would add border units and shift nothing else, so batching only equal
sizes keeps every unit exactly what a one-image forward gives) -> one forward per batch with
the offsets captured (:mod:`dcn_inspect.hooks`) -> per unit, its effective dilation and
category (:mod:`dcn_inspect.dilation`) -> streaming, mergeable statistics per layer.

Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set, world size > 1) every rank takes the
images whose dataset index ``i`` satisfies ``i % world_size == rank``, statistics are merged
through ``torch.distributed`` (gloo on CPU, nccl on CUDA, ``all_gather_object`` of the
mergeable states, merged in rank order) and rank 0 writes the outputs.

Frames are derived through the real forward (:class:`~dcn_inspect.geometry.FrameTracker`)
once per model-input size and reused for later batches of that size.
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
from torch.utils.data import DataLoader, Dataset

from dcn_inspect.annotations import AnnotatedDataset, ImageAnnotation, load_dataset
from dcn_inspect.dilation import (
    BINS,
    CATEGORIES,
    CATEGORY_CODES,
    IGNORED,
    OUTSIDE,
    CategoryStats,
    effective_dilation,
    resolve_thresholds,
    unit_categories,
)
from dcn_inspect.errors import InputError
from dcn_inspect.geometry import LayerGeometry
from dcn_inspect.hooks import DeformConvRecord, capture_offsets
from dcn_inspect.progress import image_progress
from dcn_inspect.images import DEFAULT_MAX_PIXELS, load_image, resized_size, to_model_input
from dcn_inspect.loading import LoadedModel, load_model, resolve_device
from dcn_inspect.models.registry import Preprocess
from dcn_inspect.outputs import CSV_FLOAT_FORMAT, RunSummary, atomic_path, prepare_out_dir, write_csv, write_figure, write_text

#: Columns of ``dilation_table.csv``, in order.
TABLE_COLUMNS = ["layer", "category", "count", "mean", "std", "median", "p10", "p90", "units"]
#: Columns of ``dilation_units.csv``.
UNIT_COLUMNS = ["image", "layer", "unit_x", "unit_y", "category", "dilation"]
UNITS = ("cells", "pixels")
#: How many skipped images summary.json lists by name (all are counted).
SKIPPED_EXAMPLES = 20


@dataclass
class DilationStatsResult:
    """What :func:`dilation_stats` computed (identical on every rank) and where rank 0 wrote it."""

    table: pd.DataFrame
    stats: Dict[str, CategoryStats]  # row layer name (top layer first) -> statistics
    thresholds_name: str
    thresholds: Tuple[float, float]
    units: str
    images_used: int
    skipped: Dict[str, int]
    out_dir: Optional[Path]
    files: Dict[str, Path] = field(default_factory=dict)
    summary: Dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    wall_seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# Reading images (in DataLoader workers)
# --------------------------------------------------------------------------------------------


@dataclass
class _Item:
    index: int  # position in the dataset's image list
    tensor: Optional[torch.Tensor]  # [3, H, W] model input, None when skipped
    original_hw: Tuple[int, int]
    reason: Optional[str] = None  # short reason kind when skipped
    message: Optional[str] = None


class _ImageReader(Dataset):
    """Decodes and preprocesses one annotated image; failures become skipped items, not errors."""

    def __init__(self, images: Sequence[ImageAnnotation], indices: Sequence[int], preprocess: Preprocess, resize: Optional[int], max_pixels: int) -> None:
        self.images = images
        self.indices = list(indices)
        self.preprocess = preprocess
        self.resize = resize
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> _Item:
        index = self.indices[position]
        entry = self.images[index]
        hw = (entry.height, entry.width)
        if entry.path is None:
            return _Item(index, None, hw, "image file not found", f"{entry.file_name}: image file not found")
        try:
            image = load_image(entry.path, self.max_pixels)
        except InputError as exc:
            return _Item(index, None, hw, "unreadable image", str(exc))
        if image.shape[:2] != hw:
            return _Item(
                index,
                None,
                hw,
                "image size differs from its annotation",
                f"{entry.path}: image is {image.shape[1]}x{image.shape[0]} but its annotation says {entry.width}x{entry.height}",
            )
        model_input = to_model_input(image, self.preprocess, self.resize)
        return _Item(index, model_input.tensor[0], hw)


def _collate(items: List[_Item]) -> List[_Item]:
    return items


def size_batches(input_sizes: Sequence[Tuple[int, int]], batch_size: int) -> List[List[int]]:
    """Positions grouped into batches of equal model-input size, at most ``batch_size`` each.

    Deterministic: positions are visited in order; a batch is emitted when its size group is
    full, and unfinished groups are emitted at the end in order of their first position.
    """
    open_groups: Dict[Tuple[int, int], List[int]] = {}
    batches: List[List[int]] = []
    for position, size in enumerate(input_sizes):
        group = open_groups.setdefault(size, [])
        group.append(position)
        if len(group) == batch_size:
            batches.append(group)
            del open_groups[size]
    batches.extend(open_groups.values())
    return batches


# --------------------------------------------------------------------------------------------
# torch.distributed
# --------------------------------------------------------------------------------------------


@dataclass
class _World:
    rank: int = 0
    size: int = 1
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _join_world(device: str) -> Tuple[_World, str]:
    """Initialise the process group when launched by torchrun; returns the world and the device to use."""
    if not _launched_by_torchrun():
        return _World(), device
    import torch.distributed as dist

    dev = resolve_device(device)
    if dev.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        initialized_here = True
    return _World(dist.get_rank(), dist.get_world_size(), initialized_here), device


def _gather(world: _World, payload: Any) -> List[Any]:
    if not world.distributed:
        return [payload]
    import torch.distributed as dist

    gathered: List[Any] = [None] * world.size
    dist.all_gather_object(gathered, payload)
    return gathered


# --------------------------------------------------------------------------------------------
# Per-batch work
# --------------------------------------------------------------------------------------------


@dataclass
class _LayerInfo:
    name: str
    module_type: str
    kernel: Tuple[int, int]
    dilation: Tuple[int, int]
    offset_groups: int
    modulated: bool
    geometry: Dict[str, Any]  # of the first model-input size seen

    def as_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "module_type": self.module_type,
            "kernel": list(self.kernel),
            "dilation": list(self.dilation),
            "offset_groups": self.offset_groups,
            "modulated": self.modulated,
            "geometry": self.geometry,
        }


class _Accumulator:
    """Statistics of one rank: per row layer, a :class:`CategoryStats`; plus per-unit rows."""

    def __init__(self, thresholds: Tuple[float, float], units: str, per_group: bool, device: torch.device, unit_writer: Optional["_UnitWriter"]) -> None:
        self.thresholds = thresholds
        self.units = units
        self.per_group = per_group
        self.device = device
        self.stats: Dict[str, CategoryStats] = {}
        self.not_counted: Dict[str, np.ndarray] = {}  # layer -> [ignored, outside] unit counts
        self.layers: Dict[str, _LayerInfo] = {}  # call order
        self.geometry_cache: Dict[Tuple[int, int], Dict[str, LayerGeometry]] = {}
        self.unit_writer = unit_writer

    def add(self, records: Sequence[DeformConvRecord], entries: Sequence[ImageAnnotation], indices: Sequence[int], input_hw: Tuple[int, int]) -> None:
        """Add one batch: ``records`` of its forward (call order), ``entries`` its images."""
        geometries = self.geometry_cache[input_hw]
        # Original / model-input scale of every image (images of one batch share the input size only).
        scale_x = torch.tensor([entry.width / input_hw[1] for entry in entries], dtype=torch.float64)
        scale_y = torch.tensor([entry.height / input_hw[0] for entry in entries], dtype=torch.float64)
        per_image_rows: List[List[List[str]]] = [[] for _ in entries]
        codes_cache: Dict[Tuple[Any, Tuple[int, int]], Tuple[np.ndarray, torch.Tensor]] = {}
        for record in reversed(records):  # top layer first
            geometry = geometries[record.name]
            if self.units == "cells":
                cell: Tuple[Any, Any] = (1.0, 1.0)
            else:
                cell = (geometry.input_frame.stride_y * scale_y, geometry.input_frame.stride_x * scale_x)
            # Distances in float32 or the offsets' own wider precision (~1e-7 relative); the
            # statistics accumulate in float64.
            offset = record.offset if record.offset.dtype == torch.float64 else record.offset.float()
            dilations = effective_dilation(offset, geometry.kernel, geometry.dilation, cell)  # [B, G, Ho, Wo]
            frames = [geometry.output_frame.scaled(float(sx), float(sy)) for sx, sy in zip(scale_x, scale_y)]
            key = (geometry.output_frame, geometry.output_hw)
            if key not in codes_cache:  # layers with the same output cells share their categories
                codes_np = np.stack(
                    [
                        unit_categories(frame, geometry.output_hw, (entry.width, entry.height), entry.boxes, entry.ignore, self.thresholds)
                        for frame, entry in zip(frames, entries)
                    ]
                )
                codes_cache[key] = (codes_np, torch.from_numpy(codes_np).to(dilations.device))
            codes_np, codes = codes_cache[key]
            counts = self.not_counted.setdefault(record.name, np.zeros(2, dtype=np.int64))
            counts[0] += int((codes_np == IGNORED).sum())
            counts[1] += int((codes_np == OUTSIDE).sum())
            rows = (
                [(f"{record.name}:g{g}", dilations[:, g]) for g in range(dilations.shape[1])]
                if self.per_group
                else [(record.name, dilations.mean(dim=1))]
            )
            for row_name, values in rows:
                if row_name not in self.stats:
                    self.stats[row_name] = CategoryStats(len(CATEGORIES), BINS, self.device)
                self.stats[row_name].update(values, codes)
                if self.unit_writer is not None:
                    host = values.cpu().numpy()
                    for b, entry in enumerate(entries):
                        per_image_rows[b].extend(_unit_rows(entry.file_name, row_name, frames[b], codes_np[b], host[b]))
        if self.unit_writer is not None:
            for index, rows_of_image in zip(indices, per_image_rows):
                self.unit_writer.write_image(index, rows_of_image)

    def state(self) -> Dict[str, Any]:
        return {
            "stats": {name: stats.state() for name, stats in self.stats.items()},
            "not_counted": {name: counts.tolist() for name, counts in self.not_counted.items()},
            "layers": {name: info.as_dict() for name, info in self.layers.items()},
        }


def _fmt(value: float) -> str:
    return CSV_FLOAT_FORMAT % value


def _unit_rows(image: str, layer: str, frame: Any, codes: np.ndarray, values: np.ndarray) -> List[List[str]]:
    out_h, out_w = codes.shape
    xs, ys = frame.to_image(np.arange(out_w, dtype=np.float64), np.arange(out_h, dtype=np.float64))
    x_text = [_fmt(x) for x in xs]
    y_text = [_fmt(y) for y in ys]
    return [
        [image, layer, x_text[j], y_text[i], CATEGORY_CODES[int(codes[i, j])], _fmt(float(values[i, j]))]
        for i in range(out_h)
        for j in range(out_w)
    ]


class _UnitWriter:
    """Streams per-unit rows of one rank to a part file; remembers where each image's rows are,
    so rank 0 can write them in dataset order whatever the batching and sharding."""

    def __init__(self, out_dir: Path, rank: int) -> None:
        self.path = out_dir / f".dilation_units.rank{rank}.part"
        self.rank = rank
        self.handle = open(self.path, "wb")
        self.index: List[Tuple[int, int, int, int]] = []  # (image index, rank, start, length)

    def write_image(self, index: int, rows: List[List[str]]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        data = buffer.getvalue().encode("utf-8")
        start = self.handle.tell()
        self.handle.write(data)
        self.index.append((index, self.rank, start, len(data)))

    def close(self) -> None:
        self.handle.close()


def _assemble_units(out_dir: Path, index: List[Tuple[int, int, int, int]], units_comment: str) -> Path:
    path = out_dir / "dilation_units.csv"
    parts: Dict[int, Any] = {}
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(("# " + units_comment + "\n" + ",".join(UNIT_COLUMNS) + "\n").encode("utf-8"))
                for image_index, rank, start, length in sorted(index):
                    if rank not in parts:
                        parts[rank] = open(out_dir / f".dilation_units.rank{rank}.part", "rb")
                    parts[rank].seek(start)
                    handle.write(parts[rank].read(length))
    finally:
        for part in parts.values():
            part.close()
    return path


def _remove_parts(out_dir: Path, world_size: int) -> None:
    for rank in range(world_size):
        part = out_dir / f".dilation_units.rank{rank}.part"
        if part.exists():
            part.unlink()


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _check_layers(requested: Optional[Sequence[str]], records: Sequence[DeformConvRecord], model_name: str) -> List[str]:
    available = [r.name for r in records if r.kernel_points >= 2]
    if not records:
        raise InputError(f"--model {model_name}: the model has no deformable conv layer that dcn-inspect recognises")
    if not requested:
        return available
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise InputError(f"--layers: unknown deformable layer(s) {', '.join(unknown)} (available: {', '.join(available)})")
    return [name for name in available if name in requested]


def table_frame(stats: Dict[str, CategoryStats], units: str) -> pd.DataFrame:
    """``dilation_table.csv`` rows: every row layer (in the given order) x every category."""
    rows = []
    for layer, layer_stats in stats.items():
        for category, values in zip(CATEGORIES, layer_stats.summary_rows()):
            rows.append({"layer": layer, "category": category, **values, "units": units})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def table_markdown(table: pd.DataFrame, units: str, thresholds_name: str, thresholds: Tuple[float, float]) -> str:
    """The paper's Table 2 layout: layers as rows (top first), categories as columns, mean ± std."""
    lines = [
        f"# Effective dilation (mean ± std, {units})",
        "",
        "| layer | " + " | ".join(CATEGORIES) + " |",
        "|---|" + "---:|" * len(CATEGORIES),
    ]
    for layer, group in table.groupby("layer", sort=False):
        cells = []
        for category in CATEGORIES:
            row = group[group["category"] == category].iloc[0]
            cells.append("–" if row["count"] == 0 else f"{row['mean']:.2f} ± {row['std']:.2f}")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    counts = table.groupby("category", sort=False)["count"].max()
    lines += [
        "",
        "Units per category (largest layer): " + ", ".join(f"{c} {int(counts.get(c, 0))}" for c in CATEGORIES) + ".",
        f"Categories by box area in original-image pixels² ({thresholds_name}): small < {thresholds[0]:g} <= medium < {thresholds[1]:g} <= large;",
        "background = filter centre inside no ground-truth box. Units inside only crowd/difficult boxes are not counted.",
        "",
    ]
    return "\n".join(lines)


def _units_comment(units: str, thresholds_name: str, thresholds: Tuple[float, float]) -> str:
    unit_text = "layer input cells" if units == "cells" else "original-image pixels"
    return (
        f"effective dilation (mean distance of adjacent sampling locations) in {unit_text}; "
        f"std = population std; median/p10/p90 from log-spaced histograms (0.1% bins); "
        f"categories by box area in original-image pixels^2 ({thresholds_name}: small < {thresholds[0]:g} <= medium < {thresholds[1]:g} <= large)"
    )


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
    out: Optional[Path] = Path("dcn-inspect-out"),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    figure: bool = True,
) -> DilationStatsResult:
    """Effective dilation of every deformable layer per object-size category over a dataset.

    Writes (rank 0, when ``out`` is given) ``dilation_table.csv``, ``dilation_table.md``,
    ``dilation_hist.png`` (``figure``), ``dilation_units.csv`` (``per_unit``) and
    ``summary.json``. Returns the merged result on every rank.
    """
    started = time.time()
    if units not in UNITS:
        raise InputError(f"--units {units!r}: use cells or pixels")
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be at least 1")
    if workers < 0:
        raise InputError(f"--workers {workers}: must be 0 or more")
    if max_images is not None and max_images < 1:
        raise InputError(f"--max-images {max_images}: must be at least 1")
    if resize is not None and resize < 0:
        raise InputError(f"--resize {resize}: must be 0 (the image's own size) or a positive shorter-side length")
    if per_unit and out is None:
        raise InputError("--per-unit needs an output directory (--out)")

    data: AnnotatedDataset = load_dataset(dataset, images, split)
    entries = data.images[:max_images] if max_images is not None else data.images
    if not entries:
        raise InputError(f"{data.root}: the dataset has no images")
    areas = np.concatenate([e.areas[~e.ignore] for e in entries]) if entries else np.zeros(0)
    thresholds_name, threshold_values = resolve_thresholds(thresholds, areas)

    world, device = _join_world(device)
    try:
        return _run(
            data, entries, thresholds_name, threshold_values, world, started,
            model=model, weights=weights, layers=layers, units=units, per_group=per_group, per_unit=per_unit,
            batch_size=batch_size, workers=workers, device=device, resize=resize, strict=strict,
            out=out, max_pixels=max_pixels, progress=progress, figure=figure,
            parameters={
                "dataset": str(dataset) if dataset is not None else None, "images": images, "split": split,
                "layers": list(layers) if layers else None, "thresholds": thresholds, "units": units,
                "per_group": per_group, "per_unit": per_unit, "max_images": max_images, "batch_size": batch_size,
                "workers": workers, "device": device, "resize": resize, "strict": strict, "max_pixels": max_pixels,
            },
        )  # fmt: skip
    finally:
        if world.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(
    data: AnnotatedDataset,
    entries: Sequence[ImageAnnotation],
    thresholds_name: str,
    threshold_values: Tuple[float, float],
    world: _World,
    started: float,
    *,
    model: Union[str, LoadedModel, None],
    weights: Optional[Path],
    layers: Optional[Sequence[str]],
    units: str,
    per_group: bool,
    per_unit: bool,
    batch_size: int,
    workers: int,
    device: str,
    resize: Optional[int],
    strict: bool,
    out: Optional[Path],
    max_pixels: int,
    progress: bool,
    figure: bool,
    parameters: Dict[str, Any],
) -> DilationStatsResult:
    loaded = model if isinstance(model, LoadedModel) else load_model(model, weights, device)
    dev = next((p.device for p in loaded.model.parameters()), torch.device(device))
    out_dir = prepare_out_dir(Path(out)) if out is not None and world.rank == 0 else (Path(out) if out is not None else None)
    if world.distributed and out_dir is not None:
        _gather(world, None)  # rank 0 has created the output directory before anyone writes parts
    summary = RunSummary("dilation-stats", parameters)

    shard = [i for i in range(len(entries)) if i % world.size == world.rank]
    target = resize if resize is not None else loaded.preprocess.resize
    max_size = loaded.preprocess.max_size if resize is None else 0
    input_sizes = [resized_size((entries[i].height, entries[i].width), target, max_size) for i in shard]
    batches = size_batches(input_sizes, batch_size)
    reader = _ImageReader(entries, shard, loaded.preprocess, resize, max_pixels)
    loader = DataLoader(
        reader,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=False,
        multiprocessing_context="fork" if workers > 0 and "fork" in torch.multiprocessing.get_all_start_methods() else None,
    )
    unit_writer = _UnitWriter(out_dir, world.rank) if per_unit and out_dir is not None else None
    accumulator = _Accumulator(threshold_values, units, per_group, dev, unit_writer)
    selected: Optional[List[str]] = None
    skipped: List[Tuple[int, str, str]] = []
    used = 0
    forward_seconds = 0.0
    try:
        with torch.no_grad(), image_progress("dilation-stats", progress and world.rank == 0, len(shard)) as advance:
            for items in loader:
                good = [item for item in items if item.tensor is not None]
                for item in items:
                    if item.tensor is None:
                        if strict:
                            raise InputError(f"{item.message} (skipped images are errors with --strict)")
                        skipped.append((item.index, item.reason or "unknown", item.message or ""))
                if good:
                    batch = torch.stack([item.tensor for item in good]).to(dev)  # type: ignore[misc]
                    input_hw = (int(batch.shape[-2]), int(batch.shape[-1]))
                    track = input_hw not in accumulator.geometry_cache
                    tick = time.perf_counter()
                    with capture_offsets(loaded.model, track_frames=track) as capture:
                        capture.watch_input(batch)
                        loaded.model(batch)
                    forward_seconds += time.perf_counter() - tick
                    records = list(capture.convs.values())
                    if selected is None:
                        selected = _check_layers(layers, records, loaded.name)
                    if track:
                        accumulator.geometry_cache[input_hw] = {r.name: r.geometry for r in records}
                    chosen = [r for r in records if r.name in selected]
                    for record in chosen:
                        if record.name not in accumulator.layers:
                            accumulator.layers[record.name] = _LayerInfo(
                                record.name,
                                record.module_type,
                                record.geometry.kernel,
                                record.geometry.dilation,
                                record.offset_groups,
                                record.modulated,
                                accumulator.geometry_cache[input_hw][record.name].as_dict(),
                            )
                    accumulator.add(chosen, [entries[item.index] for item in good], [item.index for item in good], input_hw)
                    used += len(good)
                advance(len(items))
    finally:
        if unit_writer is not None:
            unit_writer.close()

    # Merge the ranks (in rank order; a single process merges only itself).
    gathered = _gather(
        world,
        {
            "state": accumulator.state(),
            "skipped": skipped,
            "used": used,
            "units_index": unit_writer.index if unit_writer is not None else [],
            "forward_seconds": forward_seconds,
        },
    )
    layer_info: Dict[str, Dict[str, Any]] = {}
    for payload in gathered:
        for name, info in payload["state"]["layers"].items():
            layer_info.setdefault(name, info)
    row_order = _row_order(gathered, per_group)
    merged: Dict[str, CategoryStats] = {name: CategoryStats(len(CATEGORIES), BINS) for name in row_order}
    not_counted: Dict[str, List[int]] = {}
    for payload in gathered:
        for name, state in payload["state"]["stats"].items():
            merged[name].merge_(CategoryStats.from_state(state, BINS))
        for name, counts in payload["state"]["not_counted"].items():
            previous = not_counted.get(name, [0, 0])
            not_counted[name] = [previous[0] + counts[0], previous[1] + counts[1]]
    all_skipped = sorted(s for payload in gathered for s in payload["skipped"])
    images_used = sum(payload["used"] for payload in gathered)
    if images_used == 0:
        reasons = sorted({s[1] for s in all_skipped})
        if world.rank == 0 and unit_writer is not None and out_dir is not None:
            _remove_parts(out_dir, world.size)
        raise InputError(f"{data.root}: no image could be used ({', '.join(reasons) or 'none listed'})")
    skipped_counts: Dict[str, int] = {}
    for _, reason, _ in all_skipped:
        skipped_counts[reason] = skipped_counts.get(reason, 0) + 1

    table = table_frame(merged, units)
    result = DilationStatsResult(
        table=table,
        stats=merged,
        thresholds_name=thresholds_name,
        thresholds=threshold_values,
        units=units,
        images_used=images_used,
        skipped=skipped_counts,
        out_dir=out_dir,
        rank=world.rank,
        world_size=world.size,
    )
    wall = time.time() - started
    result.wall_seconds = wall
    summary["dataset"] = {
        "path": str(data.root),
        "format": data.format,
        "split": parameters.get("split"),
        "images_in_dataset": len(data.images),
        "images_selected": len(entries),
        "categories": data.categories,
        "issues": data.issues,
    }
    summary["images"] = {
        "used": images_used,
        "skipped": len(all_skipped),
        "skipped_by_reason": skipped_counts,
        "skipped_examples": [{"image": entries[i].file_name, "reason": r, "message": m} for i, r, m in all_skipped[:SKIPPED_EXAMPLES]],
    }
    summary["thresholds"] = {"name": thresholds_name, "small_medium_px2": threshold_values[0], "medium_large_px2": threshold_values[1]}
    summary["units"] = units
    summary["statistics"] = {
        "std": "population (ddof=0)",
        "percentiles": "from fixed log-spaced histograms, clamped to the exact min/max",
        "bins": BINS.as_dict(),
        "offset_groups": "per group" if per_group else "mean of the groups' dilations",
    }
    summary["units_not_counted"] = {name: {"ignored_box": c[0], "centre_outside_image": c[1]} for name, c in not_counted.items()}
    summary["model"] = loaded.summary()
    summary["checkpoint_sha256"] = loaded.checkpoint_sha256
    summary["layers"] = [layer_info[name] for name in reversed(list(layer_info))]
    summary["geometry_method"] = sorted({info["geometry"]["method"] for info in layer_info.values()})
    summary["distributed"] = {"world_size": world.size, "backend": _backend_name(world)}
    summary["forward_seconds"] = round(sum(payload["forward_seconds"] for payload in gathered), 3)
    summary["images_per_second"] = round(images_used / wall, 3) if wall > 0 else None
    result.summary = summary.data

    if world.rank == 0 and out_dir is not None:
        comment = _units_comment(units, thresholds_name, threshold_values)
        files = {"table_csv": out_dir / "dilation_table.csv", "table_md": out_dir / "dilation_table.md"}
        write_csv(files["table_csv"], table, comment)
        write_text(files["table_md"], table_markdown(table, units, thresholds_name, threshold_values))
        if figure:
            from dcn_inspect.plots.dilation import draw_dilation_histograms

            files["figure"] = out_dir / "dilation_hist.png"
            fig = draw_dilation_histograms(merged, units, thresholds_name)
            write_figure(files["figure"], fig, dpi=100)
        if per_unit:
            index = [entry for payload in gathered for entry in payload["units_index"]]
            unit_unit = "layer input cells" if units == "cells" else "original-image pixels"
            files["units_csv"] = _assemble_units(
                out_dir,
                index,
                f"unit_x, unit_y: filter centre in original-image pixels (continuous, (0,0) = top-left corner); dilation in {unit_unit}; "
                f"category ignored = inside only crowd/difficult boxes, outside = centre outside the image",
            )
            _remove_parts(out_dir, world.size)
        summary["outputs"] = sorted(p.name for p in files.values())
        files["summary"] = summary.write(out_dir)
        result.files = files
    if world.distributed:
        _gather(world, None)  # other ranks return only after rank 0 has read their part files
    return result


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
            groups = sorted((r for r in present if r.startswith(name + ":g")), key=lambda r: int(r.rsplit(":g", 1)[1]))
            rows.extend(groups)
        elif name in present:
            rows.append(name)
    return rows


def _backend_name(world: _World) -> Optional[str]:
    if not world.distributed:
        return None
    import torch.distributed as dist

    return str(dist.get_backend())


def rich_table(table: pd.DataFrame, units: str) -> Any:
    """The Table 2 layout as a rich table (for the CLI)."""
    from rich.table import Table

    out = Table(title=f"Effective dilation (mean ± std, {units})")
    out.add_column("layer")
    for category in CATEGORIES:
        out.add_column(category, justify="right")
    for layer, group in table.groupby("layer", sort=False):
        cells = []
        for category in CATEGORIES:
            row = group[group["category"] == category].iloc[0]
            cells.append("–" if row["count"] == 0 else f"{row['mean']:.2f} ± {row['std']:.2f}")
        out.add_row(str(layer), *cells)
    return out
