"""Multi-scale deformable attention capture on stand-ins with the exact calling conventions of
Deformable-DETR's ``MSDeformAttn`` (core through ``MSDeformAttnFunction.apply`` or
``ms_deform_attn_core_pytorch``) and mmcv's ``MultiScaleDeformableAttention`` (through
``multi_scale_deformable_attn_pytorch`` or ``MultiScaleDeformableAttnFunction.apply``,
``batch_first`` both ways), inside a small Deformable-DETR-like model (``msda_standins.py``).

The attention layers get constant, hand-set offsets and weights (zero ``Linear`` weights, known
biases), so every sampled position is computed here by hand from the conv arithmetic.

Frames of the levels, in model-input pixels (input 66 x 98; a cell (column c, row r) of level l
sits at ``(1.5 + s_l * c, 1.5 + s_l * r)``):

* stem conv 3x3 stride 2 padding 0: stride 2, offset 0.5 + 1 * (1 - 0) = 1.5, map 32 x 48;
* stage 2, conv 3x3 s2 p1: stride 4, offset 1.5 + 2 * (1 - 1) = 1.5, map 16 x 24 -> level 0;
* stage 3, conv 3x3 s2 p1: stride 8, offset 1.5, map 8 x 12 -> level 1 (after a 1x1 conv);
* extra conv 3x3 s2 p1 on stage 3: stride 16, offset 1.5, map 4 x 6 -> level 2.

A normalised location (x, y) of level l is the continuous cell (x * W_l - 0.5, y * H_l - 0.5).
"""

from __future__ import annotations

import msda_mmcv_like
import msda_official_functions
import msda_official_like
import msda_standins
import pytest
import torch
from msda_mmcv_like import MultiScaleDeformableAttnFunction, multi_scale_deformable_attn_pytorch
from msda_official_functions import MSDeformAttnFunction, ms_deform_attn_core_pytorch
from msda_standins import MultiLevelFeatures, SamplerModel, TinyDeformableDETR
from torch import nn

from dcn_inspect.capture.session import ModelRaised, capture_offsets, probe

# The originals, taken before any capture ran.
ORIGINAL_CORE = ms_deform_attn_core_pytorch
ORIGINAL_MMCV_CORE = multi_scale_deformable_attn_pytorch
FUNCTION_APPLY = torch.autograd.Function.__dict__["apply"]

IMAGES_HW = (66, 98)
SHAPES = ((16, 24), (8, 12), (4, 6))  # (H_l, W_l)
STRIDE = (4.0, 8.0, 16.0)  # model-input pixels per cell, per level
OFFSET = 1.5  # the centre of cell (0, 0) of every level, in x and in y
TOKENS = 16 * 24 + 8 * 12 + 4 * 6  # 504
HEADS, LEVELS, POINTS = 2, 3, 2

#: OFFSETS[head][level][point] = (dx, dy): the sampling_offsets bias (cells of level l for 2-d
#: references; for boxes, multiplied by box size / points / 2).
OFFSETS = [
    [[(1.0, 0.0), (-0.5, 2.0)], [(0.0, 0.0), (0.25, -1.0)], [(3.0, 1.0), (-2.0, -2.0)]],
    [[(0.0, -1.0), (2.5, 0.5)], [(-1.0, 1.5), (0.5, 0.5)], [(1.0, 0.0), (-1.5, 0.5)]],
]
#: WEIGHTS[head][level * POINTS + point]: the softmax of the bias log(WEIGHTS).
WEIGHTS = [[0.05, 0.10, 0.15, 0.20, 0.25, 0.25], [0.30, 0.05, 0.05, 0.20, 0.10, 0.30]]
#: Decoder references: centres (x, y), or boxes (cx, cy, w, h).
CENTRES = [(0.25, 0.5), (0.8, 0.1), (0.5, 0.5), (0.1, 0.9), (0.6, 0.3)]
BOXES = [(0.25, 0.5, 0.5, 0.25), (0.8, 0.1, 0.2, 0.1), (0.5, 0.5, 0.9, 0.8), (0.1, 0.9, 0.1, 0.4),
         (0.6, 0.3, 0.3, 0.6)]  # fmt: skip

