"""Everything :mod:`dcn_inspect.analysis.receptive_field` computes for the units of one image
under one model, gathered in one :class:`ReceptiveFields`.

:func:`receptive_fields` takes one gradient forward
(:class:`~dcn_inspect.capture.gradients.GradientForward`) and the followed layers (top first;
the units are cells of the top one) and computes, per unit:

1. the sampling tree (:func:`~dcn_inspect.analysis.sample_points.trace_sampling_trees`) and the
   response r;
2. one batched backward per batch of units: the ERF (:mod:`.erf`), the x- and y-marginals of
   ``sum_colour |dr/dX|`` on the resized image in the model input X (the saliency search's
   prior) and the offset gradient fields of every followed layer, read at the tree's points
   (:mod:`.point_gradients`);
3. the theoretical receptive field: the unit's cell centre and the extent the forward followed
   for its layer (:mod:`dcn_inspect.capture.extent`);
4. the saliency region (:mod:`.saliency`), by at most 12 masked forwards of the model input
   per unit, guided by those marginals;
5. the ERF's summary numbers, with the unit's ground-truth box.

Positions are original-image pixels (continuous, (0, 0) = top-left corner of the top-left
pixel, x right, y down) unless said otherwise. The model input holds the resized image in its
top-left ``content_hw`` pixels, the rest zero padding (mmdetection's and detectron2's size
divisor): positions map to the image through the resize only, ``(sx, sy) = original /
resized size`` (as every command maps them), the ERF reads dr/d(model input) on the resized
image only (the padding is no pixel of the image) and saliency boxes stay on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dcn_inspect.analysis.receptive_field.erf import (
    ErfNumbers,
    effective_receptive_field,
    erf_numbers,
    unit_box,
)
from dcn_inspect.analysis.receptive_field.point_gradients import (
    PointGradients,
    tree_gradient_weights,
)
from dcn_inspect.analysis.receptive_field.saliency import (
    DEFAULT_SALIENCY_ERROR,
    Prior,
    SaliencyRegion,
    default_saliency_step,
    saliency_regions,
)
from dcn_inspect.analysis.sample_points import GroupChoice, SamplingTrees, trace_sampling_trees
from dcn_inspect.capture.gradients import DEFAULT_BATCH_SIZE, GradientForward
from dcn_inspect.capture.records import DeformConvRecord

__all__ = ["ReceptiveFields", "receptive_fields"]


@dataclass
class ReceptiveFields:
    """The receptive fields of U units of one image under one model (original-image pixels
    unless said otherwise)."""

    layer: str  # the units' layer
    levels: List[str]  # the traced layers, top first (levels[0] == layer)
    channel: Optional[int]  # None: the response sums the channels
    units: torch.Tensor  # [U, 2] (row, col) in the layer's output map
    unit_xy: torch.Tensor  # [U, 2] unit centres (x, y)
    responses: torch.Tensor  # [U] float64
    erf: torch.Tensor  # [U, H, W] float32: sum_colour |dr/dI| per 8-bit level
    trees: SamplingTrees
    point_gradients: Optional[PointGradients]  # None when a layer's op could not be re-run
    theoretical: Optional[torch.Tensor]  # [U, 4] (x1, y1, x2, y2), None when a frame was lost
    saliency: List[SaliencyRegion]  # boxes in model-input pixels
    # [U, 4] float64 the same boxes in original-image pixels (NaN: no region)
    saliency_boxes: torch.Tensor
    numbers: List[ErfNumbers]
    notes: List[str] = field(default_factory=list)
    # the saliency search's prior: x- [U, w] and y-marginals [U, h] (float64) of
    # sum_colour |dr/dX| on the resized image in the model input X
    saliency_prior: Optional[Prior] = None
    saliency_error: Optional[float] = None  # the search's error bound (None: not searched)

    @property
    def num_units(self) -> int:
        return int(self.units.shape[0])


def _erfs_and_offset_fields(
    forward: GradientForward,
    units: torch.Tensor,
    levels: List[str],
    hw: Tuple[Tuple[int, int], Tuple[int, int]],
    std: Sequence[float],
    channel: Optional[int],
    batch_size: int,
    on_batch: Optional[Callable[[int], None]],
) -> Tuple[torch.Tensor, Prior, Dict[str, List[torch.Tensor]]]:
    """The ERF of every unit [U, H, W] (float32), the x- [U, w] and y-marginals [U, h]
    (float64) of ``sum_colour |dr/dX|`` on the resized image (the saliency prior) and, per
    followed layer, the offset gradient fields of the batches whose re-run reproduced the
    layer's output. ``hw``: the original image's size and the resized image's (h, w) inside the
    model input."""
    layer = levels[0]
    original_hw, content_hw = hw
    count = int(units.shape[0])
    erf = torch.zeros((count,) + tuple(original_hw), dtype=torch.float32)
    prior_x = torch.zeros(count, content_hw[1], dtype=torch.float64)
    prior_y = torch.zeros(count, content_hw[0], dtype=torch.float64)
    offset_fields: Dict[str, List[torch.Tensor]] = {name: [] for name in levels}
    for batch in forward.backward_units(layer, units, channel, levels, batch_size):
        size = batch.input_grad.shape[0]
        content = batch.input_grad[..., : content_hw[0], : content_hw[1]]
        erf[batch.start : batch.start + size] = effective_receptive_field(
            content.float().cpu(), original_hw, std
        )
        magnitude = content.detach().abs().sum(dim=-3).to(torch.float64).cpu()  # [B, h, w]
        prior_x[batch.start : batch.start + size] = magnitude.sum(dim=-2)
        prior_y[batch.start : batch.start + size] = magnitude.sum(dim=-1)
        for name in levels:
            if name in batch.offset_grads:
                offset_fields[name].append(batch.offset_grads[name].cpu())
        if on_batch is not None:
            on_batch(size)
    return erf, (prior_x, prior_y), offset_fields


def _point_gradients(
    trees: SamplingTrees,
    records: Sequence[DeformConvRecord],
    offset_fields: Dict[str, List[torch.Tensor]],
    group: GroupChoice,
    scale_to_original: Tuple[float, float],
    notes: List[str],
) -> Optional[PointGradients]:
    """The gradient weights of the trees' points; None (and a note) when a layer's re-run did
    not reproduce its output, None without units."""
    levels = [r.name for r in records]
    count = trees.num_units
    missing = [name for name in levels if sum(t.shape[0] for t in offset_fields[name]) != count]
    if missing:
        notes.append(
            f"re-running the op of {', '.join(missing)} did not reproduce its output: "
            "no gradient weights for the sampling points"
        )
        return None
    if not count:
        return None
    return tree_gradient_weights(
        trees,
        records,
        {name: torch.cat(offset_fields[name]) for name in levels},
        group,
        scale_to_original,
    )


def _theoretical(
    forward: GradientForward,
    layer: str,
    unit_xy_input: torch.Tensor,
    scale: torch.Tensor,
    notes: List[str],
) -> Optional[torch.Tensor]:
    """The theoretical receptive fields [U, 4] of the units centred at ``unit_xy_input``
    (model-input pixels), scaled by ``scale`` to the original image; None (and a note) when the
    frames before ``layer`` were not all derived."""
    theoretical = forward.theoretical_box(layer, unit_xy_input)
    if theoretical is None:
        notes.append(
            f"the frames before {layer} were not all derived through the forward: "
            "no theoretical receptive field"
        )
        return None
    return theoretical * scale


def _saliency(
    forward: GradientForward,
    record: DeformConvRecord,
    units: torch.Tensor,
    unit_xy_input: torch.Tensor,
    responses: torch.Tensor,
    channel: Optional[int],
    search: Tuple[Optional[float], Optional[int], Tuple[int, int], Prior],
    batch_size: int,
    on_units: Optional[Callable[[int], None]],
) -> List[SaliencyRegion]:
    """The saliency regions of ``units`` of ``record``'s layer (model-input pixels, on the
    resized image: ``search`` is the error bound, the step, that image's size and the units'
    marginals of |dr/dX| on it), searched a batch of units at a time; none when the
    error bound is None or there are no units."""
    saliency_error, saliency_step, content_hw, prior = search
    if saliency_error is None or not int(units.shape[0]):
        return []
    # masked images carry no gradients: their batch is bounded by a plain forward's maps
    masked_batch = forward.replicas(batch_size, layer=record.name, gradients=False)

    def evaluate(indices: torch.Tensor, boxes_in: torch.Tensor) -> torch.Tensor:
        return forward.evaluate_masked(record.name, units[indices], boxes_in, channel, masked_batch)

    step = saliency_step if saliency_step is not None else default_saliency_step(record)
    if on_units is not None:
        on_units(0)  # the search starts
    return saliency_regions(
        evaluate,
        unit_xy_input,
        responses,
        content_hw,
        saliency_error,
        step,
        chunk=masked_batch,
        on_units=on_units,
        prior=prior,
    )


def _region_boxes(regions: Sequence[SaliencyRegion], scale: torch.Tensor) -> torch.Tensor:
    """The regions' boxes [U, 4] scaled by ``scale`` (NaN rows: no region)."""
    nan = float("nan")
    boxes = [r.box if r.box is not None else (nan,) * 4 for r in regions]
    return torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4) * scale


