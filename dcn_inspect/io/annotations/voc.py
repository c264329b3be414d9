"""Pascal VOC directories: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/*.txt``.

``xmin..xmax`` are 1-based inclusive pixel indices, so pixel ``xmin`` starts at continuous
``xmin - 1`` and pixel ``xmax`` ends at continuous ``xmax``: the box is
``(xmin - 1, ymin - 1, xmax, ymax)`` in the continuous pixels of
:mod:`~dcn_inspect.io.annotations.types`. ``difficult`` objects are kept with
``ignore = True``. A split names ``ImageSets/Main/<split>.txt`` (the first word of each line;
class files carry a second column); without one every xml is read, sorted by name. An xml
without ``<size>`` (or with a 0x0 one, as some tools write) takes its image file's size from
the file's header, EXIF orientation honoured, as a COCO entry without width/height does.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List, Optional, Tuple

from dcn_inspect.core.errors import InputError
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
    pack_boxes,
)
from dcn_inspect.io.image_file import read_displayed_size

#: Image file suffixes tried when a VOC xml names no file.
VOC_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


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
    repairs: Optional[BoxRepairs] = None,
    allow_outside_paths: bool = False,
) -> ImageAnnotation:
    """Parse one VOC annotation file. Corners are 1-based inclusive: box = (xmin-1, ymin-1,
    xmax, ymax). A ``<filename>`` leaving the image folder is followed only with
    ``allow_outside_paths``."""
    xml_path = Path(xml_path)
    repairs = repairs if repairs is not None else BoxRepairs(xml_path)
    root = _read_xml(xml_path)
    search_dir = (
        Path(images_dir) if images_dir is not None else xml_path.parent.parent / "JPEGImages"
    )
    file_name, image_path = _image_file(root, xml_path, search_dir, allow_outside_paths)
    width, height = _image_size(root, xml_path, file_name, image_path)
    boxes, ignore, labels = _objects(root, xml_path, width, height, repairs)
    packed_boxes, packed_ignore = pack_boxes(boxes, ignore)
    return ImageAnnotation(
        image_id=xml_path.stem,
        file_name=file_name,
        path=image_path,
        width=width,
        height=height,
        boxes=packed_boxes,
        labels=labels,
        ignore=packed_ignore,
    )


def _read_xml(xml_path: Path) -> ET.Element:
    """The ``<annotation>`` root element of a VOC xml file."""
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise InputError(f"{xml_path}: annotation file not found") from None
    except ET.ParseError as exc:
        raise InputError(f"{xml_path}: not valid XML ({exc})") from None
    except RecursionError:
        raise InputError(f"{xml_path}: XML nested too deeply to be an annotation file") from None
    except OSError as exc:
        raise InputError(f"{xml_path}: cannot read ({os_reason(exc)})") from None
    if root.tag != "annotation":
        raise InputError(f"{xml_path}: root element is <{root.tag}>, expected a VOC <annotation>")
    return root


def _image_size(
    root: ET.Element, xml_path: Path, file_name: str, image_path: Optional[Path]
) -> Tuple[int, int]:
    """(width, height) from ``<size>``, positive integers; from the image file's header when
    ``<size>`` is missing, names neither width nor height, or says 0x0."""
    size = root.find("size")
    stated = (
        None
        if size is None or (size.find("width") is None and size.find("height") is None)
        else (
            _xml_number(size, "width", xml_path, "<size>"),
            _xml_number(size, "height", xml_path, "<size>"),
        )
    )
    if stated is None or stated == (0.0, 0.0):
        return _size_from_image(xml_path, file_name, image_path)
    width, height = stated
    if not (width > 0 and height > 0 and int(width) == width and int(height) == height):
        raise InputError(
            f"{xml_path}: <size> width and height must be positive integers, "
            f"got {width:g}x{height:g}"
        )
    return int(width), int(height)


def _size_from_image(xml_path: Path, file_name: str, image_path: Optional[Path]) -> Tuple[int, int]:
    """(width, height) of ``image_path`` as displayed, for an xml that does not say it."""
    if image_path is None:
        raise InputError(f"{xml_path}: no <size> and image {file_name} not found to read it")
    try:
        (height, width), _ = read_displayed_size(image_path)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for unreadable files
        raise InputError(
            f"{xml_path}: no <size> and the size of {image_path} cannot be read "
            f"({type(exc).__name__})"
        ) from None
    return width, height


def _image_file(
    root: ET.Element, xml_path: Path, search_dir: Path, allow_outside_paths: bool
) -> Tuple[str, Optional[Path]]:
    """(file name, image file in ``search_dir`` or ``None``): the ``<filename>``, else the
    xml's stem with the first of :data:`VOC_IMAGE_SUFFIXES` that exists."""
    stem = xml_path.stem
    file_name = _xml_text(root, "filename", xml_path, "<annotation>", required=False)
    image_path = None
    if file_name:
        image_path = find_image(file_name, [search_dir], allow_outside_paths)
    if image_path is None:
        for suffix in VOC_IMAGE_SUFFIXES:
            if (search_dir / (stem + suffix)).is_file():
                image_path = search_dir / (stem + suffix)
                break
    if image_path is None and file_name and leaves_directory(file_name) and not allow_outside_paths:
        raise outside_error(xml_path, "<filename>", file_name, [search_dir])
    if not file_name:
        file_name = image_path.name if image_path is not None else stem + ".jpg"
    return file_name, image_path


