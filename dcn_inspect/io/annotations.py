"""Ground-truth boxes from COCO json files, Pascal VOC directories and small box CSVs.

Every box is returned as ``x1, y1, x2, y2`` in continuous pixel coordinates of the ORIGINAL
image: (0, 0) is the top-left corner of the top-left pixel, x right, y down (COCO).

- COCO: ``bbox = [x, y, w, h]`` is already continuous, so the box is ``(x, y, x + w, y + h)``.
- VOC: ``xmin..xmax`` are 1-based inclusive pixel indices, so pixel ``xmin`` starts at
  continuous ``xmin - 1`` and pixel ``xmax`` ends at continuous ``xmax``: the box is
  ``(xmin - 1, ymin - 1, xmax, ymax)``.

Image file names are looked up inside the dataset's directory: a name that points outside it
(absolute, or through ``..``) is only followed with ``allow_outside_paths``; without it the
image is looked for by its bare name inside, and an error names the entry when it is not there.

Boxes that commands must not score (COCO ``iscrowd`` or a non-zero ``ignore`` field, VOC
``difficult``) are kept with ``ignore = True``. A COCO box keeps its ``segmentation`` as written
(polygons, uncompressed or compressed RLE); :func:`object_mask` / :func:`decode_segmentation`
turn it into a boolean mask of the original image, checked then (a malformed mask is an error
naming its annotation only for the commands that read masks). Boxes with zero or negative size are dropped and
boxes reaching outside their image are clipped; both are counted in
:attr:`AnnotatedDataset.issues`. Malformed files (missing fields, wrong types, unknown or
duplicate ids) raise :class:`~dcn_inspect.core.errors.InputError` naming the file and the entry.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import functools
import json
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from dcn_inspect.core.errors import InputError, refuse_special_file

ImageId = Union[int, str]

#: Image file suffixes tried when a VOC xml names no file.
VOC_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


@dataclass
class ImageAnnotation:
    """The ground truth of one image.

    ``boxes`` is [N, 4] float64 ``x1, y1, x2, y2`` in continuous pixels of the original image
    (already clipped to it); ``ignore[n]`` marks crowd (COCO) / difficult (VOC) boxes.
    ``path`` is the image file when it was found on disk, else ``None``. ``segmentations[n]``
    is box n's COCO ``segmentation`` as written (``None``: no mask) and ``sources[n]`` says
    where box n is in its file (for messages); both are empty lists for formats without masks.
    """

    image_id: ImageId
    file_name: str
    path: Optional[Path]
    width: int
    height: int
    boxes: np.ndarray
    labels: List[str]
    ignore: np.ndarray
    segmentations: List[Any] = field(default_factory=list)
    sources: List[str] = field(default_factory=list)

    def has_mask(self, index: int) -> bool:
        """Whether box ``index`` comes with an object mask."""
        return index < len(self.segmentations) and self.segmentations[index] is not None

    @property
    def areas(self) -> np.ndarray:
        """Box areas in original-image pixels², [N] float64."""
        if len(self.boxes) == 0:
            return np.zeros(0, dtype=np.float64)
        return (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])


@dataclass
class AnnotatedDataset:
    """A parsed dataset: its images in file order and what was repaired while reading it."""

    format: str  # "coco" or "voc"
    root: Path  # the COCO json file or the VOC directory
    categories: List[str]
    images: List[ImageAnnotation]
    issues: List[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Box clean-up shared by both formats
# --------------------------------------------------------------------------------------------


class _BoxRepairs:
    """Counts boxes dropped (zero/negative size) and clipped (outside the image)."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.dropped = 0
        self.clipped = 0
        self.first_dropped = ""
        self.first_clipped = ""

    def clean(
        self, box: Sequence[float], width: int, height: int, where: str
    ) -> Optional[Tuple[float, float, float, float]]:
        """Clip ``box`` to the image; ``None`` if it has no area (before or after clipping)."""
        x1, y1, x2, y2 = (float(v) for v in box)
        if not (x2 > x1 and y2 > y1):
            self._drop(where)
            return None
        cx1, cy1 = min(max(x1, 0.0), float(width)), min(max(y1, 0.0), float(height))
        cx2, cy2 = min(max(x2, 0.0), float(width)), min(max(y2, 0.0), float(height))
        if not (cx2 > cx1 and cy2 > cy1):  # entirely outside the image
            self._drop(where)
            return None
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            self.clipped += 1
            self.first_clipped = self.first_clipped or where
        return cx1, cy1, cx2, cy2

    def _drop(self, where: str) -> None:
        self.dropped += 1
        self.first_dropped = self.first_dropped or where

    def issues(self) -> List[str]:
        out = []
        if self.dropped:
            out.append(
                f"{self.source}: {self.dropped} box(es) with zero or negative size (or entirely outside "
                f"their image) dropped, first at {self.first_dropped}"
            )
        if self.clipped:
            out.append(
                f"{self.source}: {self.clipped} box(es) reaching outside their image clipped, first at {self.first_clipped}"
            )
        return out


