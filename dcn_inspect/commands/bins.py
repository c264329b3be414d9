"""``dcn-inspect bins``: regular versus deformed RoI-pooling bins (the paper's Fig. 7).

For each image: its RoIs (:func:`dcn_inspect.roi_selection.collect_rois`, all checked before
any work) -> the model's own forward with ``rois=`` under :func:`dcn_inspect.hooks.probe` ->
the pooling layer's record -> whose offsets to show (:func:`dcn_inspect.roi_selection.choose_classes`)
-> the bins (:mod:`dcn_inspect.roi_bins`) in original-image pixels -> written as

- ``<stem>_bins.csv``: one row per (RoI, class, bin), regular and deformed bin;
- ``<stem>_bin_points.csv`` (``points=True``): the bilinear sampling points of every bin;
- ``<stem>_bins.<fmt>``: one panel per RoI (or all RoIs on one image with ``overlay``);
- ``summary.json``: model, pooling head, RoIs and how each class was chosen, coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch

from dcn_inspect.commands.common import CommandRun, check_figure_format, check_resize, image_list, images_of_run, start_run
from dcn_inspect.defaults import DEFAULT_MAX_PIXELS, DEFAULT_OUT
from dcn_inspect.errors import InputError
from dcn_inspect.hooks import Probe, probe
from dcn_inspect.images import ModelInput, to_model_input
from dcn_inspect.loaded_model import LoadedModel
from dcn_inspect.outputs import write_csv, write_figure
from dcn_inspect.records import RoIPoolRecord
from dcn_inspect.roi_bins import (
    AGNOSTIC,
    CSV_COLUMNS,
    CSV_UNITS,
    POINT_COLUMNS,
    POINT_UNITS,
    BinGeometry,
    HeadInfo,
    bins_table,
    frame_comparison,
    geometry_for_rows,
    head_info,
    points_table,
)
from dcn_inspect.roi_selection import (
    Box,
    ClassChoice,
    RoIRequest,
    choose_classes,
    class_label,
    class_names,
    collect_rois,
    offset_class_names,
    parse_roi,
    roi_logits,
)

__all__ = ["CSV_COLUMNS", "POINT_COLUMNS", "BinsResult", "ImageBins", "bins"]

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


@dataclass
class BinsResult:
    out_dir: Path
    images: List[ImageBins]
    summary: Path
    head: Optional[HeadInfo] = None
    notes: List[str] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)  # unreadable images: image, kind, reason


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
) -> BinsResult:
    """Regular vs deformed RoI-pooling bins for each image.

    Writes ``<stem>_bins.csv``, ``<stem>_bins.<fmt>`` (and ``<stem>_bin_points.csv`` with
    ``points``) per image and ``summary.json`` into ``out``.
    """
    options = _Options(class_choice, points, overlay, layer, resize, check_figure_format(fmt))
    check_resize(resize)
    image_paths = image_list(images)
    # Every image's RoIs are checked before any work, so a bad RoI fails fast and writes nothing.
    requests_of = {path: collect_rois(path, rois, rois_file, annotations) for path in image_paths}
    parameters = {
        "images": [str(p) for p in image_paths],
        "rois": [list(map(float, parse_roi(r) if isinstance(r, str) else r)) for r in rois],
        "rois_file": rois_file,
        "annotations": annotations,
        "class": class_choice,
        "points": points,
        "overlay": overlay,
        "layer": layer,
        "resize": resize,
        "format": options.fmt,
    }
    run = start_run("bins", parameters, model, weights, device, out)
    names = class_names(run.loaded)

    results: List[ImageBins] = []
    per_image: List[Dict[str, Any]] = []
    head: Optional[HeadInfo] = None
    with images_of_run(image_paths, strict, max_pixels, "bins", progress) as (readable, skipped):
        for path, image in readable:
            item, image_summary, info = _bins_for_image(path, image, requests_of[path], names, options, run)
            head = head or info
            results.append(item)
            per_image.append(image_summary)
    run.summary["head"] = head.as_dict() if head else None
    run.summary["class_names"] = offset_class_names(names, head.num_classes) if head else names
    run.summary["images"] = per_image
    summary_path = run.finish(skipped)
    return BinsResult(run.out_dir, results, summary_path, head, run.notes, skipped.items)


# --------------------------------------------------------------------------------------------
# Steps


def _bins_for_image(
    path: Path,
    image: np.ndarray,
    requests: Sequence[RoIRequest],
    names: Optional[List[str]],
    options: _Options,
    run: CommandRun,
) -> Tuple[ImageBins, Dict[str, Any], HeadInfo]:
    """Probe one image with its RoIs, lay out its bins and write its CSV(s) and figure."""
    model_input = to_model_input(image, run.loaded.preprocess, options.resize)
    result = _forward_with_rois(run, model_input, requests)
    record = _pooling_record(result.capture.roi_pools, options.layer)
    if record.rois.shape[0] != len(requests):
        raise InputError(f"{run.loaded.name}: layer {record.name} pooled {record.rois.shape[0]} RoIs for the {len(requests)} given", param="model")
    info = head_info(record)
    if not info.has_offsets:
        run.notes.append(f"{path.name}: layer {record.name} ran without offsets; deformed bins equal the regular bins")
    offset_names = offset_class_names(names, info.num_classes)
    choice = choose_classes(options.class_choice, requests, info, offset_names, roi_logits(result.output))
    geometry = geometry_for_rows(record, choice.rows, info).scaled(*model_input.scale_to_original)
    labels = [(roi, class_label(c, how, offset_names)) for roi, c, how in choice.rows]
    files = _write_image_outputs(path, image, requests, geometry, labels, choice, info, f"{path.name}: {info.module_type} {record.name}", options, run)
    roi_summary = _roi_summary(requests, record, geometry, choice, offset_names)
    image_summary = {
        "image": str(path),
        "original_hw": list(model_input.original_hw),
        "input_hw": list(model_input.input_hw),
        "scale_to_original": list(model_input.scale_to_original),
        "layer": record.name,
        "pooled_map_hw": list(record.input_hw),
        "coordinates": frame_comparison(info, record.input_frame),
        "rois": roi_summary,
        "outputs": [files.csv.name, files.figure.name] + ([files.points_csv.name] if files.points_csv else []),
    }
    return ImageBins(path, files.csv, files.figure, files.points_csv, files.table, roi_summary), image_summary, info


def _forward_with_rois(run: CommandRun, model_input: ModelInput, requests: Sequence[RoIRequest]) -> Probe:
    """The model's forward with the RoIs scaled from original-image to model-input pixels."""
    sx, sy = model_input.scale_to_original
    boxes = torch.tensor(
        [[0.0, r.box[0] / sx, r.box[1] / sy, r.box[2] / sx, r.box[3] / sy] for r in requests], dtype=model_input.tensor.dtype
    )
    try:
        return probe(run.loaded.model, model_input.tensor.to(run.device), rois=boxes.to(run.device))
    except TypeError as exc:
        if "rois" in str(exc):
            raise InputError(
                f"{run.loaded.name}: its forward does not take rois= (bins needs a model with a deformable RoI pooling head)", param="model"
            ) from None
        raise