#: (style, batch_first): every capture route.
ROUTES = [
    ("official-function", True),
    ("official-pure", True),
    ("mmcv-pure", True),
    ("mmcv-pure", False),
    ("mmcv-function", True),
    ("mmcv-function", False),
]
ROUTE_CORE = {
    "official-function": "MSDeformAttnFunction.apply",
    "official-pure": "ms_deform_attn_core_pytorch",
    "mmcv-pure": "multi_scale_deformable_attn_pytorch",
    "mmcv-function": "MultiScaleDeformableAttnFunction.apply",
}


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *IMAGES_HW, generator=torch.Generator().manual_seed(3))


def _set_constant(attn: nn.Module) -> None:
    """Offsets and weights that do not depend on the query."""
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.copy_(torch.tensor(OFFSETS).flatten())
        attn.attention_weights.weight.zero_()
        attn.attention_weights.bias.copy_(torch.tensor(WEIGHTS).log().flatten())


def _build(style: str, batch_first: bool = True, box_refs: bool = False, **kwargs) -> nn.Module:
    """The model with constant attention and decoder references CENTRES (or BOXES): query_pos
    channel k holds logit(ref[k]), the reference Linear picks channel k."""
    model = TinyDeformableDETR(style, batch_first=batch_first, box_refs=box_refs, **kwargs).eval()
    _set_constant(model.encoder.layers[0].self_attn)
    _set_constant(model.decoder.layers[0].cross_attn)
    refs = torch.tensor(BOXES if box_refs else CENTRES)
    with torch.no_grad():
        model.reference_points.weight.zero_()
        model.reference_points.bias.zero_()
        for k in range(refs.shape[1]):
            model.reference_points.weight[k, k] = 1.0
        model.query_embed.weight[:, : refs.shape[1]] = torch.logit(refs)
    return model


def _token_refs() -> torch.Tensor:
    """Deformable DETR's encoder references: token (i, j) of a level (H, W) at
    ((j + .5) / W, (i + .5) / H)."""
    refs = [((j + 0.5) / w, (i + 0.5) / h) for h, w in SHAPES for i in range(h) for j in range(w)]
    return torch.tensor(refs, dtype=torch.float64)


def _expected_points(refs: torch.Tensor):
    """Image (x, y) ``[Q, HEADS, LEVELS * POINTS]`` of every point, by hand: location = centre +
    offset / (W_l, H_l) (2-d references) or centre + offset / POINTS * size * 0.5 (boxes); cell =
    location * (W_l, H_l) - 0.5; pixel = 1.5 + stride_l * cell."""
    xs = torch.zeros(refs.shape[0], HEADS, LEVELS * POINTS, dtype=torch.float64)
    ys = torch.zeros_like(xs)
    for head in range(HEADS):
        for level, (h, w) in enumerate(SHAPES):
            for point in range(POINTS):
                dx, dy = OFFSETS[head][level][point]
                if refs.shape[1] == 2:
                    loc_x, loc_y = refs[:, 0] + dx / w, refs[:, 1] + dy / h
                else:
                    loc_x = refs[:, 0] + dx / POINTS * refs[:, 2] * 0.5
                    loc_y = refs[:, 1] + dy / POINTS * refs[:, 3] * 0.5
                xs[:, head, level * POINTS + point] = OFFSET + STRIDE[level] * (loc_x * w - 0.5)
                ys[:, head, level * POINTS + point] = OFFSET + STRIDE[level] * (loc_y * h - 0.5)
    return xs, ys


def _check_frames(record) -> None:
    assert record.spatial_shapes == SHAPES
    assert record.frame_methods == ("hooks",) * 3
    for frame, stride in zip(record.level_frames, STRIDE):
        assert (frame.stride_x, frame.stride_y, frame.offset_x, frame.offset_y) == (
            stride,
            stride,
            OFFSET,
            OFFSET,
        )
    assert record.point_level == (0, 0, 1, 1, 2, 2)


def _check_weights(record, queries: int) -> None:
    expected = torch.tensor(WEIGHTS)[None, None].expand(2, queries, -1, -1)
    torch.testing.assert_close(record.weights, expected, rtol=0, atol=1e-6)


def _check_points(record, refs: torch.Tensor) -> None:
    x, y = record.points_in_input()
    ex, ey = _expected_points(refs)
    for got, want in ((x, ex), (y, ey)):
        assert got.shape == (2, refs.shape[0], HEADS, LEVELS * POINTS)
        torch.testing.assert_close(got, want[None].expand_as(got), rtol=0, atol=1e-3)


