"""Where multi-scale deformable attention looks, by object size: the attention analogue of the
paper's Table 2, streamed over a dataset (``dcn-inspect attention`` in its dataset mode).

Definitions (all positions in original-image pixels: a point's model-input position times the
resize scale ``(sx, sy)``):

* **spread** of one query in one head: the attention-weighted RMS distance of its sampling
  points from their reference point, ``sqrt(sum_p w_p |point_p - ref_p|^2 / sum_p w_p)``,
  over every point ``p`` of every level (``sum_p w_p`` is 1 for the op's softmax); a query's
  spread is the MEAN OVER HEADS. ``ref_p`` is the reference point the op used on point ``p``'s
  level (:meth:`~dcn_inspect.capture.attention_calls.AttentionRecord.references_in_input`; a
  4-d reference box: its centre), or, when the module passed no reference points, the query's
  own point (an encoder token's cell centre). Pixels: ``spread_px``; divided by the size of the
  query's object, ``sqrt(box area)`` of the box that decides its category: ``spread_rel``
  (none for background);
* **level share** (encoder): the fraction of a query's attention weight, summed over heads,
  that falls on each feature level: ``sum_{h, p on level l} w / sum_{h, p} w``;
* **inside box** (decoder): the fraction of a matched query's attention weight whose sampling
  point lies inside (edges inclusive) its matched ground-truth box.

Queries:

* encoder: every token of the FINEST level (the level with the most cells) of every encoder
  call; a token's point is its cell centre; its category is what ``dilation-stats`` gives a
  unit there (:func:`~dcn_inspect.analysis.size_categories.unit_categories`: the smallest
  non-ignored box containing it decides small / medium / large by area, else background;
  crowd / difficult-only and off-image tokens count nowhere);
* decoder: object queries MATCHED to ground truth (:func:`match_queries`): queries in order of
  the model's class score, each takes the unmatched non-ignored box of highest IoU with its
  predicted box if that IoU is at least 0.5 (one query per box); the category is the matched
  box's size; the predictions are the model's final ones, used for every decoder layer.

:class:`AttentionAccumulator` folds each image's values into one mergeable
:class:`~dcn_inspect.analysis.category_stats.CategoryStats` per row (kind, layer, measure,
feature level) and keeps every image's per-category sums and counts for the bootstrap
intervals over images (:func:`~dcn_inspect.analysis.dilation_tables.bootstrap_intervals`);
:meth:`AttentionAccumulator.merge` combines ranks exactly. :func:`table_frame` and
:func:`differences_frame` give ``attention_table.csv`` (:data:`TABLE_CSV`) and
``attention_differences.csv`` (:data:`DIFFERENCES_CSV`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from dcn_inspect.analysis.attention import DecoderPredictions, finest_level
from dcn_inspect.analysis.category_stats import BINS, CategoryStats
from dcn_inspect.analysis.dilation_tables import DIFFERENCES, Intervals
from dcn_inspect.analysis.size_categories import (
    CATEGORIES,
    IGNORED,
    OUTSIDE,
    area_category,
    unit_categories,
)
from dcn_inspect.capture.attention_calls import ENCODER, AttentionRecord
from dcn_inspect.core.columns import IMAGE_PIXELS, Column, names
from dcn_inspect.core.geometry import FrameMap, Pair

__all__ = [
    "DIFFERENCES_CSV",
    "MATCH_IOU",
    "TABLE_CSV",
    "AttentionAccumulator",
    "QueryValues",
    "decoder_values",
    "differences_frame",
    "encoder_values",
    "finest_tokens",
    "match_queries",
    "table_frame",
]

#: A decoder query matches a ground-truth box when their IoU is at least this.
MATCH_IOU = 0.5

SPREAD_PX, SPREAD_REL, LEVEL_SHARE, INSIDE_BOX = "spread_px", "spread_rel", "level_share", "inside"
#: Measures in table order, with their unit.
MEASURES: Dict[str, str] = {
    SPREAD_PX: IMAGE_PIXELS,
    SPREAD_REL: "object sizes (sqrt of the box area)",
    LEVEL_SHARE: "fraction of the attention weight",
    INSIDE_BOX: "fraction of the attention weight",
}
#: A row: (kind, layer, measure, feature level or -1).
RowKey = Tuple[str, str, str, int]

_MEASURE = Column(
    "measure",
    "spread_px: attention-weighted RMS distance of the sampling points from their reference, "
    "mean over heads; spread_rel: spread_px / sqrt(area of the query's box); level_share "
    "(encoder): share of the weight on `feature_level`; inside (decoder): share of the weight "
    "inside the matched box",
)
_LEAD = (
    Column("kind", "encoder (finest-level tokens) or decoder (queries matched to a box)"),
    Column("layer", "the attention module that made the call (`#k`: its k-th call), call order"),
    _MEASURE,
    Column("feature_level", "the level of a level_share row (0 = the call's first); else empty"),
)
_VALUE_UNIT = "the `units` column"

#: ``attention_table.csv``: one row per (kind, layer, measure, level) x category.
TABLE_CSV: Tuple[Column, ...] = (
    *_LEAD,
    Column(
        "category",
        "small / medium / large by area of the box deciding the query (encoder: the smallest "
        "box containing the token centre; decoder: the matched box), or background (encoder)",
    ),
    Column("count", "queries in the category, over all images"),
    Column("mean", "mean of the measure over the queries", _VALUE_UNIT),
    Column("std", "population standard deviation (ddof = 0)", _VALUE_UNIT),
    Column("median", "median, from fixed 0.1 %-wide log bins clamped to the exact min/max"),
    Column("p10", "10th percentile (same histogram)", _VALUE_UNIT),
    Column("p90", "90th percentile (same histogram)", _VALUE_UNIT),
    Column("units", "unit of the values"),
    Column(
        "ci_low",
        "lower end of the 95 % interval of the mean (percentile bootstrap over images, seeded)",
        _VALUE_UNIT,
    ),
    Column("ci_high", "upper end of the 95 % interval of the mean", _VALUE_UNIT),
)
#: ``attention_differences.csv``: one row per (kind, layer, measure, level) x difference.
DIFFERENCES_CSV: Tuple[Column, ...] = (
    *_LEAD,
    Column("category_a", "the category whose mean is the minuend"),
    Column("category_b", "the category whose mean is subtracted"),
    Column("difference", "mean of category_a - mean of category_b", _VALUE_UNIT),
    Column(
        "ci_low",
        "lower end of the 95 % interval of the difference (the means' bootstrap resamples)",
        _VALUE_UNIT,
    ),
    Column("ci_high", "upper end of the 95 % interval of the difference", _VALUE_UNIT),
    Column("units", "unit of the values"),
)


# --------------------------------------------------------------------------------------------
# Per-image measures


@dataclass
class QueryValues:
    """One call's measured queries of one image: category codes [N] (negative: counted
    nowhere) and per measure the values [N] (NaN: not defined for that query); ``level_share``
    is [N, levels]."""

    codes: np.ndarray
    spread_px: np.ndarray
    spread_rel: np.ndarray
    level_share: Optional[np.ndarray] = None
    inside: Optional[np.ndarray] = None


def finest_tokens(shapes: Sequence[Pair], frames: Sequence[FrameMap] = ()) -> List[int]:
    """The token indices of the finest level (a ``keep_tokens`` choice of the capture)."""
    level = finest_level(shapes)
    start = sum(h * w for h, w in shapes[:level])
    return list(range(start, start + shapes[level][0] * shapes[level][1]))


def on_cpu(record: AttentionRecord) -> AttentionRecord:
    """The record with its tensors on the CPU (a capture on a GPU keeps them there)."""
    reference = record.reference_points
    return replace(
        record,
        locations=record.locations.cpu(),
        weights=record.weights.cpu(),
        queries=record.queries.cpu(),
        reference_points=None if reference is None else reference.cpu(),
    )


def _spread(
    record: AttentionRecord,
    rows: np.ndarray,
    scale: Tuple[float, float],
    own_points: Optional[Tuple[np.ndarray, np.ndarray]] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(spread_px [N], weights [N, H, P], x [N, H, P], y [N, H, P]) of the kept queries at
    ``rows`` (batch element 0), original-image pixels; the references are the op's, else
    ``own_points`` (x [N], y [N])."""
    sx, sy = scale
    xs, ys = record.points_in_input()
    x = xs[0, rows].numpy() * sx
    y = ys[0, rows].numpy() * sy
    weights = record.weights[0, rows].double().numpy()
    refs = record.references_in_input()
    if refs is not None:
        ref_x = refs[0][0, rows].numpy()[:, None, :] * sx  # [N, 1, P]
        ref_y = refs[1][0, rows].numpy()[:, None, :] * sy
    elif own_points is not None:
        ref_x, ref_y = own_points[0][:, None, None], own_points[1][:, None, None]
    else:
        return np.full(len(rows), math.nan), weights, x, y
    squared = (x - ref_x) ** 2 + (y - ref_y) ** 2
    total = weights.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_head = np.sqrt((weights * squared).sum(-1) / total)  # [N, H]
    return per_head.mean(-1), weights, x, y


