"""Streaming a dataset into the effective-dilation table (the paper's Table 2).

:class:`DilationAccumulator` takes one batch at a time: the offsets captured in its forward
(:class:`~dcn_inspect.capture.records.DeformConvRecord`, one per deformable layer) and the
images' annotations. Per unit of every layer it measures the effective dilation
(:func:`~dcn_inspect.analysis.dilation.effective_dilation`, in ``units``: the layer's input cells
or original-image pixels) and the object-size category of the filter centre
(:func:`~dcn_inspect.analysis.size_categories.unit_categories`), and folds them into

- per row layer (or layer and offset group): a mergeable
  :class:`~dcn_inspect.analysis.category_stats.CategoryStats` (count, mean, std, min, max and a
  log histogram per category);
- per row and image: the per-category sums and counts behind the bootstrap intervals over
  images (:func:`~dcn_inspect.analysis.dilation_tables.bootstrap_intervals`).

With several offset groups a unit's dilation is the MEAN OF THE GROUPS' DILATIONS (each group
is a filter of its own that samples its own channels); ``per_group`` keeps them apart as rows
``"<layer>:g<k>"``.

Scales: an image of original size W x H resized to ``content_hw`` (inside a model input that
may be padded) has the original / model-input scale ``(Sx, Sy) = (W / w, H / h)``; a layer's
output frame scaled by it places the units in original-image pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import torch

from dcn_inspect.analysis.category_stats import BINS, CategoryStats, CategoryStatsRows
from dcn_inspect.analysis.dilation import effective_dilation
from dcn_inspect.analysis.size_categories import CATEGORIES, IGNORED, OUTSIDE, unit_categories
from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.core.errors import InputError
from dcn_inspect.core.geometry import FrameMap, LayerGeometry

#: The units effective dilation is measured in.
UNITS = ("cells", "pixels")


class AnnotatedImage(Protocol):
    """What the accumulator needs of an image's annotation
    (see :class:`~dcn_inspect.io.annotations.ImageAnnotation`)."""

    width: int
    height: int
    boxes: np.ndarray
    ignore: np.ndarray


@dataclass
class LayerInfo:
    """A measured deformable layer, as ``summary.json`` describes it."""

    name: str
    module_type: str
    kernel: Tuple[int, int]
    dilation: Tuple[int, int]
    offset_groups: int
    modulated: bool
    geometry: Dict[str, Any]  # of the first model-input size seen
    op: Optional[str] = None  # op-level capture: the op entry point called
    converted_from: Optional[str] = None  # "DCNv3"/"DCNv4": converted to the standard layout

    def as_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "module_type": self.module_type,
            "kernel": list(self.kernel),
            "dilation": list(self.dilation),
            "offset_groups": self.offset_groups,
            "modulated": self.modulated,
            "op": self.op,
            "converted_from": self.converted_from,
            "geometry": self.geometry,
        }


@dataclass
class _BatchCategories:
    """Categories of one batch's units on one output map
    (see :meth:`DilationAccumulator._categories`)."""

    frames: List[FrameMap]  # per image: the map's output frame in original-image pixels
    codes_np: np.ndarray  # [B, Ho, Wo] category codes (negative: counted nowhere)
    # [counted] long: positions of the counted units in [B*Ho*Wo] (None: all of them)
    keep: Optional[torch.Tensor]
    codes: torch.Tensor  # [counted] long category
    slots_np: np.ndarray  # [counted] int64: image * categories + category
    image_counts: np.ndarray  # [B, categories] counted units per image
    not_counted: np.ndarray  # [ignored box, centre outside the image] unit counts


#: Values (rows x counted units) held before they are folded into the statistics: small batches
#: are folded together, so the statistics cost a fixed number of tensor operations per fold.
PENDING_VALUES = 1 << 17


@dataclass
class _Pending:
    """One batch's measured values of a group of rows, not yet folded into the statistics."""

    names: Tuple[str, ...]
    values: torch.Tensor  # [rows, counted] float64
    categories: "_BatchCategories"
    indices: List[int]


#: One unit map of an image: (row name, output frame in original pixels, codes [Ho, Wo],
#: dilations [Ho, Wo]).
UnitMap = Tuple[str, FrameMap, np.ndarray, np.ndarray]
#: ``on_image_units(image index, [UnitMap of every row])``
UnitSink = Callable[[int, List[UnitMap]], None]