def _pack(
    boxes: List[Tuple[float, float, float, float]], ignore: List[bool]
) -> Tuple[np.ndarray, np.ndarray]:
    return (
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(ignore, dtype=bool).reshape(-1),
    )


def _image_size_from_header(path: Path, where: str) -> Tuple[int, int]:
    """(width, height) of an image file from its header, honouring EXIF orientation."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for unreadable files
        raise InputError(
            f"{where}: no 'width'/'height' and the size of {path} cannot be read ({type(exc).__name__})"
        ) from None
    if orientation in (
        5,
        6,
        7,
        8,
    ):  # rotated by 90 degrees: ImageOps.exif_transpose swaps the sides
        width, height = height, width
    return int(width), int(height)


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float (400 digits)
        return False


def _is_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


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
        raise InputError(f"{path}: cannot read ({_os_reason(exc)})") from None


def _os_reason(exc: OSError) -> str:
    return "symlink loop" if exc.errno == errno.ELOOP else (exc.strerror or type(exc).__name__)


def leaves_directory(file_name: str) -> bool:
    """True when ``file_name``, joined to a directory, points outside it (absolute, or ``..``)."""
    name = Path(file_name)
    return name.is_absolute() or ".." in name.parts


def _find_image(
    file_name: str, search_dirs: Sequence[Path], allow_outside: bool = True
) -> Optional[Path]:
    """The first existing ``dir / file_name`` (also tried with the bare file name); a
    ``file_name`` leaving the directories is only followed with ``allow_outside``."""
    outside = leaves_directory(file_name)
    for directory in search_dirs:
        candidates = (
            [directory / Path(file_name).name]
            if outside and not allow_outside
            else [directory / file_name, directory / Path(file_name).name]
        )
        for candidate in candidates:
            if candidate.is_file():
                return candidate
    return None


def _outside_error(
    source: Path, where: str, file_name: str, search_dirs: Sequence[Path]
) -> InputError:
    inside = ", ".join(str(d) for d in search_dirs)
    return InputError(
        f"{source}: {where}: file_name {file_name[:200]!r} points outside the dataset directory ({inside}) and "
        f"{Path(file_name).name} is not there; pass `allow_outside_paths` to read it"
    )


def _coco_search_dirs(json_path: Path, images_dir: Optional[Path]) -> List[Path]:
    if images_dir is not None:
        return [Path(images_dir)]
    return [json_path.parent, json_path.parent / "images"]


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
    if not isinstance(data, dict):
        raise InputError(
            f"{path}: expected a COCO json object with 'images' and 'annotations', got a {type(data).__name__}"
        )
    if not isinstance(data.get("images"), list):
        raise InputError(f"{path}: no 'images' list (not a COCO annotation file?)")
    raw_annotations = data.get("annotations", [])
    if not isinstance(raw_annotations, list):
        raise InputError(f"{path}: 'annotations' must be a list")
    search_dirs = _coco_search_dirs(path, images_dir)

    # Categories: id -> name, in file order. A file without them labels boxes by category id.
    category_names: Dict[ImageId, str] = {}
    raw_categories = data.get("categories")
    if raw_categories is not None:
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

    # Images: id -> position, in file order.
    images: List[ImageAnnotation] = []
    position: Dict[ImageId, int] = {}
    for index, entry in enumerate(data["images"]):
        where = f"images[{index}]"
        if not isinstance(entry, dict):
            raise InputError(f"{path}: {where}: expected an object, got {type(entry).__name__}")
        image_id = entry.get("id")
        if not _is_id(image_id):
            raise InputError(
                f"{path}: {where}: missing or invalid 'id' (expected an integer or string)"
            )
        if image_id in position:
            raise InputError(f"{path}: {where}: duplicate image id {image_id!r}")
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise InputError(f"{path}: {where} (id {image_id!r}): missing or invalid 'file_name'")
        image_path = _find_image(file_name, search_dirs, allow_outside_paths)
        if image_path is None and leaves_directory(file_name) and not allow_outside_paths:
            raise _outside_error(path, f"{where} (id {image_id!r})", file_name, search_dirs)
        width, height = entry.get("width"), entry.get("height")
        if width is None or height is None:
            if image_path is None:
                raise InputError(
                    f"{path}: {where} (id {image_id!r}): no 'width'/'height' and image {file_name} not found to read them"
                )
            width, height = _image_size_from_header(
                image_path, f"{path}: {where} (id {image_id!r})"
            )
        if not (
            _is_number(width)
            and _is_number(height)
            and int(width) == width
            and int(height) == height
            and width > 0
            and height > 0
        ):
            raise InputError(
                f"{path}: {where} (id {image_id!r}): 'width' and 'height' must be positive integers"
            )
        position[image_id] = len(images)
        images.append(
            ImageAnnotation(
                image_id=image_id,
                file_name=file_name,
                path=image_path,
                width=int(width),
                height=int(height),
                boxes=np.zeros((0, 4)),
                labels=[],
                ignore=np.zeros(0, dtype=bool),
            )
        )

    repairs = _BoxRepairs(path)
    boxes: List[List[Tuple[float, float, float, float]]] = [[] for _ in images]
    ignores: List[List[bool]] = [[] for _ in images]
    labels: List[List[str]] = [[] for _ in images]
    segmentations: List[List[Any]] = [[] for _ in images]
    sources: List[List[str]] = [[] for _ in images]
    for index, entry in enumerate(raw_annotations):
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
        if not (
            isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
        ):
            raise InputError(
                f"{path}: {where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}"
            )
        category = entry.get("category_id")
        if not _is_id(category):
            raise InputError(f"{path}: {where}: missing or invalid 'category_id'")
        if category_names and category not in category_names:
            raise InputError(
                f"{path}: {where}: unknown category_id {category!r} (not in 'categories')"
            )
        crowd = entry.get("iscrowd", 0)
        ignored = entry.get("ignore", 0)
        for key, value in (("iscrowd", crowd), ("ignore", ignored)):
            if value not in (0, 1) or not isinstance(value, (int, bool)):
                raise InputError(f"{path}: {where}: '{key}' must be 0 or 1, got {value!r}")
        image = images[position[image_id]]
        x, y, w, h = (float(v) for v in bbox)
        box = repairs.clean((x, y, x + w, y + h), image.width, image.height, where)
        if box is None:
            continue
        slot = position[image_id]
        boxes[slot].append(box)
        ignores[slot].append(bool(crowd) or bool(ignored))
        labels[slot].append(category_names.get(category, str(category)))
        segmentation = entry.get("segmentation") if masks else None
        segmentations[slot].append(
            None if segmentation is None or segmentation == [] else segmentation
        )
        sources[slot].append(f"{path}: {where}")

    for slot, image in enumerate(images):
        image.boxes, image.ignore = _pack(boxes[slot], ignores[slot])
        image.labels = labels[slot]
        image.segmentations = segmentations[slot]
        image.sources = sources[slot]
    categories = list(category_names.values()) or sorted(
        {label for image in images for label in image.labels}
    )
    issues = repairs.issues()
    missing = sum(1 for image in images if image.path is None)
    if missing:
        first = next(image.file_name for image in images if image.path is None)
        where = ", ".join(str(d) for d in search_dirs)
        issues.append(
            f"{path}: {missing} image file(s) not found under {where}, first {first} (set --images DIR)"
        )
    return AnnotatedDataset(
        format="coco", root=path, categories=categories, images=images, issues=issues
    )


# --------------------------------------------------------------------------------------------
# Pascal VOC
# --------------------------------------------------------------------------------------------


def _xml_text(
    node: ET.Element, tag: str, source: Path, where: str, required: bool = True
) -> Optional[str]:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise InputError(f"{source}: {where}: missing <{tag}>")
        return None
    return child.text.strip()


def _xml_number(node: ET.Element, tag: str, source: Path, where: str) -> float:
    text = _xml_text(node, tag, source, where)
    try:
        value = float(text)  # type: ignore[arg-type]
    except ValueError:
        raise InputError(f"{source}: {where}: <{tag}> is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise InputError(f"{source}: {where}: <{tag}> is not finite: {text!r}")
    return value


def parse_voc_xml(
    xml_path: Path,
    images_dir: Optional[Path] = None,
    repairs: Optional[_BoxRepairs] = None,
    allow_outside_paths: bool = False,
) -> ImageAnnotation:
    """Parse one VOC annotation file. Corners are 1-based inclusive: box = (xmin-1, ymin-1, xmax, ymax).
    A ``<filename>`` leaving the image folder is followed only with ``allow_outside_paths``."""
    xml_path = Path(xml_path)
    repairs = repairs if repairs is not None else _BoxRepairs(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise InputError(f"{xml_path}: annotation file not found") from None
    except ET.ParseError as exc:
        raise InputError(f"{xml_path}: not valid XML ({exc})") from None
    except RecursionError:
        raise InputError(f"{xml_path}: XML nested too deeply to be an annotation file") from None
    except OSError as exc:
        raise InputError(f"{xml_path}: cannot read ({_os_reason(exc)})") from None
    if root.tag != "annotation":
        raise InputError(f"{xml_path}: root element is <{root.tag}>, expected a VOC <annotation>")
    size = root.find("size")
    if size is None:
        raise InputError(f"{xml_path}: missing <size>")
    width, height = (
        _xml_number(size, "width", xml_path, "<size>"),
        _xml_number(size, "height", xml_path, "<size>"),
    )
    if not (width > 0 and height > 0 and int(width) == width and int(height) == height):
        raise InputError(
            f"{xml_path}: <size> width and height must be positive integers, got {width:g}x{height:g}"
        )
    stem = xml_path.stem
    file_name = _xml_text(root, "filename", xml_path, "<annotation>", required=False)
    search_dir = (
        Path(images_dir) if images_dir is not None else xml_path.parent.parent / "JPEGImages"
    )
    image_path = None
    if file_name:
        image_path = _find_image(file_name, [search_dir], allow_outside_paths)
    if image_path is None:
        for suffix in VOC_IMAGE_SUFFIXES:
            if (search_dir / (stem + suffix)).is_file():
                image_path = search_dir / (stem + suffix)
                break
    if image_path is None and file_name and leaves_directory(file_name) and not allow_outside_paths:
        raise _outside_error(xml_path, "<filename>", file_name, [search_dir])
    if not file_name:
        file_name = image_path.name if image_path is not None else stem + ".jpg"

    boxes: List[Tuple[float, float, float, float]] = []
    ignore: List[bool] = []
    labels: List[str] = []
    for index, obj in enumerate(root.findall("object")):
        where = f"{stem} <object> #{index}"
        name = _xml_text(obj, "name", xml_path, where)
        difficult_text = _xml_text(obj, "difficult", xml_path, where, required=False) or "0"
        if difficult_text not in ("0", "1"):
            raise InputError(
                f"{xml_path}: {where}: <difficult> must be 0 or 1, got {difficult_text!r}"
            )
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise InputError(f"{xml_path}: {where}: missing <bndbox>")
        xmin, ymin, xmax, ymax = (
            _xml_number(bndbox, tag, xml_path, where) for tag in ("xmin", "ymin", "xmax", "ymax")
        )
        box = repairs.clean((xmin - 1.0, ymin - 1.0, xmax, ymax), int(width), int(height), where)
        if box is None:
            continue
        boxes.append(box)
        ignore.append(difficult_text == "1")
        labels.append(name)  # type: ignore[arg-type]
    packed_boxes, packed_ignore = _pack(boxes, ignore)
    return ImageAnnotation(
        image_id=stem,
        file_name=file_name,
        path=image_path,
        width=int(width),
        height=int(height),
        boxes=packed_boxes,
        labels=labels,
        ignore=packed_ignore,
    )


def _voc_root(path: Path) -> Optional[Path]:
    """``path`` if it is a VOC year directory, or its single VOC* child (a VOCdevkit)."""
    if (path / "Annotations").is_dir():
        return path
    try:
        children = sorted(
            child for child in path.iterdir() if child.is_dir() and (child / "Annotations").is_dir()
        )
    except OSError as exc:
        raise InputError(f"{path}: cannot list the directory ({_os_reason(exc)})") from None
    if len(children) == 1:
        return children[0]
    if len(children) > 1:
        names = ", ".join(child.name for child in children)
        raise InputError(f"{path}: holds several VOC datasets ({names}); pass one of them")
    return None


def load_voc(
    path: Path,
    images_dir: Optional[Path] = None,
    split: Optional[str] = None,
    allow_outside_paths: bool = False,
) -> AnnotatedDataset:
    """Parse a Pascal VOC directory. ``split`` names ``ImageSets/Main/<split>.txt``; without it,
    every xml in ``Annotations/`` is used (sorted by name)."""
    path = Path(path)
    root = _voc_root(path)
    if root is None:
        raise InputError(f"{path}: not a Pascal VOC directory (no Annotations/ folder)")
    if images_dir is not None and not Path(images_dir).is_dir():
        raise InputError(f"{images_dir}: not a directory", param="images")
    annotations_dir = root / "Annotations"
    if split is not None:
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            available = sorted(
                p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem
            )
            hint = f" (available: {', '.join(available)})" if available else ""
            raise InputError(f"{split}: {split_file} not found{hint}", param="split")
        try:
            split_text = split_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{split_file}: not a text file of image names (byte {exc.start} is not UTF-8)",
                param="split",
            ) from None
        except OSError as exc:
            raise InputError(
                f"{split_file}: cannot read ({_os_reason(exc)})", param="split"
            ) from None
        if "\x00" in split_text:
            raise InputError(
                f"{split_file}: not a text file of image names (it holds NUL bytes)", param="split"
            )
        stems = []
        for line in split_text.splitlines():
            tokens = line.split()
            if tokens:
                stems.append(tokens[0])  # class files carry a second column (-1/0/1)
        bad = (
            next((stem for stem in stems if leaves_directory(stem)), None)
            if not allow_outside_paths
            else None
        )
        if bad is not None:
            raise InputError(
                f"{split_file}: {bad[:80]!r} points outside {annotations_dir}; pass `allow_outside_paths` to read it",
                param="split",
            )
        xml_paths = [annotations_dir / f"{stem}.xml" for stem in stems]
        missing = [p for p in xml_paths if not p.is_file()]
        if missing:
            raise InputError(
                f"{split_file}: {len(missing)} listed image(s) have no annotation, first {missing[0]}"
            )
    else:
        xml_paths = sorted(annotations_dir.glob("*.xml"))
        if not xml_paths:
            raise InputError(f"{annotations_dir}: no .xml annotation files")
    repairs = _BoxRepairs(annotations_dir)
    images = [
        parse_voc_xml(xml_path, images_dir, repairs, allow_outside_paths) for xml_path in xml_paths
    ]
    issues = repairs.issues()
    missing_images = [image for image in images if image.path is None]
    if missing_images:
        where = images_dir if images_dir is not None else root / "JPEGImages"
        issues.append(
            f"{root}: {len(missing_images)} image file(s) not found under {where}, first {missing_images[0].file_name}"
        )
    categories = sorted({label for image in images for label in image.labels})
    return AnnotatedDataset(
        format="voc", root=root, categories=categories, images=images, issues=issues
    )


# --------------------------------------------------------------------------------------------
# Autodetection and single-image look-up
# --------------------------------------------------------------------------------------------


def default_dataset_path() -> Path:
    """The bundled demo dataset (a COCO json with its images)."""
    try:
        from dcn_inspect.io.datasets import bundled_dataset_path
    except ImportError:
        raise InputError(
            "DATASET: no dataset given and the bundled demo dataset is not installed"
        ) from None
    path = Path(bundled_dataset_path())
    if not path.exists():
        raise InputError(
            f"DATASET: no dataset given and the bundled demo dataset is missing ({path})"
        )
    return path


def detect_format(path: Path) -> Tuple[str, Path]:
    """("coco", json file) or ("voc", directory) for ``path``; a one-line error otherwise."""
    path = Path(path)
    try:
        os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: dataset not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the dataset ({_os_reason(exc)})") from None
    refuse_special_file(path, "a COCO .json file or a Pascal VOC directory", directory_ok=True)
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco", path
        raise InputError(
            f"{path}: not a dataset (expected a COCO .json file or a Pascal VOC directory)"
        )
    if _voc_root(path) is not None:
        return "voc", path
    jsons = sorted(path.glob("*.json"))
    for preferred in ("annotations.json", "instances.json"):
        if path / preferred in jsons:
            return "coco", path / preferred
    if len(jsons) == 1:
        return "coco", jsons[0]
    if len(jsons) > 1:
        raise InputError(
            f"{path}: several .json files ({', '.join(p.name for p in jsons[:4])}); pass the annotation file itself"
        )
    raise InputError(
        f"{path}: not a dataset (no COCO .json file and no Pascal VOC Annotations/ folder)"
    )


def load_dataset(
    path: Optional[Path] = None,
    images_dir: Optional[Path] = None,
    split: Optional[str] = None,
    masks: bool = False,
    allow_outside_paths: bool = False,
) -> AnnotatedDataset:
    """Load a COCO json, a VOC directory (detected automatically) or, with ``path=None``, the
    bundled demo dataset. ``masks`` keeps the COCO boxes' segmentations (VOC has none). Image
    file names leaving the dataset's folder are followed only with ``allow_outside_paths``."""
    path = default_dataset_path() if path is None else Path(path)
    kind, resolved = detect_format(path)
    if kind == "coco":
        if split is not None:
            raise InputError(
                f"{split}: only Pascal VOC datasets have splits; {resolved} is a COCO json",
                param="split",
            )
        return load_coco(resolved, images_dir, masks, allow_outside_paths)
    return load_voc(resolved, images_dir, split, allow_outside_paths)


