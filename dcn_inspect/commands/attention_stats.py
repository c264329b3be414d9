"""``dcn-inspect attention`` in its dataset mode: where multi-scale deformable attention looks
per object size (the attention analogue of the paper's Table 2), streamed over a dataset on one
process or under torchrun (:func:`attention_stats`).

Pipeline: the dataset and its size thresholds (read as ``dilation-stats`` reads them) -> this
rank's shard of images (:meth:`~dcn_inspect.commands.distributed.World.shard`), decoded by a
``DataLoader`` (:class:`~dcn_inspect.io.images.DatasetImages`) -> one forward per image with the
attention captured, keeping the finest-level encoder tokens -> the per-image measures
(:mod:`dcn_inspect.analysis.attention_stats`: spread, level shares, decoder queries matched to
ground truth) folded into an :class:`~dcn_inspect.analysis.attention_stats.AttentionAccumulator`
-> the ranks' states gathered and merged -> rank 0 writes ``attention_table.csv``,
``attention_differences.csv``, ``attention_table.md`` and ``summary.json``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import pandas as pd
import torch
from torch.utils.data import DataLoader

from dcn_inspect.analysis.attention import decoder_predictions
from dcn_inspect.analysis.attention_stats import (
    DEFINITIONS,
    DIFFERENCES_CSV,
    MEASURES,
    TABLE_CSV,
    AttentionAccumulator,
    decoder_values,
    differences_frame,
    encoder_values,
    finest_tokens,
    match_queries,
    table_frame,
)
from dcn_inspect.analysis.dilation_tables import bootstrap_intervals
from dcn_inspect.capture.adapters import looked_for
from dcn_inspect.capture.attention_calls import ENCODER
from dcn_inspect.capture.session import capture_offsets, forward
from dcn_inspect.commands.common import CommandRun, start_run
from dcn_inspect.commands.dilation_stats import _ChosenImages, _read_dataset, _statistics_note
from dcn_inspect.commands.distributed import World, join_world
from dcn_inspect.commands.options import DatasetOptions, ImageInput, ModelChoice
from dcn_inspect.core.columns import describe
from dcn_inspect.core.defaults import DEFAULT_ATTENTION_MODEL, DEFAULT_MAX_PIXELS, DEFAULT_OUT
from dcn_inspect.core.errors import InputError
from dcn_inspect.io.annotations import ImageAnnotation
from dcn_inspect.io.images import DatasetImages, ImageItem, SkippedImages
from dcn_inspect.io.outputs import check_out_dir, write_csv, write_text
from dcn_inspect.models.loaded_model import LoadedModel

__all__ = ["AttentionStatsResult", "attention_stats", "OUTPUT_NAMES"]

#: The files a run writes into ``out``.
OUTPUT_NAMES = (
    "attention_table.csv",
    "attention_differences.csv",
    "attention_table.md",
    "summary.json",
)


@dataclass
class AttentionStatsResult:
    """What :func:`attention_stats` computed (the same on every rank) and what rank 0 wrote."""

    table: pd.DataFrame  # attention_table.csv
    differences: pd.DataFrame  # attention_differences.csv
    thresholds_name: str
    thresholds: Tuple[float, float]
    images_used: int
    skipped: SkippedImages
    notes: List[str]
    out_dir: Optional[Path]
    files: Dict[str, Path] = field(default_factory=dict)
    rank: int = 0
    wall_seconds: float = 0.0


def attention_stats(
    dataset: Optional[Path] = None,
    images_dir: Optional[Path] = None,
    split: Optional[str] = None,
    model: Union[str, LoadedModel, None] = None,
    weights: Optional[Path] = None,
    thresholds: str = "paper",
    max_images: Optional[int] = None,
    workers: int = 0,
    device: str = "cpu",
    resize: Optional[int] = None,
    strict: bool = False,
    out: Optional[Path] = Path(DEFAULT_OUT),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    allow_outside_paths: bool = False,
) -> AttentionStatsResult:
    """Attention spread (pixels and relative to the object), feature-level shares (encoder) and
    weight inside the matched box (decoder) per attention layer and object-size category over a
    dataset, with bootstrap intervals over images (definitions:
    :mod:`dcn_inspect.analysis.attention_stats`). Rank 0 writes ``attention_table.csv``,
    ``attention_differences.csv``, ``attention_table.md`` and ``summary.json`` into ``out``
    (None: write nothing). ``model`` None: the bundled attention detector
    (:data:`~dcn_inspect.core.defaults.DEFAULT_ATTENTION_MODEL`)."""
    started = time.time()
    data = DatasetOptions(dataset, images_dir, split, max_images, thresholds, allow_outside_paths)
    inputs = ImageInput(resize, max_pixels, device, strict).checked()
    if max_images is not None and max_images < 1:
        raise InputError(f"{max_images}: must be at least 1", param="max_images")
    if workers < 0:
        raise InputError(f"{workers}: must be 0 or more", param="workers")
    out_path = check_out_dir(out) if out is not None else Path(DEFAULT_OUT)
    chosen = _read_dataset(data)
    if not any(len(e.boxes) and (~e.ignore).any() for e in chosen.entries):
        raise InputError(
            f"{chosen.data.root}: the {len(chosen.entries)} image(s) chosen have no ground-truth "
            "box to sort attention by object size (a dataset without annotations?)"
        )
    with join_world(inputs.device) as (world, rank_device):
        writes = out is not None and world.is_main
        with start_run(
            "attention",
            _parameters(data, inputs, workers),
            ModelChoice(model or DEFAULT_ATTENTION_MODEL, weights),
            ImageInput(resize, max_pixels, rank_device, strict),
            out_path,
            create_out=writes,
            outputs=[out_path / name for name in OUTPUT_NAMES] if writes else [],
        ) as run:
            if writes:
                run.outputs.protect("dataset", [chosen.data.root, *chosen.paths()])
            if world.distributed and out is not None:
                world.gather(None)  # rank 0 has made the output directory
            merged, used, skipped, seconds = _measure_ranks(
                run, world, chosen, inputs, workers, progress
            )
            result = _result(merged, chosen, used, skipped, run, world, out is not None)
            result.wall_seconds = time.time() - started
            _fill_summary(run, chosen, merged, result, world, seconds)
            if writes:
                result.files = _write_outputs(run, result)
            if world.distributed:
                world.gather(None)
    return result


def _parameters(data: DatasetOptions, inputs: ImageInput, workers: int) -> Dict[str, Any]:
    """``summary.json``'s parameters, as given."""
    return {
        "dataset": str(data.dataset) if data.dataset is not None else None,
        "images_dir": data.images_dir,
        "split": data.split,
        "stats": True,
        "thresholds": data.thresholds,
        "max_images": data.max_images,
        "workers": workers,
        "resize": inputs.resize,
        "strict": inputs.strict,
        "max_pixels": inputs.max_pixels,
        "allow_outside_paths": data.allow_outside_paths,
    }


