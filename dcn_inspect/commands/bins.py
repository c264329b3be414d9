"""``dcn-inspect bins``: regular versus deformed RoI-pooling bins (the paper's Fig. 7).

For each image: its RoIs (:func:`dcn_inspect.analysis.roi_selection.collect_rois`, all checked before
any work) -> the model's own forward with ``rois=`` under :func:`dcn_inspect.capture.session.probe` ->
the pooling layer's record -> whose offsets to show (:func:`dcn_inspect.analysis.roi_selection.choose_classes`)
-> the bins (:mod:`dcn_inspect.analysis.bins`) in original-image pixels -> written as

- ``<stem>_bins.csv``: one row per (RoI, class, bin), regular and deformed bin, and the
  fraction of each bin's sampling points on the RoI's object mask (:mod:`dcn_inspect.analysis.bins_foreground`);
- ``<stem>_bin_points.csv`` (``points=True``): the bilinear sampling points of every bin;
- ``<stem>_bins.<fmt>``: one panel per RoI (or all RoIs on one image with ``overlay``);
- ``summary.json``: model, pooling head, RoIs, their objects and foreground fractions, how
  each class was chosen, coordinates.

Given a dataset (a COCO json or a VOC directory) instead of images, every annotated box of
every image is an RoI and only the foreground measurement is written: ``foreground_rois.csv``
(one row per RoI), ``foreground_table.csv`` / ``.md`` (per class and overall) and ``summary.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch

from dcn_inspect.analysis.bins import (
    AGNOSTIC,
    BIN_POINTS_CSV,
    BINS_CSV,
    CSV_COLUMNS,
    POINT_COLUMNS,
    BinGeometry,
    HeadInfo,
    bins_table,
    frame_comparison,
    geometry_for_rows,
    head_info,
    points_table,
)
from dcn_inspect.analysis.bins_foreground import (
    MATCH_IOU,
    ROIS_CSV,
    TABLE_COLUMNS,
    TABLE_CSV,
    BinForeground,
    bin_foreground,
    foreground_table,
)
from dcn_inspect.analysis.roi_selection import (
    Box,
    ClassChoice,
    RoIObject,
    RoIRequest,
    choose_classes,
    class_label,
    class_names,
    collect_rois,
    image_annotations,
    offset_class_names,
    parse_roi,
    roi_logits,
    roi_objects,
)
from dcn_inspect.capture.records import RoIPoolRecord
from dcn_inspect.capture.session import ModelRaised, Probe, probe
from dcn_inspect.commands.common import (
    CommandRun,
    image_list,
    images_of_run,
    start_run,
)
from dcn_inspect.commands.options import ImageInput, ModelChoice, check_figure_format
from dcn_inspect.core.columns import describe, names
from dcn_inspect.core.defaults import DEFAULT_MAX_PIXELS, DEFAULT_OUT
from dcn_inspect.core.errors import InputError
from dcn_inspect.io.annotations import (
    AnnotatedDataset,
    ImageAnnotation,
    detect_format,
    load_dataset,
    object_mask,
)
from dcn_inspect.io.images import (
    ImageError,
    ModelInput,
    SkippedImages,
    check_max_pixels,
    check_resize,
    read_model_input,
    to_model_input,
)
from dcn_inspect.io.outputs import write_csv, write_figure, write_text
from dcn_inspect.models.loaded_model import LoadedModel

__all__ = [
    "CSV_COLUMNS",
    "FOREGROUND_ROI_COLUMNS",
    "POINT_COLUMNS",
    "TABLE_COLUMNS",
    "BinsResult",
    "ImageBins",
    "bins",
    "foreground_markdown",
]

#: Columns of ``foreground_rois.csv`` (dataset mode): one row per RoI.
FOREGROUND_ROI_COLUMNS = names(ROIS_CSV)

#: Figures show at most this many panels (RoI x class); the rest are listed in summary.json.
MAX_PANELS = 36


@dataclass
class ImageBins:
    """Results for one image."""

    image: Path
    csv: Path
    figure: Path
    points_csv: Optional[Path]
    table: pd.DataFrame
    rois: List[Dict[str, Any]]
    foreground: Optional[pd.DataFrame] = (
        None  # one row per RoI row set (ROI_COLUMNS + object), None without masks
    )


@dataclass
class BinsResult:
    out_dir: Path
    images: List[ImageBins]
    summary: Path
    head: Optional[HeadInfo] = None
    notes: List[str] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(
        default_factory=list
    )  # unreadable images: image, kind, reason
    foreground: Optional[pd.DataFrame] = (
        None  # per class and overall (foreground.TABLE_COLUMNS); None without masks
    )
    files: Dict[str, Path] = field(default_factory=dict)  # dataset mode: what was written


@dataclass(frozen=True)
class _Options:
    class_choice: str
    points: bool
    overlay: bool
    layer: Optional[str]
    resize: Optional[int]
    fmt: str


def bins(
    images: Optional[Sequence[Path]] = None,
    model: Union[str, LoadedModel, None] = None,
    weights: Optional[Path] = None,
    rois: Sequence[Union[Box, str]] = (),
    rois_file: Optional[Path] = None,
    annotations: Optional[Path] = None,
    boxes: Optional[Path] = None,
    class_choice: str = "auto",
    points: bool = False,
    overlay: bool = False,
    layer: Optional[str] = None,
    resize: Optional[int] = None,
    device: str = "cpu",
    out: Path = Path(DEFAULT_OUT),
    fmt: str = "png",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    strict: bool = False,
    images_dir: Optional[Path] = None,
    split: Optional[str] = None,
    max_images: Optional[int] = None,
    allow_outside_paths: bool = False,
) -> BinsResult:
    """Regular vs deformed RoI-pooling bins for each image, or over a dataset.

    Images: writes ``<stem>_bins.csv``, ``<stem>_bins.<fmt>`` (and ``<stem>_bin_points.csv``
    with ``points``) per image and ``summary.json`` into ``out``. A single COCO json or VOC
    directory in ``images`` is a dataset (``images_dir``, ``split``, ``max_images`` as
    dilation-stats takes them): every annotated box is an RoI and the foreground fractions are
    written (``foreground_rois.csv``, ``foreground_table.csv`` / ``.md``, ``summary.json``);
    image files it names outside its folder are read only with ``allow_outside_paths``.
    """
    options = _Options(class_choice, points, overlay, layer, resize, check_figure_format(fmt))
    check_resize(resize)
    dataset = _dataset_argument(images)
    if dataset is not None:
        return _bins_over_dataset(
            dataset,
            model,
            weights,
            options,
            device,
            out,
            max_pixels,
            progress,
            strict,
            images_dir,
            split,
            max_images,
            allow_outside_paths,
        )
    dataset_only = {
        "images_dir": images_dir,
        "split": split,
        "max_images": max_images,
        "allow_outside_paths": allow_outside_paths or None,
    }
    for name, value in dataset_only.items():
        if value is not None:
            raise InputError(
                "applies to a dataset (a COCO json or a VOC directory), not to images", param=name
            )
    image_paths = image_list(images)
    # Every image's RoIs are checked before any work, so a bad RoI fails fast and writes nothing.
    if boxes is not None and not Path(boxes).exists():
        raise InputError(f"{boxes}: file not found", param="boxes")
    requests_of = {
        path: collect_rois(path, rois, rois_file, annotations, boxes) for path in image_paths
    }
    parameters = {
        "images": [str(p) for p in image_paths],
        "rois": [list(map(float, parse_roi(r) if isinstance(r, str) else r)) for r in rois],
        "rois_file": rois_file,
        "annotations": annotations,
        "boxes": boxes,
        "class": class_choice,
        "points": points,
        "overlay": overlay,
        "layer": layer,
        "resize": resize,
        "format": options.fmt,
    }
    planned = [Path(out) / name for path in image_paths for name in _output_names(path, options)]
    inputs = ImageInput(resize, max_pixels, device, strict)
    run = start_run("bins", parameters, ModelChoice(model, weights), inputs, out, outputs=planned)
    names = class_names(run.loaded)

    results: List[ImageBins] = []
    per_image: List[Dict[str, Any]] = []
    head: Optional[HeadInfo] = None
    with run:
        with images_of_run(image_paths, inputs, "bins", progress, run.loaded.preprocess) as (
            readable,
            skipped,
        ):
            for path, image in readable:
                entry = _annotation_matching(path, image, annotations, run)
                item, image_summary, info = _bins_for_image(
                    path, image, requests_of[path], names, options, run, entry, max_pixels
                )
                head = head or info
                results.append(item)
                per_image.append(image_summary)
        run.summary["head"] = head.as_dict() if head else None
        run.summary["class_names"] = offset_class_names(names, head.num_classes) if head else names
        run.summary["images"] = per_image
        table = _overall_foreground(results, options, run)
        run.summary["columns"] = _columns(points)
        summary_path = run.finish(skipped)
    return BinsResult(run.out_dir, results, summary_path, head, run.notes, skipped.items, table)


# --------------------------------------------------------------------------------------------
# Steps


def _bins_for_image(
    path: Path,
    image: np.ndarray,
    requests: Sequence[RoIRequest],
    names: Optional[List[str]],
    options: _Options,
    run: CommandRun,
    entry: Optional[ImageAnnotation] = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Tuple[ImageBins, Dict[str, Any], HeadInfo]:
    """Probe one image with its RoIs, lay out its bins, measure them on the objects' masks
    (``entry``: the image's annotation, if any) and write its CSV(s) and figure."""
    model_input = to_model_input(image, run.loaded.preprocess, options.resize, max_pixels)
    measured = _measure_image(model_input, requests, names, options, run, entry, max_pixels)
    record, info, choice, geometry, offset_names = (
        measured.record,
        measured.info,
        measured.choice,
        measured.geometry,
        measured.offset_names,
    )
    if not info.has_offsets:
        run.notes.append(
            f"{path.name}: layer {record.name} ran without offsets; deformed bins equal the regular bins"
        )
    labels = [(roi, class_label(c, how, offset_names)) for roi, c, how in choice.rows]
    files = _write_image_outputs(
        path,
        image,
        requests,
        geometry,
        labels,
        choice,
        info,
        f"{path.name}: {info.module_type} {record.name}",
        options,
        run,
        measured.fractions,
    )
    roi_summary = _roi_summary(
        requests, record, geometry, choice, offset_names, measured.objects, measured.fractions
    )
    image_summary = {
        "image": str(path),
        "original_hw": list(model_input.original_hw),
        "input_hw": list(model_input.input_hw),
        "scale_to_original": list(model_input.scale_to_original),
        "layer": record.name,
        "pooled_map_hw": list(record.input_hw),
        "coordinates": frame_comparison(info, record.input_frame),
        "rois": roi_summary,
        "outputs": [files.csv.name, files.figure.name]
        + ([files.points_csv.name] if files.points_csv else []),
    }
    foreground = _foreground_rows(
        path.name, requests, choice, labels, measured.objects, measured.fractions
    )
    return (
        ImageBins(
            path, files.csv, files.figure, files.points_csv, files.table, roi_summary, foreground
        ),
        image_summary,
        info,
    )


@dataclass
class _Measured:
    """One image's forward with its RoIs: the pooling layer, the chosen classes, the bins (in
    original-image pixels), each RoI's object and each row set's foreground fractions."""

    record: RoIPoolRecord
    info: HeadInfo
    choice: ClassChoice
    geometry: BinGeometry
    offset_names: Optional[List[str]]
    objects: List[Optional[RoIObject]]
    fractions: List[Optional[BinForeground]]


def _measure_image(
    model_input: ModelInput,
    requests: Sequence[RoIRequest],
    names: Optional[List[str]],
    options: _Options,
    run: CommandRun,
    entry: Optional[ImageAnnotation],
    max_pixels: int,
) -> _Measured:
    result = _forward_with_rois(run, model_input, requests)
    record = _pooling_record(result.capture.roi_pools, options.layer)
    if record.rois.shape[0] != len(requests):
        raise InputError(
            f"{run.loaded.name}: layer {record.name} pooled {record.rois.shape[0]} RoIs for the {len(requests)} given",
            param="model",
        )
    info = head_info(record)
    offset_names = offset_class_names(names, info.num_classes)
    choice = choose_classes(
        options.class_choice, requests, info, offset_names, roi_logits(result.output)
    )
    geometry = geometry_for_rows(record, choice.rows, info).scaled(*model_input.scale_to_original)
    objects = roi_objects(requests, entry)
    return _Measured(
        record,
        info,
        choice,
        geometry,
        offset_names,
        objects,
        _fractions(geometry, choice, objects, entry, max_pixels),
    )


def _fractions(
    geometry: BinGeometry,
    choice: ClassChoice,
    objects: Sequence[Optional[RoIObject]],
    entry: Optional[ImageAnnotation],
    max_pixels: int,
) -> List[Optional[BinForeground]]:
    """Foreground fractions of every row set whose RoI has an object with a mask; one mask
    decoded at a time (row sets of one RoI are consecutive)."""
    fractions: List[Optional[BinForeground]] = []
    current: Tuple[Optional[int], Optional[np.ndarray]] = (None, None)
    for k, (roi, _, _) in enumerate(choice.rows):
        obj = objects[roi]
        if entry is None or obj is None or not entry.has_mask(obj.index):
            fractions.append(None)
            continue
        if current[0] != obj.index:
            current = (obj.index, object_mask(entry, obj.index, max_pixels))
        fractions.append(bin_foreground(geometry, k, current[1]))  # type: ignore[arg-type]
    return fractions


def _foreground_rows(
    image: str,
    requests: Sequence[RoIRequest],
    choice: ClassChoice,
    labels: Sequence[Tuple[int, str]],
    objects: Sequence[Optional[RoIObject]],
    fractions: Sequence[Optional[BinForeground]],
) -> Optional[pd.DataFrame]:
    """One row per RoI row set with a fraction: :data:`FOREGROUND_ROI_COLUMNS`; None if none has one."""
    rows = []
    for (roi, _, how), (_, label), obj, fraction in zip(
        choice.rows, labels, objects_per_row(choice, objects), fractions
    ):
        if fraction is None or obj is None:
            continue
        x1, y1, x2, y2 = requests[roi].box
        rows.append(
            {
                "image": image, "roi": roi, "label": obj.label if obj.label is not None else "", "class": label, "chosen_by": how,
                "object": obj.index, "x1": x1, "y1": y1, "x2": x2, "y2": y2,
                "fg_regular": fraction.regular, "fg_deformed": fraction.deformed, "gain": fraction.gain,
            }
        )  # fmt: skip
    return pd.DataFrame(rows, columns=FOREGROUND_ROI_COLUMNS) if rows else None


def objects_per_row(
    choice: ClassChoice, objects: Sequence[Optional[RoIObject]]
) -> List[Optional[RoIObject]]:
    return [objects[roi] for roi, _, _ in choice.rows]


def _annotation_matching(
    path: Path, image: np.ndarray, annotations: Optional[Path], run: CommandRun
) -> Optional[ImageAnnotation]:
    """The image's annotation (with masks) when its size matches the image; else a note and None."""
    entry = image_annotations(path, annotations)
    if entry is None:
        return None
    if (entry.height, entry.width) != tuple(image.shape[:2]):
        run.notes.append(
            f"{path.name}: image is {image.shape[1]}x{image.shape[0]} but its annotation says {entry.width}x{entry.height}; "
            "no foreground fractions"
        )
        return None
    return entry


def _overall_foreground(
    results: Sequence[ImageBins], options: _Options, run: CommandRun
) -> Optional[pd.DataFrame]:
    """Images mode: the per-class and overall table into summary.json (one class per RoI only)."""
    parts = [item.foreground for item in results if item.foreground is not None]
    if not parts:
        run.summary["foreground"] = None
        return None
    if options.class_choice == "all":
        run.summary["foreground"] = {
            "note": "per-class table not computed with `class_choice` all (several offset sets per RoI)"
        }
        return None
    table = foreground_table(pd.concat(parts, ignore_index=True))
    run.summary["foreground"] = _foreground_summary(table)
    return table


def _foreground_summary(table: pd.DataFrame) -> Dict[str, Any]:
    return {
        "definition": (
            "fraction of a RoI's bin sampling points whose pixel (floor(x), floor(y)) belongs to the RoI's object mask; "
            "regular bins: the op's sampling pattern with zero offsets; deformed: with the network's offsets; points "
            "outside the image count as off the object"
        ),
        "object_of_roi": (
            f"the annotated box the RoI was made from; otherwise the annotated box with the highest IoU if >= {MATCH_IOU}"
        ),
        "mask_rasterisation": "polygons: pixels whose centre lies inside (even-odd, parts united); RLE: as decoded (column-major)",
        "table": [
            {
                k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                for k, v in row.items()
            }
            for row in table.to_dict("records")
        ],
    }


def _output_names(path: Path, options: _Options) -> List[str]:
    """The files :func:`_write_image_outputs` writes for ``path`` (in the output directory)."""
    return [f"{path.stem}_bins.csv", f"{path.stem}_bins.{options.fmt}"] + (
        [f"{path.stem}_bin_points.csv"] if options.points else []
    )


def _forward_with_rois(
    run: CommandRun, model_input: ModelInput, requests: Sequence[RoIRequest]
) -> Probe:
    """The model's forward with the RoIs scaled from original-image to model-input pixels."""
    sx, sy = model_input.scale_to_original
    boxes = torch.tensor(
        [[0.0, r.box[0] / sx, r.box[1] / sy, r.box[2] / sx, r.box[3] / sy] for r in requests],
        dtype=model_input.tensor.dtype,
    )
    try:
        return probe(
            run.loaded.model,
            model_input.tensor.to(run.device),
            model_name=run.loaded.name,
            rois=boxes.to(run.device),
        )
    except ModelRaised as exc:
        if isinstance(exc.original, TypeError) and "rois" in str(exc.original):
            raise InputError(
                f"{run.loaded.name}: its forward does not take rois= (bins needs a model with a deformable RoI pooling head)",
                param="model",
            ) from None
        raise


def _pooling_record(records: Dict[str, RoIPoolRecord], layer: Optional[str]) -> RoIPoolRecord:
    """The pooling layer to show: ``layer``, else the first that ran with offsets, else the first."""
    if not records:
        raise InputError(
            "no deformable RoI pooling layer ran in the forward with rois= (bins needs a deformable (PS) RoI pooling head)",
            param="model",
        )
    if layer is not None:
        if layer not in records:
            raise InputError(
                f"{layer}: not a RoI pooling layer of the model (found: {', '.join(records)})",
                param="layer",
            )
        return records[layer]
    with_offsets = [r for r in records.values() if r.offset is not None]
    return with_offsets[0] if with_offsets else next(iter(records.values()))


@dataclass(frozen=True)
class _ImageFiles:
    csv: Path
    figure: Path
    points_csv: Optional[Path]
    table: pd.DataFrame


def _write_image_outputs(
    path: Path,
    image: np.ndarray,
    requests: Sequence[RoIRequest],
    geometry: BinGeometry,
    labels: List[Tuple[int, str]],
    choice: ClassChoice,
    info: HeadInfo,
    title: str,
    options: _Options,
    run: CommandRun,
    fractions: Sequence[Optional[BinForeground]] = (),
) -> _ImageFiles:
    from dcn_inspect.report.bins import OP_EXTENT_LABELS, RoIPanel, draw_bins_figure

    shape = geometry.regular.shape[:3]
    fg_regular, fg_deformed = np.full(shape, np.nan), np.full(shape, np.nan)
    for k, fraction in enumerate(fractions):
        if fraction is not None:
            fg_regular[k], fg_deformed[k] = fraction.regular_bins, fraction.deformed_bins
    table = bins_table(geometry, labels, fg_regular, fg_deformed)
    csv_path = run.out_dir / f"{path.stem}_bins.csv"
    write_csv(csv_path, table, BINS_CSV)
    points_path = None
    if options.points:
        points_path = run.out_dir / f"{path.stem}_bin_points.csv"
        write_csv(points_path, points_table(geometry, labels), BIN_POINTS_CSV)
    panels = [
        RoIPanel(
            title=_panel_title(roi, label, how, requests[roi]),
            roi=requests[roi].box,
            regular=geometry.regular[k],
            deformed=geometry.deformed[k],
            points=geometry.points[k].reshape(-1, 2) if options.points else None,
            roi_label=f"RoI {roi}"
            + (f" ({requests[roi].label})" if requests[roi].label is not None else ""),
            op_roi=tuple(float(v) for v in geometry.op_rois[k]),  # type: ignore[arg-type]
        )
        for k, ((roi, label), (_, _, how)) in enumerate(zip(labels, choice.rows))
    ]
    if len(panels) > MAX_PANELS and not options.overlay:
        run.notes.append(
            f"{path.name}: figure shows the first {MAX_PANELS} of {len(panels)} RoI/class panels; the CSV has all"
        )
        panels = panels[:MAX_PANELS]
    figure_path = run.out_dir / f"{path.stem}_bins.{options.fmt}"
    figure = draw_bins_figure(
        image,
        panels,
        overlay=options.overlay,
        title=title,
        op_extent_label=OP_EXTENT_LABELS[info.kind],
    )
    write_figure(figure_path, figure, dpi=100)
    return _ImageFiles(csv_path, figure_path, points_path, table)


def _roi_summary(
    requests: Sequence[RoIRequest],
    record: RoIPoolRecord,
    geometry: BinGeometry,
    choice: ClassChoice,
    offset_names: Optional[List[str]],
    objects: Sequence[Optional[RoIObject]] = (),
    fractions: Sequence[Optional[BinForeground]] = (),
) -> List[Dict[str, Any]]:
    first_row: Dict[int, int] = {}
    for k, (roi, _, _) in enumerate(choice.rows):
        first_row.setdefault(roi, k)

    def measured(k: int) -> Dict[str, Any]:
        fraction = fractions[k] if k < len(fractions) else None
        if fraction is None:
            return {}
        return {
            "fg_regular": fraction.regular,
            "fg_deformed": fraction.deformed,
            "gain": fraction.gain,
        }

    def top(r: int) -> Optional[str]:
        index = choice.top_class[r] if r < len(choice.top_class) else None
        return None if index is None else class_label(index, "top", offset_names)

    return [
        {
            "roi": r,
            "box": list(request.box),
            "label": request.label,
            "source": request.source,
            "model_input_box": [float(v) for v in record.rois[r, 1:].cpu().tolist()],
            "op_extent_original": [float(v) for v in geometry.op_rois[first_row[r]]],
            "object": objects[r].as_dict() if r < len(objects) and objects[r] is not None else None,  # type: ignore[union-attr]
            "top_scored_class": top(r),
            "classes": [
                {
                    "class": class_label(c, how, offset_names),
                    "index": c,
                    "chosen_by": how,
                    **measured(k),
                }
                for k, (rr, c, how) in enumerate(choice.rows)
                if rr == r
            ],
        }
        for r, request in enumerate(requests)
    ]


def _columns(points: bool) -> Dict[str, Any]:
    """The ``summary.json`` description of the CSVs this run writes."""
    files = {"<stem>_bins.csv": describe(BINS_CSV)}
    if points:
        files["<stem>_bin_points.csv"] = describe(BIN_POINTS_CSV)
    return files


def _panel_title(roi: int, label: str, how: str, request: RoIRequest) -> str:
    name = f"RoI {roi}"
    if request.label is not None:
        name += f" ({request.label})"
    if how == AGNOSTIC:
        return name
    return f"{name}: offsets of {label} [{how}]"


# --------------------------------------------------------------------------------------------
# A dataset: the foreground measurement over every annotated box


def _dataset_argument(images: Optional[Sequence[Path]]) -> Optional[Path]:
    """The dataset when ``images`` is one COCO json or directory; None for image files."""
    if not images:
        return None
    paths = [Path(p) for p in images]
    datasets = [p for p in paths if p.suffix.lower() == ".json" or p.is_dir()]
    if not datasets:
        return None
    if len(paths) > 1:
        raise InputError(
            f"{datasets[0]}: give either image files or one dataset (a COCO json or a VOC directory), not both",
            param="images",
        )
    return datasets[0]


def _bins_over_dataset(
    dataset: Path,
    model: Union[str, LoadedModel, None],
    weights: Optional[Path],
    options: _Options,
    device: str,
    out: Path,
    max_pixels: int,
    progress: bool,
    strict: bool,
    images_dir: Optional[Path],
    split: Optional[str],
    max_images: Optional[int],
    allow_outside_paths: bool,
) -> BinsResult:
    if options.class_choice == "all":
        raise InputError(
            "all: the dataset table needs one offset set per RoI (use auto, gt, pred, or a class)",
            param="class_choice",
        )
    if max_images is not None and max_images < 1:
        raise InputError(f"{max_images}: must be at least 1", param="max_images")
    detect_format(dataset)
    check_max_pixels(max_pixels)
    data = load_dataset(
        dataset, images_dir, split, masks=True, allow_outside_paths=allow_outside_paths
    )
    entries = data.images[:max_images] if max_images is not None else data.images
    if not entries:
        raise InputError(f"{data.root}: the dataset has no images")
    parameters = {
        "dataset": str(dataset), "images_dir": images_dir, "split": split, "max_images": max_images,
        "class": options.class_choice, "layer": options.layer, "resize": options.resize, "strict": strict, "max_pixels": max_pixels,
        "allow_outside_paths": allow_outside_paths,
    }  # fmt: skip
    planned = [
        Path(out) / name
        for name in ("foreground_rois.csv", "foreground_table.csv", "foreground_table.md")
    ]
    inputs = ImageInput(options.resize, max_pixels, device, strict)
    with start_run(
        "bins", parameters, ModelChoice(model, weights), inputs, out, outputs=planned
    ) as run:
        run.outputs.protect("dataset", [data.root, *(entry.path for entry in entries)])
        return _measure_dataset(run, data, entries, options, max_pixels, progress, strict, split)


def _measure_dataset(
    run: CommandRun,
    data: AnnotatedDataset,
    entries: Sequence[ImageAnnotation],
    options: _Options,
    max_pixels: int,
    progress: bool,
    strict: bool,
    split: Optional[str],
) -> BinsResult:
    """Dataset mode's loop: every annotated box of every image an RoI, measured on its object's mask."""
    from dcn_inspect.io.progress import image_progress

    names = class_names(run.loaded)
    skipped = SkippedImages(len(entries), strict)
    parts: List[pd.DataFrame] = []
    head: Optional[HeadInfo] = None
    used = without_boxes = rois_total = rois_without_mask = rois_ignored = 0
    with image_progress("bins", progress, len(entries)) as advance:
        for entry in entries:
            advance()
            if len(entry.boxes) == 0:
                without_boxes += 1
                continue
            if entry.path is None:
                skipped.skip(
                    entry.file_name,
                    ImageError(f"{entry.file_name}: image file not found", "image file not found"),
                )
                continue
            try:
                _, model_input = read_model_input(
                    entry.path,
                    run.loaded.preprocess,
                    options.resize,
                    max_pixels,
                    (entry.height, entry.width),
                )
            except ImageError as exc:
                skipped.skip(entry.file_name, exc)
                continue
            requests = [
                RoIRequest(
                    tuple(float(v) for v in box),
                    entry.labels[k],
                    entry.sources[k] if k < len(entry.sources) else f"{entry.file_name} box {k}",
                    k,
                )  # type: ignore[arg-type]
                for k, box in enumerate(entry.boxes)
            ]
            measured = _measure_image(model_input, requests, names, options, run, entry, max_pixels)
            head = head or measured.info
            used += 1
            rois_total += len(requests)
            labels = [
                (roi, class_label(c, how, measured.offset_names))
                for roi, c, how in measured.choice.rows
            ]
            rows = _foreground_rows(
                entry.file_name,
                requests,
                measured.choice,
                labels,
                measured.objects,
                measured.fractions,
            )
            if rows is None:
                rois_without_mask += len(requests)
                continue
            ignored = entry.ignore[rows["object"].to_numpy(dtype=np.int64)]
            rois_without_mask += len(requests) - len(rows)
            rois_ignored += int(ignored.sum())
            parts.append(rows[~ignored])
    skipped.check_any_used(used, str(data.root))
    per_roi = (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame(columns=FOREGROUND_ROI_COLUMNS)
    )
    table = foreground_table(per_roi) if len(per_roi) else pd.DataFrame(columns=TABLE_COLUMNS)
    if not len(per_roi):
        run.notes.append(
            f"{data.root}: no annotated box has an object mask (COCO 'segmentation'); nothing to measure"
        )
    files = {
        "rois_csv": run.out_dir / "foreground_rois.csv",
        "table_csv": run.out_dir / "foreground_table.csv",
        "table_md": run.out_dir / "foreground_table.md",
    }
    write_csv(files["rois_csv"], per_roi, ROIS_CSV)
    write_csv(files["table_csv"], table, TABLE_CSV)
    run.summary["columns"] = {
        "foreground_rois.csv": describe(ROIS_CSV),
        "foreground_table.csv": describe(TABLE_CSV),
    }
    write_text(files["table_md"], foreground_markdown(table, run.loaded.name, str(data.root)))
    run.summary["dataset"] = {
        "path": str(data.root), "format": data.format, "split": split, "images_in_dataset": len(data.images),
        "images_selected": len(entries), "categories": data.categories, "issues": data.issues,
    }  # fmt: skip
    run.summary["images"] = {"used": used, "without_boxes": without_boxes}
    run.summary["rois"] = {
        "total": rois_total,
        "measured": len(per_roi),
        "without_mask": rois_without_mask,
        "ignored_boxes": rois_ignored,
    }
    run.summary["head"] = head.as_dict() if head else None
    run.summary["class_names"] = offset_class_names(names, head.num_classes) if head else names
    run.summary["foreground"] = _foreground_summary(table)
    summary_path = run.finish(skipped)
    return BinsResult(run.out_dir, [], summary_path, head, run.notes, skipped.items, table, files)


def foreground_markdown(table: pd.DataFrame, model: str, dataset: str) -> str:
    """The per-class and overall table in Markdown (fractions in %)."""
    lines = [
        f"Fraction of RoI-bin sampling points on the object's mask, `{model}` on `{dataset}` (mean over RoIs).",
        "",
        "| class | RoIs | regular bins | deformed bins | gain [95 % CI] | RoIs improved |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for row in table.itertuples(index=False):
        interval = (
            ""
            if not np.isfinite(row.gain_ci_low)
            else f" [{100 * row.gain_ci_low:+.1f}, {100 * row.gain_ci_high:+.1f}]"
        )
        lines.append(
            f"| {row.group} | {row.rois} | {100 * row.fg_regular:.1f} % | {100 * row.fg_deformed:.1f} % | "
            f"{100 * row.gain:+.1f} pt{interval} | {100 * row.improved:.0f} % |"
        )
    return "\n".join(lines) + "\n"