def test_standin_cores_sample_cell_centres():
    """The stand-ins sample as the capture reads them: location ((j + .5) / W, (i + .5) / H)
    with weight 1 returns token (i, j) of that level, on both cores."""
    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor(SHAPES)
    value = torch.randn(1, TOKENS, HEADS, 3, generator=gen)
    cells = [(1, 2, 5), (0, 15, 23), (2, 3, 0)]  # (level, row, column)
    locations = torch.zeros(1, len(cells), HEADS, LEVELS, 1, 2)
    weights = torch.zeros(1, len(cells), HEADS, LEVELS, 1)
    starts = (0, 384, 480)
    for q, (level, i, j) in enumerate(cells):
        h, w = SHAPES[level]
        locations[0, q, :, level, 0] = torch.tensor([(j + 0.5) / w, (i + 0.5) / h])
        weights[0, q, :, level, 0] = 1.0
    for core in (ms_deform_attn_core_pytorch, multi_scale_deformable_attn_pytorch):
        out = core(value, shapes, locations, weights).view(1, len(cells), HEADS, 3)
        for q, (level, i, j) in enumerate(cells):
            token = starts[level] + i * SHAPES[level][1] + j
            torch.testing.assert_close(out[0, q], value[0, token], rtol=0, atol=1e-6)


@pytest.mark.parametrize("style,batch_first", ROUTES)
def test_encoder_points_by_hand(style, batch_first):
    model = _build(style, batch_first)
    record = probe(model, _images()).capture.attention["encoder.layers.0.self_attn"]
    assert record.kind == "encoder"
    assert ROUTE_CORE[style] in record.captured_by
    assert record.module_type == (
        "MSDeformAttn" if "official" in style else "MultiScaleDeformableAttention"
    )
    assert record.query_count == TOKENS and record.heads == HEADS
    torch.testing.assert_close(record.queries, torch.arange(TOKENS))
    _check_frames(record)
    _check_weights(record, TOKENS)
    refs = _token_refs()
    _check_points(record, refs)
    # Token 411 = level 1 (8 x 12), row 2, column 3; reference (3.5 / 12, 2.5 / 8).
    x, y = record.points_in_input()
    # Head 0, level 0 (16 x 24, stride 4), point 0, offset (1, 0): cell (7 - .5 + 1, 5 - .5).
    assert abs(x[1, 411, 0, 0] - 31.5) < 1e-3 and abs(y[1, 411, 0, 0] - 19.5) < 1e-3
    # Head 1, level 2 (4 x 6, stride 16), point 1, offset (-1.5, .5): cell (1.75 - 2, 1.25).
    assert abs(x[0, 411, 1, 5] - -2.5) < 1e-3 and abs(y[0, 411, 1, 5] - 21.5) < 1e-3
    # References: recorded as passed ([B, S, L, 2], the same on every level) ...
    expected_refs = refs[None, :, None].expand(2, -1, LEVELS, -1).float()
    torch.testing.assert_close(record.reference_points, expected_refs, rtol=0, atol=1e-6)
    # ... and in the image: a token's reference on its own level is its cell centre.
    rx, ry = record.references_in_input()
    assert rx.shape == (2, TOKENS, LEVELS * POINTS)
    assert abs(rx[0, 411, 2] - 25.5) < 1e-3 and abs(ry[0, 411, 3] - 17.5) < 1e-3  # 1.5 + 8 * (3, 2)
    assert abs(rx[0, 411, 0] - 27.5) < 1e-3 and abs(rx[0, 411, 5] - 21.5) < 1e-3  # levels 0, 2
    assert abs(rx[0, 0, 0] - 1.5) < 1e-3 and abs(ry[0, 503, 4] - (1.5 + 16 * 3)) < 1e-3


