"""Which RoIs the ``bins`` command pools and whose offsets it shows.

RoIs come from boxes typed by the user (``rois``: ``"X1,Y1,X2,Y2"`` in original-image pixels),
a CSV file (``rois_file``: ``x1,y1,x2,y2[,class]``) and an annotation file (``annotations``:
COCO json or Pascal VOC), in that order; a bundled demo image with none of them uses its
bundled annotations. RoIs may lie partly outside the image (the pooling op handles that) but
must not be inverted, nor lie entirely outside the image (:func:`check_rois_on_image`, once the
image's size is known).

A class-specific deformable PS RoI pooling head predicts one set of offsets per class;
:func:`choose_classes` picks, per RoI, the set to show: ``auto`` (the RoI's ground-truth class
where the model has it, else the most confident foreground class), ``gt``, ``pred`` (the most
confident foreground class), ``all``, or a class index or name. The background class's offsets
are shown only when asked for (its index or name, or ``all``): :func:`background_index` says
which class that is (the class named background, or R-FCN's class 0 when the model names none).

Every RoI may belong to an annotated object
(:func:`dcn_inspect.analysis.bins_foreground.match_object`): the box it was made from, or the
best-IoU annotated box of the image; ``RoIRequest.object_index`` is that box's position in the
image's annotation.

``RoIRequest.source`` says where an RoI came from (in error messages and ``summary.json``),
naming the parameter in backticks (``"`rois` 10,10,90,80"``): an error renders it as its front
end spells parameters, and text written into outputs goes through
:func:`~dcn_inspect.core.errors.spell_parameters`, so a command-line run reads its flag
(``"--roi 10,10,90,80"``) and a Python caller the parameter (``"rois 10,10,90,80"``).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dcn_inspect.analysis.bins import AGNOSTIC, HeadInfo
from dcn_inspect.analysis.bins_foreground import MATCH_IOU, box_iou, match_object
from dcn_inspect.analysis.unit_selection import read_boxes
from dcn_inspect.core.errors import InputError
from dcn_inspect.io import datasets
from dcn_inspect.io.annotations import ImageAnnotation, annotation_for_image, read_box_csv
from dcn_inspect.models.loaded_model import LoadedModel

Box = Tuple[float, float, float, float]


@dataclass(frozen=True)
class RoIRequest:
    """One RoI asked for by the user, in original-image pixels (COCO continuous coordinates)."""

    box: Box
    label: Optional[str]
    # where it came from, for error messages and summary.json (parameters in backticks)
    source: str
    object_index: Optional[int] = (
        None  # the annotated box it was made from (position in the image's annotation)
    )


#: The largest RoI coordinate (in pixels) accepted: float32, in which the ops compute, holds
#: every integer pixel position exactly up to 2**24; far beyond any image dcn-inspect reads.
MAX_COORDINATE = float(2**24)


def parse_roi(text: str) -> Box:
    """``"X1,Y1,X2,Y2"`` -> a box; one-line :class:`InputError` naming the ``rois`` parameter
    otherwise."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise InputError(
            f"{text!r}: expected four numbers X1,Y1,X2,Y2 in image pixels", param="rois"
        ) from None
    if len(values) != 4:
        raise InputError(
            f"{text!r}: expected four numbers X1,Y1,X2,Y2, got {len(values)}", param="rois"
        )
    return values  # type: ignore[return-value]


def check_roi(request: RoIRequest) -> None:
    """RoIs may lie partly outside the image (the op handles that) but must not be inverted."""
    x1, y1, x2, y2 = request.box
    if not all(math.isfinite(v) for v in request.box):
        raise InputError(
            f"{request.source}: RoI {_fmt_box(request.box)} has a non-finite coordinate"
        )
    if any(abs(v) > MAX_COORDINATE for v in request.box):
        raise InputError(
            f"{request.source}: RoI {_fmt_box(request.box)} has a coordinate "
            f"beyond ±{MAX_COORDINATE:.0f} pixels "
            "(the pooling ops compute in float32, exact to 2**24)"
        )
    if x2 < x1:
        raise InputError(f"{request.source}: RoI {_fmt_box(request.box)} has x2 < x1")
    if y2 < y1:
        raise InputError(f"{request.source}: RoI {_fmt_box(request.box)} has y2 < y1")


