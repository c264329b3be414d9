"""``nn.Module`` wrappers of the deformable ops, named and laid out like mmcv/torchvision.

Every module reports the offsets (and masks) it actually uses to registered observers just
before calling the op; :mod:`dcn_inspect.hooks` uses that to capture offset fields without
recomputing them.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from dcn_inspect.ops import functional as F_ops
from dcn_inspect.ops._validate import IntPair, pair

OffsetObserver = Callable[..., None]


class _ObservedOffsets(nn.Module):
    """Mixin: a list of callbacks told about every offset tensor the module uses."""

    def __init__(self) -> None:
        super().__init__()
        self._offset_observers: List[OffsetObserver] = []

    def _notify(self, **record: object) -> None:
        for observer in list(self._offset_observers):
            observer(self, **record)


class DeformConv2d(_ObservedOffsets):
    """Deformable convolution whose offsets (and optional mask) are passed in (torchvision style).

    ``forward(input, offset, mask=None)``; ``offset_groups`` is inferred from the offset's channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        self.dilation = pair(dilation, "dilation")
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def kernel_points(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    def deform(self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Apply the op with the given offsets, telling the observers first."""
        self._notify(input=input, offset=offset, mask=mask)
        return F_ops.deform_conv2d(
            input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )

    def forward(self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.deform(input, offset, mask)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}"
        )


class DeformConv2dPack(DeformConv2d):
    """Deformable conv v1 with its own zero-initialised offset branch ``conv_offset`` (mmcv ``DCN``).

    The offset conv has the same kernel, stride, padding and dilation as the deformable conv
    and ``2 * deform_groups * kh * kw`` output channels (dy, dx interleaved per kernel point).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.deform_groups = deform_groups
        self.conv_offset = nn.Conv2d(
            in_channels,
            self.offset_channels(),
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def offset_channels(self) -> int:
        return 2 * self.deform_groups * self.kernel_points

    def offsets_and_mask(self, input: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.conv_offset(input), None

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        offset, mask = self.offsets_and_mask(input)
        return self.deform(input, offset, mask)


class ModulatedDeformConv2dPack(DeformConv2dPack):
    """Modulated deformable conv (DCNv2) with its own offset branch (mmcv ``DCNv2``).

    ``conv_offset`` has ``3 * deform_groups * kh * kw`` channels: the first two thirds are the
    offsets, the last third mask logits passed through a sigmoid (mmcv's chunk-by-3 split).
    """

    def offset_channels(self) -> int:
        return 3 * self.deform_groups * self.kernel_points

    def offsets_and_mask(self, input: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        out = self.conv_offset(input)
        offset_y_part, offset_x_part, mask_logits = torch.chunk(out, 3, dim=1)
        return torch.cat((offset_y_part, offset_x_part), dim=1), torch.sigmoid(mask_logits)


class DeformRoIPool(_ObservedOffsets):
    """Deformable RoI pooling with offsets passed in: ``forward(input, rois, offset=None)``."""

    def __init__(self, output_size: IntPair, spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1) -> None:
        super().__init__()
        self.output_size = pair(output_size, "output_size")
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)

    def pool(self, input: torch.Tensor, rois: torch.Tensor, offset: Optional[torch.Tensor]) -> torch.Tensor:
        self._notify(input=input, rois=rois, offset=offset)
        return F_ops.deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio, self.gamma)

    def forward(self, input: torch.Tensor, rois: torch.Tensor, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.pool(input, rois, offset)


class DeformRoIPoolPack(DeformRoIPool):
    """Deformable RoI pooling with mmcv's offset fc branch (``offset_fc``, last layer zero-initialised).

    Pools plainly, predicts normalised offsets [R, 2, ph, pw] (x first) from the pooled
    features, then pools again with them.
    """

    def __init__(
        self,
        output_size: IntPair,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = output_channels
        ph, pw = self.output_size
        self.offset_fc = nn.Sequential(
            nn.Linear(ph * pw * output_channels, deform_fc_channels),
            nn.ReLU(inplace=True),
            nn.Linear(deform_fc_channels, deform_fc_channels),
            nn.ReLU(inplace=True),
            nn.Linear(deform_fc_channels, ph * pw * 2),
        )
        nn.init.zeros_(self.offset_fc[-1].weight)
        nn.init.zeros_(self.offset_fc[-1].bias)

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        plain = F_ops.deform_roi_pool(input, rois, None, self.output_size, self.spatial_scale, self.sampling_ratio, self.gamma)
        offset = self.offset_fc(plain.flatten(1)).view(rois.shape[0], 2, *self.output_size)
        return self.pool(input, rois, offset)


class DeformPSRoIPool(_ObservedOffsets):
    """Deformable position-sensitive RoI pooling (R-FCN): ``forward(input, rois, trans=None)``.

    trans: [R, 2*num_classes, part_size, part_size], x first; class-agnostic when num_classes = 1.
    """

    def __init__(
        self,
        spatial_scale: float,
        output_dim: int,
        group_size: int,
        pooled_size: Optional[int] = None,
        part_size: Optional[int] = None,
        sample_per_part: int = 4,
        trans_std: float = 0.1,
    ) -> None:
        super().__init__()
        self.spatial_scale = float(spatial_scale)
        self.output_dim = int(output_dim)
        self.group_size = int(group_size)
        self.pooled_size = int(pooled_size if pooled_size is not None else group_size)
        self.part_size = int(part_size if part_size is not None else self.pooled_size)
        self.sample_per_part = int(sample_per_part)
        self.trans_std = float(trans_std)

    def forward(self, input: torch.Tensor, rois: torch.Tensor, trans: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._notify(input=input, rois=rois, offset=trans)
        return F_ops.deform_psroi_pool(
            input,
            rois,
            trans,
            self.spatial_scale,
            self.output_dim,
            self.group_size,
            self.pooled_size,
            self.part_size,
            self.sample_per_part,
            self.trans_std,
        )

    def extra_repr(self) -> str:
        return (
            f"output_dim={self.output_dim}, group_size={self.group_size}, pooled_size={self.pooled_size}, "
            f"part_size={self.part_size}, sample_per_part={self.sample_per_part}, trans_std={self.trans_std}, "
            f"spatial_scale={self.spatial_scale}"
        )