def _objects(
    root: ET.Element, xml_path: Path, width: int, height: int, repairs: BoxRepairs
) -> Tuple[List[Box], List[bool], List[str]]:
    """(boxes, difficult flags, names) of the ``<object>`` elements, boxes repaired."""
    boxes: List[Box] = []
    ignore: List[bool] = []
    labels: List[str] = []
    for index, obj in enumerate(root.findall("object")):
        where = f"{xml_path.stem} <object> #{index}"
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
        box = repairs.clean((xmin - 1.0, ymin - 1.0, xmax, ymax), width, height, where)
        if box is None:
            continue
        boxes.append(box)
        ignore.append(difficult_text == "1")
        labels.append(name)  # type: ignore[arg-type]
    return boxes, ignore, labels


def voc_root(path: Path) -> Optional[Path]:
    """``path`` if it is a VOC year directory, or its single VOC* child (a VOCdevkit)."""
    if (path / "Annotations").is_dir():
        return path
    try:
        children = sorted(
            child for child in path.iterdir() if child.is_dir() and (child / "Annotations").is_dir()
        )
    except OSError as exc:
        raise InputError(f"{path}: cannot list the directory ({os_reason(exc)})") from None
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
    root = voc_root(path)
    if root is None:
        raise InputError(f"{path}: not a Pascal VOC directory (no Annotations/ folder)")
    if images_dir is not None and not Path(images_dir).is_dir():
        raise InputError(f"{images_dir}: not a directory", param="images")
    annotations_dir = root / "Annotations"
    if split is not None:
        xml_paths = _split_xml_paths(root, split, allow_outside_paths)
    else:
        xml_paths = sorted(annotations_dir.glob("*.xml"))
        if not xml_paths:
            raise InputError(f"{annotations_dir}: no .xml annotation files")
    repairs = BoxRepairs(annotations_dir)
    images = [
        parse_voc_xml(xml_path, images_dir, repairs, allow_outside_paths) for xml_path in xml_paths
    ]
    issues = repairs.issues()
    missing_images = [image for image in images if image.path is None]
    if missing_images:
        where = images_dir if images_dir is not None else root / "JPEGImages"
        issues.append(
            f"{root}: {len(missing_images)} image file(s) not found under {where}, "
            f"first {missing_images[0].file_name}"
        )
    categories = sorted({label for image in images for label in image.labels})
    return AnnotatedDataset(
        format="voc", root=root, categories=categories, images=images, issues=issues
    )


def _split_xml_paths(root: Path, split: str, allow_outside_paths: bool) -> List[Path]:
    """The annotation files ``ImageSets/Main/<split>.txt`` lists, each checked to exist."""
    annotations_dir = root / "Annotations"
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    stems = _split_stems(root, split, split_file)
    bad = (
        next((stem for stem in stems if leaves_directory(stem)), None)
        if not allow_outside_paths
        else None
    )
    if bad is not None:
        raise InputError(
            f"{split_file}: {bad[:80]!r} points outside {annotations_dir}; "
            "pass `allow_outside_paths` to read it",
            param="split",
        )
    xml_paths = [annotations_dir / f"{stem}.xml" for stem in stems]
    missing = [p for p in xml_paths if not p.is_file()]
    if missing:
        raise InputError(
            f"{split_file}: {len(missing)} listed image(s) have no annotation, first {missing[0]}"
        )
    return xml_paths


def _split_stems(root: Path, split: str, split_file: Path) -> List[str]:
    """The image names a split file lists: the first word of each non-empty line."""
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
        raise InputError(f"{split_file}: cannot read ({os_reason(exc)})", param="split") from None
    if "\x00" in split_text:
        raise InputError(
            f"{split_file}: not a text file of image names (it holds NUL bytes)", param="split"
        )
    stems = []
    for line in split_text.splitlines():
        tokens = line.split()
        if tokens:
            stems.append(tokens[0])  # class files carry a second column (-1/0/1)
    return stems