@functools.lru_cache(maxsize=4)
def _cached_coco(
    path: str, mtime_ns: int, images_dir: Optional[str], masks: bool = False
) -> AnnotatedDataset:
    # Entries are only matched by file name here (the caller names the image file), so a
    # file_name leaving the folder is never read: allowed, to not refuse such files for boxes.
    return load_coco(
        Path(path), Path(images_dir) if images_dir else None, masks, allow_outside_paths=True
    )


def annotation_for_image(
    annotation_path: Path, image_path: Path, masks: bool = False
) -> Optional[ImageAnnotation]:
    """The ground truth of ``image_path`` from a COCO json, a VOC xml file or a VOC directory.

    COCO entries are matched by file name (a ``file_name`` with folders matches on its last
    component; an exact relative-path match wins). Returns ``None`` when the image is not listed.
    ``masks`` keeps the COCO boxes' segmentations.
    """
    annotation_path, image_path = Path(annotation_path), Path(image_path)
    if not annotation_path.exists():
        raise InputError(f"{annotation_path}: annotation file not found")
    if annotation_path.is_file() and annotation_path.suffix.lower() == ".xml":
        return parse_voc_xml(
            annotation_path, images_dir=image_path.parent, allow_outside_paths=True
        )
    kind, resolved = detect_format(annotation_path)
    if kind == "voc":
        root = _voc_root(resolved)
        assert root is not None
        xml_path = root / "Annotations" / f"{image_path.stem}.xml"
        return (
            parse_voc_xml(xml_path, images_dir=image_path.parent, allow_outside_paths=True)
            if xml_path.is_file()
            else None
        )
    dataset = _cached_coco(str(resolved), resolved.stat().st_mtime_ns, None, masks)
    matches = [image for image in dataset.images if Path(image.file_name).name == image_path.name]
    if len(matches) > 1:
        exact = [image for image in matches if image_path.as_posix().endswith(image.file_name)]
        if len(exact) != 1:
            raise InputError(
                f"{resolved}: {len(matches)} images are named {image_path.name}; cannot tell which one is {image_path}"
            )
        matches = exact
    if not matches:
        return None
    # The caller names the image file: that is where it is, whatever the json's folder layout.
    return dataclasses.replace(
        matches[0], path=image_path if image_path.is_file() else matches[0].path
    )


