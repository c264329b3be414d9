"""Mergeable statistics of values grouped in categories, and bootstrap intervals over images.

:class:`CategoryStats` keeps, per category, the count, Welford mean and sum of squared
deviations (merged exactly with Chan et al.'s pairwise formula), minimum, maximum and a fixed
log-spaced histogram (:data:`BINS`) for the median and percentiles. Two states merge into the
state of the concatenated data, so shards, batches and ranks can be combined in any grouping.

:func:`bootstrap_means` gives percentile intervals of category means (and of differences of
them) resampling whole images: units of one image are correlated (neighbouring units share
most of their input), so the image, not the unit, is the independent sample. It works on
per-image sums and counts, which is all a streaming run needs to keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch


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
        # Values below ``low`` have log(v / low) < 0, so floor(...) + 1 <= 0 and the clamp puts
        # them in bin 0 (the clamp_min only keeps log away from 0 and negatives). A value within
        # rounding of an edge may land in the neighbouring bin: well inside the 0.1 % the
        # percentiles promise.
        scaled = torch.log(values.clamp_min(self.low * 0.5).div_(self.low)).div_(
            math.log(self.ratio)
        )
        return scaled.floor_().add_(1).clamp_(0, self.count - 1).to(torch.long)

    def lower_edge(self, index: int) -> float:
        return 0.0 if index == 0 else self.low * self.ratio ** (index - 1)

    def upper_edge(self, index: int) -> float:
        return self.low if index == 0 else self.low * self.ratio**index

    def as_dict(self) -> Dict[str, float]:
        return {"low": self.low, "high": self.high, "ratio": self.ratio, "bins": self.count}


_ONES: Dict[str, torch.Tensor] = {}


def _ones(count: int, device: torch.device) -> torch.Tensor:
    """``count`` int64 ones on ``device`` (a view of one cached tensor, grown as needed)."""
    key = str(device)
    cached = _ONES.get(key)
    if cached is None or cached.numel() < count:
        cached = _ONES[key] = torch.ones(max(count, 1 << 16), dtype=torch.int64, device=device)
    return cached[:count]


#: The histogram every statistic uses: 0.1 % relative bin width from 1e-3 to 1e5 (cells or pixels).
BINS = LogBins()


def chan_merge(
    count_a: torch.Tensor,
    mean_a: torch.Tensor,
    m2_a: torch.Tensor,
    count_b: torch.Tensor,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al. (1979): (count, mean, M2) of two data sets combined exactly, elementwise
    (any shape; ``a``'s device)."""
    count_b = count_b.to(count_a.device)
    n_a = count_a.to(torch.float64)
    weight = count_b.to(torch.float64) / (n_a + count_b).clamp_min(
        1
    )  # n_b / (n_a + n_b); 0 when both are empty
    delta = mean_b.to(mean_a.device) - mean_a
    return (
        count_a + count_b,
        mean_a + delta * weight,
        m2_a + m2_b.to(mean_a.device) + delta * delta * n_a * weight,
    )


