"""The demo network: the small deformable network whose trained weights ship with dcn-inspect.

Registered as ``dcn-sample`` (the name its shipped checkpoints in ``sample_weights/`` carry).

The paper's structure at toy size (PAPER.md §3): a ResNet-like backbone at stride 8 whose
last stage (``layer4``) keeps the stride and has three bottleneck blocks with a 3x3
deformable conv of dilation 2 (``layer4.{0,1,2}.conv2``, offset convs zero-initialised, so
training starts from the plain dilated network), then

* a dense head: per-pixel logits over background + shape classes, upsampled to the input
  size (``seg``);
* an R-FCN-style head for RoIs: 1x1 convs to k*k*(C+1) position-sensitive score maps and to
  2*k*k*(C+1) class-specific offset maps; the offsets are PS-RoI-pooled from the offset maps
  (no offsets of their own) into trans [R, 2*(C+1), k, k] (x first), which deform the
  pooling of the score maps (:class:`~dcn_inspect.ops.DeformPSRoIPool`, 3x3 bins); the bins
  are averaged ("voting") into ``roi_logits`` [R, C+1]. With ``offset_bound`` b > 0 the
  pooled normalised offsets are bounded softly, ``b * tanh(trans / b)`` (|offset| < b, so a
  bin moves less than ``trans_std * b`` RoI widths); 0 leaves them unbounded.

``dcn-sample-dilated`` is the same network with regular dilated convs in place of the
deformable ones: the baseline of the model card.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dcn_inspect.models.registry import Preprocess, register
from dcn_inspect.ops import DeformConv2dPack, DeformPSRoIPool, deform_psroi_pool

#: Where the trained weights live (``sample_weights/`` at the repository root).
WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "sample_weights"
#: Environment variable overriding the path of the ``dcn-sample`` weights.
WEIGHTS_ENV = "DCN_INSPECT_SAMPLE_WEIGHTS"

#: Shape classes of the synthetic task (background is class 0 of every output).
CLASS_NAMES = ("disc", "square", "triangle", "cross", "star")

#: Total stride of the backbone (layer4 and both heads work at 1/8 of the input).
STRIDE = 8


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with a projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """res5-style bottleneck: 1x1 -> 3x3 (deformable or plain, dilation 2) -> 1x1, stride 1."""

    def __init__(self, cin: int, mid: int, cout: int, deformable: bool, dilation: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        if deformable:
            self.conv2: nn.Module = DeformConv2dPack(
                mid, mid, 3, padding=dilation, dilation=dilation, bias=False
            )
        else:
            self.conv2 = nn.Conv2d(mid, mid, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample: Optional[nn.Module] = None
        if cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class DemoNet(nn.Module):
    """Backbone (stride 8) + dense segmentation head + deformable PS RoI pooling head.

    ``forward(images, rois=None)``: images [B, 3, H, W] (H, W multiples of 8 are best);
    rois [R, 5] (batch_index, x1, y1, x2, y2) in input pixels. Returns
    ``{"seg": [B, C+1, H, W], "roi_logits": [R, C+1]}`` (the latter only with rois).
    """

    def __init__(
        self,
        num_classes: int = len(CLASS_NAMES),
        widths: Sequence[int] = (16, 24, 48, 64, 96),
        deformable: bool = True,
        bins: int = 3,
        trans_std: float = 0.1,
        offset_bound: float = 0.0,
    ) -> None:
        super().__init__()
        w0, w1, w2, w3, w4 = widths
        self.num_classes = int(num_classes)
        self.offset_bound = float(offset_bound)
        self.deformable = bool(deformable)
        self.bins = int(bins)
        self.stem = nn.Sequential(_conv_bn(3, w0, stride=2), _conv_bn(w0, w1, stride=2))
        self.layer1 = BasicBlock(w1, w1)
        self.layer2 = BasicBlock(w1, w2, stride=2)
        self.layer3 = BasicBlock(w2, w3)
        mid = w4 // 2
        self.layer4 = nn.Sequential(
            Bottleneck(w3, mid, w4, deformable),
            Bottleneck(w4, mid, w4, deformable),
            Bottleneck(w4, mid, w4, deformable),
        )
        outputs = self.num_classes + 1
        self.seg_head = nn.Conv2d(w4, outputs, 1)
        self.rfcn_score = nn.Conv2d(w4, bins * bins * outputs, 1)
        self.rfcn_offset = nn.Conv2d(w4, 2 * bins * bins * outputs, 1)
        # Zero offsets at the start, as the deformable convs' offset branches.
        nn.init.zeros_(self.rfcn_offset.weight)
        nn.init.zeros_(self.rfcn_offset.bias)
        self.psroi_pool = DeformPSRoIPool(
            spatial_scale=1.0 / STRIDE,
            output_dim=outputs,
            group_size=bins,
            pooled_size=bins,
            part_size=bins,
            sample_per_part=4,
            trans_std=trans_std,
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """layer4 output, [B, widths[-1], ceil(H/8), ceil(W/8)]."""
        x = self.stem(images)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.layer4(x)

    def roi_logits(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """R-FCN scoring of RoIs [R, 5] (input pixels) -> [R, C+1]."""
        outputs = self.num_classes + 1
        scores = self.rfcn_score(features)
        offset_maps = self.rfcn_offset(features)
        # Per-RoI, per-bin, per-class normalised offsets: PS-pool the offset maps without offsets.
        trans = deform_psroi_pool(
            offset_maps,
            rois,
            None,
            spatial_scale=1.0 / STRIDE,
            output_dim=2 * outputs,
            group_size=self.bins,
            pooled_size=self.bins,
            part_size=self.bins,
            sample_per_part=4,
            trans_std=0.0,
        )
        if self.offset_bound > 0:
            trans = self.offset_bound * torch.tanh(trans / self.offset_bound)
        pooled = self.psroi_pool(scores, rois, trans)  # [R, C+1, k, k]
        return pooled.mean(dim=(2, 3))

    def forward(
        self, images: torch.Tensor, rois: Optional[torch.Tensor] = None
    ) -> Dict[str, torch.Tensor]:
        features = self.features(images)
        seg = F.interpolate(
            self.seg_head(features), size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        out = {"seg": seg}
        if rois is not None:
            out["roi_logits"] = self.roi_logits(features, rois.to(features.dtype))
        return out


def _weights(file_name: str, env: Optional[str] = None) -> Path:
    override = os.environ.get(env) if env else None
    return Path(override) if override else WEIGHTS_DIR / file_name


_CONFIG = {
    "num_classes": len(CLASS_NAMES),
    "widths": [16, 24, 48, 64, 96],
    "bins": 3,
    "trans_std": 0.1,
}


@register(
    "dcn-sample",
    "Demo network trained on synthetic shape scenes: stride-8 ResNet-like backbone, three 3x3 "
    "deformable convs (dilation 2) in layer4, dense shape segmentation + R-FCN deformable PS RoI "
    "pooling (3x3 bins).",
    default_config=_CONFIG,
    preprocess=Preprocess(resize=0),
    bundled_weights=_weights("dcn_sample.pt", WEIGHTS_ENV),
)
def build_deformable(**config: object) -> DemoNet:
    return DemoNet(deformable=True, **config)  # type: ignore[arg-type]


@register(
    "dcn-sample-dilated",
    "Baseline for dcn-sample: the same network and training with regular dilated 3x3 convs in "
    "layer4 (no offsets).",
    default_config=_CONFIG,
    preprocess=Preprocess(resize=0),
    bundled_weights=_weights("dcn_sample_dilated.pt"),
)
def build_dilated(**config: object) -> DemoNet:
    return DemoNet(deformable=False, **config)  # type: ignore[arg-type]
