"""The steps both modes of ``bins`` share (images: :mod:`dcn_inspect.commands.bins`, a dataset:
:mod:`dcn_inspect.commands.bins_dataset`): one image's forward with its RoIs, measured.

:func:`measure_image`: the model's forward with ``rois=`` (the RoIs scaled from original-image
to model-input pixels, ``box / scale_to_original``) under
:func:`dcn_inspect.capture.session.probe` -> the pooling layer's record -> whose offsets to show
(:func:`dcn_inspect.analysis.roi_selection.choose_classes`) -> the bins
(:mod:`dcn_inspect.analysis.bins`) scaled back to original-image pixels -> each RoI's annotated
object and, where it has a mask, the fraction of every row set's sampling points on it
(:mod:`dcn_inspect.analysis.bins_foreground`).

:func:`foreground_rows` turns those fractions into rows of ``foreground_rois.csv``;
:func:`foreground_summary` is ``summary.json``'s ``foreground`` section of either mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from dcn_inspect.analysis.bins import BinGeometry, HeadInfo, geometry_for_rows, head_info
from dcn_inspect.analysis.bins_foreground import (
    MATCH_IOU,
    ROIS_CSV,
    BinForeground,
    bin_foreground,
)
from dcn_inspect.analysis.roi_selection import (
    ClassChoice,
    RoIObject,
    RoIRequest,
    choose_classes,
    offset_class_names,
    roi_logits,
    roi_objects,
)
from dcn_inspect.capture.records import RoIPoolRecord
from dcn_inspect.capture.session import ModelRaised, Probe, probe
from dcn_inspect.commands.common import CommandRun
from dcn_inspect.core.columns import names
from dcn_inspect.core.errors import InputError
from dcn_inspect.io.annotations import ImageAnnotation, object_mask
from dcn_inspect.io.images import ModelInput

#: Columns of ``foreground_rois.csv`` (dataset mode): one row per RoI.
FOREGROUND_ROI_COLUMNS = names(ROIS_CSV)


@dataclass(frozen=True)
class BinsOptions:
    """The choices of ``bins`` itself (the shared ones are :mod:`dcn_inspect.commands.options`)."""

    class_choice: str  # whose offsets: auto | gt | pred | all | a class index or name
    points: bool  # also write and draw every bin's bilinear sampling points
    overlay: bool  # all RoIs on one image instead of one panel each
    layer: Optional[str]  # the RoI pooling layer to show; None: the first with offsets


@dataclass
class ImageBins:
    """Results for one image."""

    image: Path
    csv: Path
    figure: Path
    points_csv: Optional[Path]
    table: pd.DataFrame
    rois: List[Dict[str, Any]]
    # one row per RoI row set (ROI_COLUMNS + object), None without masks
    foreground: Optional[pd.DataFrame] = None


@dataclass
class BinsResult:
    out_dir: Path
    images: List[ImageBins]
    summary: Path
    head: Optional[HeadInfo] = None
    notes: List[str] = field(default_factory=list)
    # unreadable images: image, kind, reason
    skipped: List[Dict[str, str]] = field(default_factory=list)
    # per class and overall (foreground.TABLE_COLUMNS); None without masks
    foreground: Optional[pd.DataFrame] = None
    files: Dict[str, Path] = field(default_factory=dict)  # dataset mode: what was written


@dataclass
class Measured:
    """One image's forward with its RoIs: the pooling layer, the chosen classes, the bins (in
    original-image pixels), each RoI's object and each row set's foreground fractions."""

    record: RoIPoolRecord
    info: HeadInfo
    choice: ClassChoice
    geometry: BinGeometry
    offset_names: Optional[List[str]]
    objects: List[Optional[RoIObject]]
    fractions: List[Optional[BinForeground]]


def measure_image(
    model_input: ModelInput,
    requests: Sequence[RoIRequest],
    class_names: Optional[List[str]],
    options: BinsOptions,
    run: CommandRun,
    entry: Optional[ImageAnnotation],
    max_pixels: int,
) -> Measured:
    """Probe one image with its RoIs and measure its bins (``entry``: its annotation, if any)."""
    result = forward_with_rois(run, model_input, requests)
    record = pooling_record(result.capture.roi_pools, options.layer)
    if record.rois.shape[0] != len(requests):
        raise InputError(
            f"{run.loaded.name}: layer {record.name} pooled {record.rois.shape[0]} RoIs "
            f"for the {len(requests)} given",
            param="model",
        )
    info = head_info(record)
    offset_names = offset_class_names(class_names, info.num_classes)
    choice = choose_classes(
        options.class_choice, requests, info, offset_names, roi_logits(result.output)
    )
    geometry = geometry_for_rows(record, choice.rows, info).scaled(*model_input.scale_to_original)
    objects = roi_objects(requests, entry)
    return Measured(
        record,
        info,
        choice,
        geometry,
        offset_names,
        objects,
        _fractions(geometry, choice, objects, entry, max_pixels),
    )


def forward_with_rois(
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
                f"{run.loaded.name}: its forward does not take rois= "
                "(bins needs a model with a deformable RoI pooling head)",
                param="model",
            ) from None
        raise


def pooling_record(records: Dict[str, RoIPoolRecord], layer: Optional[str]) -> RoIPoolRecord:
    """The pooling layer to show: ``layer``, else the first that ran with offsets, else the
    first."""
    if not records:
        raise InputError(
            "no deformable RoI pooling layer ran in the forward with rois= "
            "(bins needs a deformable (PS) RoI pooling head)",
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


def foreground_rows(
    image: str,
    requests: Sequence[RoIRequest],
    measured: Measured,
    labels: Sequence[Tuple[int, str]],
) -> Optional[pd.DataFrame]:
    """One row per RoI row set with a fraction (:data:`FOREGROUND_ROI_COLUMNS`); None if none
    has one. ``labels``: (RoI, name of the class whose offsets were used) per row set."""
    rows = []
    objects = [measured.objects[roi] for roi, _, _ in measured.choice.rows]
    for (roi, _, how), (_, label), obj, fraction in zip(
        measured.choice.rows, labels, objects, measured.fractions
    ):
        if fraction is None or obj is None:
            continue
        x1, y1, x2, y2 = requests[roi].box
        rows.append(
            {
                "image": image,
                "roi": roi,
                "label": obj.label if obj.label is not None else "",
                "class": label,
                "chosen_by": how,
                "object": obj.index,
                "x1": x1,
                "y1": y1,
                "x2": x2,
                "y2": y2,
                "fg_regular": fraction.regular,
                "fg_deformed": fraction.deformed,
                "gain": fraction.gain,
            }
        )
    return pd.DataFrame(rows, columns=FOREGROUND_ROI_COLUMNS) if rows else None


def foreground_summary(table: pd.DataFrame) -> Dict[str, Any]:
    """``summary.json``'s ``foreground``: what the fractions mean, and the table (NaN: null)."""
    return {
        "definition": (
            "fraction of a RoI's bin sampling points whose pixel (floor(x), floor(y)) belongs to "
            "the RoI's object mask; regular bins: the op's sampling pattern with zero offsets; "
            "deformed: with the network's offsets; points outside the image count as off the "
            "object"
        ),
        "object_of_roi": (
            "the annotated box the RoI was made from; otherwise the annotated box with the "
            f"highest IoU if >= {MATCH_IOU}"
        ),
        "mask_rasterisation": (
            "polygons: pixels whose centre lies inside (even-odd, parts united); "
            "RLE: as decoded (column-major)"
        ),
        "table": [
            {
                k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                for k, v in row.items()
            }
            for row in table.to_dict("records")
        ],
    }
