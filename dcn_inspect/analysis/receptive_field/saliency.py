"""Error-bounded saliency regions (DCNv2 §2.1), found in at most
:data:`MAX_FORWARDS_PER_UNIT` masked forwards per unit.

The saliency region of a unit is the smallest axis-aligned box of the model input, containing
the unit, whose pixels alone (everything else set to the dataset mean, i.e. zero after
normalisation) give a response within ``error`` (relative) of the full image's: a box passes
when ``|r_box - r_full| <= error * |r_full|``.

The search (:func:`saliency_regions`) runs for the units chunk by chunk; every step is one
batched call of ``evaluate`` over the units still searching (the whole image passes by
definition, without a forward):

0. the masked image (no pixel kept, 1 forward): when it passes, no box is the smallest (the
   search would collapse onto a point) and the unit has no region (:data:`NO_REGION`);
1. a nested family of candidate boxes (:func:`prior_family`, :func:`square_family`), no forward:
   with a prior (the x- and y-marginals of the unit's ``|dr/dX|`` on the model input), Box(q),
   q in [0, 1], grows outward from the unit's pixel: each side sits where the prior mass beyond
   it, on that side of the unit, is at most ``(1 - q)`` of that side's mass, snapped outward to
   the step grid (multiples of ``step`` from the image origin, or the image border); q = 0 is
   about the unit's cell, q = 1 the prior's support with the unit. Without a prior (or with a
   prior of zero mass): squares centred on the unit with half-sizes ``k * step`` (k = 1, 2,
   ...). Distinct boxes only, at most :data:`MAX_FAMILY` (more are subsampled evenly by index,
   the first and the last kept), then the whole image;
2. binary search (:func:`_smallest_passing_member`) for the smallest passing member (assumes
   the error shrinks as the box grows along the family): ``ceil(log2(n + 1)) <= 7`` forwards
   for n <= 127 members before the whole image;
3. refinement (:func:`_refine_side`): each side in turn (left, top, right, bottom) tried once
   moved inward to the next multiple of ``step`` (never past the unit's pixel: a region always
   contains its unit), kept when the box still passes: at most 4 forwards.

So 1 + 7 + 4 = 12 forwards per unit at most, whatever the error bound and the image size.

Boxes are (x1, y1, x2, y2) integer pixel edges of the model input: pixels x1..x2-1, y1..y2-1
are kept; (0, 0) is the top-left corner of the top-left pixel, x right, y down. The unit's pixel
is ``(floor(x), floor(y))`` of its centre (clamped into the image), so a region holds the
centre: ``x1 <= x < x2``, ``y1 <= y < y2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.core.errors import InputError

__all__ = [
    "DEFAULT_SALIENCY_ERROR",
    "FOUND",
    "MAX_FAMILY",
    "MAX_FORWARDS_PER_UNIT",
    "NO_REGION",
    "Evaluator",
    "Prior",
    "SaliencyRegion",
    "default_saliency_step",
    "prior_family",
    "saliency_cost",
    "saliency_regions",
    "square_family",
]

#: Default relative error bound of the saliency region (DCNv2's "small error bound").
DEFAULT_SALIENCY_ERROR = 0.1

#: Masked forwards (masked images evaluated) one unit's search may take, at most.
MAX_FORWARDS_PER_UNIT = 12
_MASKED_IMAGE_FORWARDS = 1  # step 0
_REFINE_FORWARDS = 4  # step 3: one try per side
_SEARCH_FORWARDS = MAX_FORWARDS_PER_UNIT - _MASKED_IMAGE_FORWARDS - _REFINE_FORWARDS  # step 2
#: Members of a family before the whole image, at most: a binary search over n members ending
#: with one known to pass (the whole image) takes ceil(log2(n + 1)) forwards.
MAX_FAMILY = 2**_SEARCH_FORWARDS - 1
assert _SEARCH_FORWARDS == 7 and MAX_FAMILY == 127

#: A unit's search found its region: a box containing the unit that meets the bound.
FOUND = "found"
#: The image with every pixel masked already meets the bound: no region (no box is smallest).
NO_REGION = "masked_image_within_bound"

#: ``evaluate(indices [N], boxes [N, 4])`` -> response of unit ``indices[n]`` with only
#: ``boxes[n]`` kept, [N].
Evaluator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: The units' prior: x-marginals [U, W] and y-marginals [U, H] of ``|dr/dX|`` summed over
#: colour on the model input (any non-negative weights; their absolute values are used).
Prior = Tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class SaliencyRegion:
    """The box found for one unit: (x1, y1, x2, y2) integer pixel edges of the model input; None
    when the unit has no region (``status`` :data:`NO_REGION`)."""

    box: Optional[Tuple[int, int, int, int]]
    response: float  # r with only the box kept (no region: with every pixel masked)
    full_response: float  # r on the whole image
    relative_error: float  # |response - full_response| / |full_response|
    evaluations: int  # masked forwards spent on this unit (<= MAX_FORWARDS_PER_UNIT)
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


def saliency_cost(regions: Sequence[SaliencyRegion]) -> Dict[str, Any]:
    """What a search cost and reached: masked forwards per unit (max, mean) over every unit and
    the relative error reached (max, mean) over the units with a region (None without any)."""
    forwards = [r.evaluations for r in regions]
    errors = [r.relative_error for r in regions if r.status == FOUND]
    return {
        "units": len(regions),
        "units_with_region": len(errors),
        "forwards_per_unit": {
            "max": max(forwards) if forwards else None,
            "mean": sum(forwards) / len(forwards) if forwards else None,
        },
        "error_reached": {
            "max": max(errors) if errors else None,
            "mean": sum(errors) / len(errors) if errors else None,
        },
    }


# ---------------------------------------------------------------------------------------------
# Step 1: the family of candidate boxes


def _unit_pixel(centre: Tuple[float, float], image_hw: Tuple[int, int]) -> Tuple[int, int]:
    height, width = image_hw
    return (
        int(math.floor(min(max(centre[0], 0.0), width - 1e-9))),
        int(math.floor(min(max(centre[1], 0.0), height - 1e-9))),
    )


def _close(boxes: torch.Tensor, image_hw: Tuple[int, int]) -> torch.Tensor:
    """Distinct boxes of a nested (growing) sequence, the whole image left out, at most
    :data:`MAX_FAMILY` (subsampled evenly by index, the first and the last kept), then the whole
    image -> [M, 4], M <= MAX_FAMILY + 1."""
    height, width = image_hw
    whole = torch.tensor([[0, 0, width, height]], dtype=torch.long)
    boxes = torch.unique_consecutive(boxes.to(torch.long), dim=0)
    boxes = boxes[~(boxes == whole).all(dim=1)]
    if boxes.shape[0] > MAX_FAMILY:
        keep = torch.linspace(0, boxes.shape[0] - 1, MAX_FAMILY, dtype=torch.float64).round()
        boxes = boxes[keep.to(torch.long)]
    return torch.cat([boxes, whole])


def _sides(
    marginal: torch.Tensor, pixel: int, size: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One axis of the prior family: the fractions of the mass below the unit's pixel that lie
    beyond each low edge x = 0..pixel (nondecreasing, 1 at the pixel) and of the mass above it
    beyond each high edge x = pixel+1..size (nonincreasing, 1 at pixel+1); a side without mass
    sits at the unit (its one edge, fraction 0). Returns (low fractions, high fractions, low
    edges, high edges)."""
    cumulative = torch.cat([marginal.new_zeros(1), torch.cumsum(marginal, 0)])  # mass of [0, x)
    below = cumulative[pixel]
    above = cumulative[size] - cumulative[pixel + 1]
    low_edges = torch.arange(0, pixel + 1)
    high_edges = torch.arange(pixel + 1, size + 1)
    if below > 0:
        low = cumulative[: pixel + 1] / below
    else:
        low, low_edges = torch.zeros(1, dtype=torch.float64), low_edges[-1:]
    if above > 0:
        high = (cumulative[size] - cumulative[pixel + 1 :]) / above
    else:
        high, high_edges = torch.zeros(1, dtype=torch.float64), high_edges[:1]
    return low, high, low_edges, high_edges