def _numbers(
    erf: torch.Tensor, unit_xy: torch.Tensor, boxes: Optional[np.ndarray]
) -> List[ErfNumbers]:
    """The ERF numbers of every unit, with the smallest box containing its centre."""
    numbers = []
    for u in range(int(erf.shape[0])):
        box_index = (
            unit_box((float(unit_xy[u, 0]), float(unit_xy[u, 1])), boxes)
            if boxes is not None
            else None
        )
        box = None if box_index is None else boxes[box_index]  # type: ignore[index]
        numbers.append(erf_numbers(erf[u].numpy(), box))
    return numbers


def _content_size(
    forward: GradientForward, content_hw: Optional[Tuple[int, int]]
) -> Tuple[int, int]:
    """The resized image's size inside the model input (default: the whole input)."""
    if content_hw is None:
        return (int(forward.images.shape[-2]), int(forward.images.shape[-1]))
    return (int(content_hw[0]), int(content_hw[1]))


def _unit_centres(record: DeformConvRecord, units: torch.Tensor) -> torch.Tensor:
    """The centres (x, y) [U, 2] of ``units`` (row, col) of ``record``'s layer, model-input
    pixels."""
    frame = record.geometry.output_frame
    rows, cols = units[:, 0].to(torch.float64), units[:, 1].to(torch.float64)
    return torch.stack(frame.to_image(cols, rows), dim=1)


