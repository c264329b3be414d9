"""``dilation_units.csv`` of ``dcn-inspect dilation-stats --per-unit``: one row per unit of every
measured row layer and image, in dataset order whatever the batching and sharding.

Each rank streams its rows to a part file of its own (:class:`UnitWriter`, a scratch file of
the run: removed at its end whatever happens) and remembers where each image's rows are:
``(image index, start, length)`` in bytes. Rank 0 then copies the byte ranges of every rank's
part in image-index order under the header (:func:`assemble_units`).

A row's position is the filter centre (the output cell's centre) in original-image pixels,
``frame.to_image(column, row)`` of the map's output frame scaled to the image; its category is
:data:`~dcn_inspect.analysis.size_categories.CATEGORY_CODES` of the unit's code; the columns
are formatted as :data:`~dcn_inspect.analysis.dilation_tables.UNITS_CSV` defines.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from dcn_inspect.analysis.dilation_stats import UnitMap
from dcn_inspect.analysis.dilation_tables import UNITS_CSV, split_row
from dcn_inspect.analysis.size_categories import CATEGORY_CODES
from dcn_inspect.commands.common import CommandRun
from dcn_inspect.core.columns import format_value
from dcn_inspect.core.geometry import FrameMap
from dcn_inspect.io.annotations import ImageAnnotation
from dcn_inspect.io.outputs import atomic_path, write_error

_UNIT_COLUMN = {column.name: column for column in UNITS_CSV}


def unit_rows(
    image: str, row: str, frame: FrameMap, codes: np.ndarray, values: np.ndarray, per_group: bool
) -> List[List[str]]:
    """The ``dilation_units.csv`` rows of one image and row layer, as text (:data:`UNITS_CSV`
    formats): units row by row, ``codes`` and ``values`` [Ho, Wo]."""
    out_h, out_w = codes.shape
    xs, ys = frame.to_image(np.arange(out_w, dtype=np.float64), np.arange(out_h, dtype=np.float64))
    x_text = [format_value(float(x), _UNIT_COLUMN["unit_x"]) for x in xs]
    y_text = [format_value(float(y), _UNIT_COLUMN["unit_y"]) for y in ys]
    layer, group = split_row(row) if per_group else (row, None)
    lead = [image, layer] if group is None else [image, layer, str(group)]
    dilation = _UNIT_COLUMN["dilation"]
    return [
        [
            *lead,
            x_text[j],
            y_text[i],
            CATEGORY_CODES[int(codes[i, j])],
            format_value(float(values[i, j]), dilation),
        ]
        for i in range(out_h)
        for j in range(out_w)
    ]


class UnitWriter:
    """Streams one rank's per-unit rows to a part file private to this run (a scratch file of the
    run: removed at its end whatever happens); remembers where each image's rows are, so rank 0
    can write them in dataset order whatever the batching and sharding."""

    def __init__(
        self, run: CommandRun, entries: Sequence[ImageAnnotation], per_group: bool
    ) -> None:
        fd, self.path = run.outputs.scratch_file(
            run.out_dir, prefix=".dilation_units.", suffix=".part"
        )
        self.out_dir = run.out_dir
        self.handle = os.fdopen(fd, "wb")
        self.entries = entries
        self.per_group = per_group
        self.index: List[Tuple[int, int, int]] = []  # (image index, start, length)

    def write_image(self, index: int, layers: List[UnitMap]) -> None:
        """Append the rows of image ``index`` (its unit map of every row layer)."""
        rows: List[List[str]] = []
        for layer, frame, codes, values in layers:
            rows.extend(
                unit_rows(
                    self.entries[index].file_name, layer, frame, codes, values, self.per_group
                )
            )
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        data = buffer.getvalue().encode("utf-8")
        try:
            start = self.handle.tell()
            self.handle.write(data)
        except OSError as exc:
            raise write_error(self.out_dir, exc, "the per-unit rows") from None
        self.index.append((index, start, len(data)))

    def close(self) -> None:
        if self.handle.closed:
            return
        try:
            self.handle.close()
        except OSError as exc:
            raise write_error(self.out_dir, exc, "the per-unit rows") from None


def assemble_units(
    path: Path, parts: List[Path], index: List[Tuple[int, int, int, int]], header: List[str]
) -> Path:
    """``dilation_units.csv`` from the ranks' part files, in dataset order; the parts are removed.

    ``index``: every image's ``(image index, rank, start, length)`` in its rank's part file.
    """
    handles: Dict[int, Any] = {}
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                handle.write((",".join(header) + "\n").encode("utf-8"))
                for _, rank, start, length in sorted(index):
                    if rank not in handles:
                        handles[rank] = open(parts[rank], "rb")
                    handles[rank].seek(start)
                    handle.write(handles[rank].read(length))
    finally:
        for part in handles.values():
            part.close()
        _remove_parts(parts)
    return path


def _remove_parts(parts: Sequence[Path]) -> None:
    for part in parts:
        if part.exists():
            part.unlink()
