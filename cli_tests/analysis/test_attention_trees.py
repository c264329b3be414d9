"""Encoder sampling trees (issue #23): trees worked out by hand, the op's own bilinear reads,
depth 1 as the attention rows, merging and pruning, the size bound."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import raises_cli

from dcn_inspect.analysis.attention import attention_rows
from dcn_inspect.analysis.attention_trees import (
    ATTENTION_TREE_CSV,
    bilinear_corners,
    encoder_tree,
)
from dcn_inspect.capture.attention_calls import ENCODER, NEAREST, AttentionRecord
from dcn_inspect.core.columns import names
from dcn_inspect.core.geometry import FrameMap, Pair
from dcn_inspect.models.attention_net import ms_deform_attn_core_pytorch

#: A hand-written frame: cell (c, r) is centred at (2 + 4c, 2 + 4r) model-input pixels.
FRAME = FrameMap(4.0, 4.0, 2.0, 2.0)


def _record(
    name: str,
    cells: torch.Tensor,
    weights: torch.Tensor,
    shapes: Sequence[Pair],
    point_level: Sequence[int],
    frames: Optional[Sequence[FrameMap]] = None,
) -> AttentionRecord:
    """An encoder call from every token's points as continuous cells ``[N, H, P, 2]`` (col, row
    of each point's level) and weights ``[N, H, P]``."""
    sizes = torch.tensor(
        [[shapes[lv][1], shapes[lv][0]] for lv in point_level], dtype=torch.float64
    )
    locations = (cells.double() + 0.5) / sizes
    tokens = int(cells.shape[0])
    frames = frames or [FRAME] * len(shapes)
    return AttentionRecord(
        name=name,
        module_type="MSDeformAttn",
        captured_by="test",
        kind=ENCODER,
        locations=locations[None],
        weights=weights.double()[None],
        queries=torch.arange(tokens),
        query_count=tokens,
        point_level=tuple(point_level),
        spatial_shapes=tuple(tuple(s) for s in shapes),  # type: ignore[misc]
        level_frames=tuple(frames),
        frame_methods=("hooks",) * len(shapes),
    )


def _token_cells(shapes: Sequence[Pair], point_level: Sequence[int]) -> torch.Tensor:
    """``[N, P, 2]``: each token's own cell (col, row) carried to each point's level (cell
    centres at the same relative position: the reference point of the encoder)."""
    rows = []
    for h, w in shapes:
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rows.append(torch.stack([(c.reshape(-1) + 0.5) / w, (r.reshape(-1) + 0.5) / h], dim=1))
    reference = torch.cat(rows).double()  # [N, 2] normalised
    sizes = torch.tensor(
        [[shapes[lv][1], shapes[lv][0]] for lv in point_level], dtype=torch.float64
    )
    return reference[:, None, :] * sizes - 0.5


def _constant(
    offsets: Sequence[Tuple[float, float]], layers: int = 2, size: int = 8
) -> List[AttentionRecord]:
    """Encoder calls on one size x size level, 1 head, a point per offset (cells) from each
    token's centre, uniform weights."""
    shapes = [(size, size)]
    cells = _token_cells(shapes, [0] * len(offsets)) + torch.tensor(offsets, dtype=torch.float64)
    weights = torch.full((size * size, 1, len(offsets)), 1.0 / len(offsets))
    return [
        _record(f"enc.{k}", cells[:, None], weights, shapes, [0] * len(offsets))
        for k in range(layers)
    ]


def _pixels(col: float, row: float) -> Tuple[float, float]:
    return 2 + 4 * col, 2 + 4 * row


def _points(tree: pd.DataFrame, depth: int) -> List[Tuple[float, float, float]]:
    of = tree[tree["depth"] == depth]
    return sorted(zip(of["x"].round(9), of["y"].round(9), of["weight"].round(12)))


