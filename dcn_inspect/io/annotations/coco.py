"""COCO detection json files.

``bbox = [x, y, w, h]`` is already in continuous pixels (x right, y down, (0, 0) the top-left
corner of the top-left pixel), so the box is ``(x, y, x + w, y + h)``. ``iscrowd`` boxes and
those with a non-zero ``ignore`` field are kept with ``ignore = True``; with ``masks`` a box
keeps its ``segmentation`` as written (decoded on demand by
:func:`~dcn_inspect.io.annotations.masks.object_mask`). Images are looked up under
``images_dir``, else next to the json and in an ``images/`` folder beside it; one without
``width``/``height`` is measured from its file's header (EXIF orientation honoured).
Malformed entries (missing fields, wrong types, unknown or duplicate ids) raise
:class:`~dcn_inspect.core.errors.InputError` naming the file and the entry.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dcn_inspect.core.errors import InputError, spell_parameters
from dcn_inspect.io.annotations.paths import (
    find_image,
    leaves_directory,
    os_reason,
    outside_error,
)
from dcn_inspect.io.annotations.types import (
    AnnotatedDataset,
    Box,
    BoxRepairs,
    ImageAnnotation,
    ImageId,
    pack_boxes,
)
from dcn_inspect.io.image_file import read_displayed_size


def is_number(value: Any) -> bool:
    """A finite JSON number (``true``/``false`` are not numbers)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float (400 digits)
        return False


def _is_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def load_coco(
    path: Path,
    images_dir: Optional[Path] = None,
    masks: bool = False,
    allow_outside_paths: bool = False,
) -> AnnotatedDataset:
    """Parse a COCO detection json. Images are looked up under ``images_dir``, else next to the
    json and in an ``images/`` folder beside it; ``path`` is ``None`` for images not found.
    ``masks`` keeps every box's ``segmentation`` (memory: the polygons of the whole file). A
    ``file_name`` leaving those folders is followed only with ``allow_outside_paths``."""
    path = Path(path)
    if images_dir is not None and not Path(images_dir).is_dir():
        raise InputError(f"{images_dir}: not a directory", param="images")
    data = _read_json(path)
    raw_images, raw_annotations = _document_lists(data, path)
    search_dirs = _coco_search_dirs(path, images_dir)
    category_names = _category_names(data.get("categories"), path)
    images = _read_images(raw_images, path, search_dirs, allow_outside_paths)
    repairs = BoxRepairs(path)
    _attach_boxes(images, raw_annotations, category_names, path, repairs, masks)
    categories = list(category_names.values()) or sorted(
        {label for image in images for label in image.labels}
    )
    issues = repairs.issues() + _missing_images_issues(images, path, search_dirs)
    return AnnotatedDataset(
        format="coco", root=path, categories=categories, images=images, issues=issues
    )


def _read_json(path: Path) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise InputError(f"{path}: annotation file not found") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file") from None
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to be an annotation file") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise InputError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({os_reason(exc)})") from None


def _document_lists(data: Any, path: Path) -> Tuple[List[Any], List[Any]]:
    """The ``images`` and ``annotations`` lists of a COCO document (annotations may be absent)."""
    if not isinstance(data, dict):
        raise InputError(
            f"{path}: expected a COCO json object with 'images' and 'annotations', "
            f"got a {type(data).__name__}"
        )
    if not isinstance(data.get("images"), list):
        raise InputError(f"{path}: no 'images' list (not a COCO annotation file?)")
    raw_annotations = data.get("annotations", [])
    if not isinstance(raw_annotations, list):
        raise InputError(f"{path}: 'annotations' must be a list")
    return data["images"], raw_annotations


def _coco_search_dirs(json_path: Path, images_dir: Optional[Path]) -> List[Path]:
    if images_dir is not None:
        return [Path(images_dir)]
    return [json_path.parent, json_path.parent / "images"]


