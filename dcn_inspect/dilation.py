"""Effective dilation of deformable filters, object-size categories and streaming statistics.

Effective dilation (PAPER.md §3, Table 2) of a k_h x k_w filter at one output unit is the mean
Euclidean distance between horizontally and vertically adjacent sampling locations of its
grid: ``k_h*(k_w-1) + (k_h-1)*k_w`` pairs (12 for 3x3). An undeformed filter with dilation d
scores exactly d. Distances are measured

- in the layer's input cells (``units="cells"``), or
- in original-image pixels (``units="pixels"``): the input frame maps a cell step to
  ``stride_x`` / ``stride_y`` model-input pixels and the model-input -> original scale
  multiplies those again, so a horizontal step of ``dx`` cells is ``dx * Sx`` pixels.

With several offset groups a unit's dilation is the MEAN OF THE GROUPS' DILATIONS (each group
is a filter of its own that samples its own channels); ``per_group`` keeps them apart.

Units are assigned a category by where their filter centre (the output cell's centre, mapped
through the layer's output frame to the original image) lies, see :func:`unit_categories`.

Statistics are streamed: :class:`CategoryStats` keeps, per category, the count, Welford
mean and sum of squared deviations (merged exactly with Chan et al.'s pairwise formula),
minimum, maximum and a fixed log-spaced histogram (:data:`BINS`) for the median and
percentiles. Two states merge into the state of the concatenated data, so shards, batches
and ranks can be combined in any grouping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dcn_inspect.errors import InputError
from dcn_inspect.geometry import FrameMap
from dcn_inspect.sampling import split_offsets

#: Categories in table order. Units counted in none of them carry a negative code.
CATEGORIES: Tuple[str, ...] = ("small", "medium", "large", "background")
SMALL, MEDIUM, LARGE, BACKGROUND = 0, 1, 2, 3
#: Centre inside an ignored (crowd / difficult) box and inside no other box.
IGNORED = -1
#: Centre outside the original image (border units of a map whose extent exceeds the image).
OUTSIDE = -2
CATEGORY_CODES = {IGNORED: "ignored", OUTSIDE: "outside", **{i: name for i, name in enumerate(CATEGORIES)}}

#: Named area thresholds (small/medium, medium/large) in original-image pixels².
NAMED_THRESHOLDS: Dict[str, Tuple[float, float]] = {
    "paper": (96.0**2, 224.0**2),  # PAPER.md §3: recalled, not verified against the paper
    "coco": (32.0**2, 96.0**2),
}


# --------------------------------------------------------------------------------------------
# Effective dilation
# --------------------------------------------------------------------------------------------


def effective_dilation(
    offset: torch.Tensor,
    kernel: Tuple[int, int],
    dilation: Tuple[int, int],
    cell_size: Tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]] = (1.0, 1.0),
) -> torch.Tensor:
    """Per-group effective dilation [B, G, Ho, Wo] from an offset field [B, 2*G*kh*kw, Ho, Wo].

    ``cell_size = (size_y, size_x)`` is the length of one input cell step in the output unit:
    (1, 1) for cells; for pixels the input frame's strides times the original/model-input
    scale, as floats or as [B] tensors (one scale per image of the batch). The regular grid's
    positions cancel in the differences, so only the kernel offsets ``a*dilation`` and the
    learned ``(dy, dx)`` enter.
    """
    if kernel[0] * kernel[1] < 2:
        raise ValueError(f"effective dilation needs at least two kernel points, got kernel {kernel}")
    batch, _, out_h, out_w = offset.shape
    kh, kw = kernel
    dy, dx = split_offsets(offset, kernel)  # [B, G, K, Ho, Wo]
    dy = dy.reshape(batch, -1, kh, kw, out_h, out_w)
    dx = dx.reshape(batch, -1, kh, kw, out_h, out_w)
    size_y, size_x = (_per_image(size, offset) for size in cell_size)
    total = torch.zeros((), dtype=offset.dtype, device=offset.device)
    if kw > 1:  # horizontal neighbours (a, b) -> (a, b + 1): one dilation_x step plus the offset change
        step_y = (dy[:, :, :, 1:] - dy[:, :, :, :-1]) * size_y
        step_x = (dx[:, :, :, 1:] - dx[:, :, :, :-1] + dilation[1]) * size_x
        total = total + torch.sqrt(step_y**2 + step_x**2).sum(dim=(2, 3))
    if kh > 1:  # vertical neighbours (a, b) -> (a + 1, b)
        step_y = (dy[:, :, 1:] - dy[:, :, :-1] + dilation[0]) * size_y
        step_x = (dx[:, :, 1:] - dx[:, :, :-1]) * size_x
        total = total + torch.sqrt(step_y**2 + step_x**2).sum(dim=(2, 3))
    return total / (kh * (kw - 1) + (kh - 1) * kw)


def _per_image(size: Union[float, torch.Tensor], offset: torch.Tensor) -> Union[float, torch.Tensor]:
    if isinstance(size, torch.Tensor):
        return size.to(offset.device, offset.dtype).view(-1, 1, 1, 1, 1, 1)
    return float(size)


# --------------------------------------------------------------------------------------------
# Categories
# --------------------------------------------------------------------------------------------


def resolve_thresholds(spec: str, box_areas: Optional[np.ndarray] = None) -> Tuple[str, Tuple[float, float]]:
    """``paper``, ``coco``, ``tertiles`` (needs ``box_areas``) or ``A,B`` (numbers or ``N^2``) ->
    (name, (small/medium, medium/large)) in pixels²."""
    text = spec.strip().lower()
    if text in NAMED_THRESHOLDS:
        return text, NAMED_THRESHOLDS[text]
    if text == "tertiles":
        if box_areas is None or len(box_areas) < 3:
            count = 0 if box_areas is None else len(box_areas)
            raise InputError(f"--thresholds tertiles: needs at least 3 ground-truth boxes, the dataset has {count}")
        low, high = tertile_thresholds(box_areas)
        return "tertiles", (low, high)
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise InputError(f"--thresholds {spec!r}: expected paper, coco, tertiles or two areas 'A,B' in pixels² (e.g. 1024,9216 or 32^2,96^2)")
    values = []
    for part in parts:
        try:
            if "^" in part:
                base, power = part.split("^", 1)
                value = float(base) ** float(power)
            else:
                value = float(part)
        except ValueError:
            raise InputError(f"--thresholds {spec!r}: {part!r} is not a number") from None
        values.append(value)
    if not (0 < values[0] < values[1] and all(math.isfinite(v) for v in values)):
        raise InputError(f"--thresholds {spec!r}: need 0 < A < B")
    return "custom", (values[0], values[1])


def tertile_thresholds(box_areas: np.ndarray) -> Tuple[float, float]:
    """Areas splitting ``box_areas`` into three equally populated thirds.

    Boxes with ``area < low`` are small, ``low <= area < high`` medium, the rest large; the
    thresholds are the 1/3 and 2/3 quantiles (linear interpolation, numpy's default).
    """
    areas = np.sort(np.asarray(box_areas, dtype=np.float64))
    low, high = np.quantile(areas, [1.0 / 3.0, 2.0 / 3.0])
    return float(low), float(high)


def area_category(areas: np.ndarray, thresholds: Tuple[float, float]) -> np.ndarray:
    """COCO convention: small ``area < t1``, medium ``t1 <= area < t2``, large ``area >= t2``."""
    areas = np.asarray(areas, dtype=np.float64)
    return np.where(areas < thresholds[0], SMALL, np.where(areas < thresholds[1], MEDIUM, LARGE)).astype(np.int64)


def unit_categories(
    frame: FrameMap,
    output_hw: Tuple[int, int],
    image_wh: Tuple[int, int],
    boxes: np.ndarray,
    ignore: np.ndarray,
    thresholds: Tuple[float, float],
) -> np.ndarray:
    """Category code [Ho, Wo] of every unit of a map whose cells sit at ``frame`` (original-image pixels).

    A unit's centre ``(x, y)`` is inside a box when ``x1 <= x <= x2`` and ``y1 <= y <= y2``
    (boundaries inclusive: a unit on a box edge belongs to the box). Then:

    - inside at least one non-ignored box: the SMALLEST such box (by area) decides small /
      medium / large, whatever larger or ignored boxes also contain the unit (nested boxes:
      the inner object wins);
    - else inside an ignored (crowd / difficult) box: :data:`IGNORED`, counted nowhere;
    - else, centre inside the image (``0 <= x <= W``, ``0 <= y <= H``): background;
    - else :data:`OUTSIDE` (a border unit whose centre lies beyond the image), counted nowhere.
    """
    out_h, out_w = output_hw
    xs, ys = frame.to_image(np.arange(out_w, dtype=np.float64), np.arange(out_h, dtype=np.float64))
    width, height = image_wh
    inside_image = ((ys >= 0) & (ys <= height))[:, None] & ((xs >= 0) & (xs <= width))[None, :]
    codes = np.where(inside_image, BACKGROUND, OUTSIDE).astype(np.int64)
    if len(boxes) == 0:
        return codes
    boxes = np.asarray(boxes, dtype=np.float64)
    ignore = np.asarray(ignore, dtype=bool)
    in_x = (boxes[:, 0:1] <= xs[None, :]) & (xs[None, :] <= boxes[:, 2:3])  # [N, Wo]
    in_y = (boxes[:, 1:2] <= ys[None, :]) & (ys[None, :] <= boxes[:, 3:4])  # [N, Ho]
    inside = in_y[:, :, None] & in_x[:, None, :]  # [N, Ho, Wo]
    if ignore.any():
        codes[inside[ignore].any(axis=0)] = IGNORED
    kept = ~ignore
    if kept.any():
        areas = (boxes[kept, 2] - boxes[kept, 0]) * (boxes[kept, 3] - boxes[kept, 1])
        order = np.argsort(areas, kind="stable")  # smallest first
        inside_kept = inside[kept][order]
        hit = inside_kept.any(axis=0)
        smallest = inside_kept.argmax(axis=0)  # first True = smallest containing box
        box_codes = area_category(areas[order], thresholds)
        codes[hit] = box_codes[smallest[hit]]
    return codes


# --------------------------------------------------------------------------------------------
# Streaming statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogBins:
    """Fixed log-spaced histogram bins: bin 0 holds values below ``low`` (including 0), bin
    ``1 + floor(log(v / low) / log(ratio))`` the rest, the last bin everything from ``high``."""

    low: float = 1e-3
    high: float = 1e5
    ratio: float = 1.001

    @property
    def count(self) -> int:
        return int(math.ceil(math.log(self.high / self.low) / math.log(self.ratio))) + 2

    def index(self, values: torch.Tensor) -> torch.Tensor:
        scaled = torch.log(values.clamp_min(self.low * 0.5) / self.low) / math.log(self.ratio)
        index = torch.floor(scaled).to(torch.long) + 1
        index = torch.where(values < self.low, torch.zeros_like(index), index)
        return index.clamp(0, self.count - 1)

    def lower_edge(self, index: int) -> float:
        return 0.0 if index == 0 else self.low * self.ratio ** (index - 1)

    def upper_edge(self, index: int) -> float:
        return self.low if index == 0 else self.low * self.ratio**index

    def as_dict(self) -> Dict[str, float]:
        return {"low": self.low, "high": self.high, "ratio": self.ratio, "bins": self.count}


#: The histogram every statistic uses: 0.1 % relative bin width from 1e-3 to 1e5 (cells or pixels).
BINS = LogBins()


class CategoryStats:
    """Mergeable statistics of one layer's dilation values, one slot per category.

    Float state is float64; ``count`` and ``hist`` are exact integers. ``update`` accepts a
    batch of values with their category codes (negative codes are skipped).
    """

    def __init__(self, categories: int = len(CATEGORIES), bins: LogBins = BINS, device: torch.device | str = "cpu") -> None:
        self.bins = bins
        self.count = torch.zeros(categories, dtype=torch.int64, device=device)
        self.mean = torch.zeros(categories, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(categories, dtype=torch.float64, device=device)
        self.minimum = torch.full((categories,), math.inf, dtype=torch.float64, device=device)
        self.maximum = torch.full((categories,), -math.inf, dtype=torch.float64, device=device)
        self.hist = torch.zeros(categories, bins.count, dtype=torch.int64, device=device)

    @property
    def categories(self) -> int:
        return int(self.count.shape[0])

    def update(self, values: torch.Tensor, codes: torch.Tensor) -> None:
        """Add ``values`` (any shape) whose categories are ``codes`` (same shape)."""
        values = values.reshape(-1).to(self.mean.device, torch.float64)
        codes = codes.reshape(-1).to(self.mean.device, torch.long)
        keep = codes >= 0
        if not bool(keep.all()):
            values, codes = values[keep], codes[keep]
        if values.numel() == 0:
            return
        slots = self.categories
        count = torch.bincount(codes, minlength=slots)
        mean = torch.bincount(codes, weights=values, minlength=slots) / count.clamp_min(1).to(torch.float64)
        # Two passes inside the batch (mean first, then squared deviations), then Chan's merge.
        m2 = torch.bincount(codes, weights=(values - mean[codes]) ** 2, minlength=slots)
        self._merge_moments(count, mean, m2)
        self.minimum.scatter_reduce_(0, codes, values, reduce="amin")
        self.maximum.scatter_reduce_(0, codes, values, reduce="amax")
        flat = codes * self.bins.count + self.bins.index(values)
        self.hist.view(-1).index_add_(0, flat, torch.ones_like(flat))

    def _merge_moments(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Chan et al. (1979): combine (count, mean, M2) of two data sets exactly."""
        n_a = self.count.to(torch.float64)
        n_b = count.to(self.mean.device, torch.float64)
        total = n_a + n_b
        safe = total.clamp_min(1.0)
        delta = mean.to(self.mean.device) - self.mean
        self.mean = torch.where(total > 0, self.mean + delta * n_b / safe, self.mean)
        self.m2 = self.m2 + m2.to(self.mean.device) + delta**2 * n_a * n_b / safe
        self.count = self.count + count.to(self.count.device)

    def merge_(self, other: "CategoryStats") -> "CategoryStats":
        """In place: this state becomes the state of both data sets (Chan et al. 1979)."""
        self._merge_moments(other.count, other.mean, other.m2)
        self.minimum = torch.minimum(self.minimum, other.minimum.to(self.mean.device))
        self.maximum = torch.maximum(self.maximum, other.maximum.to(self.mean.device))
        self.hist = self.hist + other.hist.to(self.hist.device)
        return self

    def std(self) -> torch.Tensor:
        """Population standard deviation (ddof = 0) per category; NaN where empty."""
        out = torch.sqrt(self.m2 / self.count.to(torch.float64))
        return torch.where(self.count > 0, out, torch.full_like(out, math.nan))

    def quantile(self, category: int, q: float) -> float:
        """The ``q`` quantile of one category from its histogram.

        numpy's linear definition: interpolate between order statistics ``floor(r)`` and
        ``floor(r) + 1`` for rank ``r = q*(n-1)``. Each order statistic is estimated inside its
        histogram bin (values spread evenly on a log scale), so it is off by less than one bin
        (0.1 %); results are clamped to the exact minimum and maximum, so constant data give
        their value exactly.
        """
        n = int(self.count[category])
        if n == 0:
            return math.nan
        hist = self.hist[category].cpu().numpy()
        cumulative = np.cumsum(hist)
        rank = q * (n - 1)
        below = math.floor(rank)
        value = self._order_statistic(hist, cumulative, below)
        if rank > below:
            value += (rank - below) * (self._order_statistic(hist, cumulative, below + 1) - value)
        lowest, highest = float(self.minimum[category]), float(self.maximum[category])
        return float(min(max(value, lowest), highest))

    def _order_statistic(self, hist: np.ndarray, cumulative: np.ndarray, k: int) -> float:
        """Estimate of the k-th smallest value (0-based) from the histogram."""
        index = int(np.searchsorted(cumulative, k, side="right"))
        before = int(cumulative[index - 1]) if index > 0 else 0
        fraction = (k - before + 0.5) / int(hist[index])
        low, high = self.bins.lower_edge(index), self.bins.upper_edge(index)
        if index == 0:
            return low + (high - low) * fraction
        if index == self.bins.count - 1:
            return low  # overflow bin: only its lower edge is known (then clamped to the maximum)
        return low * (high / low) ** fraction

    def state(self) -> Dict[str, np.ndarray]:
        """CPU copy of the state (for torch.distributed gathering and pickling)."""
        return {
            "count": self.count.cpu().numpy(),
            "mean": self.mean.cpu().numpy(),
            "m2": self.m2.cpu().numpy(),
            "minimum": self.minimum.cpu().numpy(),
            "maximum": self.maximum.cpu().numpy(),
            "hist": self.hist.cpu().numpy(),
        }

    @staticmethod
    def from_state(state: Dict[str, np.ndarray], bins: LogBins = BINS) -> "CategoryStats":
        stats = CategoryStats(len(state["count"]), bins)
        stats.count = torch.as_tensor(state["count"], dtype=torch.int64).clone()
        stats.mean = torch.as_tensor(state["mean"], dtype=torch.float64).clone()
        stats.m2 = torch.as_tensor(state["m2"], dtype=torch.float64).clone()
        stats.minimum = torch.as_tensor(state["minimum"], dtype=torch.float64).clone()
        stats.maximum = torch.as_tensor(state["maximum"], dtype=torch.float64).clone()
        stats.hist = torch.as_tensor(state["hist"], dtype=torch.int64).clone()
        return stats

    def to(self, device: torch.device | str) -> "CategoryStats":
        return CategoryStats.from_state(self.state(), self.bins) if str(device) == "cpu" else self._moved(device)

    def _moved(self, device: torch.device | str) -> "CategoryStats":
        stats = CategoryStats(self.categories, self.bins, device)
        stats.merge_(self)
        return stats

    def summary_rows(self) -> List[Dict[str, float]]:
        """Per category: count, mean, std, median, p10, p90."""
        std = self.std()
        rows = []
        for category in range(self.categories):
            n = int(self.count[category])
            rows.append(
                {
                    "count": n,
                    "mean": float(self.mean[category]) if n else math.nan,
                    "std": float(std[category]),
                    "median": self.quantile(category, 0.5),
                    "p10": self.quantile(category, 0.1),
                    "p90": self.quantile(category, 0.9),
                }
            )
        return rows


def merge_states(states: Sequence[Dict[str, CategoryStats]]) -> Dict[str, CategoryStats]:
    """Merge per-layer statistics of several shards, in the given order (layers keep first-seen order)."""
    merged: Dict[str, CategoryStats] = {}
    for shard in states:
        for name, stats in shard.items():
            if name not in merged:
                merged[name] = CategoryStats(stats.categories, stats.bins)
            merged[name].merge_(stats.to("cpu"))
    return merged