def test_whole_cell_offsets_give_the_tree_worked_out_by_hand() -> None:
    records = _constant([(1.0, 0.0), (0.0, 1.0)])
    token = 3 * 8 + 2  # column 2, row 3
    tree = encoder_tree(records, token, levels=2, scale_to_original=(0.5, 2.0))
    assert list(tree.columns) == names(ATTENTION_TREE_CSV)
    depth1 = tree[tree["depth"] == 1]
    assert depth1["layer"].tolist() == ["enc.1", "enc.1"]  # the last call first
    assert depth1["via_token"].tolist() == [token, token]
    assert depth1["parent"].isna().all()
    expected1 = [(*_pixels(3, 3), 0.5), (*_pixels(2, 4), 0.5)]
    assert _points(tree, 1) == sorted((x * 0.5, y * 2.0, w) for x, y, w in expected1)
    assert (depth1["in_map"] == 1).all()  # on cell centres: one token, factor 1
    depth2 = tree[tree["depth"] == 2]
    assert len(depth2) == 4 and (depth2["layer"] == "enc.0").all()
    cells2 = [(4, 3), (3, 4), (3, 4), (2, 5)]  # (+2, 0), (+1, +1) twice, (0, +2)
    assert _points(tree, 2) == sorted(
        (_pixels(c, r)[0] * 0.5, _pixels(c, r)[1] * 2.0, 0.25) for c, r in cells2
    )
    # Parents: depth-1 point 0 (the +1, 0 point) is token (3, 3) = 27, point 1 is (2, 4) = 34.
    assert depth2["parent"].tolist() == [0, 0, 1, 1]
    assert depth2["via_token"].tolist() == [27, 27, 34, 34]
    assert np.allclose(depth2["via_weight"], 0.5) and np.allclose(depth2["attention"], 0.5)