# --------------------------------------------------------------------------------------------
# Object masks (COCO ``segmentation``)
# --------------------------------------------------------------------------------------------

#: Rows rasterised at once by the polygon filler (bounds its scratch memory to ~this x width).
_SCANLINE_ROWS = 256


def object_mask(entry: ImageAnnotation, index: int, max_pixels: int = 0) -> Optional[np.ndarray]:
    """Box ``index``'s object mask, [H, W] bool at the image's original size; ``None`` without one.

    Decoded on demand (one mask at a time keeps memory at one image's pixels);
    ``max_pixels`` > 0 refuses images larger than that before allocating.
    """
    if not entry.has_mask(index):
        return None
    where = entry.sources[index] if index < len(entry.sources) else f"{entry.file_name} box {index}"
    return decode_segmentation(
        entry.segmentations[index], entry.height, entry.width, where, max_pixels
    )


def decode_segmentation(
    segmentation: Any, height: int, width: int, where: str, max_pixels: int = 0
) -> np.ndarray:
    """A COCO ``segmentation`` as a boolean mask [height, width] of the original image.

    - polygons ``[[x1, y1, x2, y2, ...], ...]`` in continuous pixels: a pixel belongs to the
      object when its centre (c + 0.5, r + 0.5) lies inside one of the polygons (even-odd rule;
      several polygons are united, as COCO merges an object's parts);
    - RLE ``{"size": [h, w], "counts": ...}``: run lengths over the pixels in column-major
      order, starting with a run of zeros; ``counts`` a list of integers (uncompressed, as in
      ``iscrowd`` annotations) or a string (compressed, COCO's LEB128-like text encoding with
      counts after the second stored as differences). ``size`` must equal the image's size and
      the runs must cover it exactly.

    Anything else is an :class:`InputError` naming ``where`` (the file and annotation).
    """
    if max_pixels and height * width > max_pixels:
        raise InputError(
            f"{where}: mask of {width}x{height} pixels exceeds the limit of {max_pixels} (`max_pixels`)"
        )
    if isinstance(segmentation, dict):
        return _decode_rle(segmentation, height, width, where)
    if isinstance(segmentation, list):
        return rasterize_polygons(_polygons(segmentation, where), height, width)
    raise InputError(
        f"{where}: 'segmentation' must be a list of polygons or an RLE object, got {type(segmentation).__name__}"
    )