def check_rois_on_image(
    requests: Sequence[RoIRequest], image: str, width: int, height: int
) -> None:
    """Every RoI must share some area with the ``width`` x ``height`` image (named ``image``): one
    lying entirely outside it (including one that only touches its border) pools nothing of the
    image, so it is refused, as a unit outside the image is. Partly outside is allowed."""
    for request in requests:
        x1, y1, x2, y2 = request.box
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            raise InputError(
                f"{request.source}: RoI {_fmt_box(request.box)} lies entirely outside "
                f"{image} ({width}x{height} pixels)"
            )


def _fmt_box(box: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in box)


def collect_rois(
    image_path: Path,
    rois: Sequence[Union[Box, str]] = (),
    rois_file: Optional[Path] = None,
    annotations: Optional[Path] = None,
    boxes: Optional[Path] = None,
) -> List[RoIRequest]:
    """The RoIs for one image: ``rois``, then ``rois_file`` CSV rows, then the image's ``boxes``
    (CSV, COCO or VOC, read as sample-points reads them: crowd / difficult boxes left out), then
    the ``annotations``' boxes.

    With none given, a bundled demo image uses its bundled annotations.
    """
    requests: List[RoIRequest] = []
    for item in rois:
        box = parse_roi(item) if isinstance(item, str) else tuple(float(v) for v in item)
        source = f"`rois` {_fmt_box(box)}"
        requests.append(RoIRequest(box, None, source))  # type: ignore[arg-type]
    if rois_file is not None:
        file_boxes, labels = read_box_csv(Path(rois_file))
        for k, (box, label) in enumerate(
            zip(np.asarray(file_boxes, dtype=np.float64).reshape(-1, 4), labels)
        ):
            source = f"`rois_file` {rois_file} box {k}"
            requests.append(
                RoIRequest(tuple(float(v) for v in box), label, source)  # type: ignore[arg-type]
            )
    if boxes is not None:
        found = read_boxes(Path(image_path), Path(boxes))
        if found is None:
            raise InputError(
                f"{boxes}: no annotation for image {Path(image_path).name}", param="boxes"
            )
        for k, (box, label) in enumerate(
            zip(np.asarray(found[0], dtype=np.float64).reshape(-1, 4), found[1])
        ):
            requests.append(RoIRequest(tuple(float(v) for v in box), label, f"{boxes} box {k}"))  # type: ignore[arg-type]
    annotation_path = Path(annotations) if annotations is not None else None
    if annotation_path is None and not requests:
        annotation_path = _bundled_annotations_for(image_path)
        if annotation_path is None:
            raise InputError(
                f"{image_path}: no RoIs given: use `rois` X1,Y1,X2,Y2, `rois_file` FILE, "
                "`boxes` FILE or `annotations` FILE"
            )
    if annotation_path is not None:
        entry = annotation_for_image(annotation_path, Path(image_path))
        if entry is None:
            raise InputError(
                f"{annotation_path}: no entry for image {Path(image_path).name}",
                param="annotations",
            )
        for k, box in enumerate(np.asarray(entry.boxes, dtype=np.float64).reshape(-1, 4)):
            label = entry.labels[k] if k < len(entry.labels) else None
            requests.append(
                RoIRequest(
                    tuple(float(v) for v in box),
                    label,
                    f"{annotation_path} ({entry.file_name}) box {k}",
                    k,
                )
            )  # type: ignore[arg-type]
    if not requests:
        raise InputError(f"{image_path}: no RoIs (the annotations list no boxes for this image)")
    for request in requests:
        check_roi(request)
    return requests