def _measure_ranks(
    run: CommandRun,
    world: World,
    chosen: _ChosenImages,
    inputs: ImageInput,
    workers: int,
    progress: bool,
) -> Tuple[AttentionAccumulator, int, SkippedImages, float]:
    """This rank's shard measured; every rank's state gathered and merged in rank order."""
    from dcn_inspect.io.progress import image_progress

    entries = chosen.entries
    shard = world.shard(len(entries))
    accumulator = AttentionAccumulator()
    skipped = SkippedImages(len(entries), inputs.strict)
    notes: List[str] = []
    used, seconds = 0, 0.0
    loader = DataLoader(
        DatasetImages(entries, shard, run.loaded.preprocess, inputs.resize, inputs.max_pixels),
        batch_size=None,
        num_workers=workers,
    )
    shown = progress and world.is_main
    with torch.no_grad(), image_progress("attention", shown, len(shard)) as advance:
        for item in loader:
            if item.error is not None:
                skipped.skip(entries[item.index].file_name, item.error)
            else:
                seconds += _add_image(
                    run, accumulator, entries[item.index], item, chosen.thresholds, notes
                )
                used += 1
            advance()
    gathered = world.gather(
        {
            "state": accumulator.state(),
            "skipped": skipped.items,
            "used": used,
            "seconds": seconds,
            "notes": notes,
        }
    )
    merged = AttentionAccumulator()
    for payload in gathered:
        merged.merge(payload["state"])
        run.notes.extend(n for n in payload["notes"] if n not in run.notes)
    position = {entry.file_name: i for i, entry in enumerate(entries)}
    skipped.items = sorted(
        (item for payload in gathered for item in payload["skipped"]),
        key=lambda item: position.get(item["image"], 0),
    )
    used = sum(payload["used"] for payload in gathered)
    skipped.check_any_used(used, str(chosen.data.root))
    return merged, used, skipped, sum(payload["seconds"] for payload in gathered)


