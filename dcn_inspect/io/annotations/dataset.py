"""Which format a dataset path is, loading it whole, and one image's ground truth.

:func:`detect_format` tells a COCO json (a ``.json`` file, or a folder holding
``annotations.json``, ``instances.json`` or a single ``.json``) from a Pascal VOC directory (an
``Annotations/`` folder, or a VOCdevkit holding one such year directory);
:func:`load_dataset` parses either (the bundled demo dataset without a path);
:func:`annotation_for_image` finds one image's entry, matched by file name, and refuses it when
its image size is not the image file's (the boxes would be read in another frame).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections import Counter
from pathlib import Path
from typing import Optional, Tuple

from dcn_inspect.core.errors import InputError, refuse_special_file
from dcn_inspect.io.annotations.coco import load_coco
from dcn_inspect.io.annotations.paths import os_reason
from dcn_inspect.io.annotations.types import AnnotatedDataset, ImageAnnotation
from dcn_inspect.io.annotations.voc import load_voc, parse_voc_xml, voc_root
from dcn_inspect.io.image_file import displayed_size, size_mismatch_message


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
        raise InputError(f"{path}: cannot read the dataset ({os_reason(exc)})") from None
    refuse_special_file(path, "a COCO .json file or a Pascal VOC directory", directory_ok=True)
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco", path
        raise InputError(
            f"{path}: not a dataset (expected a COCO .json file or a Pascal VOC directory)"
        )
    if voc_root(path) is not None:
        return "voc", path
    jsons = sorted(path.glob("*.json"))
    for preferred in ("annotations.json", "instances.json"):
        if path / preferred in jsons:
            return "coco", path / preferred
    if len(jsons) == 1:
        return "coco", jsons[0]
    if len(jsons) > 1:
        raise InputError(
            f"{path}: several .json files ({', '.join(p.name for p in jsons[:4])}); "
            "pass the annotation file itself"
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
    component; an exact relative-path match wins). Returns ``None`` when the image is not
    listed. ``masks`` keeps the COCO boxes' segmentations. An entry whose width and height are
    not those of ``image_path`` as displayed (EXIF orientation applied) is an error naming both
    sizes (and the EXIF rotation, when that is why they are swapped).
    """
    annotation_path, image_path = Path(annotation_path), Path(image_path)
    entry, source = _entry_for_image(annotation_path, image_path, masks)
    if entry is None:
        return None
    header = displayed_size(image_path)  # None: unreadable, the image reader says why
    if header is not None and header[0] != (entry.height, entry.width):
        raise InputError(
            size_mismatch_message(
                image_path, header[0], (entry.height, entry.width), header[1], source
            )
        )
    return entry


def _entry_for_image(
    annotation_path: Path, image_path: Path, masks: bool
) -> Tuple[Optional[ImageAnnotation], Path]:
    """:func:`annotation_for_image` before the size check, and the file the entry is in."""
    if not annotation_path.exists():
        raise InputError(f"{annotation_path}: annotation file not found")
    if annotation_path.is_file() and annotation_path.suffix.lower() == ".xml":
        entry = parse_voc_xml(
            annotation_path, images_dir=image_path.parent, allow_outside_paths=True
        )
        return entry, annotation_path
    kind, resolved = detect_format(annotation_path)
    if kind == "voc":
        root = voc_root(resolved)
        assert root is not None
        xml_path = root / "Annotations" / f"{image_path.stem}.xml"
        if not xml_path.is_file():
            return None, xml_path
        entry = parse_voc_xml(xml_path, images_dir=image_path.parent, allow_outside_paths=True)
        return entry, xml_path
    dataset = _cached_coco(str(resolved), resolved.stat().st_mtime_ns, None, masks)
    matches = [image for image in dataset.images if Path(image.file_name).name == image_path.name]
    if len(matches) > 1:
        exact = [image for image in matches if image_path.as_posix().endswith(image.file_name)]
        if len(exact) != 1:
            raise InputError(
                f"{resolved}: {len(matches)} images are named {image_path.name}; "
                f"cannot tell which one is {image_path}"
            )
        matches = exact
    if not matches:
        return None, resolved
    # The caller names the image file: that is where it is, whatever the json's folder layout.
    entry = dataclasses.replace(
        matches[0], path=image_path if image_path.is_file() else matches[0].path
    )
    return entry, resolved


def count_labels(dataset: AnnotatedDataset) -> Counter:
    """Number of non-ignored boxes per label (for summaries)."""
    counts: Counter = Counter()
    for image in dataset.images:
        for label, ignored in zip(image.labels, image.ignore):
            if not ignored:
                counts[label] += 1
    return counts