class DilationAccumulator:
    """Effective dilation of every unit of every measured layer, streamed over batches.

    Per row (a layer, or ``"<layer>:g<k>"`` with ``per_group``): a :class:`CategoryStats`
    (:attr:`stats`; the rows are kept and updated together, one set of tensor operations per
    batch and group of layers with the same output cells), the units counted in no category
    (:attr:`not_counted`: ignored-box and centre-outside-image counts) and every image's
    per-category sums and counts (:attr:`image_sums`, for bootstrap intervals). Frames are
    taken from the first batch of each model-input size, whose forward must have followed the
    frames (:meth:`needs_frames`); later batches of that size reuse them.
    """

    def __init__(
        self,
        thresholds: Tuple[float, float],
        units: str = "cells",
        per_group: bool = False,
        device: Union[torch.device, str] = "cpu",
        on_image_units: Optional[UnitSink] = None,
    ) -> None:
        if units not in UNITS:
            raise InputError(f"{units!r}: use cells or pixels", param="units")
        self.thresholds = thresholds
        self.units = units
        self.per_group = per_group
        self.device = torch.device(device)
        self.on_image_units = on_image_units
        # The statistics of every row, updated together.
        self._rows = CategoryStatsRows(len(CATEGORIES), BINS, self.device)
        self._row_index: Dict[str, int] = {}  # row name -> its row in _rows (top layer first)
        self.not_counted: Dict[str, np.ndarray] = {}  # layer -> [ignored, outside] unit counts
        self.layers: Dict[str, LayerInfo] = {}  # call order
        # row -> [(image index, sums, counts)]
        self._image_sums: Dict[str, List[Tuple[int, np.ndarray, np.ndarray]]] = {}
        # Batches measured but not yet folded into the statistics: small batches are folded
        # together (a fixed number of tensor operations per fold, whatever the batch size).
        self._pending: List[_Pending] = []
        self._pending_values = 0
        self._geometries: Dict[Tuple[int, int], Dict[str, LayerGeometry]] = {}

    @property
    def stats(self) -> Dict[str, CategoryStats]:
        """Row name (top layer first) -> its statistics (copies, on CPU)."""
        self.flush()
        return {name: self._rows.row(index) for name, index in self._row_index.items()}

    @property
    def image_sums(self) -> Dict[str, List[Tuple[int, np.ndarray, np.ndarray]]]:
        """Row name -> every image's (dataset index, per-category sums, per-category counts)."""
        self.flush()
        return self._image_sums

    def needs_frames(self, input_hw: Tuple[int, int]) -> bool:
        """Whether the next batch of this model-input size must be run with frames followed."""
        return tuple(input_hw) not in self._geometries

    def add(
        self,
        records: Sequence[DeformConvRecord],
        entries: Sequence[AnnotatedImage],
        indices: Sequence[int],
        input_hw: Tuple[int, int],
        content_hw: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> None:
        """Add one batch: the ``records`` of its forward (call order) for ``entries`` (dataset
        ``indices``).

        ``content_hw``: each image's resized size inside the (padded) model input of ``input_hw``
        (default: no padding). The original / model-input scale is original / resized size, so
        units in the padding map beyond the image and count in no category.
        """
        input_hw = (int(input_hw[0]), int(input_hw[1]))
        if input_hw not in self._geometries:
            self._geometries[input_hw] = {r.name: r.geometry for r in records}
        geometries = self._geometries[input_hw]
        self._describe_layers(records, geometries)
        # Original / model-input scale of every image (images of one batch share the input
        # size only).
        content = list(content_hw) if content_hw is not None else [input_hw] * len(entries)
        scale_x = [entry.width / hw[1] for entry, hw in zip(entries, content)]
        scale_y = [entry.height / hw[0] for entry, hw in zip(entries, content)]
        top_first = list(reversed(records))
        for record in top_first:
            self._register_rows(record)
        per_image: List[List[UnitMap]] = [[] for _ in entries]
        for (frame, output_hw), members in _by_output_map(top_first, geometries).items():
            categories = self._categories(frame, output_hw, entries, scale_x, scale_y)
            names, values = self._row_values(members, geometries, categories, scale_x, scale_y)
            self._hold(names, values, categories, indices)
            if self.on_image_units is not None:
                host = values.cpu().numpy()
                for k, name in enumerate(names):
                    for b in range(len(entries)):
                        per_image[b].append(
                            (name, categories.frames[b], categories.codes_np[b], host[k, b])
                        )
        if self.on_image_units is not None:
            for index, layers in zip(indices, per_image):
                self.on_image_units(index, layers)

    def _describe_layers(
        self, records: Sequence[DeformConvRecord], geometries: Dict[str, LayerGeometry]
    ) -> None:
        """A :class:`LayerInfo` for every layer seen for the first time (call order)."""
        for record in records:
            if record.name not in self.layers:
                geometry = geometries[record.name]
                self.layers[record.name] = LayerInfo(
                    record.name,
                    record.module_type,
                    geometry.kernel,
                    geometry.dilation,
                    record.offset_groups,
                    record.modulated,
                    geometry.as_dict(),
                    record.op,
                    record.converted_from,
                )

    def _row_values(
        self,
        members: Sequence[DeformConvRecord],
        geometries: Dict[str, LayerGeometry],
        categories: "_BatchCategories",
        scale_x: List[float],
        scale_y: List[float],
    ) -> Tuple[List[str], torch.Tensor]:
        """The rows of the layers sharing one output map and their values [rows, B, Ho, Wo]:
        per group, or the mean of the groups' dilations; counts each layer's uncounted units."""
        names: List[str] = []
        parts: List[torch.Tensor] = []
        for record, dilations in zip(
            members, self._dilations(members, geometries, scale_x, scale_y)
        ):  # [B, G, Ho, Wo] each
            counts = self.not_counted.setdefault(record.name, np.zeros(2, dtype=np.int64))
            counts += categories.not_counted
            if self.per_group:
                names += [f"{record.name}:g{g}" for g in range(dilations.shape[1])]
                parts.append(dilations.transpose(0, 1))
            else:
                names.append(record.name)
                mean = dilations[:, 0] if dilations.shape[1] == 1 else dilations.mean(dim=1)
                parts.append(mean[None])
        return names, torch.cat(parts) if len(parts) > 1 else parts[0]

    def _register_rows(self, record: DeformConvRecord) -> None:
        names = (
            [f"{record.name}:g{g}" for g in range(record.offset_groups)]
            if self.per_group
            else [record.name]
        )
        new = [name for name in names if name not in self._row_index]
        for name in new:
            self._row_index[name] = len(self._row_index)
        if new:
            self._rows.add_rows(len(new))

    def _dilations(
        self,
        records: Sequence[DeformConvRecord],
        geometries: Dict[str, LayerGeometry],
        scale_x: List[float],
        scale_y: List[float],
    ) -> List[torch.Tensor]:
        """Effective dilation [B, G, Ho, Wo] of every unit of each layer, in this accumulator's
        units; layers of the same shape are measured in one call (their offsets stacked)."""
        shapes = {
            (
                geometries[r.name].kernel,
                geometries[r.name].dilation,
                self._cell_strides(geometries[r.name]),
                r.offset.shape,
                r.offset.dtype,
            )
            for r in records
        }
        if len(records) > 1 and len(shapes) == 1:
            offsets = torch.cat([r.offset for r in records])
            together = self._measure(
                offsets, geometries[records[0].name], scale_x * len(records), scale_y * len(records)
            )
            return list(together.view(len(records), -1, *together.shape[1:]).unbind(0))
        return [self._measure(r.offset, geometries[r.name], scale_x, scale_y) for r in records]

    def _cell_strides(self, geometry: LayerGeometry) -> Tuple[float, float]:
        return (
            (1.0, 1.0)
            if self.units == "cells"
            else (geometry.input_frame.stride_y, geometry.input_frame.stride_x)
        )

    def _measure(
        self,
        offset: torch.Tensor,
        geometry: LayerGeometry,
        scale_x: List[float],
        scale_y: List[float],
    ) -> torch.Tensor:
        if self.units == "cells":
            cell: Tuple[Any, Any] = (1.0, 1.0)
        else:  # one cell step in original-image pixels, per image
            cell = (
                geometry.input_frame.stride_y * torch.tensor(scale_y, dtype=torch.float64),
                geometry.input_frame.stride_x * torch.tensor(scale_x, dtype=torch.float64),
            )
        # Distances in float32 or the offsets' own wider precision (~1e-7 relative); the
        # statistics accumulate in float64.
        offset = offset if offset.dtype == torch.float64 else offset.float()
        return effective_dilation(offset, geometry.kernel, geometry.dilation, cell)

    def _categories(
        self,
        frame: FrameMap,
        output_hw: Tuple[int, int],
        entries: Sequence[AnnotatedImage],
        scale_x: List[float],
        scale_y: List[float],
    ) -> "_BatchCategories":
        """The categories of a batch's units on one output map, prepared once for every layer
        and row that shares the map: codes, and which image and category each counted unit adds
        to."""
        frames = [frame.scaled(sx, sy) for sx, sy in zip(scale_x, scale_y)]
        codes_np = np.stack(
            [
                unit_categories(
                    f,
                    output_hw,
                    (entry.width, entry.height),
                    entry.boxes,
                    entry.ignore,
                    self.thresholds,
                )
                for f, entry in zip(frames, entries)
            ]
        )
        slots_np = (np.arange(len(entries))[:, None, None] * len(CATEGORIES) + codes_np).reshape(-1)
        keep_np = codes_np.reshape(-1) >= 0
        all_kept = bool(keep_np.all())
        image_counts = np.bincount(
            slots_np[keep_np], minlength=len(entries) * len(CATEGORIES)
        ).reshape(len(entries), len(CATEGORIES))
        return _BatchCategories(
            frames=frames,
            codes_np=codes_np,
            keep=None if all_kept else torch.from_numpy(np.flatnonzero(keep_np)).to(self.device),
            codes=torch.from_numpy(codes_np.reshape(-1)[keep_np]).to(self.device),
            slots_np=slots_np[keep_np],
            image_counts=image_counts,
            not_counted=np.array(
                [(codes_np == IGNORED).sum(), (codes_np == OUTSIDE).sum()], dtype=np.int64
            ),
        )

    def _hold(
        self,
        names: List[str],
        values: torch.Tensor,
        categories: "_BatchCategories",
        indices: Sequence[int],
    ) -> None:
        """Keep one group's counted values [rows, counted] until enough are held to fold them in."""
        flat = values.reshape(values.shape[0], -1).to(self.device, torch.float64)
        kept = flat if categories.keep is None else flat.index_select(1, categories.keep)
        self._pending.append(_Pending(tuple(names), kept, categories, list(indices)))
        self._pending_values += kept.numel()
        if self._pending_values >= PENDING_VALUES:
            self.flush()

    def flush(self) -> None:
        """Fold the held batches into the statistics and the per-image sums (in the order they
        came; consecutive batches of the same rows in one go)."""
        pending, self._pending, self._pending_values = self._pending, [], 0
        start = 0
        while start < len(pending):
            stop = start + 1
            while stop < len(pending) and pending[stop].names == pending[start].names:
                stop += 1
            self._fold(pending[start:stop])
            start = stop

    def _fold(self, held: Sequence["_Pending"]) -> None:
        """Batches of the same rows into their statistics and each image's per-category sums and
        counts (units in no category left out)."""
        names = held[0].names
        categories = len(CATEGORIES)
        # Every held image gets its own slots: image position (over the held batches) *
        # categories + category.
        firsts = np.cumsum([0] + [len(item.indices) for item in held[:-1]])
        slots_np = np.concatenate(
            [item.categories.slots_np + first * categories for item, first in zip(held, firsts)]
        )
        codes = (
            torch.cat([item.categories.codes for item in held])
            if len(held) > 1
            else held[0].categories.codes
        )
        values = (
            torch.cat([item.values for item in held], dim=1) if len(held) > 1 else held[0].values
        )  # [rows, counted]
        image_counts = np.concatenate(
            [item.categories.image_counts for item in held]
        )  # [images, categories]
        indices = [index for item in held for index in item.indices]
        rows, images = values.shape[0], len(indices)
        slots = torch.from_numpy(slots_np).to(self.device)
        row_slots = (
            torch.arange(rows, device=self.device)[:, None] * (images * categories) + slots
        )  # [rows, counted]
        image_sums = torch.bincount(
            row_slots.view(-1), weights=values.reshape(-1), minlength=rows * images * categories
        )
        image_sums = image_sums.view(rows, images, categories)
        counts = torch.from_numpy(image_counts.sum(axis=0)).to(self.device)
        self._rows.update(
            [self._row_index[name] for name in names], values, codes, counts, image_sums.sum(dim=1)
        )
        sums_np = image_sums.cpu().numpy()
        for k, name in enumerate(names):
            self._image_sums.setdefault(name, []).extend(
                (int(index), sums_np[k, b], image_counts[b]) for b, index in enumerate(indices)
            )

    def state(self) -> Dict[str, Any]:
        """A picklable CPU copy, for merging the ranks of a distributed run."""
        return {
            "stats": {name: stats.state() for name, stats in self.stats.items()},
            "not_counted": {name: counts.tolist() for name, counts in self.not_counted.items()},
            "layers": {name: info.as_dict() for name, info in self.layers.items()},
            "image_sums": {
                name: [(i, s.tolist(), c.tolist()) for i, s, c in rows]
                for name, rows in self.image_sums.items()
            },
        }


def _by_output_map(
    records: Sequence[DeformConvRecord], geometries: Dict[str, LayerGeometry]
) -> Dict[Tuple[FrameMap, Tuple[int, int]], List[DeformConvRecord]]:
    """Records grouped by output map (frame and size), in order: layers whose output cells
    coincide share their units' categories, so their rows are measured together (one set of
    tensor operations per group, whatever its size)."""
    groups: Dict[Tuple[FrameMap, Tuple[int, int]], List[DeformConvRecord]] = {}
    for record in records:
        geometry = geometries[record.name]
        groups.setdefault((geometry.output_frame, geometry.output_hw), []).append(record)
    return groups
