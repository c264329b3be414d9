"""``dcn-inspect bins``: regular versus deformed RoI-pooling bins (the paper's Fig. 7).

For each image: its RoIs (:func:`dcn_inspect.analysis.roi_selection.collect_rois`, all checked
before any work) -> the model's forward with them, measured
(:func:`dcn_inspect.commands.bins_measure.measure_image`: the pooling layer's record, whose
offsets to show, the bins in original-image pixels, the objects' masks) -> written as

- ``<stem>_bins.csv``: one row per (RoI, class, bin), regular and deformed bin, and the
  fraction of each bin's sampling points on the RoI's object mask
  (:mod:`dcn_inspect.analysis.bins_foreground`);
- ``<stem>_bin_points.csv`` (``points=True``): the bilinear sampling points of every bin;
- ``<stem>_bins.<fmt>``: one panel per RoI (or all RoIs on one image with ``overlay``);
- ``summary.json``: model, pooling head, RoIs, their objects and foreground fractions, how
  each class was chosen, coordinates.

Given a dataset (a COCO json or a VOC directory) instead of images, every annotated box of
every image is an RoI and only the foreground measurement is written
(:mod:`dcn_inspect.commands.bins_dataset`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from dcn_inspect.analysis.bins import (
    AGNOSTIC,
    BIN_POINTS_CSV,
    BINS_CSV,
    CSV_COLUMNS,
    POINT_COLUMNS,
    HeadInfo,
    bins_table,
    frame_comparison,
    points_table,
)
from dcn_inspect.analysis.bins_foreground import TABLE_COLUMNS, foreground_table
from dcn_inspect.analysis.roi_selection import (
    Box,
    RoIRequest,
    check_rois_on_image,
    class_label,
    class_names,
    collect_rois,
    image_annotations,
    offset_class_names,
    parse_roi,
)
from dcn_inspect.commands.bins_dataset import bins_over_dataset, dataset_argument
from dcn_inspect.commands.bins_measure import (
    FOREGROUND_ROI_COLUMNS,
    BinsOptions,
    BinsResult,
    ImageBins,
    Measured,
    foreground_rows,
    foreground_summary,
    measure_image,
)
from dcn_inspect.commands.common import CommandRun, image_list, images_of_run, start_run
from dcn_inspect.commands.options import DatasetOptions, ImageInput, ModelChoice, OutputOptions
from dcn_inspect.core.columns import describe
from dcn_inspect.core.defaults import DEFAULT_MAX_PIXELS, DEFAULT_OUT
from dcn_inspect.core.errors import InputError, spell_parameters
from dcn_inspect.io.annotations import ImageAnnotation
from dcn_inspect.io.images import to_model_input
from dcn_inspect.io.outputs import write_csv, write_figure
from dcn_inspect.models.loaded_model import LoadedModel

__all__ = [
    "CSV_COLUMNS",
    "FOREGROUND_ROI_COLUMNS",
    "POINT_COLUMNS",
    "TABLE_COLUMNS",
    "BinsResult",
    "ImageBins",
    "bins",
]

#: Figures show at most this many panels (RoI x class); the rest are listed in summary.json.
MAX_PANELS = 36
#: What the figure's title adds for a registered architecture run without weights.
RANDOM_WEIGHTS = "random weights"


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
    chosen = ModelChoice(model, weights)
    output = OutputOptions(out, fmt, progress).checked()
    inputs = ImageInput(resize, max_pixels, device, strict).checked()
    options = BinsOptions(class_choice, points, overlay, layer)
    subset = DatasetOptions(
        dataset_argument(images),
        images_dir,
        split,
        max_images,
        allow_outside_paths=allow_outside_paths,
    )
    if subset.dataset is not None:
        return bins_over_dataset(subset, chosen, inputs, output, options)
    _refuse_dataset_options(subset)
    sources = _RoISources(rois, rois_file, annotations, boxes)
    return _bins_over_images(image_list(images), sources, chosen, inputs, output, options)


@dataclass(frozen=True)
class _RoISources:
    """Where each image's RoIs come from, in this order (:func:`collect_rois`)."""

    rois: Sequence[Union[Box, str]]  # X1,Y1,X2,Y2 in original-image pixels
    rois_file: Optional[Path]  # a CSV: x1,y1,x2,y2[,class]
    annotations: Optional[Path]  # COCO json or VOC: every box of the image, with masks
    boxes: Optional[Path]  # as sample-points reads them

    def of(self, image: Path) -> List[RoIRequest]:
        return collect_rois(image, self.rois, self.rois_file, self.annotations, self.boxes)