@pytest.mark.parametrize("box_refs", [False, True], ids=["centres", "boxes"])
@pytest.mark.parametrize("style,batch_first", ROUTES)
def test_decoder_points_by_hand(style, batch_first, box_refs):
    model = _build(style, batch_first, box_refs)
    attention = probe(model, _images()).capture.attention
    assert list(attention) == ["encoder.layers.0.self_attn", "decoder.layers.0.cross_attn"]
    record = attention["decoder.layers.0.cross_attn"]
    assert record.kind == "decoder" and record.query_count == 5
    assert ROUTE_CORE[style] in record.captured_by
    _check_frames(record)
    _check_weights(record, 5)
    refs = torch.tensor(BOXES if box_refs else CENTRES, dtype=torch.float64)
    _check_points(record, refs)
    x, y = record.points_in_input()
    if box_refs:
        # Query 0, box (.25, .5, .5, .25); head 0, level 2, point 0, offset (3, 1):
        # location (.25 + 3 / 2 * .5 * .5, .5 + 1 / 2 * .25 * .5) = (.625, .5625).
        assert abs(x[0, 0, 0, 4] - (1.5 + 16 * (0.625 * 6 - 0.5))) < 1e-3  # 53.5
        assert abs(y[0, 0, 0, 4] - (1.5 + 16 * (0.5625 * 4 - 0.5))) < 1e-3  # 29.5
    else:
        # Query 0, centre (.25, .5); head 0, level 1 (8 x 12), point 1, offset (.25, -1).
        assert abs(x[1, 0, 0, 3] - 23.5) < 1e-3 and abs(y[1, 0, 0, 3] - 21.5) < 1e-3
    # References: [B, Q, L, 2 | 4], the same on every level; in the image, the centre.
    expected_refs = refs.float()[None, :, None].expand(2, -1, LEVELS, -1)
    torch.testing.assert_close(record.reference_points, expected_refs, rtol=0, atol=1e-6)
    rx, ry = record.references_in_input()
    # Query 0, centre (.25, .5) on level 2 (4 x 6, stride 16): cell (1, 1.5).
    assert abs(rx[0, 0, 4] - 17.5) < 1e-3 and abs(ry[0, 0, 4] - 25.5) < 1e-3
    # On level 0 (16 x 24, stride 4): cell (5.5, 7.5).
    assert abs(rx[1, 0, 1] - 23.5) < 1e-3 and abs(ry[1, 0, 1] - 31.5) < 1e-3


def test_module_called_twice_gets_hash_2():
    """The shared encoder layer runs twice: two records, each from its own call."""
    model = TinyDeformableDETR("official-function", encoder_repeats=2).eval()  # random offsets
    attention = probe(model, _images()).capture.attention
    assert list(attention) == [
        "encoder.layers.0.self_attn",
        "encoder.layers.0.self_attn#2",
        "decoder.layers.0.cross_attn",
    ]
    first, second = (
        attention["encoder.layers.0.self_attn"],
        attention["encoder.layers.0.self_attn#2"],
    )
    assert first.kind == second.kind == "encoder" and second.module_type == "MSDeformAttn"
    # The second call's queries are the first's output: other offsets, other weights.
    assert not torch.allclose(first.locations, second.locations)
    assert not torch.allclose(first.weights, second.weights)
    torch.testing.assert_close(first.reference_points, second.reference_points)


def test_core_called_by_a_plain_module():
    """A core called from a module that is no attention module: named after the innermost
    running module (``head.sampler``, not ``head``), without reference points."""
    locations = torch.zeros(3, HEADS, LEVELS, POINTS, 2)
    locations[0, 0, 0, 0] = torch.tensor([0.5, 0.25])  # level 0: cell (11.5, 3.5)
    locations[1, 1, 2, 1] = torch.tensor([1.0, 0.0])  # level 2: cell (5.5, -0.5)
    locations[2, 0, 1, 0] = torch.tensor([0.125, 0.75])  # level 1: cell (1, 5.5)
    model = SamplerModel(locations).eval()
    result = probe(model, _images())
    assert list(result.capture.attention) == ["head.sampler"]
    record = result.capture.attention["head.sampler"]
    assert record.module_type == "LevelSampler" and record.kind == "decoder"
    assert "ms_deform_attn_core_pytorch" in record.captured_by
    assert record.reference_points is None and record.references_in_input() is None
    _check_frames(record)
    torch.testing.assert_close(record.weights, torch.full((2, 3, HEADS, 6), 1 / 6))
    x, y = record.points_in_input()
    assert (float(x[0, 0, 0, 0]), float(y[0, 0, 0, 0])) == pytest.approx((47.5, 15.5), abs=1e-3)
    assert (float(x[1, 1, 1, 5]), float(y[1, 1, 1, 5])) == pytest.approx((89.5, -6.5), abs=1e-3)
    assert (float(x[0, 2, 0, 2]), float(y[0, 2, 0, 2])) == pytest.approx((9.5, 45.5), abs=1e-3)
    # Level 0 point at location (0, 0): cell (-.5, -.5) -> 1.5 - 2 = -.5.
    assert (float(x[0, 0, 1, 0]), float(y[0, 0, 1, 0])) == pytest.approx((-0.5, -0.5), abs=1e-3)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _check_originals() -> None:
    assert msda_official_like.MSDeformAttnFunction is MSDeformAttnFunction
    assert msda_official_like.ms_deform_attn_core_pytorch is ORIGINAL_CORE
    assert msda_official_functions.ms_deform_attn_core_pytorch is ORIGINAL_CORE
    assert msda_standins.ms_deform_attn_core_pytorch is ORIGINAL_CORE
    assert msda_mmcv_like.multi_scale_deformable_attn_pytorch is ORIGINAL_MMCV_CORE
    for function in (MSDeformAttnFunction, MultiScaleDeformableAttnFunction):
        assert "apply" not in vars(function)  # inherited again, as before the capture
        assert function.apply.__func__ is FUNCTION_APPLY.__func__