def image_annotations(
    image_path: Path, annotations: Optional[Path] = None
) -> Optional[ImageAnnotation]:
    """The ground truth (with object masks) of one image: from ``annotations``, else the bundled
    annotations of a bundled demo image, else ``None``."""
    path = (
        Path(annotations) if annotations is not None else _bundled_annotations_for(Path(image_path))
    )
    if path is None:
        return None
    return annotation_for_image(path, Path(image_path), masks=True)


@dataclass(frozen=True)
class RoIObject:
    """The annotated object an RoI belongs to: its box's position in the image's annotation,
    how it was found ("annotation": the RoI is that box; "best IoU": :func:`match_object`),
    the IoU of RoI and box, and the object's class label."""

    index: int
    matched_by: str
    iou: float
    label: Optional[str]

    def as_dict(self) -> Dict[str, Any]:
        return {
            "index": self.index,
            "matched_by": self.matched_by,
            "iou": self.iou,
            "label": self.label,
        }


def roi_objects(
    requests: Sequence[RoIRequest], entry: Optional[ImageAnnotation], min_iou: float = MATCH_IOU
) -> List[Optional[RoIObject]]:
    """Which annotated object each RoI belongs to (``None``: none, or no annotation)."""
    if entry is None or len(entry.boxes) == 0:
        return [None] * len(requests)
    found: List[Optional[RoIObject]] = []
    for request in requests:
        index, iou = request.object_index, 1.0
        how = "annotation"
        if index is None or index >= len(entry.boxes):
            index, iou = match_object(request.box, entry.boxes, min_iou)
            how = "best IoU"
        else:
            iou = float(box_iou(request.box, entry.boxes[index : index + 1])[0])
        label = (
            None if index is None else (entry.labels[index] if index < len(entry.labels) else None)
        )
        found.append(None if index is None else RoIObject(int(index), how, iou, label))
    return found


def _bundled_annotations_for(image_path: Path) -> Optional[Path]:
    """The bundled annotation file if ``image_path`` is one of the bundled demo images."""
    # realpath, not Path.resolve: it does not raise on a symlink loop (the image is then skipped
    # as unreadable).
    bundled = {os.path.realpath(p) for p in datasets.bundled_images()}
    if os.path.realpath(image_path) in bundled:
        return Path(datasets.bundled_images_annotations())
    return None


def class_names(loaded: LoadedModel) -> Optional[List[str]]:
    """The model's class names if it declares them.

    Looked up in order: the model's ``class_names`` attribute, the checkpoint's meta or
    config ``class_names``, then a ``CLASS_NAMES`` constant of the module defining the model
    class (how the built-in architectures declare them). The background class may be omitted.
    """
    defining_module = sys.modules.get(type(loaded.model).__module__)
    for source in (
        getattr(loaded.model, "class_names", None),
        loaded.meta.get("class_names"),
        loaded.config.get("class_names"),
        getattr(defining_module, "CLASS_NAMES", None),
    ):
        if source:
            return [str(n) for n in source]
    return None


def offset_class_names(names: Optional[List[str]], num_classes: int) -> Optional[List[str]]:
    """Names of the head's offset classes: the model's list, with R-FCN's background prepended
    if short by one."""
    if names is None:
        return None
    if len(names) == num_classes:
        return list(names)
    if len(names) == num_classes - 1:
        return ["background"] + list(names)
    return None


def _label_to_index(
    label: Optional[str], names: Optional[List[str]], num_classes: int
) -> Optional[int]:
    if label is None:
        return None
    text = str(label).strip()
    if names is not None and text in names:
        return names.index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < num_classes:
        return int(text)
    return None


#: Class names read as the background class (compared lower-case).
BACKGROUND_NAMES = ("background", "__background__", "bg", "__bg__")


def background_index(names: Optional[List[str]], num_classes: int) -> Optional[int]:
    """The background class among a class-specific head's ``num_classes`` offset classes.

    With class names: the class named background (``background``, ``__background__``, ``bg``),
    else none. Without names: class 0, R-FCN's convention (C + 1 outputs, background first).
    """
    if num_classes < 2:
        return None
    if names is None:
        return 0
    for index, name in enumerate(names):
        if str(name).strip().lower() in BACKGROUND_NAMES:
            return index
    return None


