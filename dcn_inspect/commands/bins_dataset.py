"""``dcn-inspect bins DATASET``: the paper's Fig. 7 measured over a dataset.

Given a dataset (a COCO json or a VOC directory) instead of images, every annotated box of
every image is an RoI, with the offsets of one class each (``class_choice``, not ``all``), and
only the foreground measurement is written (:mod:`dcn_inspect.analysis.bins_foreground`):

- ``foreground_rois.csv``: one row per RoI whose object has a mask (boxes marked ignore, such
  as COCO crowd, left out);
- ``foreground_table.csv`` / ``.md``: per ground-truth class and overall, mean fractions and the
  gain's bootstrap interval over images (:func:`dcn_inspect.report.tables.foreground_markdown`);
- ``summary.json``: the dataset, how many images and RoIs were used, measured, without a mask
  or ignored, the pooling head and the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import pandas as pd

from dcn_inspect.analysis.bins import HeadInfo
from dcn_inspect.analysis.bins_foreground import (
    ROIS_CSV,
    TABLE_COLUMNS,
    TABLE_CSV,
    foreground_table,
)
from dcn_inspect.analysis.roi_selection import (
    RoIRequest,
    class_label,
    class_names,
    offset_class_names,
)
from dcn_inspect.commands.bins_measure import (
    FOREGROUND_ROI_COLUMNS,
    BinsOptions,
    BinsResult,
    foreground_rows,
    foreground_summary,
    measure_image,
)
from dcn_inspect.commands.common import CommandRun, start_run
from dcn_inspect.commands.options import DatasetOptions, ImageInput, ModelChoice, OutputOptions
from dcn_inspect.core.columns import describe
from dcn_inspect.core.errors import InputError
from dcn_inspect.io.annotations import (
    AnnotatedDataset,
    ImageAnnotation,
    detect_format,
    load_dataset,
)
from dcn_inspect.io.images import (
    ImageError,
    ModelInput,
    SkippedImages,
    check_max_pixels,
    read_model_input,
)
from dcn_inspect.io.outputs import write_csv, write_text
from dcn_inspect.io.progress import image_progress

#: What dataset mode writes besides ``summary.json``: key in ``BinsResult.files`` -> file name.
DATASET_FILES = {
    "rois_csv": "foreground_rois.csv",
    "table_csv": "foreground_table.csv",
    "table_md": "foreground_table.md",
}


def dataset_argument(images: Optional[Sequence[Path]]) -> Optional[Path]:
    """The dataset when ``images`` is one COCO json or directory; None for image files."""
    if not images:
        return None
    paths = [Path(p) for p in images]
    datasets = [p for p in paths if p.suffix.lower() == ".json" or p.is_dir()]
    if not datasets:
        return None
    if len(paths) > 1:
        raise InputError(
            f"{datasets[0]}: give either image files or one dataset "
            "(a COCO json or a VOC directory), not both",
            param="images",
        )
    return datasets[0]


def bins_over_dataset(
    subset: DatasetOptions,
    model: ModelChoice,
    inputs: ImageInput,
    output: OutputOptions,
    options: BinsOptions,
) -> BinsResult:
    """Every annotated box of ``subset.dataset`` an RoI, measured on its object's mask."""
    if options.class_choice == "all":
        raise InputError(
            "all: the dataset table needs one offset set per RoI (use auto, gt, pred, or a class)",
            param="class_choice",
        )
    if subset.max_images is not None and subset.max_images < 1:
        raise InputError(f"{subset.max_images}: must be at least 1", param="max_images")
    assert subset.dataset is not None
    detect_format(subset.dataset)
    check_max_pixels(inputs.max_pixels)
    data = load_dataset(
        subset.dataset,
        subset.images_dir,
        subset.split,
        masks=True,
        allow_outside_paths=subset.allow_outside_paths,
    )
    entries = data.images[: subset.max_images] if subset.max_images is not None else data.images
    if not entries:
        raise InputError(f"{data.root}: the dataset has no images")
    parameters = {
        "dataset": str(subset.dataset),
        "images_dir": subset.images_dir,
        "split": subset.split,
        "max_images": subset.max_images,
        "class": options.class_choice,
        "layer": options.layer,
        "resize": inputs.resize,
        "strict": inputs.strict,
        "max_pixels": inputs.max_pixels,
        "allow_outside_paths": subset.allow_outside_paths,
    }
    planned = [Path(output.out) / name for name in DATASET_FILES.values()]
    with start_run("bins", parameters, model, inputs, output.out, outputs=planned) as run:
        run.outputs.protect("dataset", [data.root, *(entry.path for entry in entries)])
        names = class_names(run.loaded)
        tally = _measure_dataset(run, data, entries, names, options, inputs, output.progress)
        return _write_dataset_outputs(run, data, entries, names, tally, subset.split)


@dataclass
class _Tally:
    """What the loop over the dataset's images measured and counted."""

    skipped: SkippedImages
    parts: List[pd.DataFrame] = field(default_factory=list)  # foreground rows per image
    head: Optional[HeadInfo] = None  # the pooling head (of the first image measured)
    used: int = 0  # images measured
    without_boxes: int = 0  # images with no annotated box
    rois_total: int = 0  # RoIs (annotated boxes) of the images measured
    rois_without_mask: int = 0  # of which their object has no mask
    rois_ignored: int = 0  # of which the box is marked ignore (COCO crowd, VOC difficult)


