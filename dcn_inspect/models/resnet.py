"""Deformable ResNet-50/101 backbones in the two settings users meet.

* The paper's (Dai et al. 2017, R-FCN / Faster R-CNN experiments): conv5 (``layer4``) at stride
  16 -- its stride-2 removed and its 3x3 convs dilated 2 (padding 2) -- and deformable conv on
  the three 3x3 convs of res5 (``layer4.{0,1,2}.conv2``), offset conv 3x3 / dilation 2 / pad 2.
* mmdetection's ``dcn=dict(type='DCN'|'DCNv2'), stage_with_dcn=(False, True, True, True)``:
  deformable conv on the 3x3 convs of layer2..layer4 (c3-c5), stride 32, ``pytorch`` style
  (the stride of a block sits on its 3x3 conv).

Module names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1..4``, ``layerX.Y.conv2``
with its offset branch ``conv2.conv_offset``, ``downsample.0/1``), so mmdetection backbone
weights load after stripping ``backbone.``; ``stage_names`` renames the stages (detectron2's
``res2..res5``) so every output speaks of the layers by the names their checkpoint uses.
ResNeXt (``groups``, ``width_per_group``: the 3x3 convs of stage i have
``groups * width_per_group * 2**i`` channels in ``groups`` groups) covers mmdetection's
x101-32x4d / x101-64x4d DCN backbones. ``forward(images)`` returns the stage outputs.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from dcn_inspect.models.registry import Preprocess, register
from dcn_inspect.ops.modules import DeformConv2dPack, ModulatedDeformConv2dPack

#: Bottleneck output channels = EXPANSION * its 3x3 conv's channels.
EXPANSION = 4

#: Blocks per stage for the supported depths.
BLOCKS_PER_STAGE: Dict[int, Tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

#: Stage names in output order.
STAGES = ("layer1", "layer2", "layer3", "layer4")


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1) whose 3x3 conv may be deformable.

    ``stride_in_1x1`` puts the block's stride on the first 1x1 conv (caffe / MSRA / detectron2
    default) instead of the 3x3 conv (pytorch style); the offset branch always has the same
    stride, padding and dilation as the 3x3 conv it steers.
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: Optional[nn.Module] = None,
        deformable: bool = False,
        modulated: bool = False,
        offset_groups: int = 1,
        stride_in_1x1: bool = False,
        width: Optional[int] = None,
        groups: int = 1,
    ) -> None:
        super().__init__()
        width = planes if width is None else width  # ResNeXt: groups * width_per_group * 2**stage
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, width, 1, stride=stride_1x1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2: nn.Module
        if deformable:
            conv_type = ModulatedDeformConv2dPack if modulated else DeformConv2dPack
            self.conv2 = conv_type(
                width,
                width,
                3,
                stride=stride_3x3,
                padding=dilation,
                dilation=dilation,
                groups=groups,
                offset_groups=offset_groups,
                bias=False,
            )
        else:
            self.conv2 = nn.Conv2d(
                width,
                width,
                3,
                stride=stride_3x3,
                padding=dilation,
                dilation=dilation,
                groups=groups,
                bias=False,
            )
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class DeformableResNet(nn.Module):
    """ResNet-50/101 backbone with deformable 3x3 convs in chosen stages.

    Args:
        depth: 50 or 101.
        base_channels: width of the stem and of layer1's 3x3 convs (64 in the real networks;
            tests use small values).
        dcn_stages: for layer1..layer4, whether the stage's 3x3 convs are deformable.
        modulated: DCNv2 (offsets + sigmoid masks) instead of DCNv1.
        offset_groups: offset groups of every deformable conv.
        strides: stride of each stage's first block (the paper's setting uses (1, 2, 2, 1)).
        dilations: dilation (= padding) of each stage's 3x3 convs.
        stride_in_1x1: caffe style (stride on the first 1x1 conv) instead of pytorch style.
        num_classes: add global pooling and a linear classifier (``fc``) when set.
        groups: ResNeXt cardinality of the 3x3 convs (1: ResNet).
        width_per_group: ResNeXt width of one group in layer1 (None: ResNet, the 3x3 convs have
            the stage's ``planes`` channels).
        stage_names: module names of the four stages (default torchvision's ``layer1..4``).
    """

    def __init__(
        self,
        depth: int = 50,
        base_channels: int = 64,
        dcn_stages: Sequence[bool] = (False, True, True, True),
        modulated: bool = False,
        offset_groups: int = 1,
        strides: Sequence[int] = (1, 2, 2, 2),
        dilations: Sequence[int] = (1, 1, 1, 1),
        stride_in_1x1: bool = False,
        num_classes: Optional[int] = None,
        groups: int = 1,
        width_per_group: Optional[int] = None,
        stage_names: Sequence[str] = STAGES,
    ) -> None:
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"depth must be one of {sorted(BLOCKS_PER_STAGE)}, got {depth}")
        for label, values in (
            ("dcn_stages", dcn_stages),
            ("strides", strides),
            ("dilations", dilations),
        ):
            if len(values) != 4:
                raise ValueError(f"{label} needs one value per stage (4), got {list(values)}")
        if base_channels < 1 or offset_groups < 1:
            raise ValueError("base_channels and offset_groups must be positive")
        if groups < 1 or (width_per_group is not None and width_per_group < 1):
            raise ValueError("groups and width_per_group must be positive")
        stage_names = tuple(str(n) for n in stage_names)
        if (
            len(stage_names) != 4
            or len(set(stage_names)) != 4
            or not all(n.isidentifier() for n in stage_names)
        ):
            raise ValueError(
                f"stage_names needs four distinct identifiers, got {list(stage_names)}"
            )
        first_width = base_channels if width_per_group is None else groups * width_per_group
        if first_width % offset_groups or first_width % groups:
            raise ValueError(
                f"the 3x3 convs' width ({first_width}) must be divisible by offset_groups "
                f"({offset_groups}) and groups ({groups})"
            )
        self.depth = depth
        self.stage_names = stage_names
        self.conv1 = nn.Conv2d(3, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = base_channels
        for index, (name, blocks) in enumerate(zip(stage_names, BLOCKS_PER_STAGE[depth])):
            planes = base_channels * 2**index
            stage, inplanes = self._make_stage(
                inplanes,
                planes,
                blocks,
                int(strides[index]),
                int(dilations[index]),
                bool(dcn_stages[index]),
                bool(modulated),
                int(offset_groups),
                bool(stride_in_1x1),
                None if width_per_group is None else int(groups) * int(width_per_group) * 2**index,
                int(groups),
            )
            self.add_module(name, stage)
        self.fc: Optional[nn.Linear] = None
        if num_classes:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(inplanes, int(num_classes))
        self._init_weights()

    @staticmethod
    def _make_stage(
        inplanes: int,
        planes: int,
        blocks: int,
        stride: int,
        dilation: int,
        deformable: bool,
        modulated: bool,
        offset_groups: int,
        stride_in_1x1: bool,
        width: Optional[int] = None,
        groups: int = 1,
    ) -> Tuple[nn.Sequential, int]:
        downsample = None
        if stride != 1 or inplanes != planes * EXPANSION:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * EXPANSION),
            )
        # Unlike torchvision's replace_stride_with_dilation, every block of a dilated stage
        # (its first included) uses the stage's dilation: the paper and mmdetection do so.
        layers: List[nn.Module] = []
        for block in range(blocks):
            layers.append(
                Bottleneck(
                    inplanes if block == 0 else planes * EXPANSION,
                    planes,
                    stride=stride if block == 0 else 1,
                    dilation=dilation,
                    downsample=downsample if block == 0 else None,
                    deformable=deformable,
                    modulated=modulated,
                    offset_groups=offset_groups,
                    stride_in_1x1=stride_in_1x1,
                    width=width,
                    groups=groups,
                )
            )
        return nn.Sequential(*layers), planes * EXPANSION

    def _init_weights(self) -> None:
        # Offset branches stay zero-initialised (PAPER.md §1): a fresh model samples the regular
        # grid.
        offset_branches = {
            id(m.conv_offset) for m in self.modules() if isinstance(m, DeformConv2dPack)
        }
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and id(module) not in offset_branches:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        outputs: Dict[str, torch.Tensor] = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outputs[name] = x
        if self.fc is not None:
            outputs["logits"] = self.fc(torch.flatten(self.avgpool(x), 1))
        return outputs


def _config(depth: int, setting: str) -> Dict[str, object]:
    """Paper: deformable res5 only, kept at stride 16 with dilation 2. mmdetection: deformable
    c3-c5, stride 32."""
    paper = setting == "paper"
    return {
        "depth": depth,
        "base_channels": 64,
        "dcn_stages": [False, False, False, True] if paper else [False, True, True, True],
        "modulated": False,
        "offset_groups": 1,
        "strides": [1, 2, 2, 1] if paper else [1, 2, 2, 2],
        "dilations": [1, 1, 1, 2] if paper else [1, 1, 1, 1],
        "stride_in_1x1": False,
        "num_classes": None,
    }


#: The registered ResNet architectures: name -> (depth, setting). Importers use it to pick one.
RESNET_ARCHITECTURES: Dict[str, Tuple[int, str]] = {
    "resnet50-dcn-paper": (50, "paper"),
    "resnet101-dcn-paper": (101, "paper"),
    "resnet50-dcn-mmdet": (50, "mmdet"),
    "resnet101-dcn-mmdet": (101, "mmdet"),
}

# R-FCN tests with the shorter side at 600 pixels (longer side at most 1000). mmdetection's
# test pipeline: mmcv's keep-ratio rescale to 1333x800 with cv2's bilinear resize (no
# antialiasing), ImageNet mean/std in RGB, zero padding to a multiple of 32.
_PAPER_PREPROCESS = Preprocess(resize=600, max_size=1000)
MMDET_PREPROCESS = Preprocess(
    resize=800,
    max_size=1333,
    interpolation="cv2-bilinear",
    size_rule="mmdetection",
    size_divisor=32,
)


def _description(depth: int, setting: str) -> str:
    if setting == "paper":
        return (
            f"ResNet-{depth}, paper setting: conv5 at stride 16 (dilation 2), deformable 3x3 "
            "convs in the three res5 blocks (offset conv 3x3, dil 2, pad 2); v1, or v2 with "
            "modulated=true"
        )
    return (
        f"ResNet-{depth}, mmdetection setting: deformable 3x3 convs in layer2-layer4 (c3-c5), "
        "stride 32, pytorch style; loads mmdetection/detectron2 DCN and DCNv2 backbones"
    )


def build_resnet(**config: object) -> DeformableResNet:
    """Build a :class:`DeformableResNet` from a (JSON-like) config dict.

    ``deform_groups`` (mmcv's word, in configs written before dcn-inspect settled on
    ``offset_groups``) is read as ``offset_groups``.
    """
    if "deform_groups" in config:
        config["offset_groups"] = config.pop("deform_groups")
    return DeformableResNet(**config)  # type: ignore[arg-type]


for _name, (_depth, _setting) in RESNET_ARCHITECTURES.items():
    register(
        _name,
        _description(_depth, _setting),
        default_config=_config(_depth, _setting),
        preprocess=_PAPER_PREPROCESS if _setting == "paper" else MMDET_PREPROCESS,
        config_aliases={"deform_groups": "offset_groups"},
    )(build_resnet)