@dataclass
class ClassChoice:
    """Which offset set each RoI uses: ``rows`` is a list of (roi, class_index, how chosen).

    ``top_class[r]`` is the class the model scores highest for RoI r including background
    (``None`` without ``roi_logits``), recorded so a reader sees when a foreground class was
    chosen although background scored higher.
    """

    rows: List[Tuple[int, int, str]]
    top_class: List[Optional[int]] = field(default_factory=list)
    background: Optional[int] = None


def _scores(roi_logits: Optional[torch.Tensor], count: int, num: int) -> Optional[np.ndarray]:
    """Per-RoI class scores [R, classes] from the model's ``roi_logits`` (extra dims averaged)."""
    if (
        roi_logits is None
        or roi_logits.dim() < 2
        or roi_logits.shape[0] != count
        or roi_logits.shape[1] != num
    ):
        return None
    return roi_logits.detach().reshape(count, num, -1).to(torch.float64).mean(dim=2).cpu().numpy()


def choose_classes(
    choice: str,
    requests: Sequence[RoIRequest],
    info: HeadInfo,
    names: Optional[List[str]],
    roi_logits: Optional[torch.Tensor],
) -> ClassChoice:
    """Resolve a class choice (auto | gt | pred | all | index | name) into one offset set per row.

    ``pred`` and ``auto``'s fallback take the most confident FOREGROUND class: the background
    class (:func:`background_index`) only when it is the head's only class. Background is
    shown when asked for by index or name, or with ``all``.
    """
    count = len(requests)
    if info.class_agnostic:
        return ClassChoice([(r, 0, AGNOSTIC) for r in range(count)], [None] * count)
    num = info.num_classes
    background = background_index(names, num)
    scores = _scores(roi_logits, count, num)
    top: List[Optional[int]] = (
        [None] * count if scores is None else [int(v) for v in scores.argmax(axis=1)]
    )
    predicted: Optional[np.ndarray] = None
    if scores is not None:
        foreground = scores.copy()
        if background is not None:
            foreground[:, background] = -np.inf
        predicted = foreground.argmax(axis=1)
    choice = (choice or "auto").strip()
    if choice == "all":
        return ClassChoice(
            [(r, c, "all") for r in range(count) for c in range(num)], top, background
        )
    if choice in ("auto", "gt", "pred"):
        rows = []
        for r, request in enumerate(requests):
            gt = _label_to_index(request.label, names, num) if choice != "pred" else None
            if gt is not None:
                rows.append((r, gt, "gt"))
            elif choice == "gt":
                what = (
                    "has no class"
                    if request.label is None
                    else f"class {request.label!r} is not one of the model's {num} offset classes"
                )
                raise InputError(f"gt: {request.source} {what}", param="class_choice")
            elif predicted is not None:
                rows.append((r, int(predicted[r]), "pred"))
            else:
                raise InputError(
                    f"{choice}: {request.source} needs a class for the class-specific offsets of "
                    f"{info.layer} ({num} classes) and the model gives no roi_logits "
                    "to predict one; "
                    "use `class_choice` INDEX|NAME|all",
                    param="class_choice",
                )
        return ClassChoice(rows, top, background)
    index = _label_to_index(choice, names, num)
    if index is None:
        known = f" ({', '.join(names)})" if names else ""
        raise InputError(
            f"{choice!r}: not a class index 0..{num - 1}, a class name{known}, "
            "auto, gt, pred or all",
            param="class_choice",
        )
    return ClassChoice([(r, index, "given") for r in range(count)], top, background)


def roi_logits(output: Any) -> Optional[torch.Tensor]:
    if isinstance(output, dict):
        value = output.get("roi_logits")
        return value if isinstance(value, torch.Tensor) else None
    return None


def class_label(class_index: int, how: str, names: Optional[List[str]]) -> str:
    if how == AGNOSTIC:
        return AGNOSTIC
    if names is not None and 0 <= class_index < len(names):
        return names[class_index]
    return str(class_index)