class CategoryStats:
    """Mergeable statistics of one stream of values, one slot per category (default 4: the
    small / medium / large / background of :mod:`dcn_inspect.analysis.dilation_stats`).

    Float state is float64; ``count`` and ``hist`` are exact integers. ``update`` accepts a
    batch of values with their category codes (negative codes are skipped).
    """

    def __init__(
        self, categories: int = 4, bins: LogBins = BINS, device: torch.device | str = "cpu"
    ) -> None:
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
        mean = torch.bincount(codes, weights=values, minlength=slots) / count.clamp_min(1).to(
            torch.float64
        )
        # Two passes inside the batch (mean first, then squared deviations), then Chan's merge.
        deviations = values - mean[codes]
        m2 = torch.bincount(codes, weights=deviations.mul_(deviations), minlength=slots)
        self._merge_moments(count, mean, m2)
        self.minimum.scatter_reduce_(0, codes, values, reduce="amin")
        self.maximum.scatter_reduce_(0, codes, values, reduce="amax")
        flat = self.bins.index(values).add_(codes * self.bins.count)
        self.hist.view(-1).index_add_(0, flat, _ones(flat.numel(), flat.device))

    def _merge_moments(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Chan et al. (1979): combine (count, mean, M2) of two data sets exactly."""
        self.count, self.mean, self.m2 = chan_merge(self.count, self.mean, self.m2, count, mean, m2)

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
        return (
            CategoryStats.from_state(self.state(), self.bins)
            if str(device) == "cpu"
            else self._moved(device)
        )

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


class CategoryStatsRows:
    """:class:`CategoryStats` of many rows (e.g. the layers of a model), updated together.

    State tensors carry a leading row dimension (``count`` [R, C], ``hist`` [R, C, bins], ...),
    so one batch of R rows of values costs a fixed number of tensor operations instead of R
    times as many. :meth:`row` gives a row as a :class:`CategoryStats`.
    """

    def __init__(
        self, categories: int = 4, bins: LogBins = BINS, device: torch.device | str = "cpu"
    ) -> None:
        self.bins = bins
        self.categories = categories
        self.device = torch.device(device)
        self.count = torch.zeros(0, categories, dtype=torch.int64, device=device)
        self.mean = torch.zeros(0, categories, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(0, categories, dtype=torch.float64, device=device)
        self.minimum = torch.zeros(0, categories, dtype=torch.float64, device=device)
        self.maximum = torch.zeros(0, categories, dtype=torch.float64, device=device)
        self.hist = torch.zeros(0, categories, bins.count, dtype=torch.int64, device=device)

    @property
    def rows(self) -> int:
        return int(self.count.shape[0])

    def add_rows(self, count: int) -> None:
        """Append ``count`` empty rows."""
        empty = CategoryStats(self.categories, self.bins, self.device)
        self.count = torch.cat([self.count, empty.count.expand(count, -1)])
        self.mean = torch.cat([self.mean, empty.mean.expand(count, -1)])
        self.m2 = torch.cat([self.m2, empty.m2.expand(count, -1)])
        self.minimum = torch.cat([self.minimum, empty.minimum.expand(count, -1)])
        self.maximum = torch.cat([self.maximum, empty.maximum.expand(count, -1)])
        self.hist = torch.cat([self.hist, empty.hist.expand(count, -1, -1)])

    def update(
        self,
        rows: Sequence[int],
        values: torch.Tensor,
        codes: torch.Tensor,
        count: torch.Tensor,
        total: torch.Tensor,
    ) -> None:
        """Add ``values`` [len(rows), N] (float64) to ``rows``: every row's N values have the
        categories ``codes`` [N] (long, all valid), ``count`` [C] values per category, and sum
        to ``total`` [len(rows), C] per category."""
        if values.shape[-1] == 0:
            return
        index = _row_index(rows, self.rows, self.device)
        local = (
            torch.arange(len(rows), device=self.device)[:, None] * self.categories + codes
        )  # [R_g, N] -> row-category slot
        mean = total / count.clamp_min(1).to(torch.float64)  # [R_g, C]
        deviations = values - mean.view(-1)[local]
        m2 = torch.bincount(
            local.view(-1),
            weights=deviations.mul_(deviations).view(-1),
            minlength=len(rows) * self.categories,
        )
        if isinstance(index, slice):  # the rows' slots in the state: shift the local ones
            slots = local if index.start == 0 else local + index.start * self.categories
        else:
            slots = index[:, None] * self.categories + codes
        if isinstance(index, slice):  # Chan's merge in place on the rows' views
            n_a = self.count[index].to(torch.float64)
            n_b = count.to(torch.float64)
            weight = n_b / (n_a + n_b).clamp_min_(1)  # n_b / (n_a + n_b); 0 when both are empty
            delta = mean - self.mean[index]
            self.mean[index] += delta * weight
            self.m2[index] += m2.view(len(rows), -1) + delta.mul_(delta).mul_(n_a).mul_(weight)
            self.count[index] += count
        else:
            merged = chan_merge(
                self.count[index],
                self.mean[index],
                self.m2[index],
                count.expand(len(rows), -1),
                mean,
                m2.view(len(rows), -1),
            )
            self.count[index], self.mean[index], self.m2[index] = merged
        flat_slots = slots.reshape(-1)
        flat_values = values.reshape(-1)
        self.minimum.view(-1).scatter_reduce_(0, flat_slots, flat_values, reduce="amin")
        self.maximum.view(-1).scatter_reduce_(0, flat_slots, flat_values, reduce="amax")
        flat = self.bins.index(flat_values).add_(flat_slots * self.bins.count)
        self.hist.view(-1).index_add_(0, flat, _ones(flat.numel(), flat.device))

    def row(self, index: int) -> CategoryStats:
        """Row ``index`` as a :class:`CategoryStats` (a copy, on CPU)."""
        return CategoryStats.from_state(
            {
                name: getattr(self, name)[index].cpu().numpy()
                for name in ("count", "mean", "m2", "minimum", "maximum", "hist")
            },
            self.bins,
        )


def _row_index(rows: Sequence[int], total: int, device: torch.device) -> Any:
    """A slice when ``rows`` are consecutive (views, no copies), else an index tensor."""
    first = rows[0]
    if list(rows) == list(range(first, first + len(rows))):
        return slice(first, first + len(rows))
    return torch.as_tensor(list(rows), dtype=torch.long, device=device)


def merge_states(states: Sequence[Dict[str, CategoryStats]]) -> Dict[str, CategoryStats]:
    """Merge per-layer statistics of several shards, in the given order (layers keep first-seen
    order)."""
    merged: Dict[str, CategoryStats] = {}
    for shard in states:
        for name, stats in shard.items():
            if name not in merged:
                merged[name] = CategoryStats(stats.categories, stats.bins)
            merged[name].merge_(stats.to("cpu"))
    return merged


#: Values gathered at once by :func:`bootstrap_means` (resamples x images x categories).
_BOOTSTRAP_ELEMENTS = 1 << 22


def bootstrap_means(
    sums: np.ndarray,
    counts: np.ndarray,
    pairs: Sequence[Tuple[int, int]] = (),
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Tuple[np.ndarray, Dict[Tuple[int, int], Tuple[float, float]]]:
    """Percentile bootstrap over images of category means and of their differences.

    ``sums`` and ``counts`` are [images, categories]: each image's sum and number of values per
    category. Every resample draws images with replacement (``numpy.random.default_rng(seed)``,
    so reruns are identical) and recomputes each category's mean over all values of the drawn
    images. Returns ``(intervals [categories, 2], {(a, b): interval of mean_a - mean_b})``;
    NaN where a category is empty in every resample.
    """
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    categories = sums.shape[1] if sums.ndim == 2 else 0
    nan_pair = (math.nan, math.nan)
    images = sums.shape[0]
    if images == 0:
        return np.full((categories, 2), math.nan), {pair: nan_pair for pair in pairs}
    rng = np.random.default_rng(seed)
    # Resamples in chunks (the same draws as one [resamples, images] call), so memory stays
    # bounded whatever the number of images.
    chunk = max(1, _BOOTSTRAP_ELEMENTS // max(1, images * categories))
    means = np.empty((resamples, categories))
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        draws = rng.integers(0, images, size=(size, images))
        with np.errstate(invalid="ignore", divide="ignore"):
            means[start : start + size] = sums[draws].sum(axis=1) / counts[draws].sum(
                axis=1
            )  # [size, categories]
    tail = 100.0 * (1.0 - level) / 2.0
    intervals = np.full((categories, 2), math.nan)
    for category in range(categories):
        finite = means[:, category][np.isfinite(means[:, category])]
        if finite.size:
            intervals[category] = np.percentile(finite, [tail, 100.0 - tail])
    differences: Dict[Tuple[int, int], Tuple[float, float]] = {}
    for first, second in pairs:
        diff = means[:, first] - means[:, second]
        diff = diff[np.isfinite(diff)]
        differences[(first, second)] = (
            tuple(float(v) for v in np.percentile(diff, [tail, 100.0 - tail]))
            if diff.size
            else nan_pair
        )  # type: ignore[assignment]
    return intervals, differences
