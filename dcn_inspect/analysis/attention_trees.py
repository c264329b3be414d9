"""Sampling trees through the encoder: where one encoder token reads the image, through several
layers of multi-scale deformable attention (issue #23; the attention analogue of
:mod:`dcn_inspect.analysis.sample_points`).

An encoder query (token ``t``) of encoder layer ``k`` samples ``H x P`` points (``H`` heads,
``P`` points over the levels) on the output of layer ``k - 1``, whose cells are the tokens
(:class:`~dcn_inspect.capture.attention_calls.AttentionRecord`, batch element 0 by default).
Point ``p`` of head ``h`` lies at the continuous cell ``(c, r) = (x * W_l - 0.5, y * H_l - 0.5)``
of its level ``l`` and reads, exactly as ``grid_sample(align_corners=False,
padding_mode="zeros")`` does, the tokens of the four cells around it, with ``fx = c - floor(c)``
and ``fy = r - floor(r)``::

    (floor c,     floor r    ): (1 - fx) (1 - fy)      (floor c + 1, floor r    ): fx (1 - fy)
    (floor c,     floor r + 1): (1 - fx) fy            (floor c + 1, floor r + 1): fx fy

Each of those tokens is itself a query of layer ``k - 1``, whose points form the next depth:

* depth 1: the points of layer ``k``'s query ``t`` (``via_token`` = ``t``);
* depth ``d``: the points of layer ``k - d + 1`` made by the tokens that the points of depth
  ``d - 1`` read (``via_token``: the query that made the point).

Weights (head mean): a point's weight is the product along its path of ``w_{h,p} / H`` (the
op's attention weight, a softmax over every point of one head, averaged over the heads) and of
the bilinear factors of the tokens passed through::

    weight = via_weight * w_{h,p}(via_token) / H,   via_weight = weight(parent) * factor

so the weights of every depth sum to 1 when no corner falls outside a map. A corner outside its
map contributes nothing (the op's zero padding) and is dropped, and so is a corner of factor 0
(a point exactly on a cell centre reads that one token, factor 1): the children of a point near
a border sum to ``weight * in_map`` < ``weight``, ``in_map`` being the sum of the point's in-map
factors (0 for a point wholly outside). RT-DETRv2's ``discrete`` method reads the nearest cell,
clamped to the map: factor 1 on one token, ``in_map`` = 1.

Positions: the continuous cell through the level's frame (model-input pixels,
``offset + stride * index``) and the resize scale: original-image pixels, COCO continuous
coordinates, as in :mod:`dcn_inspect.analysis.attention` (depth 1 is its rows, weights / H).

Size: depth ``d`` has up to ``HP (4 HP)^(d - 1)`` points (128, 65 536, 33.5 million for 8
heads, 4 levels and 4 points). Two things keep it bounded:

* ``min_weight``: only rows of weight >= ``min_weight`` are kept. A child weighs at most its
  parent (``factor <= 1``, ``w / H <= 1``), so pruning a row prunes its whole subtree and
  changes no kept row: the result is exactly the rows of the full tree that weigh enough
  (``point`` and ``parent`` numbered among the kept rows);
* ``merge=True``: every path into a token yields the same points, so from depth 2 each
  distinct via token is expanded once: the row (token, head, point) weighs the token's
  ``via_weight`` (the sum over every path into it, corners outside dropped) times
  ``w_{h,p} / H``, and ``parent`` is empty. A depth then has at most tokens x H x P rows.
  Pruning leaves its weights exact: the inflows are carried for every token reached, light
  ones included, and only the rows shown are pruned.

Before a depth is made its rows are counted (exactly: a row below ``min_weight`` is counted,
not stored, in chunks); more than ``max_rows`` (:data:`MAX_TREE_ROWS`) rows in all, depths
together, raise :class:`~dcn_inspect.core.errors.InputError` (``levels``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch

from dcn_inspect.capture.attention_calls import ENCODER, NEAREST, AttentionRecord
from dcn_inspect.core.columns import Column, position
from dcn_inspect.core.errors import InputError

__all__ = [
    "ATTENTION_TREE_CSV",
    "MAX_TREE_ROWS",
    "bilinear_corners",
    "encoder_tree",
    "tree_layers",
]

#: The most rows a tree may have (all depths together) before :func:`encoder_tree` refuses.
MAX_TREE_ROWS = 2_000_000

#: Columns of an encoder sampling tree (:func:`encoder_tree`), in order: one row per point.
ATTENTION_TREE_CSV: Tuple[Column, ...] = (
    Column(
        "depth",
        "1 = the sampling points of the root token's query in the chosen encoder layer, d = the "
        "points of the encoder layer d - 1 calls before it, made by the tokens depth d - 1 read",
    ),
    Column("point", "index of the point within its depth, 0-based (rows of a depth in order)"),
    Column(
        "parent",
        "`point` of depth - 1 whose bilinear read passed through `via_token` (empty at depth 1, "
        "and at every depth of a merged tree, where a row stands for every path into its token)",
    ),
    Column(
        "via_token",
        "the token whose query made the point (depth 1: the root token), index in the "
        "flattened multi-level sequence, first level first",
    ),
    Column("layer", "the encoder attention call that sampled the point (`#k`: its k-th call)"),
    Column("head", "attention head, 0-based"),
    Column("feature_level", "feature level sampled, 0 = the first level of the call (finest)"),
    Column(
        "sample",
        "index of the sampling point within its head and level (`point` of the "
        "attention CSV), 0-based",
    ),
    position("x", "the sampling point, x"),
    position("y", "the sampling point, y"),
    Column(
        "attention",
        "the op's attention weight of the point (softmax over all levels and points of its head)",
        "0..1",
    ),
    Column(
        "via_weight",
        "weight reaching `via_token`: the parent's weight times the token's bilinear factor in "
        "the parent's read (1 at depth 1; merged: summed over every path into the token)",
        "0..1",
    ),
    Column(
        "weight",
        "via_weight * attention / heads: the point's share of the root token's head-mean "
        "attention (a depth sums to 1 unless corners fell outside a map)",
        "0..1",
    ),
    Column(
        "in_map",
        "sum of the bilinear factors of the point's corners inside its map: its children weigh "
        "weight * in_map in all (1 inside; 0 wholly outside; always 1 for nearest-cell sampling)",
        "0..1",
    ),
)

#: Corner order of a bilinear read: (d_col, d_row).
_CORNERS = ((0, 0), (1, 0), (0, 1), (1, 1))


@dataclass
class _Layer:
    """One encoder call as a tree reads it: every kept query's points, batch element ``b``."""

    record: AttentionRecord
    row_of_token: torch.Tensor  # [N] long: row in the kept queries, -1 when not kept
    cells: torch.Tensor  # [Q_kept, H*P, 2] float64 continuous (col, row) of each point's level
    xs: torch.Tensor  # [Q_kept, H*P] float64, original-image pixels
    ys: torch.Tensor
    weights: torch.Tensor  # [Q_kept, H*P] float64: the op's weights
    level: torch.Tensor  # [P] long: each point's level
    sample: torch.Tensor  # [P] long: each point's index within its head and level

    @property
    def heads(self) -> int:
        return self.record.heads

    @property
    def points(self) -> int:
        return len(self.record.point_level)

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows of ``tokens`` among the kept queries; an error for a token not kept."""
        rows = self.row_of_token[tokens]
        if bool((rows < 0).any()):
            missing = int(tokens[rows < 0][0])
            raise ValueError(
                f"token {missing}: not among the queries kept by {self.record.name}; a tree "
                "needs the capture to keep every encoder token (keep_tokens=None)"
            )
        return rows


def _layer_view(record: AttentionRecord, batch_index: int, scale: Tuple[float, float]) -> _Layer:
    count = sum(h * w for h, w in record.spatial_shapes)
    row_of_token = torch.full((count,), -1, dtype=torch.long)
    row_of_token[record.queries.long()] = torch.arange(len(record.queries))
    kept = int(record.queries.shape[0])
    hp = record.heads * len(record.point_level)
    xs, ys = record.points_in_input()
    counts: Dict[int, int] = {}
    sample = []
    for level in record.point_level:
        sample.append(counts.get(level, 0))
        counts[level] = counts.get(level, 0) + 1
    return _Layer(
        record=record,
        row_of_token=row_of_token,
        cells=record.sampled_cells()[batch_index].reshape(kept, hp, 2),
        xs=xs[batch_index].reshape(kept, hp) * float(scale[0]),
        ys=ys[batch_index].reshape(kept, hp) * float(scale[1]),
        weights=record.weights[batch_index].double().reshape(kept, hp),
        level=torch.as_tensor(record.point_level, dtype=torch.long),
        sample=torch.as_tensor(sample, dtype=torch.long),
    )


def bilinear_corners(
    cells: torch.Tensor, levels: torch.Tensor, record: AttentionRecord
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The tokens a point reads and their factors: ``cells`` [R, 2] continuous (col, row) on
    ``levels`` [R] of ``record``'s maps -> (tokens [R, 4] long, factors [R, 4] float64), corners
    in :data:`_CORNERS` order (top-left, top-right, bottom-left, bottom-right); a corner outside
    its map or of factor 0 has token -1 and factor 0 (``grid_sample``, ``align_corners=False``,
    zero padding). Nearest-cell sampling: the (clamped) cell itself, factor 1, in corner 0."""
    shapes = torch.as_tensor(record.spatial_shapes, dtype=torch.long).reshape(-1, 2)
    heights, widths = shapes[levels, 0], shapes[levels, 1]
    start = torch.as_tensor(record.level_start, dtype=torch.long)[levels]
    cols, rows = cells[:, 0], cells[:, 1]
    if record.sampling == NEAREST:
        tokens = torch.full((len(cells), 4), -1, dtype=torch.long)
        factors = torch.zeros(len(cells), 4, dtype=torch.float64)
        tokens[:, 0] = start + rows.long() * widths + cols.long()
        factors[:, 0] = 1.0
        return tokens, factors
    left, top = torch.floor(cols), torch.floor(rows)
    fx, fy = cols - left, rows - top
    # Clamped: far outside, a corner is still outside, and the long conversion cannot overflow.
    left_i = torch.maximum(torch.minimum(left, widths.double() + 1), torch.tensor(-2.0)).long()
    top_i = torch.maximum(torch.minimum(top, heights.double() + 1), torch.tensor(-2.0)).long()
    token_list, factor_list = [], []
    for dx, dy in _CORNERS:
        col, row = left_i + dx, top_i + dy
        factor = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
        inside = (col >= 0) & (col < widths) & (row >= 0) & (row < heights) & (factor > 0)
        token_list.append(torch.where(inside, start + row * widths + col, -1))
        factor_list.append(torch.where(inside, factor, torch.zeros_like(factor)))
    return torch.stack(token_list, dim=1), torch.stack(factor_list, dim=1)