def _add_image(
    run: CommandRun,
    accumulator: AttentionAccumulator,
    entry: ImageAnnotation,
    item: ImageItem,
    thresholds: Tuple[float, float],
    notes: List[str],
) -> float:
    """One forward of one image with the attention captured, its queries added; returns the
    forward's seconds."""
    tensor = item.tensor[None].to(run.device)  # type: ignore[index]
    tick = time.perf_counter()
    with capture_offsets(run.loaded.model, keep_tokens=finest_tokens) as capture:
        capture.watch_input(tensor)
        output = forward(run.loaded.model, tensor, run.loaded.name)
    seconds = time.perf_counter() - tick
    if not capture.attention:
        raise InputError(
            f"{run.loaded.name}: the model ran no multi-scale deformable attention that "
            f"dcn-inspect recognises; looked for {looked_for()}",
            param="model",
        )
    content = item.resized_hw or tuple(tensor.shape[-2:])
    scale = (entry.width / content[1], entry.height / content[0])
    predictions = decoder_predictions(_prediction_fields(output), (entry.height, entry.width))
    pairs = match_queries(predictions, entry.boxes, entry.ignore) if predictions else []
    kept = ~entry.ignore
    for record in capture.attention.values():
        accumulator.layers.setdefault(record.name, record.summary())
        if record.kind == ENCODER:
            values = encoder_values(
                record, scale, (entry.width, entry.height), entry.boxes, entry.ignore, thresholds
            )
        elif predictions is None or predictions.boxes is None:
            _note(
                notes,
                "decoder rows left out: the model's output has no class logits and "
                "boxes (logits / pred_logits and pred_boxes) to match queries to boxes",
            )
            continue
        elif record.query_count != len(predictions.scores):
            _note(
                notes,
                f"{record.name}: {record.query_count} queries, the output "
                f"{len(predictions.scores)} predictions: left out",
            )
            continue
        else:
            values = decoder_values(record, pairs, scale, entry.boxes, thresholds)
        accumulator.add_values(record.kind, record.name, item.index, values)
    if predictions is not None and predictions.boxes is not None:
        accumulator.matched["queries"] += len(pairs)
        accumulator.matched["boxes"] += int(kept.sum())
    return seconds


def _prediction_fields(output: Any) -> Dict[str, torch.Tensor]:
    """The output's class logits and boxes (the fields ``decoder_predictions`` reads), on CPU."""
    fields = {}
    for name in ("logits", "pred_logits", "pred_boxes"):
        value = output.get(name) if isinstance(output, dict) else getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            fields[name] = value.detach().cpu()
    return fields


def _note(notes: List[str], text: str) -> None:
    if text not in notes:
        notes.append(text)


def _result(
    merged: AttentionAccumulator,
    chosen: _ChosenImages,
    used: int,
    skipped: SkippedImages,
    run: CommandRun,
    world: World,
    writes: bool,
) -> AttentionStatsResult:
    """The merged statistics as tables with their bootstrap intervals over images."""
    intervals = bootstrap_intervals(merged.image_sums)
    return AttentionStatsResult(
        table=table_frame(merged, intervals),
        differences=differences_frame(merged, intervals),
        thresholds_name=chosen.thresholds_name,
        thresholds=chosen.thresholds,
        images_used=used,
        skipped=skipped,
        notes=run.notes,
        out_dir=run.out_dir if writes else None,
        rank=world.rank,
    )


