"""Where multi-scale deformable attention looked: the sampling points of chosen queries, in
original-image pixels (Deformable DETR, Zhu et al. 2021, Fig. 6).

Input: the :class:`~dcn_inspect.capture.attention_calls.AttentionRecord` s of one forward (batch
element 0) and, for decoder queries, the model's own predictions. Output: one row per sampling
point (:data:`ATTENTION_CSV`) and one :class:`QueryPanel` per (query, layer) for the figure.

Positions: point ``p`` of head ``h`` sampled normalised ``(x, y)`` on its level ``l``, the
continuous cell ``(x * W_l - 0.5, y * H_l - 0.5)`` of that level's padded map
(``grid_sample``, ``align_corners=False``; RT-DETRv2's ``discrete`` method: the cell it read),
mapped to model-input pixels through the level's frame and to the original image by the
resize scale (padding at the bottom / right changes nothing). Weights are the op's: a softmax
over every point of every level of one head, so a query's weights sum to the number of heads.

Queries:

* decoder (object queries): chosen by index, or the ``top`` N by the model's own class score,
  ``max_c sigmoid(logit_c)`` of its ``logits`` / ``pred_logits`` output (the sigmoid focal
  classification of the Deformable DETR family); each row carries the query's class, score
  and predicted box (``pred_boxes``: normalised cx, cy, w, h of the image, as the family's post
  processing reads them);
* encoder (tokens of the multi-level sequence): the token nearest to a chosen (x, y) on the
  finest level or a chosen one (:func:`nearest_tokens`: the cell whose centre is nearest, the
  rule of ``sample-points`` units).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from dcn_inspect.capture.attention_calls import DECODER, ENCODER, AttentionRecord
from dcn_inspect.core.columns import COORDINATE_DECIMALS, IMAGE_PIXELS, Column, position
from dcn_inspect.core.errors import InputError
from dcn_inspect.core.geometry import FrameMap, Pair

__all__ = [
    "ATTENTION_CSV",
    "DecoderPredictions",
    "QueryPanel",
    "attention_rows",
    "decoder_predictions",
    "decoder_queries",
    "encoder_points",
    "nearest_tokens",
    "query_panels",
    "top_queries",
]

#: When the decoder columns exist.
SCORED = "for decoder queries of a model whose output has class logits"
#: Columns of ``<stem>_attention.csv``, in order (``decoder``: with decoder queries scored).
ATTENTION_CSV: Tuple[Column, ...] = (
    Column(
        "query",
        "index in the call's query sequence: the object-query index (decoder) or the token "
        "index in the flattened multi-level sequence, finest level first (encoder)",
    ),
    Column("kind", "encoder (self-attention of the tokens) or decoder (object queries)"),
    Column("layer", "the attention module that made the call (`#k`: its k-th call)"),
    Column("head", "attention head, 0-based"),
    Column("feature_level", "feature level sampled, 0 = the first level of the call (finest)"),
    Column("point", "index of the sampling point within its head and level, 0-based"),
    position("x", "the sampling point, x"),
    position("y", "the sampling point, y"),
    Column(
        "weight",
        "the point's attention weight (softmax over all levels and points of its head)",
        "0..1",
    ),
    position("ref_x", "the query's reference point on this level (a box's centre), x"),
    position("ref_y", "the query's reference point on this level (a box's centre), y"),
    Column(
        "score",
        "the query's class score: max over classes of sigmoid(logit)",
        "0..1",
        only="decoder",
        only_when=SCORED,
    ),
    Column("class", "the query's highest-scoring class index", only="decoder", only_when=SCORED),
    Column(
        "class_name",
        "that class's name, as the model names it (`class_names`, or a transformers config's "
        "id2label; empty without names)",
        only="decoder",
        only_when=SCORED,
    ),
    *(
        Column(
            f"box_{corner}",
            f"the query's predicted box, {side}",
            IMAGE_PIXELS,
            COORDINATE_DECIMALS,
            only="decoder",
            only_when=SCORED,
        )
        for corner, side in (("x0", "left"), ("y0", "top"), ("x1", "right"), ("y1", "bottom"))
    ),
)


@dataclass(frozen=True)
class DecoderPredictions:
    """The model's own predictions per object query (batch element 0)."""

    scores: np.ndarray  # [Q] max over classes of sigmoid(logit)
    labels: np.ndarray  # [Q] int
    boxes: Optional[np.ndarray]  # [Q, 4] x0, y0, x1, y1 original-image pixels
    class_names: Optional[Dict[int, str]] = None

    def name_of(self, query: int) -> str:
        """The query's class name ("" without names)."""
        return (self.class_names or {}).get(int(self.labels[query]), "")