@dataclass
class _Depth:
    """The rows of one depth: who made each point and what reached it."""

    via: torch.Tensor  # [R] long: the token whose query made the point
    hp: torch.Tensor  # [R] long: head * P + point, in the via token's query
    via_weight: torch.Tensor  # [R] float64
    weight: torch.Tensor  # [R] float64
    parent: Optional[torch.Tensor]  # [R] long point of depth - 1; None: depth 1 or merged


def _corners_of(depth: _Depth, layer: _Layer) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tokens [R, 4] and factors [R, 4] read by every point of ``depth`` (made in ``layer``)."""
    rows = layer.rows(depth.via)
    cells = layer.cells[rows, depth.hp]
    return bilinear_corners(cells, layer.level[depth.hp % layer.points], layer.record)


def _child_count(
    tokens: torch.Tensor, via_weight: torch.Tensor, layer: _Layer, min_weight: float
) -> int:
    """How many children of weight >= ``min_weight`` the (token, via_weight) pairs have in
    ``layer``, counted in chunks without storing them."""
    hp = layer.heads * layer.points
    if min_weight <= 0:
        return int(tokens.numel()) * hp
    total = 0
    chunk = max(1, (1 << 20) // hp)
    for begin in range(0, int(tokens.numel()), chunk):
        rows = layer.rows(tokens[begin : begin + chunk])
        child = via_weight[begin : begin + chunk, None] * layer.weights[rows] / layer.heads
        total += int((child >= min_weight).sum())
    return total


def _children(
    tokens: torch.Tensor,
    via_weight: torch.Tensor,
    parent: Optional[torch.Tensor],
    layer: _Layer,
    min_weight: float,
) -> _Depth:
    """Every point of ``layer`` made by each (token, via_weight) pair, weight >= ``min_weight``;
    pair-major, then head, then point. Made in chunks of pairs: what is held beyond the kept
    rows is one chunk."""
    hp = layer.heads * layer.points
    chunk = max(1, (1 << 20) // hp)
    parts: List[_Depth] = []
    for begin in range(0, max(int(tokens.numel()), 1), chunk):
        pair_tokens = tokens[begin : begin + chunk]
        pair_weight = via_weight[begin : begin + chunk]
        rows = layer.rows(pair_tokens)
        weight = (pair_weight[:, None] * layer.weights[rows] / layer.heads).reshape(-1)
        keep = weight >= min_weight
        pair = torch.arange(len(pair_tokens)).repeat_interleave(hp)[keep]
        parts.append(
            _Depth(
                via=pair_tokens[pair],
                hp=torch.arange(hp).repeat(len(pair_tokens))[keep],
                via_weight=pair_weight[pair],
                weight=weight[keep],
                parent=None if parent is None else parent[begin : begin + chunk][pair],
            )
        )
    return _Depth(
        via=torch.cat([p.via for p in parts]),
        hp=torch.cat([p.hp for p in parts]),
        via_weight=torch.cat([p.via_weight for p in parts]),
        weight=torch.cat([p.weight for p in parts]),
        parent=None if parent is None else torch.cat([p.parent for p in parts]),  # type: ignore
    )


def _check_rows(
    projected: int, so_far: int, max_rows: int, levels: int, depth: int, merge: bool
) -> None:
    """An error when depth ``depth`` (``projected`` rows) takes the tree past ``max_rows``."""
    if so_far + projected <= max_rows:
        return
    hint = "raise `min_weight`" + ("" if merge else " or set `merge`")
    raise InputError(
        f"{levels}: a tree of {levels} levels would have more than the {max_rows:,} rows "
        f"allowed ({so_far + projected:,} by depth {depth}, {projected:,} at depth {depth}); "
        f"use fewer levels or {hint}",
        param="levels",
    )


def _next_tree_depth(
    depth: _Depth, made_in: _Layer, min_weight: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (parent point, token, via_weight) pairs of the next depth of a full tree: every
    in-map corner of every point, parent-major, corners in order; pairs lighter than
    ``min_weight`` have no child heavy enough and are dropped."""
    tokens, factors = _corners_of(depth, made_in)
    via_weight = depth.weight[:, None] * factors
    keep = (tokens >= 0) & (via_weight >= min_weight)
    parent = torch.arange(len(tokens))[:, None].expand_as(tokens)
    return parent[keep], tokens[keep], via_weight[keep]


