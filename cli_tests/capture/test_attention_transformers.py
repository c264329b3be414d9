"""Multi-scale deformable attention capture against the real transformers models.

Each model is built from a tiny config with random weights (nothing is downloaded). The real
core of each model (the ``MultiScaleDeformableAttention`` kernel module, or the
``multi_scale_deformable_attention[_v2]`` function) is wrapped by a recorder of this test,
independent of dcn-inspect, before the model is built; a forward pre-hook on each attention
module records which module is running and the ``reference_points`` it got. Then
:func:`dcn_inspect.capture.session.probe` runs the same forward, and its records must match what
the real core received, call by call: names, kinds, locations, weights, levels, points, the
frames of the levels (derived here by hand from the backbone's conv arithmetic) and the sample
and reference positions in model-input pixels.

How each sibling builds the locations the core gets (transformers 5.x):

* Deformable DETR, Grounding DINO, RT-DETR (kernel module ``MultiScaleDeformableAttention``,
  6-d locations ``[N, Q, H, L, P, 2]``): 2-d references plus ``offsets / (W_l, H_l)``; 4-d
  boxes: centre plus ``offsets / P * (w, h) * 0.5``.
* RT-DETRv2 and D-FINE (function ``multi_scale_deformable_attention_v2``, 5-d locations
  ``[N, Q, H, sum(P_l), 2]`` with ``num_points_list``): box centre plus
  ``offsets / P_l * (w, h) * offset_scale``. ``method="discrete"`` reads the cell
  ``int(x * W + 0.5)`` (clamped): the cell nearest to ``x * W``, half a cell right/down of the
  bilinear position ``x * W - 0.5`` (so up to one cell away from the cell nearest to it).
  D-FINE stores the function on the instance (``self.ms_deformable_attn_core``), so patching
  its module's namespace alone misses it.
* Mask2Former (function ``multi_scale_deformable_attention``, 6-d, the pixel decoder's encoder
  only): 2-d references plus ``offsets / (W_l, H_l)``; levels coarsest first.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from dcn_inspect.capture.session import probe  # noqa: E402

IMAGE_HW = (64, 96)
Frame = Tuple[float, float]  # (stride, offset) of a frame, the same along x and y here


# --- frames by hand -------------------------------------------------------------------------


def _conv(frame: Frame, kernel: int, stride: int, padding: int) -> Frame:
    """Output cell j of a conv / pool is centred on input index ``j*stride - padding +
    (kernel-1)/2`` (the rule of dcn_inspect/core/geometry.py, written out again here)."""
    step, offset = frame
    return step * stride, offset + step * ((kernel - 1) / 2 - padding)


IMAGE: Frame = (1.0, 0.5)  # pixel j centred at j + 0.5


def _resnet_frames() -> Dict[str, Frame]:
    """HF ResNet (bottleneck, downsample on the 3x3): embedder conv 7x7/2 pad 3, max-pool
    3x3/2 pad 1; stage 1 keeps the stride; stages 2-4 downsample with a 3x3/2 pad 1 conv (the
    1x1/2 pad 0 shortcut has the same centres); the extra DETR level is a 3x3/2 pad 1 conv on
    the last backbone map."""
    stem = _conv(_conv(IMAGE, 7, 2, 3), 3, 2, 1)
    assert _conv(stem, 3, 2, 1) == _conv(stem, 1, 2, 0)  # the two branches of a stage agree
    frames = {"stage1": stem}
    for index in (2, 3, 4):
        frames[f"stage{index}"] = _conv(frames[f"stage{index - 1}"], 3, 2, 1)
    frames["extra"] = _conv(frames["stage4"], 3, 2, 1)
    return frames


def _hgnetv2_frames() -> Dict[str, Frame]:
    """HGNetV2 (D-FINE's backbone): stem1 conv 3x3/2 pad 1, pad right/bottom by 1, then two
    branches concatenated: max-pool 2x2/1 (centres at +0.5 stem1 cell) and stem2a, pad, stem2b
    (two 2x2/1 convs: +1 stem1 cell). The branches disagree by half a stem1 cell (1 input
    pixel); the tracker keeps the frame of the concat's first input, the pool branch. Then
    stem3 conv 3x3/2 pad 1, stem4 1x1; stage 1 keeps the stride, stages 2-4 downsample with a
    depthwise 3x3/2 pad 1 conv."""
    stem1 = _conv(IMAGE, 3, 2, 1)
    pool_branch = _conv(stem1, 2, 1, 0)
    conv_branch = _conv(_conv(stem1, 2, 1, 0), 2, 1, 0)
    assert conv_branch[1] - pool_branch[1] == 1.0
    frames = {"stage1": _conv(_conv(pool_branch, 3, 2, 1), 1, 1, 0)}
    for index in (2, 3, 4):
        frames[f"stage{index}"] = _conv(frames[f"stage{index - 1}"], 3, 2, 1)
    return frames


# --- tiny configs -----------------------------------------------------------------------------


def _resnet(out_features: Sequence[str] = ("stage2", "stage3", "stage4")) -> Any:
    return transformers.ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        out_features=list(out_features),
    )


def _hgnetv2() -> Any:
    return transformers.HGNetV2Config(
        stem_channels=[3, 8, 8],
        stage_in_channels=[8, 16, 32, 64],
        stage_mid_channels=[8, 8, 16, 16],
        stage_out_channels=[16, 32, 64, 128],
        stage_num_blocks=[1, 1, 1, 1],
        stage_numb_of_layers=[1, 1, 1, 1],
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        embedding_size=8,
        out_features=["stage2", "stage3", "stage4"],
    )


def _deformable_detr(**extra: Any) -> nn.Module:
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=_resnet(),
        num_queries=20,
        encoder_layers=1,
        decoder_layers=2,
        d_model=32,
        encoder_attention_heads=2,
        decoder_attention_heads=4,
        encoder_n_points=2,
        decoder_n_points=3,
        num_feature_levels=4,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_labels=3,
        **extra,
    )
    return transformers.DeformableDetrForObjectDetection(config)


def _rt_detr_kwargs() -> Dict[str, Any]:
    return dict(
        backbone_config=_resnet(),
        encoder_in_channels=[32, 64, 128],
        feat_strides=[8, 16, 32],
        encoder_hidden_dim=32,
        encoder_ffn_dim=32,
        encoder_attention_heads=2,
        d_model=32,
        num_queries=20,
        decoder_layers=2,
        decoder_in_channels=[32, 32, 32],
        decoder_ffn_dim=32,
        decoder_attention_heads=2,
        num_labels=3,
    )


def _rt_detr() -> nn.Module:
    config = transformers.RTDetrConfig(**_rt_detr_kwargs(), decoder_n_points=2)
    return transformers.RTDetrForObjectDetection(config)


def _rt_detr_v2(method: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = transformers.RTDetrV2Config(
            **_rt_detr_kwargs(), decoder_n_points=2, decoder_method=method
        )
        return transformers.RTDetrV2ForObjectDetection(config)

    return build


def _d_fine(backbone: str, method: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        kwargs = _rt_detr_kwargs()
        kwargs["backbone_config"] = _hgnetv2() if backbone == "hgnetv2" else _resnet()
        config = transformers.DFineConfig(
            **kwargs, decoder_n_points=[3, 2, 1], decoder_method=method, lqe_hidden_dim=16
        )
        return transformers.DFineForObjectDetection(config)

    return build


def _mask2former() -> nn.Module:
    # Mask2FormerModel, not ...ForUniversalSegmentation: the latter builds its loss, which needs
    # scipy; the deformable attention (pixel decoder's encoder) is the same.
    config = transformers.Mask2FormerConfig(
        backbone_config=_resnet(("stage1", "stage2", "stage3", "stage4")),
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        encoder_layers=2,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=32,
        num_queries=10,
        num_labels=3,
    )
    return transformers.Mask2FormerModel(config)


def _grounding_dino() -> nn.Module:
    config = transformers.GroundingDinoConfig(
        backbone_config=_resnet(),
        text_config=transformers.BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        ),
        num_queries=20,
        encoder_layers=1,
        decoder_layers=2,
        d_model=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_n_points=2,
        decoder_n_points=3,
        num_feature_levels=4,
        max_text_len=16,
        fusion_droppath=0.0,
    )
    return transformers.GroundingDinoForObjectDetection(config)


# --- cases ------------------------------------------------------------------------------------


@dataclass
class Case:
    """One model: how to build it, its real core, and what the capture must report."""

    id: str
    build: Callable[[], nn.Module]
    models_module: str  # transformers.models.<this>.modeling_<this>
    core: str  # a class (kernel module, its forward is wrapped) or a function of that module
    attention: str  # class name of the calling attention module
    calls: List[Tuple[str, str, int]]  # (name, kind, reference dims), in call order
    frames: List[Frame]  # per level, in the order of the call's levels
    points: Optional[List[int]] = None  # per level, where the config gives a list
    method: str = "default"
    forward_kwargs: Callable[[], Dict[str, Any]] = field(default=dict)


_RES = _resnet_frames()
_HG = _hgnetv2_frames()
_DETR_FRAMES = [_RES["stage2"], _RES["stage3"], _RES["stage4"], _RES["extra"]]
_RT_FRAMES = [_RES["stage2"], _RES["stage3"], _RES["stage4"]]
_DEC = "model.decoder.layers.{}.encoder_attn"


def _detr_calls(encoder: str, decoder_dims: int) -> List[Tuple[str, str, int]]:
    return [(encoder, "encoder", 2)] + [(_DEC.format(i), "decoder", decoder_dims) for i in (0, 1)]


def _rt_calls() -> List[Tuple[str, str, int]]:
    return [(_DEC.format(i), "decoder", 4) for i in (0, 1)]


def _text_ids() -> Dict[str, Any]:
    return {"input_ids": torch.randint(1, 100, (1, 7), generator=torch.Generator().manual_seed(1))}


# RT-DETR, RT-DETRv2 and D-FINE: the hybrid encoder's FPN upsamples with interpolate, which
# loses a frame, but every level the decoder reads is a channel concat of that upsampled branch
# with a traced map (the backbone's lateral map, or a 3x3/2 pad 1 conv of the level below), and
# the concat keeps the traced frame: the frames are "hooks" and the backbone's arithmetic, not
# the from-sizes guess.
CASES = [
    Case(
        "deformable-detr",
        _deformable_detr,
        "deformable_detr",
        "MultiScaleDeformableAttention",
        "DeformableDetrMultiscaleDeformableAttention",
        _detr_calls("model.encoder.layers.0.self_attn", 2),
        _DETR_FRAMES,
    ),
    Case(
        "deformable-detr-two-stage",
        functools.partial(
            _deformable_detr, with_box_refine=True, two_stage=True, two_stage_num_proposals=20
        ),
        "deformable_detr",
        "MultiScaleDeformableAttention",
        "DeformableDetrMultiscaleDeformableAttention",
        _detr_calls("model.encoder.layers.0.self_attn", 4),
        _DETR_FRAMES,
    ),
    Case(
        "rt-detr",
        _rt_detr,
        "rt_detr",
        "MultiScaleDeformableAttention",
        "RTDetrMultiscaleDeformableAttention",
        _rt_calls(),
        _RT_FRAMES,
    ),
    Case(
        "rt-detr-v2",
        _rt_detr_v2("default"),
        "rt_detr_v2",
        "multi_scale_deformable_attention_v2",
        "RTDetrV2MultiscaleDeformableAttention",
        _rt_calls(),
        _RT_FRAMES,
        points=[2, 2, 2],
    ),
    Case(
        "rt-detr-v2-discrete",
        _rt_detr_v2("discrete"),
        "rt_detr_v2",
        "multi_scale_deformable_attention_v2",
        "RTDetrV2MultiscaleDeformableAttention",
        _rt_calls(),
        _RT_FRAMES,
        points=[2, 2, 2],
        method="discrete",
    ),
    Case(
        "d-fine",
        _d_fine("resnet", "default"),
        "d_fine",
        "multi_scale_deformable_attention_v2",
        "DFineMultiscaleDeformableAttention",
        _rt_calls(),
        _RT_FRAMES,
        points=[3, 2, 1],
    ),
    Case(
        "d-fine-hgnetv2-discrete",
        _d_fine("hgnetv2", "discrete"),
        "d_fine",
        "multi_scale_deformable_attention_v2",
        "DFineMultiscaleDeformableAttention",
        _rt_calls(),
        [_HG["stage2"], _HG["stage3"], _HG["stage4"]],
        points=[3, 2, 1],
        method="discrete",
    ),
    Case(
        "mask2former",
        _mask2former,
        "mask2former",
        "multi_scale_deformable_attention",
        "Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention",
        [
            (f"pixel_level_module.decoder.encoder.layers.{i}.self_attn", "encoder", 2)
            for i in (0, 1)
        ],
        [_RES["stage4"], _RES["stage3"], _RES["stage2"]],  # coarsest level first
    ),
    Case(
        "grounding-dino",
        _grounding_dino,
        "grounding_dino",
        "MultiScaleDeformableAttention",
        "GroundingDinoMultiscaleDeformableAttention",
        _detr_calls("model.encoder.layers.0.deformable_layer.self_attn", 4),
        _DETR_FRAMES,
        forward_kwargs=_text_ids,
    ),
]


# --- the independent recorder -----------------------------------------------------------------


@dataclass
class RealCall:
    """What the real core received, with the attention module running at the time."""

    caller: Optional[str]
    locations: torch.Tensor  # as received: [N, Q, H, L, P, 2] or [N, Q, H, sum(P_l), 2]
    weights: torch.Tensor
    shapes: Tuple[Tuple[int, int], ...]
    points: Tuple[int, ...]  # per level
    method: str
    reference: Optional[torch.Tensor]


@dataclass
class Recorder:
    calls: List[RealCall] = field(default_factory=list)
    caller: Optional[str] = None
    reference: Optional[torch.Tensor] = None
    wrapper: Any = None

    def core(self, original: Callable) -> Callable:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            shapes = a.get("value_spatial_shapes_list", a.get("value_spatial_shapes"))
            locations = a["sampling_locations"]
            if locations.dim() == 6:
                points = (int(locations.shape[4]),) * int(locations.shape[3])
            else:
                points = tuple(int(p) for p in a["num_points_list"])
            self.calls.append(
                RealCall(
                    self.caller,
                    locations.detach().clone(),
                    a["attention_weights"].detach().clone(),
                    tuple((int(h), int(w)) for h, w in shapes),
                    points,
                    a.get("method", "default"),
                    self.reference,
                )
            )
            return original(*args, **kwargs)

        self.wrapper = recorded
        return recorded

    def watch(self, model: nn.Module, attention_class: str) -> None:
        """Pre-hooks on the attention modules: which one runs, and its reference points."""
        for name, module in model.named_modules():
            if type(module).__name__ != attention_class:
                continue
            signature = inspect.signature(module.forward)

            def enter(m: nn.Module, args: Any, kwargs: Any, _n=name, _s=signature) -> None:
                self.caller = _n
                reference = _s.bind(*args, **kwargs).arguments.get("reference_points")
                self.reference = reference.detach().clone()

            def leave(m: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
                self.caller, self.reference = None, None

            module.register_forward_pre_hook(enter, with_kwargs=True)
            module.register_forward_hook(leave, with_kwargs=True)


def _models_module(case: Case) -> Any:
    return importlib.import_module(
        f"transformers.models.{case.models_module}.modeling_{case.models_module}"
    )


def _build(case: Case, monkeypatch: pytest.MonkeyPatch) -> Tuple[nn.Module, Recorder]:
    """Wrap the real core (before building: D-FINE keeps the function it finds at __init__),
    then build the model."""
    recorder = Recorder()
    try:
        owner = _models_module(case)
        core = getattr(owner, case.core)
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"{case.id}: this transformers has no {case.core}: {exc!r:.200}")
    if isinstance(core, type):
        monkeypatch.setattr(core, "forward", recorder.core(core.forward))
    else:
        monkeypatch.setattr(owner, case.core, recorder.core(core))
    torch.manual_seed(0)
    try:
        model = case.build().eval()
    except Exception as exc:  # noqa: BLE001 - a config this version cannot build is a skip
        pytest.skip(f"{case.id}: cannot be built offline from a config: {exc!r:.200}")
    recorder.watch(model, case.attention)
    return model, recorder


def _tensors(value: Any, path: str = "out") -> Iterator[Tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{path}[{index}]")


# --- the expectations, computed from the real calls -------------------------------------------


def _per_point(call: RealCall, frames: Sequence[Frame]) -> Tuple[torch.Tensor, ...]:
    """Per point: its level's size (W, H), stride and offset, ``[P, 2]`` each (float64)."""
    levels = [lv for lv, count in enumerate(call.points) for _ in range(count)]
    size = torch.tensor([[call.shapes[lv][1], call.shapes[lv][0]] for lv in levels]).double()
    stride = torch.tensor([[frames[lv][0]] * 2 for lv in levels], dtype=torch.float64)
    offset = torch.tensor([[frames[lv][1]] * 2 for lv in levels], dtype=torch.float64)
    return size, stride, offset


def _flat(call: RealCall) -> Tuple[torch.Tensor, torch.Tensor]:
    """The real locations / weights as ``[N, Q, H, P_total, 2]`` / ``[N, Q, H, P_total]``."""
    n, q, h = call.locations.shape[:3]
    return call.locations.reshape(n, q, h, -1, 2), call.weights.reshape(n, q, h, -1)


def _expected_points(call: RealCall, frames: Sequence[Frame]) -> torch.Tensor:
    size, stride, offset = _per_point(call, frames)
    scaled = _flat(call)[0].double() * size
    if call.method == "discrete":
        # The cell the op reads: int(x * W + 0.5) clamped to the map; floor equals the op's
        # truncation wherever the clamp does not decide.
        cells = torch.minimum(torch.floor(scaled + 0.5).clamp(min=0), size - 1)
    else:
        cells = scaled - 0.5  # grid_sample, align_corners=False
    return offset + stride * cells


def _expected_references(call: RealCall, frames: Sequence[Frame]) -> torch.Tensor:
    """``[N, Q, P, 2]``: the reference point (a box's centre) of every point's level."""
    assert call.reference is not None
    size, stride, offset = _per_point(call, frames)
    levels = [lv for lv, count in enumerate(call.points) for _ in range(count)]
    if call.reference.shape[2] == 1:
        levels = [0] * len(levels)
    ref = call.reference[:, :, levels, :2].double()
    return offset + stride * (ref * size - 0.5)


# --- the test ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is faster, and far faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_capture_matches_the_real_core(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    model, recorder = _build(case, monkeypatch)
    images = torch.randn(1, 3, *IMAGE_HW, generator=torch.Generator().manual_seed(0))
    kwargs = case.forward_kwargs()

    with torch.no_grad():
        plain = model(images, **kwargs)
    plain_calls, recorder.calls = recorder.calls, []
    result = probe(model, images, **kwargs)
    real = recorder.calls

    # The capture changes nothing: same outputs, same op inputs; the patches are gone after.
    plain_out, probed_out = dict(_tensors(plain)), dict(_tensors(result.output))
    assert plain_out.keys() == probed_out.keys() and plain_out
    for key, value in plain_out.items():
        assert torch.equal(value, probed_out[key]), key
    assert len(plain_calls) == len(real)
    for before, during in zip(plain_calls, real):
        assert torch.equal(before.locations, during.locations)
    owner = _models_module(case)
    core = getattr(owner, case.core)
    assert (core.forward if isinstance(core, type) else core) is recorder.wrapper
    stored = [  # D-FINE's self.ms_deformable_attn_core: restored on the instances too
        value
        for module in model.modules()
        for value in vars(module).values()
        if getattr(value, "__name__", None) == case.core
    ]
    assert all(value is recorder.wrapper for value in stored)
    if case.models_module == "d_fine":
        assert len(stored) == len(case.calls)

    # Every call, in order, named after its attention module.
    records = list(result.capture.attention.values())
    assert [c.caller for c in real] == [name for name, _, _ in case.calls]
    assert [r.name for r in records] == [name for name, _, _ in case.calls]
    for record, call, (name, kind, ref_dims) in zip(records, real, case.calls):
        where = f"{case.id} {name}"
        assert record.kind == kind, where
        assert record.module_type == case.attention, where
        assert case.core in record.captured_by, where
        assert record.spatial_shapes == call.shapes, where
        assert len(case.frames) == len(call.shapes), where
        if case.points is not None:
            assert list(call.points) == case.points, where
        assert record.point_level == tuple(
            lv for lv, count in enumerate(call.points) for _ in range(count)
        ), where
        assert record.sampling == ("nearest" if case.method == "discrete" else "bilinear")
        assert call.method == case.method, where
        queries = int(call.locations.shape[1])
        assert record.query_count == queries
        assert torch.equal(record.queries, torch.arange(queries))
        if kind == "encoder":
            assert queries == sum(h * w for h, w in call.shapes), where

        locations, weights = _flat(call)
        torch.testing.assert_close(record.locations, locations, atol=1e-6, rtol=0)
        torch.testing.assert_close(record.weights, weights, atol=1e-6, rtol=0)

        # Frames: the backbone's arithmetic, traced through the forward.
        assert record.frame_methods == ("hooks",) * len(call.shapes), where
        assert [(f.stride_x, f.offset_x) for f in record.level_frames] == case.frames, where
        assert [(f.stride_y, f.offset_y) for f in record.level_frames] == case.frames, where

        xs, ys = record.points_in_input()
        expected = _expected_points(call, case.frames)
        torch.testing.assert_close(xs, expected[..., 0], atol=1e-3, rtol=0)
        torch.testing.assert_close(ys, expected[..., 1], atol=1e-3, rtol=0)

        # Reference points: 2-d per level, or 4-d boxes (one for all levels in the RT-DETRs).
        assert call.reference is not None and call.reference.shape[-1] == ref_dims, where
        assert record.reference_points is not None
        torch.testing.assert_close(record.reference_points, call.reference, atol=0, rtol=0)
        refs = record.references_in_input()
        assert refs is not None, where
        expected_refs = _expected_references(call, case.frames)
        torch.testing.assert_close(refs[0], expected_refs[..., 0], atol=1e-3, rtol=0)
        torch.testing.assert_close(refs[1], expected_refs[..., 1], atol=1e-3, rtol=0)


def test_discrete_positions_are_the_cells_read() -> None:
    """RT-DETRv2's discrete method reads value cells by index: feed the real function a value
    map whose features are each cell's (column, row) and one-hot weights, and the features it
    returns are the cells ``sampled_cells`` reports."""
    from dcn_inspect.capture.attention_calls import AttentionRecord
    from dcn_inspect.core.geometry import FrameMap

    v2 = pytest.importorskip("transformers.models.rt_detr_v2.modeling_rt_detr_v2")
    shapes = [(4, 6), (2, 3)]
    points = [2, 1]
    generator = torch.Generator().manual_seed(3)
    locations = torch.rand(1, 5, 1, sum(points), 2, generator=generator) * 1.4 - 0.2
    tokens = [
        torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy"), -1)
        .reshape(h * w, 2)
        .double()
        for h, w in shapes
    ]
    value = torch.cat(tokens)[None, :, None, :]  # [1, tokens, heads=1, 2]: (column, row)
    record = AttentionRecord(
        name="x",
        module_type="x",
        captured_by="x",
        kind="decoder",
        locations=locations,
        weights=torch.zeros(1, 5, 1, sum(points)),
        queries=torch.arange(5),
        query_count=5,
        point_level=(0, 0, 1),
        spatial_shapes=tuple(shapes),
        level_frames=(FrameMap(1, 1, 0, 0),) * 2,
        frame_methods=("size",) * 2,
        sampling="nearest",
    )
    cells = record.sampled_cells()
    for point in range(sum(points)):
        weights = torch.zeros(1, 5, 1, sum(points), dtype=torch.float64)
        weights[..., point] = 1.0
        read = v2.multi_scale_deformable_attention_v2(
            value, shapes, locations.double(), weights, points, "discrete"
        )
        torch.testing.assert_close(read, cells[:, :, 0, point], atol=0, rtol=0)