def receptive_fields(
    forward: GradientForward,
    records: Sequence[DeformConvRecord],
    units: torch.Tensor,
    original_hw: Tuple[int, int],
    std: Sequence[float],
    *,
    channel: Optional[int] = None,
    group: GroupChoice = 0,
    round_positions: bool = False,
    saliency_error: Optional[float] = DEFAULT_SALIENCY_ERROR,
    saliency_step: Optional[int] = None,
    boxes: Optional[np.ndarray] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Optional[Callable[[int], None]] = None,
    content_hw: Optional[Tuple[int, int]] = None,
    on_saliency: Optional[Callable[[int], None]] = None,
    keep_graph: bool = True,
) -> ReceptiveFields:
    """ERF, gradient-weighted sampling trees, theoretical receptive field, saliency region and
    summary numbers of ``units`` [U, 2] of ``records[0]``'s layer, traced through ``records``
    (top first), for the image of ``forward``. ``boxes`` [N, 4] (original pixels): the unit's
    box is the smallest containing its centre (for ``ErfNumbers.mass_in_box``).
    ``saliency_error=None`` skips the saliency search (at most 12 masked forwards per unit,
    guided by the units' marginals of |dr/dX|); ``saliency_step`` is its resolution in
    model-input pixels (default: the layer's stride, rounded, at least 1). ``content_hw``: the
    resized image's size inside the model input, the rest being padding (default: the whole
    input). ``on_batch(n)`` is told of every batch of n units whose gradients are done,
    ``on_saliency(n)`` of every batch of n units whose saliency search is done (n = 0 when it
    starts). ``keep_graph=False`` frees ``forward``'s graph before the masked forwards
    (:meth:`GradientForward.release_graph`): no backward through it afterwards.
    """
    layer = records[0].name
    content_hw = _content_size(forward, content_hw)
    sx, sy = original_hw[1] / content_hw[1], original_hw[0] / content_hw[0]
    units = torch.as_tensor(units, dtype=torch.long).reshape(-1, 2)
    trees = trace_sampling_trees(
        records, units, group=group, round_positions=round_positions, scale_to_original=(sx, sy)
    )
    responses = forward.responses(layer, units, channel)
    levels = [r.name for r in records]
    erf, prior, offset_fields = _erfs_and_offset_fields(
        forward, units, levels, (original_hw, content_hw), std, channel, batch_size, on_batch
    )
    notes: List[str] = []
    point_gradients = _point_gradients(trees, records, offset_fields, group, (sx, sy), notes)
    unit_xy_input = _unit_centres(records[0], units)
    scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
    theoretical = _theoretical(forward, layer, unit_xy_input, scale, notes)
    if not keep_graph:
        forward.release_graph()  # the search's masked forwards need no graph
    regions = _saliency(
        forward,
        records[0],
        units,
        unit_xy_input,
        responses,
        channel,
        (saliency_error, saliency_step, content_hw, prior),
        batch_size,
        on_saliency,
    )
    return ReceptiveFields(
        layer=layer,
        levels=levels,
        channel=channel,
        units=units,
        unit_xy=trees.unit_xy,
        responses=responses,
        erf=erf,
        trees=trees,
        point_gradients=point_gradients,
        theoretical=theoretical,
        saliency=regions,
        saliency_boxes=_region_boxes(regions, scale),
        numbers=_numbers(erf, trees.unit_xy, boxes),
        notes=notes,
        saliency_prior=prior,
        saliency_error=saliency_error,
    )
