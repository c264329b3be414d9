"""Error-bounded saliency regions (DCNv2 §2.1), found by progressive masking.

The saliency region of a unit is the smallest axis-aligned box of the model input, containing
the unit, whose pixels alone (everything else set to the dataset mean, i.e. zero after
normalisation) give a response within ``error`` (relative) of the full image's: a box passes
when ``|r_box - r_full| <= error * |r_full|``.

The search (:func:`saliency_regions`) moves boxes in multiples of ``step`` pixels and runs for
the units chunk by chunk; every step is one batched call of ``evaluate`` over the units still
searching (the whole image passes by definition, without a forward):

0. the masked image (no pixel kept): when it passes, no box is the smallest (the search would
   collapse onto a point) and the unit has no region (:data:`NO_REGION`);
1. grow (:func:`_grow`): square windows centred on the unit with half-sizes ``step * 2^k``;
2. bisect (:func:`_bisect_half_size`): the smallest passing half-size between the last failing
   and the first passing square;
3. refine (:func:`_refine_side`): each side in turn moved inward as far as the box still
   passes, never past the unit's pixel: a region always contains its unit.

Boxes are (x1, y1, x2, y2) integer pixel edges of the model input: pixels x1..x2-1, y1..y2-1
are kept; (0, 0) is the top-left corner of the top-left pixel, x right, y down. The unit's pixel
is ``(floor(x), floor(y))`` of its centre (clamped into the image), so a region holds the
centre: ``x1 <= x < x2``, ``y1 <= y < y2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.core.errors import InputError

__all__ = [
    "DEFAULT_SALIENCY_ERROR",
    "FOUND",
    "NO_REGION",
    "Evaluator",
    "SaliencyRegion",
    "default_saliency_step",
    "saliency_regions",
]

#: Default relative error bound of the saliency region (DCNv2's "small error bound").
DEFAULT_SALIENCY_ERROR = 0.1

#: A unit's search found its region: a box containing the unit that meets the bound.
FOUND = "found"
#: The image with every pixel masked already meets the bound: no region (no box is smallest).
NO_REGION = "masked_image_within_bound"

#: ``evaluate(indices [N], boxes [N, 4])`` -> response of unit ``indices[n]`` with only
#: ``boxes[n]`` kept, [N].
Evaluator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SaliencyRegion:
    """The box found for one unit: (x1, y1, x2, y2) integer pixel edges of the model input; None
    when the unit has no region (``status`` :data:`NO_REGION`)."""

    box: Optional[Tuple[int, int, int, int]]
    response: float  # r with only the box kept (no region: with every pixel masked)
    full_response: float  # r on the whole image
    relative_error: float  # |response - full_response| / |full_response|
    evaluations: int  # masked forwards spent on this unit
    status: str = FOUND  # FOUND or NO_REGION

    @property
    def area(self) -> Optional[int]:
        if self.box is None:
            return None
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def default_saliency_step(record: DeformConvRecord) -> int:
    """The saliency search's default resolution: the layer's output stride in model-input
    pixels (at least 1)."""
    frame = record.geometry.output_frame
    return max(1, int(round(min(frame.stride_x, frame.stride_y))))


class _MaskingSearch:
    """What every step of one search shares: the units' centres (clamped into the image) and
    pixels, their full responses, the error bound, the step, the image size, the masked forwards
    spent per unit (:attr:`evaluations`) and the response of each unit's last passing box
    (:attr:`passing`: the box the search holds)."""

    def __init__(
        self,
        evaluate: Evaluator,
        centres: torch.Tensor,
        full: torch.Tensor,
        image_hw: Tuple[int, int],
        error: float,
        step: int,
    ) -> None:
        self.height, self.width = image_hw
        self.count = int(centres.shape[0])
        centres = centres.to(torch.float64)
        self.full = full.to(torch.float64)
        self.cx = centres[:, 0].clamp(0.0, self.width - 1e-9)
        self.cy = centres[:, 1].clamp(0.0, self.height - 1e-9)
        # the unit's pixel: every box keeps it
        self.px = torch.floor(self.cx).to(torch.long)
        self.py = torch.floor(self.cy).to(torch.long)
        self.evaluate = evaluate
        self.error = error
        self.step = step
        self.evaluations = torch.zeros(self.count, dtype=torch.long)
        self.passing = self.full.clone()

    def square(self, multiples: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Square windows of half-size ``multiples * step`` around the centres of ``indices``,
        clipped to the image."""
        h = multiples.to(torch.float64) * self.step
        x, y = self.cx[indices], self.cy[indices]
        x1 = torch.floor(x - h).clamp(0, self.width)
        y1 = torch.floor(y - h).clamp(0, self.height)
        x2 = torch.ceil(x + h).clamp(0, self.width)
        y2 = torch.ceil(y + h).clamp(0, self.height)
        return torch.stack([x1, y1, x2, y2], dim=1).to(torch.long)

    def whole(self, boxes: torch.Tensor) -> torch.Tensor:
        """Which boxes cover the whole image."""
        return (
            (boxes[:, 0] == 0)
            & (boxes[:, 1] == 0)
            & (boxes[:, 2] == self.width)
            & (boxes[:, 3] == self.height)
        )

    def passes(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        full = self.full[indices]
        return (values - full).abs() <= self.error * full.abs()

    def check(self, indices: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Which boxes pass (their responses kept in :attr:`passing`); the whole image passes
        without a forward."""
        passed = self.whole(boxes)
        self.passing[indices[passed]] = self.full[indices[passed]]
        ask = torch.nonzero(~passed).flatten()
        if ask.numel():
            values = self.evaluate(indices[ask], boxes[ask]).to(torch.float64)
            self.evaluations[indices[ask]] += 1
            passed[ask] = self.passes(values, indices[ask])
            self.passing[indices[ask][passed[ask]]] = values[passed[ask]]
        return passed


def _grow(search: _MaskingSearch) -> Tuple[List[int], torch.Tensor]:
    """Step 1: square windows of half-sizes ``step * 2^k`` (k = 0, 1, ...), up to the one
    covering the whole image. Returns the multiples of ``step`` tried and, per unit, the index
    of the first passing one."""
    multiples: List[int] = [1]
    while multiples[-1] * search.step < max(search.height, search.width):
        multiples.append(multiples[-1] * 2)
    first_pass = torch.full((search.count,), len(multiples) - 1, dtype=torch.long)
    searching = torch.ones(search.count, dtype=torch.bool)
    for k, m in enumerate(multiples):
        indices = torch.nonzero(searching).flatten()
        if indices.numel() == 0:
            break
        passed = search.check(indices, search.square(torch.full((indices.numel(),), m), indices))
        first_pass[indices[passed]] = k
        searching[indices[passed]] = False
    return multiples, first_pass


def _bisect_half_size(
    search: _MaskingSearch, multiples: List[int], first_pass: torch.Tensor
) -> torch.Tensor:
    """Step 2: the smallest half-size (a multiple of ``step``) between the last failing and the
    first passing square that passes (assumes the error shrinks as the square grows between
    those two) -> the units' squares [U, 4]."""
    sizes = torch.tensor(multiples, dtype=torch.long)
    high = sizes[first_pass]
    low = torch.where(first_pass > 0, sizes[(first_pass - 1).clamp(min=0)], torch.zeros_like(high))
    while True:
        active = torch.nonzero(high - low > 1).flatten()
        if active.numel() == 0:
            break
        middle = (low[active] + high[active]) // 2
        passed = search.check(active, search.square(middle, active))
        high[active[passed]] = middle[passed]
        low[active[~passed]] = middle[~passed]
    return search.square(high, torch.arange(search.count))


def _refine_side(search: _MaskingSearch, boxes: torch.Tensor, side: int) -> torch.Tensor:
    """Step 3, one side (0 left, 1 top, 2 right, 3 bottom): moved inward by the largest multiple
    of ``step`` that keeps the box passing (bisection over the cut, assuming the error grows as
    the box shrinks), never past the unit's pixel; the last step may stop at the image border
    or at the unit's pixel."""
    inward = 1 if side < 2 else -1
    step = search.step
    unit = (search.px, search.py)[side % 2]
    # pixels that may go: up to the unit's pixel, which stays
    room = unit - boxes[:, side] if side < 2 else boxes[:, side] - (unit + 1)
    low = torch.zeros(search.count, dtype=torch.long)  # cut (in steps) known to pass
    high = (room + step - 1) // step + 1  # cut known impossible

    def moved(indices: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
        trial = boxes[indices].clone()
        trial[:, side] += inward * torch.minimum(cut * step, room[indices])
        return trial

    while True:
        active = torch.nonzero(high - low > 1).flatten()
        if active.numel() == 0:
            break
        middle = (low[active] + high[active]) // 2
        passed = search.check(active, moved(active, middle))
        low[active[passed]] = middle[passed]
        high[active[~passed]] = middle[~passed]
    return torch.where(low[:, None] > 0, moved(torch.arange(search.count), low), boxes)


def _relative_error(value: float, reference: float) -> float:
    if reference != 0:
        return abs(value - reference) / abs(reference)
    return 0.0 if value == reference else math.inf


def _masked_image(search: _MaskingSearch) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 0: the response with every pixel masked, [U], and which units it already passes."""
    everyone = torch.arange(search.count)
    values = search.evaluate(everyone, torch.zeros(search.count, 4, dtype=torch.long))
    values = values.to(torch.float64)
    search.evaluations += 1
    return values, search.passes(values, everyone)


def _search_chunk(
    evaluate: Evaluator,
    centres: torch.Tensor,
    full: torch.Tensor,
    image_hw: Tuple[int, int],
    error: float,
    step: int,
) -> List[SaliencyRegion]:
    """Steps 0-3 for the units of one chunk; each region's response is the one its box gave when
    it passed (the whole image: the full response)."""
    search = _MaskingSearch(evaluate, centres, full, image_hw, error, step)
    masked, no_region = _masked_image(search)
    searching = torch.nonzero(~no_region).flatten()
    boxes = torch.zeros(search.count, 4, dtype=torch.long)
    if searching.numel():
        inner = _MaskingSearch(
            lambda indices, b: evaluate(searching[indices], b),
            centres[searching],
            full[searching],
            image_hw,
            error,
            step,
        )
        multiples, first_pass = _grow(inner)
        found = _bisect_half_size(inner, multiples, first_pass)
        for side in range(4):
            found = _refine_side(inner, found, side)
        boxes[searching] = found
        search.evaluations[searching] += inner.evaluations
        search.passing[searching] = inner.passing
    regions = []
    for u in range(search.count):
        reference = float(search.full[u])
        evaluations = int(search.evaluations[u])
        if bool(no_region[u]):
            value = float(masked[u])
            relative = _relative_error(value, reference)
            regions.append(SaliencyRegion(None, value, reference, relative, evaluations, NO_REGION))
            continue
        value = float(search.passing[u])
        box: Tuple[int, int, int, int] = tuple(int(v) for v in boxes[u].tolist())  # type: ignore[assignment]
        regions.append(
            SaliencyRegion(box, value, reference, _relative_error(value, reference), evaluations)
        )
    return regions


def saliency_regions(
    evaluate: Evaluator,
    centres: torch.Tensor,
    full: torch.Tensor,
    image_hw: Tuple[int, int],
    error: float = DEFAULT_SALIENCY_ERROR,
    step: int = 1,
    chunk: Optional[int] = None,
    on_units: Optional[Callable[[int], None]] = None,
) -> List[SaliencyRegion]:
    """The error-bounded saliency region of every unit, by progressive masking.

    ``centres`` [U, 2] (x, y) are the units' centres and ``full`` [U] their responses on the
    whole image; a box passes when ``|r_box - r_full| <= error * |r_full|``. Boxes move in
    multiples of ``step`` pixels (the search's resolution; the image border is always
    reachable). The units are searched ``chunk`` at a time (default: all together);
    ``on_units(n)`` is told of every chunk of n units done. Schedule, every step one batched
    ``evaluate`` over the units still searching:

    0. the masked image: a unit whose response it already gives within the bound has no region
       (``box`` None, ``status`` :data:`NO_REGION`, its ``response`` the masked image's);
    1. grow: square windows centred on the unit (its centre clamped into the image) with
       half-sizes ``step * 2^k`` (k = 0, 1, ...), clipped to the image, up to the one covering
       the whole image (which passes by definition, without a forward): the first that passes;
    2. bisect: the smallest half-size (a multiple of ``step``) between the last failing and the
       first passing square that passes (assumes the error shrinks as the square grows between
       those two);
    3. refine: each side in turn (left, top, right, bottom) is moved inward by the largest
       multiple of ``step`` that keeps the box passing (bisection, same assumption), never past
       the unit's pixel: every region contains its unit.

    Boxes are (x1, y1, x2, y2) integer pixel edges: pixels x1..x2-1, y1..y2-1 are kept. A
    region's ``response`` and ``relative_error`` are those its box gave in the search.
    """
    if not error >= 0:
        raise InputError(f"{error}: the relative error bound must be >= 0", param="saliency_error")
    if step < 1:
        raise InputError(
            f"{step}: the search resolution must be at least 1 pixel", param="saliency_step"
        )
    count = int(centres.shape[0])
    size = max(1, count if chunk is None else int(chunk))
    regions: List[SaliencyRegion] = []
    for start in range(0, count, size):
        indices = torch.arange(start, min(start + size, count))
        regions += _search_chunk(
            lambda n, boxes, indices=indices: evaluate(indices[n], boxes),
            centres[indices],
            full[indices],
            image_hw,
            error,
            step,
        )
        if on_units is not None:
            on_units(int(indices.numel()))
    return regions
