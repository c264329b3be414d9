"""Boxes from a small CSV file: a header ``x1,y1,x2,y2`` and an optional ``class`` (or
``label``) column, in continuous original-image pixels; lines starting with ``#`` are
comments. Read for one image, a box entirely outside it is an error (like an `at` point
outside it); a box reaching outside is kept as written."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from dcn_inspect.core.errors import InputError, refuse_special_file
from dcn_inspect.io.image_file import displayed_size


def read_box_csv(
    path: Path, image: Optional[Path] = None
) -> Tuple[np.ndarray, List[Optional[str]]]:
    """Read boxes from a CSV with a header ``x1,y1,x2,y2`` and an optional ``class`` (or ``label``)
    column, in continuous original-image pixels. Lines starting with ``#`` are comments.

    With ``image`` (the image the boxes are for), a box with no area on it is an error naming its
    line; nothing is checked when the image cannot be read (its reader says why)."""
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
    if image is not None:
        _refuse_boxes_outside(path, [number for number, _ in lines[1:]], boxes, Path(image))
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), labels


def _refuse_boxes_outside(
    path: Path, line_numbers: List[int], boxes: List[List[float]], image: Path
) -> None:
    """An error for the first box that does not overlap ``image`` (x2 <= 0, x1 >= width...)."""
    header = displayed_size(image)
    if header is None:
        return
    height, width = header[0]
    for number, (x1, y1, x2, y2) in zip(line_numbers, boxes):
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            box = ",".join(f"{v:g}" for v in (x1, y1, x2, y2))
            raise InputError(
                f"{path}: line {number}: box {box} lies entirely outside {image.name} "
                f"({width}x{height} pixels)"
            )