@pytest.mark.parametrize("style,batch_first", ROUTES)
def test_names_restored_and_output_unchanged(style, batch_first):
    model = TinyDeformableDETR(style, batch_first=batch_first).eval()  # random offsets
    images = _images()
    _check_originals()
    with torch.no_grad():
        plain = model(images)
    with torch.no_grad(), capture_offsets(model) as capture:
        capture.watch_input(images)
        # Patched while the capture runs (else "restored" would prove nothing).
        if style == "official-pure":
            assert msda_official_like.ms_deform_attn_core_pytorch is not ORIGINAL_CORE
        elif style == "official-function":
            assert "apply" in vars(MSDeformAttnFunction)
        elif style == "mmcv-pure":
            assert msda_mmcv_like.multi_scale_deformable_attn_pytorch is not ORIGINAL_MMCV_CORE
        else:
            assert "apply" in vars(MultiScaleDeformableAttnFunction)
        captured = model(images)
    assert len(capture.attention) == 2
    _check_originals()
    assert _hook_count(model) == 0
    for got, want in zip(captured, plain):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        model(images)
    assert len(capture.attention) == 2  # nothing recorded after the capture


class _RaisesAfterAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.detr = TinyDeformableDETR("official-function")

    def forward(self, images):
        self.detr(images)
        raise RuntimeError("boom")


def test_names_restored_when_the_model_raises():
    with pytest.raises(ModelRaised, match="boom"):
        probe(_RaisesAfterAttention().eval(), _images())
    _check_originals()


def test_model_without_attention_records_nothing():
    """The backbone's module imports the cores (they are patched) but never calls them."""
    images = _images()
    assert probe(MultiLevelFeatures().eval(), images).capture.attention == {}
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU()).eval()
    assert probe(plain, images).capture.attention == {}
    _check_originals()


def test_keep_tokens_keeps_chosen_encoder_queries():
    model = _build("mmcv-function", batch_first=False)
    images = _images()
    seen = []

    def keep(shapes, frames):
        seen.append((shapes, frames))
        return [0, 411, 503]

    full = probe(model, images).capture.attention
    with torch.no_grad(), capture_offsets(model, keep_tokens=keep) as capture:
        capture.watch_input(images)
        model(images)
    kept = capture.attention
    assert len(seen) == 1  # asked for the encoder call only
    assert seen[0][0] == SHAPES and seen[0][1] == full["encoder.layers.0.self_attn"].level_frames
    encoder = kept["encoder.layers.0.self_attn"]
    assert encoder.queries.tolist() == [0, 411, 503] and encoder.query_count == TOKENS
    assert encoder.locations.shape == (2, 3, HEADS, 6, 2) and encoder.weights.shape == (
        2,
        3,
        HEADS,
        6,
    )
    index = torch.tensor([0, 411, 503])
    whole = full["encoder.layers.0.self_attn"]
    torch.testing.assert_close(encoder.locations, whole.locations[:, index], rtol=0, atol=0)
    torch.testing.assert_close(encoder.reference_points, whole.reference_points[:, index])
    _check_points(encoder, _token_refs()[index])
    x, y = encoder.points_in_input()
    assert abs(x[1, 1, 0, 0] - 31.5) < 1e-3 and abs(y[1, 1, 0, 0] - 19.5) < 1e-3  # token 411
    decoder = kept["decoder.layers.0.cross_attn"]
    assert decoder.queries.tolist() == list(range(5)) and decoder.locations.shape[1] == 5
    torch.testing.assert_close(decoder.locations, full["decoder.layers.0.cross_attn"].locations)