def _polygons(segmentation: List[Any], where: str) -> List[np.ndarray]:
    polygons = []
    for k, polygon in enumerate(segmentation):
        if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
            raise InputError(
                f"{where}: segmentation polygon {k} must be a flat list of finite numbers [x1, y1, x2, y2, ...]"
            )
        if len(polygon) % 2 or len(polygon) < 6:
            raise InputError(
                f"{where}: segmentation polygon {k} has {len(polygon)} numbers; need an even count of at least 6 (3 points)"
            )
        polygons.append(np.asarray(polygon, dtype=np.float64).reshape(-1, 2))
    return polygons


def rasterize_polygons(polygons: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Pixels whose centres lie inside any polygon ([V, 2] (x, y) continuous pixels), [H, W] bool.

    Scanline filling: for pixel row r, each edge crossing the line y = r + 0.5 (an edge counts
    when exactly one endpoint lies at or above the line, so a vertex on the line counts once)
    toggles the inside state of every pixel whose centre lies to the right of the crossing.
    """
    mask = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        _fill_polygon(mask, np.asarray(polygon, dtype=np.float64))
    return mask


def _fill_polygon(mask: np.ndarray, polygon: np.ndarray) -> None:
    height, width = mask.shape
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    first = max(int(math.floor(y0.min() - 0.5)), 0)
    last = min(int(math.ceil(y0.max() - 0.5)) + 1, height)
    rows_per_chunk = max(1, min(_SCANLINE_ROWS, 4_000_000 // max(width + 1, len(polygon))))
    for start in range(first, last, rows_per_chunk):
        rows = np.arange(start, min(start + rows_per_chunk, last))
        line = rows[:, None] + 0.5
        crosses = (y0[None, :] <= line) != (y1[None, :] <= line)  # [rows, edges]
        row_index, edge = np.nonzero(crosses)
        if row_index.size == 0:
            continue
        ya, yb, xa, xb = y0[edge], y1[edge], x0[edge], x1[edge]
        x = xa + (rows[row_index] + 0.5 - ya) / (yb - ya) * (xb - xa)
        # The first pixel whose centre c + 0.5 lies right of the crossing: c = floor(x - 0.5) + 1.
        column = np.clip(np.floor(x - 0.5) + 1, 0, width).astype(np.int64)
        toggles = np.zeros((len(rows), width + 1), dtype=np.int32)
        np.add.at(toggles, (row_index, column), 1)
        mask[rows] |= (np.cumsum(toggles[:, :width], axis=1) & 1).astype(bool)


def _decode_rle(rle: Dict[str, Any], height: int, width: int, where: str) -> np.ndarray:
    size, counts = rle.get("size"), rle.get("counts")
    if not (
        isinstance(size, list)
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    ):
        raise InputError(f"{where}: RLE 'size' must be [height, width] integers, got {size!r}")
    if tuple(size) != (height, width):
        raise InputError(
            f"{where}: RLE 'size' {size[1]}x{size[0]} (width x height) differs from the image's {width}x{height}"
        )
    if isinstance(counts, str):
        runs = _rle_string_counts(counts, where)
    elif isinstance(counts, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in counts
    ):
        runs = counts
    else:
        raise InputError(f"{where}: RLE 'counts' must be a list of integers or a compressed string")
    lengths = np.asarray(runs, dtype=np.int64)
    if lengths.size and lengths.min() < 0:
        raise InputError(f"{where}: RLE 'counts' has a negative run length")
    total = int(lengths.sum())
    if total != height * width:
        raise InputError(
            f"{where}: RLE runs cover {total} pixels, the {width}x{height} image has {height * width}"
        )
    values = (np.arange(lengths.size) % 2).astype(bool)  # zeros first, then alternating
    flat = np.repeat(values, lengths)
    return flat.reshape(width, height).T.copy()  # column-major: pixel (r, c) is flat[c * h + r]


def _rle_string_counts(text: str, where: str) -> List[int]:
    """COCO's compressed RLE text -> run lengths.

    Each number is written in 5-bit groups, least significant first, one character per group
    (``chr(48 + group)``, bit 0x20 = more groups follow, bit 0x10 of the last group = negative);
    from the third number on, the value is the difference to the number two places before.
    """
    counts: List[int] = []
    position, length = 0, len(text)
    while position < length:
        value, shift, more = 0, 0, True
        while more:
            if position >= length:
                raise InputError(f"{where}: compressed RLE 'counts' ends in the middle of a number")
            group = ord(text[position]) - 48
            if not 0 <= group < 64:
                raise InputError(
                    f"{where}: compressed RLE 'counts' has an invalid character {text[position]!r} at {position}"
                )
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value -= 1 << shift  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


# --------------------------------------------------------------------------------------------
# Box CSVs
# --------------------------------------------------------------------------------------------


def read_box_csv(path: Path) -> Tuple[np.ndarray, List[Optional[str]]]:
    """Read boxes from a CSV with a header ``x1,y1,x2,y2`` and an optional ``class`` (or ``label``)
    column, in continuous original-image pixels. Lines starting with ``#`` are comments."""
    path = Path(path)
    refuse_special_file(path, "a CSV file of boxes")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: box file not found") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    lines = [
        (number, line)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise InputError(f"{path}: empty box file (expected a header x1,y1,x2,y2[,class])")
    try:
        rows = list(csv.reader([line for _, line in lines]))
    except csv.Error as exc:
        raise InputError(f"{path}: not a readable CSV ({exc})") from None
    header = [cell.strip().lower() for cell in rows[0]]
    missing = [name for name in ("x1", "y1", "x2", "y2") if name not in header]
    if missing:
        raise InputError(
            f"{path}: header must name columns x1,y1,x2,y2[,class]; missing {', '.join(missing)}"
        )
    columns = [header.index(name) for name in ("x1", "y1", "x2", "y2")]
    label_column = (
        header.index("class")
        if "class" in header
        else (header.index("label") if "label" in header else None)
    )
    boxes: List[List[float]] = []
    labels: List[Optional[str]] = []
    for (number, _), row in zip(lines[1:], rows[1:]):
        if len(row) < len(header):
            raise InputError(
                f"{path}: line {number}: expected {len(header)} columns, got {len(row)}"
            )
        try:
            values = [float(row[c]) for c in columns]
        except ValueError:
            raise InputError(f"{path}: line {number}: x1,y1,x2,y2 must be numbers") from None
        if not all(math.isfinite(v) for v in values):
            raise InputError(f"{path}: line {number}: x1,y1,x2,y2 must be finite")
        if not (values[2] > values[0] and values[3] > values[1]):
            raise InputError(
                f"{path}: line {number}: box has zero or negative size (need x2 > x1 and y2 > y1)"
            )
        boxes.append(values)
        label = row[label_column].strip() if label_column is not None else ""
        labels.append(label or None)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), labels


def count_labels(dataset: AnnotatedDataset) -> Counter:
    """Number of non-ignored boxes per label (for summaries)."""
    counts: Counter = Counter()
    for image in dataset.images:
        for label, ignored in zip(image.labels, image.ignore):
            if not ignored:
                counts[label] += 1
    return counts