def _category_names(raw_categories: Any, path: Path) -> Dict[ImageId, str]:
    """Category id -> name, in file order; empty without ``categories`` (boxes are then
    labelled by their category id)."""
    category_names: Dict[ImageId, str] = {}
    if raw_categories is None:
        return category_names
    if not isinstance(raw_categories, list):
        raise InputError(f"{path}: 'categories' must be a list")
    for index, entry in enumerate(raw_categories):
        where = f"categories[{index}]"
        if not isinstance(entry, dict) or not _is_id(entry.get("id")):
            raise InputError(f"{path}: {where}: missing or non-integer 'id'")
        name = entry.get("name", str(entry["id"]))
        if not isinstance(name, str):
            raise InputError(f"{path}: {where}: 'name' must be a string")
        if entry["id"] in category_names:
            raise InputError(f"{path}: {where}: duplicate category id {entry['id']!r}")
        category_names[entry["id"]] = name
    return category_names


def _read_images(
    raw_images: List[Any], path: Path, search_dirs: Sequence[Path], allow_outside_paths: bool
) -> List[ImageAnnotation]:
    """The ``images`` entries in file order, still without boxes."""
    images: List[ImageAnnotation] = []
    seen: set = set()
    for index, entry in enumerate(raw_images):
        where = f"images[{index}]"
        if not isinstance(entry, dict):
            raise InputError(f"{path}: {where}: expected an object, got {type(entry).__name__}")
        image_id = entry.get("id")
        if not _is_id(image_id):
            raise InputError(
                f"{path}: {where}: missing or invalid 'id' (expected an integer or string)"
            )
        if image_id in seen:
            raise InputError(f"{path}: {where}: duplicate image id {image_id!r}")
        seen.add(image_id)
        images.append(
            _read_image(entry, f"{where} (id {image_id!r})", path, search_dirs, allow_outside_paths)
        )
    return images


def _read_image(
    entry: Dict[str, Any],
    where: str,
    path: Path,
    search_dirs: Sequence[Path],
    allow_outside_paths: bool,
) -> ImageAnnotation:
    """One ``images`` entry (its id checked): the file found on disk and the size, checked."""
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise InputError(f"{path}: {where}: missing or invalid 'file_name'")
    image_path = find_image(file_name, search_dirs, allow_outside_paths)
    if image_path is None and leaves_directory(file_name) and not allow_outside_paths:
        raise outside_error(path, where, file_name, search_dirs)
    width, height = entry.get("width"), entry.get("height")
    if width is None or height is None:
        if image_path is None:
            raise InputError(
                f"{path}: {where}: no 'width'/'height' and image {file_name} not found to read them"
            )
        width, height = _image_size_from_header(image_path, f"{path}: {where}")
    if not (
        is_number(width)
        and is_number(height)
        and int(width) == width
        and int(height) == height
        and width > 0
        and height > 0
    ):
        raise InputError(f"{path}: {where}: 'width' and 'height' must be positive integers")
    return ImageAnnotation(
        image_id=entry["id"],
        file_name=file_name,
        path=image_path,
        width=int(width),
        height=int(height),
        boxes=np.zeros((0, 4)),
        labels=[],
        ignore=np.zeros(0, dtype=bool),
    )


def _image_size_from_header(path: Path, where: str) -> Tuple[int, int]:
    """(width, height) of an image file from its header, honouring EXIF orientation."""
    try:
        (height, width), _ = read_displayed_size(path)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for unreadable files
        raise InputError(
            f"{where}: no 'width'/'height' and the size of {path} cannot be read "
            f"({type(exc).__name__})"
        ) from None
    return width, height


@dataclass
class _CocoBox:
    """One ``annotations`` entry, checked: its image's position and the box as written."""

    where: str
    slot: int
    bbox: Tuple[float, float, float, float]  # x, y, w, h
    label: str
    ignore: bool
    segmentation: Any