def _refuse_dataset_options(subset: DatasetOptions) -> None:
    """The dataset's options given with image files: an error naming the first one."""
    dataset_only = {
        "images_dir": subset.images_dir,
        "split": subset.split,
        "max_images": subset.max_images,
        "allow_outside_paths": subset.allow_outside_paths or None,
    }
    for name, value in dataset_only.items():
        if value is not None:
            raise InputError(
                "applies to a dataset (a COCO json or a VOC directory), not to images", param=name
            )


def _bins_over_images(
    paths: List[Path],
    sources: _RoISources,
    model: ModelChoice,
    inputs: ImageInput,
    output: OutputOptions,
    options: BinsOptions,
) -> BinsResult:
    """Every image's bins measured, written and summarised."""
    # Every image's RoIs are checked before any work, so a bad RoI fails fast and writes nothing.
    if sources.boxes is not None and not Path(sources.boxes).exists():
        raise InputError(f"{sources.boxes}: file not found", param="boxes")
    requests_of = {path: sources.of(path) for path in paths}
    parameters = _parameters(paths, sources, options, inputs, output)
    planned = [Path(output.out) / name for p in paths for name in _output_names(p, options, output)]
    run = start_run("bins", parameters, model, inputs, output.out, outputs=planned)
    names = class_names(run.loaded)

    results: List[ImageBins] = []
    per_image: List[Dict[str, Any]] = []
    head: Optional[HeadInfo] = None
    with run:
        preprocess = run.loaded.preprocess
        with images_of_run(paths, inputs, "bins", output.progress, preprocess) as (
            readable,
            skipped,
        ):
            for path, image in readable:
                entry = _annotation_matching(path, image, sources.annotations, run)
                item, image_summary, info = _bins_for_image(
                    path, image, requests_of[path], names, entry, options, inputs, output, run
                )
                head = head or info
                results.append(item)
                per_image.append(image_summary)
        run.summary["head"] = head.as_dict() if head else None
        run.summary["class_names"] = offset_class_names(names, head.num_classes) if head else names
        run.summary["images"] = per_image
        table = _overall_foreground(results, options, run)
        run.summary["columns"] = _columns(options.points)
        summary_path = run.finish(skipped)
    return BinsResult(run.out_dir, results, summary_path, head, run.notes, skipped.items, table)


def _parameters(
    paths: List[Path],
    sources: _RoISources,
    options: BinsOptions,
    inputs: ImageInput,
    output: OutputOptions,
) -> Dict[str, Any]:
    """``summary.json``'s parameters of an images run."""
    return {
        "images": [str(p) for p in paths],
        "rois": [list(map(float, parse_roi(r) if isinstance(r, str) else r)) for r in sources.rois],
        "rois_file": sources.rois_file,
        "annotations": sources.annotations,
        "boxes": sources.boxes,
        "class": options.class_choice,
        "points": options.points,
        "overlay": options.overlay,
        "layer": options.layer,
        "resize": inputs.resize,
        "format": output.fmt,
    }


def _output_names(path: Path, options: BinsOptions, output: OutputOptions) -> List[str]:
    """The files :func:`_write_image_outputs` writes for ``path`` (in the output directory)."""
    return [f"{path.stem}_bins.csv", f"{path.stem}_bins.{output.fmt}"] + (
        [f"{path.stem}_bin_points.csv"] if options.points else []
    )