def model_class_names(model: Any) -> Optional[Dict[int, str]]:
    """Class index -> name, as the model gives them: a ``class_names`` sequence (dcn-inspect's
    models) or a transformers ``config.id2label``; None without either."""
    names = getattr(model, "class_names", None)
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return dict(enumerate(names))
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if isinstance(id2label, dict) and id2label:
        return {int(k): str(v) for k, v in id2label.items()}
    return None


def _field(output: Any, names: Sequence[str]) -> Optional[torch.Tensor]:
    for name in names:
        value = output.get(name) if isinstance(output, dict) else getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return None


def decoder_predictions(
    output: Any, original_hw: Pair, class_names: Optional[Dict[int, str]] = None
) -> Optional[DecoderPredictions]:
    """Scores, classes and boxes from a model output with ``logits`` / ``pred_logits`` (and
    ``pred_boxes``: normalised cx, cy, w, h); None when it has no class logits."""
    logits = _field(output, ("logits", "pred_logits"))
    if logits is None or logits.dim() != 3:
        return None
    probabilities = logits[0].detach().float().cpu().sigmoid()
    scores, labels = probabilities.max(dim=-1)
    boxes = _field(output, ("pred_boxes",))
    corners = None
    if boxes is not None and boxes.dim() == 3 and boxes.shape[:2] == logits.shape[:2]:
        cx, cy, w, h = boxes[0].detach().double().cpu().unbind(-1)
        height, width = original_hw
        corners = torch.stack(
            [
                (cx - w / 2) * width,
                (cy - h / 2) * height,
                (cx + w / 2) * width,
                (cy + h / 2) * height,
            ],
            dim=-1,
        ).numpy()
    return DecoderPredictions(scores.numpy(), labels.numpy().astype(np.int64), corners, class_names)


def top_queries(predictions: DecoderPredictions, top: int) -> List[int]:
    """The ``top`` object queries by score (ties: the lower index first)."""
    order = sorted(range(len(predictions.scores)), key=lambda q: (-float(predictions.scores[q]), q))
    return order[:top]


def decoder_queries(
    query: Sequence[int],
    top: int,
    predictions: Optional[DecoderPredictions],
    count: int,
    name: str,
) -> Tuple[List[int], str]:
    """The object queries to show and how they were chosen: ``query`` (indices, checked against
    the ``count`` queries of model ``name``), else the ``top`` by the model's class score."""
    if query:
        beyond = [q for q in query if q >= count]
        if beyond:
            raise InputError(
                f"{beyond[0]}: no such object query; {name} has {count} (0..{count - 1})",
                param="query",
            )
        return list(query), "by index"
    if predictions is None:
        raise InputError(
            f"{name}: the model's output carries no class logits (a logits or pred_logits "
            "field) to rank object queries by; pick them with `query`",
            param="model",
        )
    return top_queries(predictions, min(top, count)), f"top {top} by class score"


def encoder_points(
    at: Sequence[Tuple[float, float]],
    original_hw: Pair,
    scale_to_original: Tuple[float, float],
) -> List[Tuple[float, float]]:
    """The points whose nearest tokens are the encoder queries, in model-input pixels: ``at``
    (original-image pixels), or the image centre when there is none."""
    height, width = original_hw
    sx, sy = scale_to_original
    return [(x / sx, y / sy) for x, y in (at or ((width / 2.0, height / 2.0),))]


def finest_level(shapes: Sequence[Pair]) -> int:
    """The level with the most cells (the first of equals)."""
    return max(range(len(shapes)), key=lambda lv: (shapes[lv][0] * shapes[lv][1], -lv))


def nearest_tokens(
    points_input: Sequence[Tuple[float, float]],
    shapes: Sequence[Pair],
    frames: Sequence[FrameMap],
    level: Optional[int],
) -> List[int]:
    """The token index of the cell nearest to each (x, y) (model-input pixels) on ``level``
    (None: the finest), in the flattened multi-level sequence (levels in call order)."""
    chosen = finest_level(shapes) if level is None else level
    if not 0 <= chosen < len(shapes):
        raise InputError(
            f"{chosen}: no such feature level; the attention has {len(shapes)} "
            f"(0..{len(shapes) - 1})",
            param="feature_level",
        )
    start = sum(h * w for h, w in shapes[:chosen])
    height, width = shapes[chosen]
    tokens = []
    for x, y in points_input:
        col, row = frames[chosen].to_index(x, y)
        col = min(max(int(math.floor(col + 0.5)), 0), width - 1)
        row = min(max(int(math.floor(row + 0.5)), 0), height - 1)
        tokens.append(start + row * width + col)
    return tokens


@dataclass(frozen=True)
class QueryPanel:
    """One (query, layer) of the figure: the query's reference, box and sampling points."""

    query: int
    kind: str
    layer: str
    reference: Optional[Tuple[float, float]]  # original-image pixels
    box: Optional[Tuple[float, float, float, float]]  # x0, y0, x1, y1, original-image pixels
    label: str
    points: pd.DataFrame  # head, feature_level, point, x, y, weight