def _fill_summary(
    run: CommandRun,
    chosen: _ChosenImages,
    merged: AttentionAccumulator,
    result: AttentionStatsResult,
    world: World,
    seconds: float,
) -> None:
    """``summary.json``: dataset, images, thresholds, definitions, layers, the run's speed."""
    summary = run.summary
    data = chosen.data
    summary["mode"] = "dataset statistics"
    summary["dataset"] = {
        "path": str(data.root),
        "format": data.format,
        "split": chosen.split,
        "images_in_dataset": len(data.images),
        "images_selected": len(chosen.entries),
        "issues": data.issues,
    }
    summary["images"] = {"used": result.images_used}
    summary["skipped"] = result.skipped.summary()
    summary["notes"] = run.notes
    summary["thresholds"] = {
        "name": result.thresholds_name,
        "small_medium_px2": result.thresholds[0],
        "medium_large_px2": result.thresholds[1],
    }
    summary["definitions"] = DEFINITIONS
    summary["measures"] = MEASURES
    summary["statistics"] = {
        k: v for k, v in _statistics_note(per_group=False).items() if k != "offset_groups"
    }
    summary["tokens_not_counted"] = {
        name: {"ignored_box": c[0], "centre_outside_image": c[1]}
        for name, c in merged.not_counted.items()
    }
    summary["decoder_matches"] = merged.matched
    summary["layers"] = list(merged.layers.values())
    summary["distributed"] = {"world_size": world.size, "backend": world.backend()}
    summary["forward_seconds"] = round(seconds, 3)
    summary["images_per_second"] = (
        round(result.images_used / result.wall_seconds, 3) if result.wall_seconds > 0 else None
    )


def _write_outputs(run: CommandRun, result: AttentionStatsResult) -> Dict[str, Path]:
    """Rank 0: the two CSVs, the Markdown tables and ``summary.json``."""
    out_dir = run.out_dir
    files = {
        "table_csv": out_dir / "attention_table.csv",
        "differences_csv": out_dir / "attention_differences.csv",
        "table_md": out_dir / "attention_table.md",
    }
    write_csv(files["table_csv"], result.table, TABLE_CSV)
    write_csv(files["differences_csv"], result.differences, DIFFERENCES_CSV)
    write_text(files["table_md"], tables_markdown(result))
    run.summary["columns"] = {
        "attention_table.csv": describe(TABLE_CSV),
        "attention_differences.csv": describe(DIFFERENCES_CSV),
    }
    run.summary["outputs"] = sorted(p.name for p in files.values())
    files["summary"] = run.summary.write(out_dir)
    return files


def measure_tables(
    result: AttentionStatsResult,
) -> List[Tuple[str, str, pd.DataFrame, pd.DataFrame]]:
    """(kind, measure, table, differences) per block of the tables, in the dilation-stats
    layout: one row label per layer (``<layer> L<k>`` for the share of level k)."""

    def labelled(frame: pd.DataFrame) -> pd.DataFrame:
        names = [
            f"{layer} L{level}" if not pd.isna(level) else str(layer)
            for layer, level in zip(frame["layer"], frame["feature_level"])
        ]
        return frame.assign(layer=names).drop(columns=["kind", "measure", "feature_level"])

    blocks = []
    differences = result.differences
    for (kind, measure), part in result.table.groupby(["kind", "measure"], sort=False):
        of = differences[(differences["kind"] == kind) & (differences["measure"] == measure)]
        blocks.append((str(kind), str(measure), labelled(part), labelled(of)))
    return blocks


def tables_markdown(result: AttentionStatsResult) -> str:
    """``attention_table.md``: the definitions, then one dilation-stats style table per (kind,
    measure) (layers as rows, categories as columns) with its differences."""
    from dcn_inspect.report.dilation_stats import table_markdown

    lines = ["# Deformable attention by object size", ""]
    lines += [f"- **{name}**: {text}" for name, text in DEFINITIONS.items()]
    parts = ["\n".join(lines) + "\n"]
    for kind, measure, table, differences in measure_tables(result):
        parts.append(
            table_markdown(
                table,
                MEASURES[measure],
                result.thresholds_name,
                result.thresholds,
                differences,
                title=f"Attention {measure} ({kind} queries)",
            )
        )
    return "\n".join(parts)
