"""Object masks from COCO ``segmentation`` fields: polygons and run-length encodings.

A mask is [H, W] bool at the image's ORIGINAL size; pixel (r, c) covers the continuous square
[c, c + 1) x [r, r + 1) and its centre is (c + 0.5, r + 0.5). Masks are decoded on demand, one
at a time (a dataset's masks together would hold every image's pixels), and checked then: a
malformed mask is an :class:`~dcn_inspect.core.errors.InputError` naming its annotation only
for the commands that read masks.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from dcn_inspect.core.errors import InputError
from dcn_inspect.io.annotations.coco import is_number
from dcn_inspect.io.annotations.types import ImageAnnotation

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
            f"{where}: mask of {width}x{height} pixels exceeds the limit of {max_pixels} "
            "(`max_pixels`)"
        )
    if isinstance(segmentation, dict):
        return _decode_rle(segmentation, height, width, where)
    if isinstance(segmentation, list):
        return rasterize_polygons(_polygons(segmentation, where), height, width)
    raise InputError(
        f"{where}: 'segmentation' must be a list of polygons or an RLE object, "
        f"got {type(segmentation).__name__}"
    )


def _polygons(segmentation: List[Any], where: str) -> List[np.ndarray]:
    polygons = []
    for k, polygon in enumerate(segmentation):
        if not isinstance(polygon, list) or not all(is_number(v) for v in polygon):
            raise InputError(
                f"{where}: segmentation polygon {k} must be a flat list of finite numbers "
                "[x1, y1, x2, y2, ...]"
            )
        if len(polygon) % 2 or len(polygon) < 6:
            raise InputError(
                f"{where}: segmentation polygon {k} has {len(polygon)} numbers; "
                "need an even count of at least 6 (3 points)"
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
            f"{where}: RLE 'size' {size[1]}x{size[0]} (width x height) differs from the image's "
            f"{width}x{height}"
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
            f"{where}: RLE runs cover {total} pixels, "
            f"the {width}x{height} image has {height * width}"
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
                    f"{where}: compressed RLE 'counts' has an invalid character "
                    f"{text[position]!r} at {position}"
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