def _attach_boxes(
    images: List[ImageAnnotation],
    raw_annotations: List[Any],
    category_names: Dict[ImageId, str],
    path: Path,
    repairs: BoxRepairs,
    masks: bool,
) -> None:
    """Give every image its boxes (repaired by ``repairs``), labels, ignore flags and, with
    ``masks``, segmentations, in file order."""
    position = {image.image_id: slot for slot, image in enumerate(images)}
    boxes: List[List[Box]] = [[] for _ in images]
    ignores: List[List[bool]] = [[] for _ in images]
    labels: List[List[str]] = [[] for _ in images]
    segmentations: List[List[Any]] = [[] for _ in images]
    sources: List[List[str]] = [[] for _ in images]
    for index, entry in enumerate(raw_annotations):
        found = _read_annotation(entry, index, path, position, category_names, masks)
        image = images[found.slot]
        x, y, w, h = found.bbox
        box = repairs.clean((x, y, x + w, y + h), image.width, image.height, found.where)
        if box is None:
            continue
        boxes[found.slot].append(box)
        ignores[found.slot].append(found.ignore)
        labels[found.slot].append(found.label)
        segmentations[found.slot].append(found.segmentation)
        sources[found.slot].append(f"{path}: {found.where}")
    for slot, image in enumerate(images):
        image.boxes, image.ignore = pack_boxes(boxes[slot], ignores[slot])
        image.labels = labels[slot]
        image.segmentations = segmentations[slot]
        image.sources = sources[slot]


def _read_annotation(
    entry: Any,
    index: int,
    path: Path,
    position: Dict[ImageId, int],
    category_names: Dict[ImageId, str],
    masks: bool,
) -> _CocoBox:
    """One ``annotations`` entry, checked field by field."""
    where = f"annotations[{index}]"
    if not isinstance(entry, dict):
        raise InputError(f"{path}: {where}: expected an object, got {type(entry).__name__}")
    if "id" in entry:
        where += f" (id {entry['id']!r})"
    image_id = entry.get("image_id")
    if not _is_id(image_id):
        raise InputError(f"{path}: {where}: missing or invalid 'image_id'")
    if image_id not in position:
        raise InputError(f"{path}: {where}: unknown image_id {image_id!r} (not in 'images')")
    bbox = entry.get("bbox")
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        raise InputError(
            f"{path}: {where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}"
        )
    category = entry.get("category_id")
    if not _is_id(category):
        raise InputError(f"{path}: {where}: missing or invalid 'category_id'")
    if category_names and category not in category_names:
        raise InputError(f"{path}: {where}: unknown category_id {category!r} (not in 'categories')")
    crowd = entry.get("iscrowd", 0)
    ignored = entry.get("ignore", 0)
    for key, value in (("iscrowd", crowd), ("ignore", ignored)):
        if value not in (0, 1) or not isinstance(value, (int, bool)):
            raise InputError(f"{path}: {where}: '{key}' must be 0 or 1, got {value!r}")
    segmentation = entry.get("segmentation") if masks else None
    x, y, w, h = (float(v) for v in bbox)
    return _CocoBox(
        where=where,
        slot=position[image_id],
        bbox=(x, y, w, h),
        label=category_names.get(category, str(category)),
        ignore=bool(crowd) or bool(ignored),
        segmentation=None if segmentation is None or segmentation == [] else segmentation,
    )


def _missing_images_issues(
    images: List[ImageAnnotation], path: Path, search_dirs: Sequence[Path]
) -> List[str]:
    """One line when some image files were not found, naming the first and how to point at
    them."""
    missing = sum(1 for image in images if image.path is None)
    if not missing:
        return []
    first = next(image.file_name for image in images if image.path is None)
    where = ", ".join(str(d) for d in search_dirs)
    # The hint names the parameter; the front end spells it (the CLI: its image folder flag).
    hint = spell_parameters("(set `images_dir` DIR)")
    return [f"{path}: {missing} image file(s) not found under {where}, first {first} {hint}"]
