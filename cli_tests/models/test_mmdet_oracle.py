"""mmdetection's own ResNet as the oracle of our mmdetection import (issue #26).

mmdetection 3.x and mmengine are pure Python; ``make test`` installs them (``--no-deps``, see
the Makefile). mmcv is compiled and not installable with the CPU-only torch, so a minimal
``mmcv`` stands in for it here, only for the duration of this module's tests: ``mmcv.cnn``'s
builders (what ``mmdet.models.backbones.resnet`` imports) backed by ``torch.nn``, and mmcv's
``DCN`` / ``DCNv2`` layers with mmcv's constructor signature, parameter names (``weight``,
``bias``, ``conv_offset``) and offset/mask derivation, calling our ``deform_conv2d`` op as the
sampling kernel. Everything else, the block layout, strides, where the deformable convs sit,
their bias flags and offset-group counts, the state-dict keys and the checkpoint's embedded
config (mmengine's ``Config.pretty_text``, as mmengine's runner writes it), is mmdetection's
and mmengine's own code.

A ResNet-50 with DCN (v1) or DCNv2, 4 deform groups in stages 2-4, gets random weights, is
saved as an mmdetection checkpoint and imported with ``load_model``; every deformable layer's
offsets (and masks) captured by ``probe`` must equal what mmdetection's layers compute (hooks
on their ``conv_offset``), and the four stage outputs must equal mmdetection's ``forward``.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
import torch
from torch import nn

from dcn_inspect.capture.session import probe
from dcn_inspect.models.loading import load_model
from dcn_inspect.ops import deform_conv2d

# find_spec, not importorskip: importing mmdet needs mmcv, which only the fixture provides.
if importlib.util.find_spec("mmdet") is None or importlib.util.find_spec("mmengine") is None:
    pytest.skip(
        "mmdetection 3.x / mmengine not installed (`make setup` installs them)",
        allow_module_level=True,
    )

# mmengine's import runs torch.jit.script, deprecated in recent torch.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"
)

DEFORM_GROUPS = 4
DCN_STAGES = (False, True, True, True)


# ------------------------------------------------------------------------ the stand-in mmcv


def _pair(value) -> Tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)  # type: ignore


class _DeformConv2dPack(nn.Module):
    """mmcv.ops.DeformConv2dPack (``DCN``): mmcv's signature; no bias (mmcv refuses one)."""

    offset_factor = 2  # conv_offset channels per offset group and kernel point

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
        im2col_step: int = 32,
    ) -> None:
        super().__init__()
        assert not bias, "mmcv's DeformConv2d has no bias"
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups, self.deform_groups = groups, deform_groups
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.register_parameter("bias", None)
        self.conv_offset = nn.Conv2d(
            in_channels,
            self.deform_groups * self.offset_factor * self.kernel_size[0] * self.kernel_size[1],
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        bound = 1 / math.sqrt(self.weight[0].numel())
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def offset_and_mask(self, out: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """mmcv's use of ``conv_offset``'s output: the offsets as they are (v1)."""
        return out, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = self.offset_and_mask(self.conv_offset(x))
        return deform_conv2d(
            x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )


class _ModulatedDeformConv2dPack(_DeformConv2dPack):
    """mmcv.ops.ModulatedDeformConv2dPack (``DCNv2``): bias by default (mmdetection passes
    ``bias=False``); of ``conv_offset``'s 3 channel chunks the first two are the offsets, the
    last the mask logits."""

    offset_factor = 3

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deform_groups=1,
        bias=True,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            deform_groups,
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))

    def offset_and_mask(self, out: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        return torch.cat((o1, o2), dim=1), torch.sigmoid(mask)


_CONV_LAYERS = {
    "Conv": nn.Conv2d,
    "Conv2d": nn.Conv2d,
    "DCN": _DeformConv2dPack,
    "DCNv2": _ModulatedDeformConv2dPack,
}


def _build_conv_layer(cfg: Optional[dict], *args, **kwargs) -> nn.Module:
    cfg = dict(type="Conv2d") if cfg is None else dict(cfg)
    return _CONV_LAYERS[cfg.pop("type")](*args, **kwargs, **cfg)


def _build_norm_layer(cfg: dict, num_features: int, postfix="") -> Tuple[str, nn.Module]:
    cfg = dict(cfg)
    kind = cfg.pop("type")
    assert kind in ("BN", "BN2d"), f"the stand-in mmcv builds BN only, not {kind}"
    requires_grad = cfg.pop("requires_grad", True)
    cfg.setdefault("eps", 1e-5)
    layer = nn.BatchNorm2d(num_features, **cfg)
    for param in layer.parameters():
        param.requires_grad = requires_grad
    return f"bn{postfix}", layer


def _build_plugin_layer(*args, **kwargs):
    raise NotImplementedError("the stand-in mmcv has no plugin layers")


def _stand_in_mmcv() -> Dict[str, types.ModuleType]:
    mmcv = types.ModuleType("mmcv")
    mmcv.__version__ = "2.1.0"  # within mmdet 3.3's accepted range
    mmcv.__path__ = []
    cnn = types.ModuleType("mmcv.cnn")
    cnn.build_conv_layer = _build_conv_layer
    cnn.build_norm_layer = _build_norm_layer
    cnn.build_plugin_layer = _build_plugin_layer
    ops = types.ModuleType("mmcv.ops")
    ops.DeformConv2dPack = _DeformConv2dPack
    ops.ModulatedDeformConv2dPack = _ModulatedDeformConv2dPack
    mmcv.cnn, mmcv.ops = cnn, ops
    return {"mmcv": mmcv, "mmcv.cnn": cnn, "mmcv.ops": ops}


@pytest.fixture(scope="module")
def mmdet_resnet() -> Iterator[type]:
    """mmdetection's ``ResNet`` class, imported with the stand-in mmcv; ``mmdet.models`` and its
    ``layers`` / ``backbones`` packages are entered without running their ``__init__`` (which
    imports every detector and mmcv's compiled ops)."""
    before = set(sys.modules)
    saved = {name: sys.modules.get(name) for name in ("mmcv", "mmcv.cnn", "mmcv.ops")}
    sys.modules.update(_stand_in_mmcv())
    try:
        import mmdet

        models_dir = Path(mmdet.__file__).parent / "models"
        for sub in ("", ".layers", ".backbones"):
            package = types.ModuleType("mmdet.models" + sub)
            package.__path__ = [str(models_dir / sub.lstrip("."))]
            sys.modules[package.__name__] = package
        layers = sys.modules["mmdet.models.layers"]
        layers.ResLayer = importlib.import_module("mmdet.models.layers.res_layer").ResLayer
        yield importlib.import_module("mmdet.models.backbones.resnet").ResNet
    finally:
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("mmcv", "mmdet"):
                del sys.modules[name]
        for name, module in saved.items():
            if module is not None:
                sys.modules[name] = module


# ------------------------------------------------------------------------------------- tests


def _randomise(model: nn.Module, seed: int) -> None:
    """Random weights: BN statistics and affine terms, the offset branches at a scale that moves
    samples by about a pixel, the other convs keep their (fan-in scaled) initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            elif isinstance(module, _DeformConv2dPack):
                fan_in = module.in_channels * 9
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in**0.5)
                offset = module.conv_offset
                offset.weight.copy_(torch.randn(offset.weight.shape, generator=gen) / fan_in**0.5)
                offset.bias.copy_(torch.randn(offset.bias.shape, generator=gen))


@pytest.mark.parametrize("dcn_type", ["DCN", "DCNv2"])
def test_our_import_matches_mmdetections_own_resnet(tmp_path, mmdet_resnet, dcn_type):
    from mmengine.config import Config

    dcn = dict(type=dcn_type, deform_groups=DEFORM_GROUPS, fallback_on_stride=False)
    backbone_cfg = dict(
        type="ResNet",
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type="BN", requires_grad=True),
        norm_eval=True,
        style="pytorch",
        dcn=dcn,
        stage_with_dcn=DCN_STAGES,
    )
    kwargs = {k: copy.deepcopy(v) for k, v in backbone_cfg.items() if k != "type"}
    backbone = mmdet_resnet(**kwargs)
    _randomise(backbone, seed=1 if dcn_type == "DCN" else 2)
    backbone.eval()
    deformable = {
        name: module
        for name, module in backbone.named_modules()
        if isinstance(module, _DeformConv2dPack)
    }
    assert len(deformable) == 4 + 6 + 3 and all(
        (type(m) is _ModulatedDeformConv2dPack) == (dcn_type == "DCNv2")
        and m.deform_groups == DEFORM_GROUPS
        and m.bias is None
        for m in deformable.values()
    )

    # What mmengine's runner saves: the model's state dict and the config's pretty text.
    config = Config(dict(model=dict(type="FasterRCNN", backbone=backbone_cfg)))
    state = {"backbone." + k: v for k, v in backbone.state_dict().items()}
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(8, 256, 1, 1)
    path = tmp_path / f"faster_rcnn_r50_{dcn_type.lower()}.pth"
    meta = {"cfg": config.pretty_text, "epoch": 12, "mmengine_version": "0.10.7"}
    torch.save({"meta": meta, "state_dict": state}, path)

    loaded = load_model(str(path))
    assert loaded.source == "mmdetection" and loaded.arch == "resnet50-dcn-mmdet"
    assert loaded.config["modulated"] is (dcn_type == "DCNv2")
    assert loaded.config["offset_groups"] == DEFORM_GROUPS

    # Their offsets: hooks on mmdetection's conv_offset, split as mmcv's layers split them.
    theirs: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

    def hook(name: str, layer: _DeformConv2dPack):
        return lambda _m, _i, out: theirs.__setitem__(name, layer.offset_and_mask(out))

    handles = [m.conv_offset.register_forward_hook(hook(n, m)) for n, m in deformable.items()]
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected: List[torch.Tensor] = list(backbone(images))
    for handle in handles:
        handle.remove()

    ours = probe(loaded.model, images)
    assert sorted(ours.convs) == sorted(theirs)
    for name, record in ours.convs.items():
        offset, mask = theirs[name]
        assert record.offset_groups == DEFORM_GROUPS
        torch.testing.assert_close(record.offset, offset, rtol=1e-5, atol=1e-5)
        if dcn_type == "DCNv2":
            torch.testing.assert_close(record.mask, mask, rtol=1e-5, atol=1e-6)
        else:
            assert record.mask is None
    moved = torch.cat([offset.flatten() for offset, _ in theirs.values()]).abs()
    assert moved.mean() > 0.5 and (moved % 1).std() > 0.1  # sub-pixel samples, not a lattice

    stages = [ours.output[f"layer{i}"] for i in range(1, 5)]
    assert [s.shape for s in stages] == [e.shape for e in expected]
    for actual, reference in zip(stages, expected):
        scale = reference.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-5 * scale)
