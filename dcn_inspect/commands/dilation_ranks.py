"""Merging what the ranks of a ``dcn-inspect dilation-stats`` run measured (torchrun, or one
process as a world of size 1).

Every rank sends a picklable payload (:func:`merge_ranks`: its accumulator's
:meth:`~dcn_inspect.analysis.dilation_stats.DilationAccumulator.state`, skipped images, counts,
per-unit part file and its index) to every rank
(:meth:`~dcn_inspect.commands.distributed.World.gather`), and each merges them in rank order
into the same :class:`Merged`: the rows' statistics merged exactly
(:meth:`~dcn_inspect.analysis.category_stats.CategoryStats.merge_`), the per-image sums
concatenated (the bootstrap orders them by image index), the skipped images in dataset order.
Rows are ordered top layer first, offset groups ascending (:func:`row_order`), whatever rank
saw a layer first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dcn_inspect.analysis.category_stats import BINS, CategoryStats
from dcn_inspect.analysis.dilation_stats import DilationAccumulator
from dcn_inspect.analysis.size_categories import CATEGORIES
from dcn_inspect.commands.distributed import World
from dcn_inspect.io.annotations import ImageAnnotation
from dcn_inspect.io.images import SkippedImages


@dataclass
class Measured:
    """What one rank measured."""

    accumulator: DilationAccumulator
    skipped: SkippedImages
    used: int
    forward_seconds: float
    unit_part: Optional[Path]
    unit_index: List[Tuple[int, int, int]]  # (image index, start, length) in unit_part


@dataclass
class Merged:
    """All ranks' measurements merged (identical on every rank)."""

    stats: Dict[str, CategoryStats]
    # row -> every image's (index, sums, counts), all ranks
    image_sums: Dict[str, List[Tuple[int, Any, Any]]]
    layer_info: Dict[str, Dict[str, Any]]
    not_counted: Dict[str, List[int]]
    skipped: SkippedImages
    images_used: int
    forward_seconds: float
    unit_parts: List[Path]
    unit_index: List[Tuple[int, int, int, int]]  # (image index, rank, start, length)


def merge_ranks(
    world: World,
    measured: Measured,
    entries: Sequence[ImageAnnotation],
    strict: bool,
    per_group: bool,
) -> Merged:
    """Gather every rank's state and merge it in rank order (a single process merges itself)."""
    gathered = world.gather(
        {
            "state": measured.accumulator.state(),
            "skipped": measured.skipped.items,
            "used": measured.used,
            "unit_part": measured.unit_part,
            "unit_index": measured.unit_index,
            "forward_seconds": measured.forward_seconds,
        }
    )
    layer_info: Dict[str, Dict[str, Any]] = {}
    for payload in gathered:
        for name, info in payload["state"]["layers"].items():
            layer_info.setdefault(name, info)
    merged: Dict[str, CategoryStats] = {
        name: CategoryStats(len(CATEGORIES), BINS) for name in row_order(gathered, per_group)
    }
    not_counted: Dict[str, List[int]] = {}
    image_sums: Dict[str, List[Tuple[int, Any, Any]]] = {name: [] for name in merged}
    for payload in gathered:
        for name, state in payload["state"]["stats"].items():
            merged[name].merge_(CategoryStats.from_state(state, BINS))
        for name, rows in payload["state"]["image_sums"].items():
            image_sums[name].extend(rows)
        for name, counts in payload["state"]["not_counted"].items():
            previous = not_counted.get(name, [0, 0])
            not_counted[name] = [previous[0] + counts[0], previous[1] + counts[1]]
    return Merged(
        stats=merged,
        image_sums=image_sums,
        layer_info=layer_info,
        not_counted=not_counted,
        skipped=_skipped_in_dataset_order(gathered, entries, strict),
        images_used=sum(payload["used"] for payload in gathered),
        forward_seconds=sum(payload["forward_seconds"] for payload in gathered),
        unit_parts=[
            payload["unit_part"] for payload in gathered if payload["unit_part"] is not None
        ],
        unit_index=[
            (image, rank, start, length)
            for rank, payload in enumerate(gathered)
            for image, start, length in payload["unit_index"]
        ],
    )


def _skipped_in_dataset_order(
    gathered: Sequence[Dict[str, Any]], entries: Sequence[ImageAnnotation], strict: bool
) -> SkippedImages:
    """Every rank's skipped images, in the order the dataset lists them."""
    skipped = SkippedImages(len(entries), strict)
    position = {entry.file_name: i for i, entry in enumerate(entries)}
    skipped.items = sorted(
        (item for payload in gathered for item in payload["skipped"]),
        key=lambda item: position.get(item["image"], 0),
    )
    return skipped


def row_order(gathered: Sequence[Dict[str, Any]], per_group: bool) -> List[str]:
    """Row layers top first: reverse call order of the deformable layers; groups ascending."""
    call_order: List[str] = []
    for payload in gathered:
        for name in payload["state"]["layers"]:
            if name not in call_order:
                call_order.append(name)
    rows: List[str] = []
    present = {name for payload in gathered for name in payload["state"]["stats"]}
    for name in reversed(call_order):
        if per_group:
            groups = sorted(
                (r for r in present if r.startswith(name + ":g")),
                key=lambda r: int(r.rsplit(":g", 1)[1]),
            )
            rows.extend(groups)
        elif name in present:
            rows.append(name)
    return rows