def _place(
    fractions: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    limits: torch.Tensor,
    step: int,
    size: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both sides of one axis for every fraction limit ``1 - q`` in ``limits`` [T]: the low side
    at the largest edge whose fraction beyond is <= the limit, the high side at the smallest,
    snapped outward to multiples of ``step`` (or the image border)."""
    low, high, low_edges, high_edges = fractions
    x1 = low_edges[torch.searchsorted(low, limits, right=True) - 1]
    x2 = high_edges[torch.searchsorted(-high, -limits, right=False)]
    x1 = torch.div(x1, step, rounding_mode="floor") * step
    x2 = (-torch.div(-x2, step, rounding_mode="floor") * step).clamp(max=size)
    return x1, x2


def prior_family(
    prior_x: torch.Tensor,
    prior_y: torch.Tensor,
    centre: Tuple[float, float],
    image_hw: Tuple[int, int],
    step: int,
) -> Optional[torch.Tensor]:
    """Step 1 with a prior: the nested boxes Box(q) of one unit [M, 4] (growing; the last the
    whole image), or None when the prior has no mass. ``prior_x`` [W] and ``prior_y`` [H] weigh
    the columns and rows (absolute values are used); ``centre`` (x, y) is the unit's centre."""
    height, width = image_hw
    mx = prior_x.detach().to(torch.float64).abs().nan_to_num(0.0, 0.0, 0.0).cpu()
    my = prior_y.detach().to(torch.float64).abs().nan_to_num(0.0, 0.0, 0.0).cpu()
    if not (mx.sum() > 0 and my.sum() > 0):
        return None
    px, py = _unit_pixel(centre, image_hw)
    x_axis = _sides(mx, px, width)
    y_axis = _sides(my, py, height)
    # every limit 1 - q at which a side moves, q = 0 (limit 1) and q = 1 (limit 0)
    limits = torch.cat([x_axis[0], x_axis[1], y_axis[0], y_axis[1], torch.tensor([0.0, 1.0])])
    limits = torch.unique(limits).flip(0)  # q from 0 to 1: the boxes grow
    x1, x2 = _place(x_axis, limits, step, width)
    y1, y2 = _place(y_axis, limits, step, height)
    return _close(torch.stack([x1, y1, x2, y2], dim=1), image_hw)


def square_family(
    centre: Tuple[float, float], image_hw: Tuple[int, int], step: int
) -> torch.Tensor:
    """Step 1 without a prior: squares centred on the unit's centre (clamped into the image)
    with half-sizes ``k * step``, k = 1, 2, ..., clipped to the image, up to the whole image
    -> [M, 4] (growing; the last the whole image)."""
    height, width = image_hw
    x = min(max(centre[0], 0.0), width - 1e-9)
    y = min(max(centre[1], 0.0), height - 1e-9)
    reach = max(x, width - x, y, height - y)
    half = torch.arange(1, int(math.ceil(reach / step)) + 1, dtype=torch.float64) * step
    boxes = torch.stack(
        [
            torch.floor(x - half).clamp(0, width),
            torch.floor(y - half).clamp(0, height),
            torch.ceil(x + half).clamp(0, width),
            torch.ceil(y + half).clamp(0, height),
        ],
        dim=1,
    )
    return _close(boxes, image_hw)


# ---------------------------------------------------------------------------------------------
# Steps 0, 2 and 3


class _MaskingSearch:
    """What every step of one search shares: the units' pixels, their full responses, the error
    bound, the step, the image size, the masked forwards spent per unit (:attr:`evaluations`)
    and the response of each unit's last passing box (:attr:`passing`: the box the search
    holds)."""

    def __init__(
        self,
        evaluate: Evaluator,
        pixels: torch.Tensor,
        full: torch.Tensor,
        image_hw: Tuple[int, int],
        error: float,
        step: int,
    ) -> None:
        self.height, self.width = image_hw
        self.count = int(pixels.shape[0])
        self.px, self.py = pixels[:, 0], pixels[:, 1]
        self.full = full.to(torch.float64)
        self.evaluate = evaluate
        self.error = error
        self.step = step
        self.evaluations = torch.zeros(self.count, dtype=torch.long)
        self.passing = self.full.clone()

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


def _masked_image(search: _MaskingSearch) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 0: the response with every pixel masked, [U], and which units it already passes."""
    everyone = torch.arange(search.count)
    values = search.evaluate(everyone, torch.zeros(search.count, 4, dtype=torch.long))
    values = values.to(torch.float64)
    search.evaluations += 1
    return values, search.passes(values, everyone)


def _smallest_passing_member(
    search: _MaskingSearch, families: torch.Tensor, sizes: torch.Tensor
) -> torch.Tensor:
    """Step 2: per unit the smallest passing member of its family (``families`` [U, M, 4]
    padded, ``sizes`` [U] members, the last the whole image), by binary search (assumes the
    error shrinks as the box grows along the family) -> the units' boxes [U, 4]."""
    low = torch.full((search.count,), -1, dtype=torch.long)  # members below it: none known
    high = sizes - 1  # the whole image: passes
    while True:
        active = torch.nonzero(high - low > 1).flatten()
        if active.numel() == 0:
            break
        middle = (low[active] + high[active]) // 2
        passed = search.check(active, families[active, middle])
        high[active[passed]] = middle[passed]
        low[active[~passed]] = middle[~passed]
    return families[torch.arange(search.count), high]


def _refine_side(search: _MaskingSearch, boxes: torch.Tensor, side: int) -> torch.Tensor:
    """Step 3, one side (0 left, 1 top, 2 right, 3 bottom): tried once moved inward to the next
    multiple of ``step`` (never past the unit's pixel), kept when the box still passes; a side
    already at the unit's pixel is not tried."""
    step = search.step
    unit = (search.px, search.py)[side % 2]
    edge = boxes[:, side]
    if side < 2:
        moved = torch.minimum((torch.div(edge, step, rounding_mode="floor") + 1) * step, unit)
    else:
        ceiling = -torch.div(-edge, step, rounding_mode="floor") * step
        moved = torch.maximum(ceiling - step, unit + 1)
    active = torch.nonzero(moved != edge).flatten()
    if active.numel() == 0:
        return boxes
    trial = boxes[active].clone()
    trial[:, side] = moved[active]
    passed = search.check(active, trial)
    boxes = boxes.clone()
    boxes[active[passed]] = trial[passed]
    return boxes


def _relative_error(value: float, reference: float) -> float:
    if reference != 0:
        return abs(value - reference) / abs(reference)
    return 0.0 if value == reference else math.inf


def _families(
    centres: torch.Tensor, prior: Optional[Prior], image_hw: Tuple[int, int], step: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 1 for every unit: the families padded to one tensor [U, M, 4] and their sizes
    [U]."""
    members = []
    for u, (x, y) in enumerate(centres.tolist()):
        family = (
            None
            if prior is None
            else prior_family(prior[0][u], prior[1][u], (x, y), image_hw, step)
        )
        members.append(square_family((x, y), image_hw, step) if family is None else family)
    sizes = torch.tensor([m.shape[0] for m in members], dtype=torch.long)
    padded = torch.zeros(len(members), int(sizes.max()), 4, dtype=torch.long)
    for u, family in enumerate(members):
        padded[u, : family.shape[0]] = family
    return padded, sizes


def _search_chunk(
    evaluate: Evaluator,
    centres: torch.Tensor,
    full: torch.Tensor,
    prior: Optional[Prior],
    image_hw: Tuple[int, int],
    error: float,
    step: int,
) -> List[SaliencyRegion]:
    """Steps 0-3 for the units of one chunk; each region's response is the one its box gave when
    it passed (the whole image: the full response)."""
    pixels = torch.tensor(
        [_unit_pixel((x, y), image_hw) for x, y in centres.tolist()], dtype=torch.long
    ).reshape(-1, 2)
    search = _MaskingSearch(evaluate, pixels, full, image_hw, error, step)
    masked, no_region = _masked_image(search)
    searching = torch.nonzero(~no_region).flatten()
    boxes = torch.zeros(search.count, 4, dtype=torch.long)
    if searching.numel():
        inner = _MaskingSearch(
            lambda indices, b: evaluate(searching[indices], b),
            pixels[searching],
            full[searching],
            image_hw,
            error,
            step,
        )
        inner_prior = None if prior is None else (prior[0][searching], prior[1][searching])
        families, sizes = _families(centres[searching], inner_prior, image_hw, step)
        found = _smallest_passing_member(inner, families, sizes)
        for side in range(4):
            found = _refine_side(inner, found, side)
        boxes[searching] = found
        search.evaluations[searching] += inner.evaluations
        search.passing[searching] = inner.passing
    if search.count and int(search.evaluations.max()) > MAX_FORWARDS_PER_UNIT:
        raise RuntimeError(
            f"the saliency search took {int(search.evaluations.max())} masked forwards for a "
            f"unit, over its budget of {MAX_FORWARDS_PER_UNIT}"
        )
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
    prior: Optional[Prior] = None,
) -> List[SaliencyRegion]:
    """The error-bounded saliency region of every unit, in at most
    :data:`MAX_FORWARDS_PER_UNIT` (12) masked forwards per unit.

    ``centres`` [U, 2] (x, y) are the units' centres and ``full`` [U] their responses on the
    whole image; a box passes when ``|r_box - r_full| <= error * |r_full|``. Box edges sit on
    multiples of ``step`` pixels from the image origin or on the image border (the search's
    resolution), except where a side stops at the unit's pixel and on the squares searched
    without a prior (centred on the unit). ``prior`` (x-marginals [U, W],
    y-marginals [U, H] over the ``image_hw`` image, e.g. of ``|dr/dX|`` summed over colour)
    guides the candidate boxes. The units are searched ``chunk`` at a time (default: all
    together); ``on_units(n)`` is told of every chunk of n units done. Schedule, every step one
    batched ``evaluate`` over the units still searching:

    0. the masked image (1 forward): a unit whose response it already gives within the bound
       has no region (``box`` None, ``status`` :data:`NO_REGION`, its ``response`` the masked
       image's);
    1. the unit's family of nested candidate boxes (no forward): with a prior of non-zero mass,
       Box(q) for q in [0, 1], each side where the prior mass beyond it, on that side of the
       unit's pixel, is at most ``(1 - q)`` of that side's mass, snapped outward to the step
       grid (q = 0: about the unit's cell; q = 1: the prior's support with the unit's pixel);
       without one, squares centred on the unit (its centre clamped into the image) with
       half-sizes ``k * step``, k = 1, 2, ..., clipped to the image. Distinct boxes only; more
       than :data:`MAX_FAMILY` (127) are subsampled evenly by index, the first and the last
       kept; the whole image ends the family (it passes by definition, without a forward);
    2. binary search for the smallest passing member (assumes the error shrinks as the box
       grows along the family): at most 7 forwards;
    3. refinement: each side in turn (left, top, right, bottom) tried once moved inward to the
       next multiple of ``step``, never past the unit's pixel, and kept when the box still
       passes: at most 4 forwards. Every region contains its unit.

    Boxes are (x1, y1, x2, y2) integer pixel edges: pixels x1..x2-1, y1..y2-1 are kept. A
    region's ``response`` and ``relative_error`` are those its box gave in the search, its
    ``evaluations`` the masked forwards it took (at most 12).
    """
    if not error >= 0:
        raise InputError(f"{error}: the relative error bound must be >= 0", param="saliency_error")
    if step < 1:
        raise InputError(
            f"{step}: the search resolution must be at least 1 pixel", param="saliency_step"
        )
    count = int(centres.shape[0])
    if prior is not None:
        expected = ((count, image_hw[1]), (count, image_hw[0]))
        if (tuple(prior[0].shape), tuple(prior[1].shape)) != expected:
            raise ValueError(
                f"prior marginals {tuple(prior[0].shape)}, {tuple(prior[1].shape)}: expected "
                f"{expected[0]} and {expected[1]} (units, image width / height)"
            )
    size = max(1, count if chunk is None else int(chunk))
    regions: List[SaliencyRegion] = []
    for start in range(0, count, size):
        indices = torch.arange(start, min(start + size, count))
        regions += _search_chunk(
            lambda n, boxes, indices=indices: evaluate(indices[n], boxes),
            centres[indices],
            full[indices],
            None if prior is None else (prior[0][indices], prior[1][indices]),
            image_hw,
            error,
            step,
        )
        if on_units is not None:
            on_units(int(indices.numel()))
    return regions