def _pooling_record(records: Dict[str, RoIPoolRecord], layer: Optional[str]) -> RoIPoolRecord:
    """The pooling layer to show: ``layer``, else the first that ran with offsets, else the first."""
    if not records:
        raise InputError(
            "no deformable RoI pooling layer ran in the forward with rois= (bins needs a deformable (PS) RoI pooling head)", param="model"
        )
    if layer is not None:
        if layer not in records:
            raise InputError(f"{layer}: not a RoI pooling layer of the model (found: {', '.join(records)})", param="layer")
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
) -> _ImageFiles:
    from dcn_inspect.plots.bins import OP_EXTENT_LABELS, RoIPanel, draw_bins_figure

    table = bins_table(geometry, labels)
    csv_path = run.out_dir / f"{path.stem}_bins.csv"
    write_csv(csv_path, table, CSV_UNITS)
    points_path = None
    if options.points:
        points_path = run.out_dir / f"{path.stem}_bin_points.csv"
        write_csv(points_path, points_table(geometry, labels), POINT_UNITS)
    panels = [
        RoIPanel(
            title=_panel_title(roi, label, how, requests[roi]),
            roi=requests[roi].box,
            regular=geometry.regular[k],
            deformed=geometry.deformed[k],
            points=geometry.points[k].reshape(-1, 2) if options.points else None,
            roi_label=f"RoI {roi}" + (f" ({requests[roi].label})" if requests[roi].label is not None else ""),
            op_roi=tuple(float(v) for v in geometry.op_rois[k]),  # type: ignore[arg-type]
        )
        for k, ((roi, label), (_, _, how)) in enumerate(zip(labels, choice.rows))
    ]
    if len(panels) > MAX_PANELS and not options.overlay:
        run.notes.append(f"{path.name}: figure shows the first {MAX_PANELS} of {len(panels)} RoI/class panels; the CSV has all")
        panels = panels[:MAX_PANELS]
    figure_path = run.out_dir / f"{path.stem}_bins.{options.fmt}"
    figure = draw_bins_figure(image, panels, overlay=options.overlay, title=title, op_extent_label=OP_EXTENT_LABELS[info.kind])
    write_figure(figure_path, figure, dpi=100)
    return _ImageFiles(csv_path, figure_path, points_path, table)


def _roi_summary(
    requests: Sequence[RoIRequest], record: RoIPoolRecord, geometry: BinGeometry, choice: ClassChoice, offset_names: Optional[List[str]]
) -> List[Dict[str, Any]]:
    first_row: Dict[int, int] = {}
    for k, (roi, _, _) in enumerate(choice.rows):
        first_row.setdefault(roi, k)
    return [
        {
            "roi": r,
            "box": list(request.box),
            "label": request.label,
            "source": request.source,
            "model_input_box": [float(v) for v in record.rois[r, 1:].cpu().tolist()],
            "op_extent_original": [float(v) for v in geometry.op_rois[first_row[r]]],
            "classes": [
                {"class": class_label(c, how, offset_names), "index": c, "chosen_by": how} for rr, c, how in choice.rows if rr == r
            ],
        }
        for r, request in enumerate(requests)
    ]


def _panel_title(roi: int, label: str, how: str, request: RoIRequest) -> str:
    name = f"RoI {roi}"
    if request.label is not None:
        name += f" ({request.label})"
    if how == AGNOSTIC:
        return name
    return f"{name}: offsets of {label} [{how}]"