def test_half_cell_offsets_split_between_two_tokens() -> None:
    records = _constant([(0.5, 0.0), (0.0, 0.5)])
    token = 3 * 8 + 2
    tree = encoder_tree(records, token, levels=2)
    depth2 = tree[tree["depth"] == 2]
    # Point 0 at (2.5, 3) reads tokens (2, 3) and (3, 3) by 1/2 each; point 1 at (2, 3.5) reads
    # (2, 3) and (2, 4).
    assert depth2["parent"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert depth2["via_token"].tolist() == [26, 26, 27, 27, 26, 26, 34, 34]
    assert np.allclose(depth2["via_weight"], 0.25) and np.allclose(depth2["weight"], 0.125)
    cells2 = [(2.5, 3), (2, 3.5), (3.5, 3), (3, 3.5), (2.5, 3), (2, 3.5), (2.5, 4), (2, 4.5)]
    assert _points(tree, 2) == sorted((*_pixels(c, r), 0.125) for c, r in cells2)
    assert (tree["in_map"] == 1).all()
    # The corners themselves: (2.5, 3.25) -> 3/8, 3/8, 1/8, 1/8.
    tokens, factors = bilinear_corners(
        torch.tensor([[2.5, 3.25]], dtype=torch.float64), torch.tensor([0]), records[0]
    )
    assert tokens.tolist() == [[26, 27, 34, 35]]
    assert torch.allclose(
        factors, torch.tensor([[0.375, 0.375, 0.125, 0.125]], dtype=torch.float64)
    )


def test_corners_outside_the_map_are_dropped_and_the_weight_lost() -> None:
    records = _constant([(0.5, 0.0), (0.0, 0.5)])
    token = 3 * 8 + 7  # the right-hand column: its +0.5 point reads column 8 (outside) by 1/2
    tree = encoder_tree(records, token, levels=2)
    depth1 = tree[tree["depth"] == 1]
    assert depth1["in_map"].tolist() == [0.5, 1.0]
    depth2 = tree[tree["depth"] == 2]
    assert depth2["parent"].tolist() == [0, 0, 1, 1, 1, 1]  # one corner of point 0 is dropped
    assert depth2["via_token"].tolist() == [31, 31, 31, 31, 39, 39]
    assert depth2["weight"].sum() == pytest.approx(0.75)  # 1/2 * 1/2 + 1/2 * 1
    by_parent = depth2.groupby("parent")["weight"].sum()
    assert by_parent.tolist() == pytest.approx(
        (depth1["weight"] * depth1["in_map"]).tolist()
    )  # children weigh weight * in_map
    # Wholly outside (the -1 border and beyond): nothing is read.
    tokens, factors = bilinear_corners(
        torch.tensor([[-1.0, 2.0], [-3.7, 50.0], [7.0, -0.5]], dtype=torch.float64),
        torch.tensor([0, 0, 0]),
        records[0],
    )
    assert tokens[:2].eq(-1).all() and factors[:2].eq(0).all()
    assert tokens[2].tolist() == [-1, -1, 7, -1] and factors[2].tolist() == [0, 0, 0.5, 0]


def test_nearest_cell_sampling_reads_one_token() -> None:
    """RT-DETRv2's discrete method: the op reads cell ``int(x * W + 0.5)`` clamped to the map
    (:meth:`AttentionRecord.sampled_cells`), factor 1. From the centre of cell c, an offset e
    reads ``int(c + e + 1)``."""
    records = _constant([(0.6, -1.0), (-1.0, 0.4)])
    for record in records:
        record.sampling = NEAREST
    tree = encoder_tree(records, 3 * 8 + 7, levels=2)  # right-hand column: 8 clamps to 7
    depth1 = tree[tree["depth"] == 1]
    assert (depth1["in_map"] == 1).all()
    assert list(zip(depth1["x"], depth1["y"])) == [_pixels(7, 3), _pixels(7, 4)]
    depth2 = tree[tree["depth"] == 2]
    assert depth2["via_token"].tolist() == [31, 31, 39, 39]
    assert np.allclose(depth2["weight"], 0.25)


def _random_records(
    layers: int,
    spread: float,
    seed: int = 0,
    heads: int = 2,
    shapes: Sequence[Pair] = ((6, 8), (3, 4)),
    points: int = 2,
) -> List[AttentionRecord]:
    """Encoder calls with random offsets (``spread`` cells around the reference; 0: every point
    drawn inside the band whose four corners are all in the map) and random softmax weights."""
    generator = torch.Generator().manual_seed(seed)
    point_level = [lv for lv in range(len(shapes)) for _ in range(points)]
    base = _token_cells(shapes, point_level)  # [N, P, 2]
    tokens = base.shape[0]
    sizes = torch.tensor(
        [[shapes[lv][1], shapes[lv][0]] for lv in point_level], dtype=torch.float64
    )
    out = []
    for k in range(layers):
        shape = (tokens, heads, len(point_level), 2)
        if spread:
            cells = base[:, None] + spread * torch.randn(shape, generator=generator).double()
        else:
            cells = torch.rand(shape, generator=generator).double() * (sizes - 1)
        weights = torch.randn(tokens, heads, len(point_level), generator=generator).softmax(-1)
        out.append(_record(f"enc.{k}", cells, weights, shapes, point_level))
    return out


def test_every_depth_sums_to_one_when_nothing_falls_outside() -> None:
    records = _random_records(3, spread=0.0)
    tree = encoder_tree(records, 17, levels=3)
    assert tree.groupby("depth").size().tolist() == [8, 8 * 4 * 8, 8 * 4 * 8 * 4 * 8]
    assert np.allclose(tree.groupby("depth")["weight"].sum(), 1.0, atol=1e-12)
    assert np.allclose(tree["in_map"], 1.0)
    assert np.allclose(tree["weight"], tree["via_weight"] * tree["attention"] / 2)
    # A parent's children (through all its tokens) weigh what the parent does.
    for depth in (2, 3):
        parents = tree[tree["depth"] == depth - 1].set_index("point")["weight"]
        children = tree[tree["depth"] == depth].groupby("parent")["weight"].sum()
        assert np.allclose(children.to_numpy(), parents.loc[children.index].to_numpy())


def _op_transport(record: AttentionRecord) -> torch.Tensor:
    """``[N, N]``: how much of token s query q reads, head mean, by the op itself (grid_sample on
    one-hot values)."""
    tokens, heads = record.query_count, record.heads
    levels, points = record.levels, len(record.point_level) // record.levels
    value = torch.eye(tokens, dtype=torch.float64)[None, :, None, :].expand(
        1, tokens, heads, tokens
    )
    out = ms_deform_attn_core_pytorch(
        value.contiguous(),
        torch.tensor(record.spatial_shapes),
        record.locations.double().reshape(1, tokens, heads, levels, points, 2),
        record.weights.double().reshape(1, tokens, heads, levels, points),
    )
    return out.reshape(tokens, heads, tokens).mean(dim=1)


def test_the_weight_reaching_each_token_is_what_the_op_reads() -> None:
    """Off the maps included: the tree's via weights are the op's own bilinear reads."""
    records = _random_records(3, spread=2.0, seed=1)
    token = 5
    tree = encoder_tree(records, token, levels=3)
    mass = torch.zeros(records[0].query_count, dtype=torch.float64)
    mass[token] = 1.0
    for depth, record in zip((2, 3), (records[2], records[1])):
        mass = mass @ _op_transport(record)
        of = tree[tree["depth"] == depth]
        reached = of.groupby("via_token")["weight"].sum()  # sum over h, p of w / H is 1
        expected = mass.numpy()
        assert np.allclose(reached.to_numpy(), expected[reached.index.to_numpy()], atol=1e-12)
        assert np.allclose(np.delete(expected, reached.index.to_numpy()), 0.0, atol=1e-12)
    assert tree[tree["depth"] == 3]["weight"].sum() < 0.99  # some weight left the maps


def test_depth_one_is_the_attention_rows_of_the_token() -> None:
    records = _random_records(2, spread=1.5, seed=2)
    scale = (1.25, 0.75)
    tree = encoder_tree(records, 40, levels=2, scale_to_original=scale)
    rows = attention_rows(records[-1], [40], scale)
    depth1 = tree[tree["depth"] == 1].reset_index(drop=True)
    for column in ("head", "feature_level", "x", "y"):
        assert np.allclose(depth1[column], rows[column])
    assert (depth1["sample"] == rows["point"]).all()
    assert np.allclose(depth1["weight"], rows["weight"] / records[-1].heads)
    assert np.allclose(depth1["attention"], rows["weight"])


def test_depth_two_points_are_the_via_tokens_own_points() -> None:
    records = _random_records(2, spread=1.5, seed=3)
    tree = encoder_tree(records, 11, levels=2)
    depth2 = tree[tree["depth"] == 2]
    rows = attention_rows(records[0], sorted(set(depth2["via_token"])), (1.0, 1.0))
    merged = depth2.merge(
        rows,
        left_on=["via_token", "head", "feature_level", "sample"],
        right_on=["query", "head", "feature_level", "point"],
        suffixes=("", "_op"),
    )
    assert len(merged) == len(depth2)
    assert np.allclose(merged["x"], merged["x_op"]) and np.allclose(merged["y"], merged["y_op"])
    assert np.allclose(merged["attention"], merged["weight_op"])


def test_merging_sums_the_paths_through_a_token() -> None:
    records = _random_records(3, spread=1.5, seed=4)
    full = encoder_tree(records, 30, levels=3)
    merged = encoder_tree(records, 30, levels=3, merge=True)
    assert merged["parent"].isna().all()
    key = ["depth", "via_token", "head", "sample", "feature_level"]
    summed = full.groupby(key)[["weight", "via_weight"]].sum()
    mine = merged.set_index(key).sort_index()
    assert list(summed.index) == list(mine.index)
    assert np.allclose(summed["weight"], mine["weight"], atol=1e-14)
    # A via token's inflow: the sum over every path into it.
    assert np.allclose(summed["via_weight"], mine["via_weight"], atol=1e-14)
    assert len(merged) < len(full)


def test_min_weight_keeps_exactly_the_heavy_rows() -> None:
    records = _random_records(3, spread=1.5, seed=5)
    full = encoder_tree(records, 30, levels=3)
    threshold = 1e-3
    pruned = encoder_tree(records, 30, levels=3, min_weight=threshold)
    heavy = full[full["weight"] >= threshold]
    columns = ["depth", "via_token", "head", "sample", "x", "y", "weight"]
    assert np.allclose(pruned[columns].to_numpy(dtype=float), heavy[columns].to_numpy(dtype=float))
    # Parents are renumbered to the kept points of the depth above.
    depth2 = pruned[pruned["depth"] == 2].reset_index(drop=True)
    depth3 = pruned[pruned["depth"] == 3]
    assert (depth3["parent"] < len(depth2)).all()
    assert np.allclose(
        depth3["via_weight"],
        depth2["weight"].to_numpy()[depth3["parent"].to_numpy(dtype=int)],
        rtol=1,
    )
    # Merged: the same rows as the merged tree without pruning, filtered (exact inflows even
    # where lighter paths were dropped from the table, depth 1 included).
    merged = encoder_tree(records, 30, levels=3, merge=True)
    assert ((merged["depth"] == 1) & (merged["weight"] < 0.014)).sum() == 1
    for threshold in (1e-3, 0.014):  # 0.014: a depth-1 row goes, its tokens' inflows stay
        pruned = encoder_tree(records, 30, levels=3, min_weight=threshold, merge=True)
        heavy = merged[merged["weight"] >= threshold]
        assert 0 < len(pruned) < len(merged) and (pruned["depth"] == 2).any()
        assert np.allclose(
            pruned[columns].to_numpy(dtype=float), heavy[columns].to_numpy(dtype=float)
        )


def test_a_merged_tree_counts_the_light_paths_it_does_not_show() -> None:
    """10 points on the token's own centre (one heavy, nine light): every path returns to the
    token, whose inflow stays 1 when the light rows are pruned from the table."""
    records = _constant([(0.0, 0.0)] * 10, layers=3)
    weights = torch.tensor([0.91] + [0.01] * 9, dtype=torch.float64)
    for record in records:
        record.weights[:] = weights
    tree = encoder_tree(records, 20, levels=3, merge=True, min_weight=0.5)
    assert tree["depth"].tolist() == [1, 2, 3] and (tree["via_token"] == 20).all()
    assert tree["via_weight"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert tree["weight"].tolist() == pytest.approx([0.91, 0.91, 0.91])
    full = encoder_tree(records, 20, levels=3, min_weight=0.5)  # one path: 0.91 ** depth
    assert full["weight"].tolist() == pytest.approx([0.91, 0.91**2, 0.91**3])


def test_too_many_rows_is_refused_before_they_are_made() -> None:
    # 8 heads x 4 levels x 4 points, every point inside with 4 corners: depth 3 would have
    # 128 * 512 * 512 = 33.5 million rows.
    records = _random_records(
        3, spread=0.0, seed=6, heads=8, shapes=((8, 8), (4, 4), (2, 2), (2, 2)), points=4
    )
    with raises_cli(
        r"levels 3: a tree of 3 levels would have more than the 2,000,000 rows allowed "
        r"\(33,620,096 by depth 3, 33,554,432 at depth 3\); use fewer levels or raise "
        r"--min-weight or set --merge"
    ):
        encoder_tree(records, 3, levels=3)
    tree = encoder_tree(records, 3, levels=2)  # 128 + 65 536 rows
    assert len(tree) == 128 + 128 * 4 * 128
    merged = encoder_tree(records, 3, levels=3, merge=True)  # at most 88 tokens x 128 per depth
    assert len(merged) <= 128 + 2 * 88 * 128
    assert np.allclose(merged.groupby("depth")["weight"].sum(), 1.0)
    with raises_cli(r"levels 2: .* more than the 1,000 rows allowed \(65,664 by depth 2"):
        encoder_tree(records, 3, levels=2, max_rows=1000)
    with raises_cli(r"levels 4: a tree from enc.2 .* has 1..3 levels"):
        encoder_tree(records, 3, levels=4)
    with raises_cli(r"levels 3: a tree from enc.1 .* has 1..2 levels"):
        encoder_tree(records, 3, levels=3, layer="enc.1")
    with pytest.raises(ValueError, match=r"token 88: no such token; enc.2 has 88"):
        encoder_tree(records, 88)
    with raises_cli(r"min.weight -1: must be at least 0"):
        encoder_tree(records, 3, min_weight=-1)


def _tiny_deformable_detr() -> torch.nn.Module:
    """A transformers Deformable DETR built from a config (no download): 2 encoder layers, 2
    heads, 4 levels, 2 points, offsets and weights that differ per token."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=transformers.ResNetConfig(
            embedding_size=16,
            hidden_sizes=[16, 32, 64, 128],
            depths=[1, 1, 1, 1],
            out_features=["stage2", "stage3", "stage4"],
        ),
        num_queries=4, encoder_layers=2, decoder_layers=2, d_model=32,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2,
        decoder_n_points=2, num_feature_levels=4, encoder_ffn_dim=32, decoder_ffn_dim=32,
        num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.DeformableDetrForObjectDetection(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "sampling_offsets" in name or "attention_weights" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model.eval()


def test_a_real_deformable_detr_encoder_tree_is_its_own_op_reads() -> None:
    from dcn_inspect.capture.session import capture_offsets

    model = _tiny_deformable_detr()
    images = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_offsets(model) as capture:
        capture.watch_input(images)
        model(images)
    records = [r for r in capture.attention.values() if r.kind == ENCODER]
    assert len(records) == 2 and records[0].spatial_shapes == ((12, 16), (6, 8), (3, 4), (2, 2))
    token = 6 * 16 + 8  # near the centre of the finest level
    tree = encoder_tree(records, token, levels=2, scale_to_original=(2.0, 2.0))
    depth2 = tree[tree["depth"] == 2]
    assert len(depth2) > 16 and set(depth2["layer"]) == {records[0].name}
    # Positions: the via token's own points in the first call, the op's locations by hand.
    locations = records[0].locations[0].double()  # [N, H, P, 2]
    level = depth2["feature_level"].to_numpy().copy()
    point = (level * 2 + depth2["sample"].to_numpy()).tolist()
    xy = locations[depth2["via_token"].tolist(), depth2["head"].tolist(), point]
    height = torch.tensor([records[0].spatial_shapes[lv][0] for lv in level], dtype=torch.float64)
    width = torch.tensor([records[0].spatial_shapes[lv][1] for lv in level], dtype=torch.float64)
    stride = torch.tensor([8.0, 16.0, 32.0, 64.0], dtype=torch.float64)[level]
    assert [f.stride_x for f in records[0].level_frames] == [8, 16, 32, 64]
    expected_x = 2.0 * (0.5 + stride * (xy[:, 0] * width - 0.5))
    expected_y = 2.0 * (0.5 + stride * (xy[:, 1] * height - 0.5))
    assert np.allclose(depth2["x"], expected_x.numpy(), atol=1e-6)
    assert np.allclose(depth2["y"], expected_y.numpy(), atol=1e-6)
    # Weights: what reaches each token is what the op's grid_sample reads from it.
    mass = torch.zeros(records[0].query_count, dtype=torch.float64)
    mass[token] = 1.0
    mass = mass @ _op_transport(records[1])
    reached = depth2.groupby("via_token")["weight"].sum()
    assert np.allclose(reached.to_numpy(), mass.numpy()[reached.index.to_numpy()], atol=1e-6)
    assert depth2["weight"].sum() == pytest.approx(float(mass.sum()), abs=1e-6)