def _query_label(query: int, kind: str, predictions: Optional[DecoderPredictions]) -> str:
    if kind == ENCODER:
        return f"token {query}"
    if predictions is None:
        return f"query {query}"
    name = predictions.name_of(query) or f"class {int(predictions.labels[query])}"
    return f"query {query}: {name}, score {float(predictions.scores[query]):.2f}"


def attention_rows(
    record: AttentionRecord,
    queries: Sequence[int],
    scale_to_original: Tuple[float, float],
    predictions: Optional[DecoderPredictions] = None,
) -> pd.DataFrame:
    """One row per sampling point of the chosen ``queries`` (indices in the call's query
    sequence) of one call, columns :data:`ATTENTION_CSV` (the decoder ones with
    ``predictions``)."""
    sx, sy = scale_to_original
    kept = {int(q): i for i, q in enumerate(record.queries.tolist())}
    missing = [q for q in queries if q not in kept]
    if missing:
        raise InputError(
            f"{missing[0]}: not among the {record.query_count} queries of {record.name}",
            param="query",
        )
    xs, ys = record.points_in_input()
    refs = record.references_in_input()
    heads, points = record.heads, len(record.point_level)
    within = _index_within_level(record.point_level)
    frames = []
    for query in queries:
        i = kept[int(query)]
        x = xs[0, i].numpy() * sx  # [H, P]
        y = ys[0, i].numpy() * sy
        weight = record.weights[0, i].double().numpy()
        table: Dict[str, Any] = {
            "query": np.full(heads * points, int(query)),
            "kind": record.kind,
            "layer": record.name,
            "head": np.repeat(np.arange(heads), points),
            "feature_level": np.tile(np.asarray(record.point_level), heads),
            "point": np.tile(within, heads),
            "x": x.reshape(-1),
            "y": y.reshape(-1),
            "weight": weight.reshape(-1),
        }
        if refs is not None:
            table["ref_x"] = np.tile(refs[0][0, i].numpy() * sx, heads)
            table["ref_y"] = np.tile(refs[1][0, i].numpy() * sy, heads)
        else:
            table["ref_x"] = np.nan
            table["ref_y"] = np.nan
        if predictions is not None and record.kind == DECODER:
            table["score"] = float(predictions.scores[query])
            table["class"] = int(predictions.labels[query])
            table["class_name"] = predictions.name_of(query)
            box = predictions.boxes[query] if predictions.boxes is not None else [np.nan] * 4
            for name, value in zip(("box_x0", "box_y0", "box_x1", "box_y1"), box):
                table[name] = float(value)
        frames.append(pd.DataFrame(table))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _index_within_level(point_level: Sequence[int]) -> np.ndarray:
    counts: Dict[int, int] = {}
    index = []
    for level in point_level:
        index.append(counts.get(level, 0))
        counts[level] = counts.get(level, 0) + 1
    return np.asarray(index)


def token_centre(
    record: AttentionRecord, token: int, scale_to_original: Tuple[float, float]
) -> Tuple[float, float]:
    """The centre of an encoder token's cell, original-image pixels: the query's own point."""
    level, row, col = record.token_cell(token)
    x, y = record.level_frames[level].to_image(col, row)
    return float(x) * scale_to_original[0], float(y) * scale_to_original[1]


def query_panels(
    rows: pd.DataFrame,
    predictions: Optional[DecoderPredictions],
    query_points: Optional[Dict[int, Tuple[float, float]]] = None,
) -> List[QueryPanel]:
    """One panel per (query, layer) of ``rows`` (queries in row order, layers in call order):
    the reference is ``query_points[query]`` when given (an encoder query's own token centre),
    else the query's reference point on the first level, the box the query's predicted box."""
    panels = []
    for query in dict.fromkeys(rows["query"].tolist()):
        of_query = rows[rows["query"] == query]
        for layer in dict.fromkeys(of_query["layer"].tolist()):
            points = of_query[of_query["layer"] == layer]
            kind = str(points["kind"].iloc[0])
            first = points[points["feature_level"] == points["feature_level"].min()].iloc[0]
            reference = (
                query_points[int(query)]
                if query_points and int(query) in query_points
                else None
                if pd.isna(first["ref_x"])
                else (float(first["ref_x"]), float(first["ref_y"]))
            )
            box = None
            if kind == DECODER and "box_x0" in points and not pd.isna(first["box_x0"]):
                box = tuple(float(first[c]) for c in ("box_x0", "box_y0", "box_x1", "box_y1"))
            panels.append(
                QueryPanel(
                    int(query),
                    kind,
                    str(layer),
                    reference,
                    box,  # type: ignore[arg-type]
                    _query_label(int(query), kind, predictions),
                    points[["head", "feature_level", "point", "x", "y", "weight"]].reset_index(
                        drop=True
                    ),
                )
            )
    return panels