def _bins_for_image(
    path: Path,
    image: np.ndarray,
    requests: Sequence[RoIRequest],
    names: Optional[List[str]],
    entry: Optional[ImageAnnotation],
    options: BinsOptions,
    inputs: ImageInput,
    output: OutputOptions,
    run: CommandRun,
) -> Tuple[ImageBins, Dict[str, Any], HeadInfo]:
    """Probe one image with its RoIs, lay out its bins, measure them on the objects' masks
    (``entry``: the image's annotation, if any) and write its CSV(s) and figure."""
    check_rois_on_image(requests, path.name, image.shape[1], image.shape[0])
    model_input = to_model_input(image, run.loaded.preprocess, inputs.resize, inputs.max_pixels)
    measured = measure_image(model_input, requests, names, options, run, entry, inputs.max_pixels)
    record, info = measured.record, measured.info
    if not info.has_offsets:
        run.notes.append(
            f"{path.name}: layer {record.name} ran without offsets; "
            "deformed bins equal the regular bins"
        )
    labels = [
        (roi, class_label(c, how, measured.offset_names)) for roi, c, how in measured.choice.rows
    ]
    title = f"{path.name}: {info.module_type} {record.name}"
    if run.loaded.random_weights:
        title += f" ({RANDOM_WEIGHTS})"
    files = _write_image_outputs(
        path, image, requests, measured, labels, title, options, output, run
    )
    roi_summary = _roi_summary(requests, measured)
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
    foreground = foreground_rows(path.name, requests, measured, labels)
    item = ImageBins(
        path, files.csv, files.figure, files.points_csv, files.table, roi_summary, foreground
    )
    return item, image_summary, info


def _annotation_matching(
    path: Path, image: np.ndarray, annotations: Optional[Path], run: CommandRun
) -> Optional[ImageAnnotation]:
    """The image's annotation (with masks) when its size matches the image; else a note and None."""
    entry = image_annotations(path, annotations)
    if entry is None:
        return None
    if (entry.height, entry.width) != tuple(image.shape[:2]):
        run.notes.append(
            f"{path.name}: image is {image.shape[1]}x{image.shape[0]} "
            f"but its annotation says {entry.width}x{entry.height}; "
            "no foreground fractions"
        )
        return None
    return entry


def _overall_foreground(
    results: Sequence[ImageBins], options: BinsOptions, run: CommandRun
) -> Optional[pd.DataFrame]:
    """Images mode: the per-class and overall table into summary.json (one class per RoI only)."""
    parts = [item.foreground for item in results if item.foreground is not None]
    if not parts:
        run.summary["foreground"] = None
        return None
    if options.class_choice == "all":
        run.summary["foreground"] = {
            "note": "per-class table not computed with `class_choice` all "
            "(several offset sets per RoI)"
        }
        return None
    table = foreground_table(pd.concat(parts, ignore_index=True))
    run.summary["foreground"] = foreground_summary(table)
    return table


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
    measured: Measured,
    labels: List[Tuple[int, str]],
    title: str,
    options: BinsOptions,
    output: OutputOptions,
    run: CommandRun,
) -> _ImageFiles:
    """``<stem>_bins.csv`` (with the bins' foreground fractions, NaN without a mask), the
    points CSV with ``points`` and the figure (at most :data:`MAX_PANELS` panels)."""
    from dcn_inspect.report.bins import OP_EXTENT_LABELS, draw_bins_figure

    geometry = measured.geometry
    shape = geometry.regular.shape[:3]
    fg_regular, fg_deformed = np.full(shape, np.nan), np.full(shape, np.nan)
    for k, fraction in enumerate(measured.fractions):
        if fraction is not None:
            fg_regular[k], fg_deformed[k] = fraction.regular_bins, fraction.deformed_bins
    table = bins_table(geometry, labels, fg_regular, fg_deformed)
    csv_path = run.out_dir / f"{path.stem}_bins.csv"
    write_csv(csv_path, table, BINS_CSV)
    points_path = None
    if options.points:
        points_path = run.out_dir / f"{path.stem}_bin_points.csv"
        write_csv(points_path, points_table(geometry, labels), BIN_POINTS_CSV)
    panels = _panels(requests, measured, labels, options)
    if len(panels) > MAX_PANELS and not options.overlay:
        run.notes.append(
            f"{path.name}: figure shows the first {MAX_PANELS} of {len(panels)} "
            "RoI/class panels; the CSV has all"
        )
        panels = panels[:MAX_PANELS]
    figure_path = run.out_dir / f"{path.stem}_bins.{output.fmt}"
    figure = draw_bins_figure(
        image,
        panels,
        overlay=options.overlay,
        title=title,
        op_extent_label=OP_EXTENT_LABELS[measured.info.kind],
    )
    write_figure(figure_path, figure, dpi=100)
    return _ImageFiles(csv_path, figure_path, points_path, table)