def containing_box_sizes(
    xs: np.ndarray, ys: np.ndarray, boxes: np.ndarray, ignore: np.ndarray
) -> np.ndarray:
    """sqrt(area) [len(ys), len(xs)] of the smallest non-ignored box containing each grid point
    (edges inclusive, as :func:`unit_categories`), NaN where none does."""
    size = np.full((len(ys), len(xs)), math.inf)
    for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[~np.asarray(ignore, bool)]:
        area = (box[2] - box[0]) * (box[3] - box[1])
        inside = ((ys >= box[1]) & (ys <= box[3]))[:, None] & ((xs >= box[0]) & (xs <= box[2]))
        size = np.where(inside, np.minimum(size, area), size)
    return np.where(np.isfinite(size), np.sqrt(size), math.nan)


def encoder_values(
    record: AttentionRecord,
    scale: Tuple[float, float],
    image_wh: Tuple[int, int],
    boxes: np.ndarray,
    ignore: np.ndarray,
    thresholds: Tuple[float, float],
) -> QueryValues:
    """The finest-level tokens kept in an encoder ``record``: category, spread and level shares."""
    record = on_cpu(record)
    level = finest_level(record.spatial_shapes)
    height, width = record.spatial_shapes[level]
    start = record.level_start[level]
    kept = {int(q): i for i, q in enumerate(record.queries.tolist())}
    rows = np.asarray([kept[t] for t in range(start, start + height * width) if t in kept])
    tokens = record.queries.numpy()[rows] - start
    frame = record.level_frames[level].scaled(*scale)
    codes = unit_categories(frame, (height, width), image_wh, boxes, ignore, thresholds)
    xs, ys = frame.to_image(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    sizes = containing_box_sizes(xs, ys, boxes, ignore).reshape(-1)[tokens]
    own = (xs[tokens % width], ys[tokens // width])
    spread, weights, _, _ = _spread(record, rows, scale, own)
    levels = np.asarray(record.point_level)
    per_level = np.stack(
        [weights[..., levels == lv].sum((-1, -2)) for lv in range(record.levels)], -1
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        share = per_level / per_level.sum(-1, keepdims=True)
    return QueryValues(codes.reshape(-1)[tokens], spread, spread / sizes, level_share=share)


def _iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """IoU [len(first), len(second)] of x0, y0, x1, y1 boxes."""
    x0 = np.maximum(first[:, None, 0], second[None, :, 0])
    y0 = np.maximum(first[:, None, 1], second[None, :, 1])
    x1 = np.minimum(first[:, None, 2], second[None, :, 2])
    y1 = np.minimum(first[:, None, 3], second[None, :, 3])
    overlap = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (first[:, 2] - first[:, 0]) * (first[:, 3] - first[:, 1])
    area_b = (second[:, 2] - second[:, 0]) * (second[:, 3] - second[:, 1])
    union = area_a[:, None] + area_b[None, :] - overlap
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, overlap / union, 0.0)


def match_queries(
    predictions: DecoderPredictions,
    boxes: np.ndarray,
    ignore: np.ndarray,
    min_iou: float = MATCH_IOU,
) -> List[Tuple[int, int]]:
    """(query, box index) pairs: queries by descending score (ties: lower index first), each
    taking the unmatched non-ignored box of highest IoU (ties: lower index) if it is at least
    ``min_iou``; one query per box."""
    if predictions.boxes is None or len(boxes) == 0:
        return []
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    iou = _iou(np.asarray(predictions.boxes, dtype=np.float64), boxes)
    iou[:, np.asarray(ignore, dtype=bool)] = -1.0
    order = sorted(range(len(predictions.scores)), key=lambda q: (-float(predictions.scores[q]), q))
    taken = np.zeros(len(boxes), dtype=bool)
    pairs = []
    for query in order:
        candidates = np.where(taken, -1.0, iou[query])
        best = int(np.argmax(candidates))
        if candidates[best] >= min_iou:
            taken[best] = True
            pairs.append((query, best))
        if taken.all():
            break
    return pairs


def decoder_values(
    record: AttentionRecord,
    pairs: Sequence[Tuple[int, int]],
    scale: Tuple[float, float],
    boxes: np.ndarray,
    thresholds: Tuple[float, float],
) -> QueryValues:
    """The matched queries of a decoder ``record`` (``pairs``: (query, box index)): category of
    the matched box, spread and the share of the weight inside that box."""
    record = on_cpu(record)
    kept = {int(q): i for i, q in enumerate(record.queries.tolist())}
    pairs = [(q, b) for q, b in pairs if q in kept]
    rows = np.asarray([kept[q] for q, _ in pairs], dtype=np.int64)
    matched = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[[b for _, b in pairs]]
    areas = (matched[:, 2] - matched[:, 0]) * (matched[:, 3] - matched[:, 1])
    if not len(rows):
        empty = np.zeros(0)
        return QueryValues(np.zeros(0, np.int64), empty, empty, inside=empty)
    spread, weights, x, y = _spread(record, rows, scale)
    box = matched[:, :, None, None]
    inside = (x >= box[:, 0]) & (x <= box[:, 2]) & (y >= box[:, 1]) & (y <= box[:, 3])
    share = (weights * inside).sum((-1, -2)) / weights.sum((-1, -2))
    return QueryValues(
        area_category(areas, thresholds), spread, spread / np.sqrt(areas), inside=share
    )


# --------------------------------------------------------------------------------------------
# Streaming statistics


class AttentionAccumulator:
    """Per row (kind, layer, measure, feature level): a :class:`CategoryStats` and every image's
    per-category sums and counts (the bootstrap's input); rows in first-seen order."""

    def __init__(self) -> None:
        self.stats: Dict[RowKey, CategoryStats] = {}
        self.image_sums: Dict[RowKey, List[Tuple[int, np.ndarray, np.ndarray]]] = {}
        self.layers: Dict[str, Dict[str, Any]] = {}  # call order: the record's summary
        self.not_counted: Dict[str, List[int]] = {}  # encoder layer -> [ignored, outside]
        self.matched: Dict[str, int] = {"queries": 0, "boxes": 0}  # decoder: matched / boxes

    def add_values(self, kind: str, layer: str, index: int, values: QueryValues) -> None:
        """One call's queries of image ``index``."""
        counted = values.codes >= 0
        codes = values.codes[counted]
        measures: List[Tuple[str, int, np.ndarray]] = [
            (SPREAD_PX, -1, values.spread_px[counted]),
            (SPREAD_REL, -1, values.spread_rel[counted]),
        ]
        if values.level_share is not None:
            share = values.level_share[counted]
            measures += [(LEVEL_SHARE, lv, share[:, lv]) for lv in range(share.shape[1])]
        if values.inside is not None:
            measures.append((INSIDE_BOX, -1, values.inside[counted]))
        for measure, level, data in measures:
            self._add((kind, layer, measure, level), index, data, codes)
        if kind == ENCODER:
            tally = self.not_counted.setdefault(layer, [0, 0])
            tally[0] += int((values.codes == IGNORED).sum())
            tally[1] += int((values.codes == OUTSIDE).sum())

    def _add(self, key: RowKey, index: int, data: np.ndarray, codes: np.ndarray) -> None:
        finite = np.isfinite(data)
        data, codes = data[finite], codes[finite]
        stats = self.stats.setdefault(key, CategoryStats(len(CATEGORIES), BINS))
        stats.update(torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(codes))
        sums = np.bincount(codes, weights=data, minlength=len(CATEGORIES)).astype(np.float64)
        counts = np.bincount(codes, minlength=len(CATEGORIES)).astype(np.float64)
        self.image_sums.setdefault(key, []).append((index, sums, counts))

    def state(self) -> Dict[str, Any]:
        """A picklable copy (for gathering across ranks)."""
        return {
            "stats": {key: stats.state() for key, stats in self.stats.items()},
            "image_sums": self.image_sums,
            "layers": self.layers,
            "not_counted": self.not_counted,
            "matched": self.matched,
        }

    def merge(self, state: Dict[str, Any]) -> "AttentionAccumulator":
        """In place: add another accumulator's :meth:`state` (exactly, Chan et al.)."""
        for name, info in state["layers"].items():
            self.layers.setdefault(name, info)
        for key, stats in state["stats"].items():
            mine = self.stats.setdefault(key, CategoryStats(len(CATEGORIES), BINS))
            mine.merge_(CategoryStats.from_state(stats, BINS))
        for key, rows in state["image_sums"].items():
            self.image_sums.setdefault(key, []).extend(rows)
        for layer, (ignored, outside) in state["not_counted"].items():
            tally = self.not_counted.setdefault(layer, [0, 0])
            tally[0] += ignored
            tally[1] += outside
        for name, count in state["matched"].items():
            self.matched[name] = self.matched.get(name, 0) + count
        return self

    def ordered(self) -> List[RowKey]:
        """Rows: encoder then decoder, layers in call order, measures in table order, levels
        ascending."""
        calls = list(self.layers)
        measures = list(MEASURES)

        def rank(key: RowKey) -> Tuple[int, int, int, int]:
            layer = calls.index(key[1]) if key[1] in calls else len(calls)
            return (key[0] != ENCODER, layer, measures.index(key[2]), key[3])

        return sorted(self.stats, key=rank)


# --------------------------------------------------------------------------------------------
# Tables


def _lead(key: RowKey) -> Dict[str, Any]:
    kind, layer, measure, level = key
    return {
        "kind": kind,
        "layer": layer,
        "measure": measure,
        "feature_level": level if level >= 0 else None,
    }


def table_frame(
    accumulator: AttentionAccumulator, intervals: Dict[RowKey, Intervals]
) -> pd.DataFrame:
    """``attention_table.csv``: every row x category, with the bootstrap intervals."""
    rows = []
    for key in accumulator.ordered():
        bounds = intervals[key].means if key in intervals else np.full((len(CATEGORIES), 2), np.nan)
        for k, values in enumerate(accumulator.stats[key].summary_rows()):
            rows.append(
                {
                    **_lead(key),
                    "category": CATEGORIES[k],
                    **values,
                    "units": MEASURES[key[2]],
                    "ci_low": float(bounds[k, 0]),
                    "ci_high": float(bounds[k, 1]),
                }
            )
    frame = pd.DataFrame(rows, columns=names(TABLE_CSV))
    frame["feature_level"] = frame["feature_level"].astype("Int64")
    return frame


def differences_frame(
    accumulator: AttentionAccumulator, intervals: Dict[RowKey, Intervals]
) -> pd.DataFrame:
    """``attention_differences.csv``: every row x :data:`DIFFERENCES` with its interval (NaN
    where a category has no query: decoder rows have no background)."""
    index = {name: i for i, name in enumerate(CATEGORIES)}
    rows = []
    for key in accumulator.ordered():
        stats = accumulator.stats[key]
        counts, means = stats.count.numpy(), stats.mean.numpy()
        for first, second in DIFFERENCES:
            a, b = index[first], index[second]
            value = float(means[a] - means[b]) if counts[a] and counts[b] else math.nan
            low, high = intervals[key].differences[(a, b)] if key in intervals else (np.nan,) * 2
            rows.append(
                {
                    **_lead(key),
                    "category_a": first,
                    "category_b": second,
                    "difference": value,
                    "ci_low": low,
                    "ci_high": high,
                    "units": MEASURES[key[2]],
                }
            )
    frame = pd.DataFrame(rows, columns=names(DIFFERENCES_CSV))
    frame["feature_level"] = frame["feature_level"].astype("Int64")
    return frame


#: What the rows' queries and measures are (``summary.json``, ``attention_table.md``).
DEFINITIONS: Dict[str, str] = {
    "encoder queries": "every token of the finest feature level of each encoder call; its point "
    "is its cell centre, its category that of a dilation-stats unit there (the smallest "
    "non-ignored box containing it by area, else background)",
    "decoder queries": "object queries matched to a non-ignored ground-truth box: queries by "
    f"descending class score, each taking the unmatched box of highest IoU >= {MATCH_IOU} with "
    "its predicted box; category: the matched box's size; the final predictions for every layer",
    SPREAD_PX: "per head sqrt(sum_p w_p |point_p - ref_p|^2 / sum_p w_p) over every point of every "
    "level (ref_p: the op's reference point on p's level, a box's centre; without one the "
    "query's own point), mean over heads, original-image pixels",
    SPREAD_REL: "spread_px / sqrt(area) of the query's box (encoder: the smallest box containing "
    "the token; decoder: the matched box); none for background",
    LEVEL_SHARE: "encoder: the share of the query's attention weight (all heads) on each level",
    INSIDE_BOX: "decoder: the share of the query's attention weight (all heads) whose sampling "
    "point lies inside its matched box (edges inclusive)",
}