def _merged_inflow(
    tokens: torch.Tensor, inflow: torch.Tensor, made_in: _Layer, token_count: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The tokens (ascending) that the points of ``tokens``' queries in ``made_in`` read, and
    the weight into each: sum over the tokens, heads, points and corners of ``inflow * w / H *
    factor``. In chunks of tokens: no row of the depth is made."""
    hp = made_in.heads * made_in.points
    chunk = max(1, (1 << 18) // hp)
    into = torch.zeros(token_count, dtype=torch.float64)
    reached = torch.zeros(token_count, dtype=torch.bool)
    for begin in range(0, int(tokens.numel()), chunk):
        part = tokens[begin : begin + chunk]
        weight = inflow[begin : begin + chunk, None] * made_in.weights[made_in.rows(part)]
        points = _Depth(
            via=part.repeat_interleave(hp),
            hp=torch.arange(hp).repeat(len(part)),
            via_weight=inflow[begin : begin + chunk].repeat_interleave(hp),
            weight=weight.reshape(-1) / made_in.heads,
            parent=None,
        )
        read, factors = _corners_of(points, made_in)
        inside = read >= 0
        into.index_add_(0, read[inside], (points.weight[:, None] * factors)[inside])
        reached[read[inside]] = True
    chosen = torch.nonzero(reached).reshape(-1)
    return chosen, into[chosen]


def _depth_table(depth: _Depth, layer: _Layer, number: int) -> pd.DataFrame:
    """The rows of one depth (:data:`ATTENTION_TREE_CSV`)."""
    rows = layer.rows(depth.via)
    point = depth.hp % layer.points
    _, factors = _corners_of(depth, layer)
    count = len(depth.via)
    parent = (
        pd.array([pd.NA] * count, dtype="Int64")
        if depth.parent is None
        else pd.array(depth.parent.numpy(), dtype="Int64")
    )
    return pd.DataFrame(
        {
            "depth": np.full(count, number),
            "point": np.arange(count),
            "parent": parent,
            "via_token": depth.via.numpy(),
            "layer": np.full(count, layer.record.name, dtype=object),
            "head": (depth.hp // layer.points).numpy(),
            "feature_level": layer.level[point].numpy(),
            "sample": layer.sample[point].numpy(),
            "x": layer.xs[rows, depth.hp].numpy(),
            "y": layer.ys[rows, depth.hp].numpy(),
            "attention": layer.weights[rows, depth.hp].numpy(),
            "via_weight": depth.via_weight.numpy(),
            "weight": depth.weight.numpy(),
            "in_map": factors.sum(dim=1).numpy(),
        }
    )


def tree_layers(
    records: Sequence[AttentionRecord], layer: Optional[Union[int, str]], levels: int
) -> List[AttentionRecord]:
    """The encoder calls a tree of ``levels`` depths reads, depth 1 first: ``layer`` (an index
    into ``records``, or a name; None: the last) and the ``levels - 1`` calls before it."""
    if not records:
        raise ValueError("encoder_tree needs the encoder attention calls")
    names = [r.name for r in records]
    if layer is None:
        top = len(records) - 1
    elif isinstance(layer, str):
        if layer not in names:
            raise InputError(
                f"{layer}: not an encoder attention layer (they are: {', '.join(names)})",
                param="layer",
            )
        top = names.index(layer)
    elif -len(records) <= int(layer) < len(records):
        top = int(layer) % len(records)
    else:
        raise InputError(
            f"{layer}: no such encoder call; there are {len(records)} (0..{len(records) - 1})",
            param="layer",
        )
    if levels < 1 or levels > top + 1:
        raise InputError(
            f"{levels}: a tree from {names[top]} (encoder call {top + 1} of {len(records)}) has "
            f"1..{top + 1} levels, one per encoder call up to it",
            param="levels",
        )
    chosen = [records[top - d] for d in range(levels)]
    for record in chosen:
        if record.kind != ENCODER or record.spatial_shapes != chosen[0].spatial_shapes:
            raise ValueError(
                f"{record.name}: not an encoder call over the tokens of {chosen[0].name} "
                f"({record.kind}, levels {record.spatial_shapes})"
            )
    return chosen


def encoder_tree(
    records: Sequence[AttentionRecord],
    token: int,
    levels: int = 2,
    *,
    layer: Optional[Union[int, str]] = None,
    scale_to_original: Tuple[float, float] = (1.0, 1.0),
    min_weight: float = 0.0,
    merge: bool = False,
    max_rows: int = MAX_TREE_ROWS,
    batch_index: int = 0,
) -> pd.DataFrame:
    """The sampling tree of encoder token ``token`` through ``levels`` encoder calls (see the
    module docstring), one row per point, columns :data:`ATTENTION_TREE_CSV`, depth-major.

    ``records``: the encoder calls in call order, their tokens kept (all of them, or at least
    every token the tree reaches); the tree starts at ``layer`` (index or name; None: the last
    call). ``scale_to_original`` = (sx, sy) maps model-input pixels to the original image.
    Within a depth, rows run parent-major (then corner, head, point) or, merged, by via token
    (then head, point).
    """
    chosen = tree_layers(records, layer, levels)
    if min_weight < 0:
        raise InputError(f"{min_weight}: must be at least 0", param="min_weight")
    token_count = sum(h * w for h, w in chosen[0].spatial_shapes)
    if not 0 <= token < token_count:
        raise ValueError(f"token {token}: no such token; {chosen[0].name} has {token_count}")
    views = [_layer_view(r, batch_index, scale_to_original) for r in chosen]
    # A full tree keeps its rows (light ones dropped: their subtrees are lighter still); a
    # merged one keeps (token, inflow) pairs, every token reached, so that inflows are exact.
    tokens = torch.tensor([int(token)])
    inflow = torch.ones(1, dtype=torch.float64)
    parent: Optional[torch.Tensor] = None
    total = 0
    tables: List[pd.DataFrame] = []
    made: List[_Depth] = []
    for number, view in enumerate(views, start=1):
        if number > 1 and merge:
            tokens, inflow = _merged_inflow(tokens, inflow, views[number - 2], token_count)
        elif number > 1:
            parent, tokens, inflow = _next_tree_depth(made[-1], views[number - 2], min_weight)
        projected = _child_count(tokens, inflow, view, min_weight)
        _check_rows(projected, total, max_rows, levels, number, merge)
        made.append(_children(tokens, inflow, parent, view, min_weight))
        tables.append(_depth_table(made[-1], view, number))
        total += len(made[-1].via)
    return pd.concat(tables, ignore_index=True)