def _panels(
    requests: Sequence[RoIRequest],
    measured: Measured,
    labels: List[Tuple[int, str]],
    options: BinsOptions,
) -> List[Any]:
    """One :class:`~dcn_inspect.report.bins.RoIPanel` per row set (RoI and class)."""
    from dcn_inspect.report.bins import RoIPanel

    geometry = measured.geometry
    return [
        RoIPanel(
            title=_panel_title(roi, label, how, requests[roi]),
            roi=requests[roi].box,
            regular=geometry.regular[k],
            deformed=geometry.deformed[k],
            points=geometry.points[k].reshape(-1, 2) if options.points else None,
            roi_label=_roi_name(roi, requests[roi]),
            op_roi=tuple(float(v) for v in geometry.op_rois[k]),  # type: ignore[arg-type]
        )
        for k, ((roi, label), (_, _, how)) in enumerate(zip(labels, measured.choice.rows))
    ]


def _roi_name(roi: int, request: RoIRequest) -> str:
    """``RoI 3``, with its label in brackets when it has one."""
    name = f"RoI {roi}"
    if request.label is not None:
        name += f" ({request.label})"
    return name


def _panel_title(roi: int, label: str, how: str, request: RoIRequest) -> str:
    name = _roi_name(roi, request)
    if how == AGNOSTIC:
        return name
    return f"{name}: offsets of {label} [{how}]"


def _roi_summary(requests: Sequence[RoIRequest], measured: Measured) -> List[Dict[str, Any]]:
    """``summary.json``'s RoIs of one image: box, source, object, the classes shown and their
    foreground fractions."""
    choice, offset_names = measured.choice, measured.offset_names
    first_row: Dict[int, int] = {}
    for k, (roi, _, _) in enumerate(choice.rows):
        first_row.setdefault(roi, k)

    def fractions_of(k: int) -> Dict[str, Any]:
        fraction = measured.fractions[k] if k < len(measured.fractions) else None
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

    def classes_of(r: int) -> List[Dict[str, Any]]:
        return [
            {
                "class": class_label(c, how, offset_names),
                "index": c,
                "chosen_by": how,
                **fractions_of(k),
            }
            for k, (rr, c, how) in enumerate(choice.rows)
            if rr == r
        ]

    def object_of(r: int) -> Optional[Dict[str, Any]]:
        found = measured.objects[r] if r < len(measured.objects) else None
        return found.as_dict() if found is not None else None

    return [
        {
            "roi": r,
            "box": list(request.box),
            "label": request.label,
            "source": spell_parameters(request.source),
            "model_input_box": [float(v) for v in measured.record.rois[r, 1:].cpu().tolist()],
            "op_extent_original": [float(v) for v in measured.geometry.op_rois[first_row[r]]],
            "object": object_of(r),
            "top_scored_class": top(r),
            "classes": classes_of(r),
        }
        for r, request in enumerate(requests)
    ]


def _columns(points: bool) -> Dict[str, Any]:
    """The ``summary.json`` description of the CSVs this run writes."""
    files = {"<stem>_bins.csv": describe(BINS_CSV)}
    if points:
        files["<stem>_bin_points.csv"] = describe(BIN_POINTS_CSV)
    return files