def _measure_dataset(
    run: CommandRun,
    data: AnnotatedDataset,
    entries: List[ImageAnnotation],
    names: Optional[List[str]],
    options: BinsOptions,
    inputs: ImageInput,
    progress: bool,
) -> _Tally:
    """Every image with boxes read and measured; unreadable ones skipped (under ``strict``)."""
    tally = _Tally(SkippedImages(len(entries), inputs.strict))
    with image_progress("bins", progress, len(entries)) as advance:
        for entry in entries:
            advance()
            if len(entry.boxes) == 0:
                tally.without_boxes += 1
                continue
            model_input = _model_input(entry, run, inputs, tally.skipped)
            if model_input is not None:
                _measure_entry(entry, model_input, names, options, run, inputs, tally)
    tally.skipped.check_any_used(tally.used, str(data.root))
    return tally


def _model_input(
    entry: ImageAnnotation, run: CommandRun, inputs: ImageInput, skipped: SkippedImages
) -> Optional[ModelInput]:
    """The image of ``entry`` as the model's input; None (and skipped) when it cannot be read."""
    if entry.path is None:
        skipped.skip(
            entry.file_name,
            ImageError(f"{entry.file_name}: image file not found", "image file not found"),
        )
        return None
    try:
        _, model_input = read_model_input(
            entry.path,
            run.loaded.preprocess,
            inputs.resize,
            inputs.max_pixels,
            (entry.height, entry.width),
        )
    except ImageError as exc:
        skipped.skip(entry.file_name, exc)
        return None
    return model_input


def _entry_rois(entry: ImageAnnotation) -> List[RoIRequest]:
    """Every annotated box of the image as an RoI made from that box (its object)."""
    return [
        RoIRequest(
            tuple(float(v) for v in box),  # type: ignore[arg-type]
            entry.labels[k],
            entry.sources[k] if k < len(entry.sources) else f"{entry.file_name} box {k}",
            k,
        )
        for k, box in enumerate(entry.boxes)
    ]


def _measure_entry(
    entry: ImageAnnotation,
    model_input: ModelInput,
    names: Optional[List[str]],
    options: BinsOptions,
    run: CommandRun,
    inputs: ImageInput,
    tally: _Tally,
) -> None:
    """One image's RoIs measured; its rows (ignored boxes left out) added to ``tally``."""
    requests = _entry_rois(entry)
    measured = measure_image(model_input, requests, names, options, run, entry, inputs.max_pixels)
    tally.head = tally.head or measured.info
    tally.used += 1
    tally.rois_total += len(requests)
    labels = [
        (roi, class_label(c, how, measured.offset_names)) for roi, c, how in measured.choice.rows
    ]
    rows = foreground_rows(entry.file_name, requests, measured, labels)
    if rows is None:
        tally.rois_without_mask += len(requests)
        return
    ignored = entry.ignore[rows["object"].to_numpy(dtype=np.int64)]
    tally.rois_without_mask += len(requests) - len(rows)
    tally.rois_ignored += int(ignored.sum())
    tally.parts.append(rows[~ignored])


def _write_dataset_outputs(
    run: CommandRun,
    data: AnnotatedDataset,
    entries: List[ImageAnnotation],
    names: Optional[List[str]],
    tally: _Tally,
    split: Optional[str],
) -> BinsResult:
    """The per-RoI rows and the per-class table written, ``summary.json`` filled and the run
    finished."""
    from dcn_inspect.report.tables import foreground_markdown

    per_roi = (
        pd.concat(tally.parts, ignore_index=True)
        if tally.parts
        else pd.DataFrame(columns=FOREGROUND_ROI_COLUMNS)
    )
    table = foreground_table(per_roi) if len(per_roi) else pd.DataFrame(columns=TABLE_COLUMNS)
    if not len(per_roi):
        run.notes.append(
            f"{data.root}: no annotated box has an object mask (COCO 'segmentation'); "
            "nothing to measure"
        )
    files = {key: run.out_dir / name for key, name in DATASET_FILES.items()}
    write_csv(files["rois_csv"], per_roi, ROIS_CSV)
    write_csv(files["table_csv"], table, TABLE_CSV)
    run.summary["columns"] = {
        "foreground_rois.csv": describe(ROIS_CSV),
        "foreground_table.csv": describe(TABLE_CSV),
    }
    write_text(files["table_md"], foreground_markdown(table, run.loaded.name, str(data.root)))
    run.summary["dataset"] = {
        "path": str(data.root),
        "format": data.format,
        "split": split,
        "images_in_dataset": len(data.images),
        "images_selected": len(entries),
        "categories": data.categories,
        "issues": data.issues,
    }
    run.summary["images"] = {"used": tally.used, "without_boxes": tally.without_boxes}
    run.summary["rois"] = {
        "total": tally.rois_total,
        "measured": len(per_roi),
        "without_mask": tally.rois_without_mask,
        "ignored_boxes": tally.rois_ignored,
    }
    head = tally.head
    run.summary["head"] = head.as_dict() if head else None
    run.summary["class_names"] = offset_class_names(names, head.num_classes) if head else names
    run.summary["foreground"] = foreground_summary(table)
    summary_path = run.finish(tally.skipped)
    return BinsResult(
        run.out_dir, [], summary_path, head, run.notes, tally.skipped.items, table, files
    )
