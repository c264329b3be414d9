"""``nn.Module`` wrappers of the deformable ops, named and laid out like mmcv/torchvision.

Every module reports the offsets (and masks) it actually uses to registered observers just
before calling the op; :mod:`dcn_inspect.capture.session` uses that to capture offset fields without
recomputing them.

Drop-in notes for users of the peers' modules:

* :class:`DeformConv2d` has torchvision's signature and semantics: ``bias=True`` by default,
  ``forward(input, offset, mask=None)``, offset groups inferred from the offset's channels.
  mmcv 1.x's ``mmcv.ops.DeformConv2d`` differs: its positional argument after ``groups`` is
  ``deform_groups``, it has no bias (``bias=False``, and a bias is refused), and its forward
  takes no mask (v1 only). Port mmcv v1 code with ``DeformConv2d(..., bias=False)`` and
  keyword arguments, or use :class:`DeformConv2dPack` for mmcv's ``DCN``.
* :class:`DeformConv2dPack` (mmcv ``DCN``, ``bias=False``) and :class:`ModulatedDeformConv2dPack`
  (mmcv ``DCNv2`` / ``ModulatedDeformConv2dPack``, ``bias=True``) take mmcv's positional
  order; the offset group count is ``offset_groups`` (torchvision's word), and mmcv's
  keywords ``deform_groups`` and ``deformable_groups`` (mmdetection 1.x) are accepted as
  aliases. ``im2col_step`` is accepted and ignored: it only bounds mmcv's scratch memory and
  never changes results (our kernels bound theirs by ``DCN_INSPECT_COLUMN_BUDGET``).
* :class:`DeformRoIPoolPack` / :class:`ModulatedDeformRoIPoolPack` are mmcv's ``dpool`` /
  ``mdpool``; ``sampling_ratio <= 0`` means adaptive everywhere (mmcv writes 0, torchvision -1).
* The convolution modules are TorchScript-scriptable (``torch.jit.script(DeformConv2d(...))``).
  A scripted module calls ``torch.ops.dcn_inspect.deform_conv2d`` when the native backend is
  active at scripting time, else the pure-PyTorch reference (:mod:`dcn_inspect.ops.reference`);
  scripted modules skip the offset observers.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from dcn_inspect.ops import functional as F_ops
from dcn_inspect.ops._validate import IntPair, pair
from dcn_inspect.ops.reference import deform_conv2d_checked

OffsetObserver = Callable[..., None]


def _resolve_offset_groups(
    offset_groups: Optional[int], deform_groups: Optional[int], deformable_groups: Optional[int]
) -> int:
    """The offset group count from ``offset_groups`` or its mmcv aliases (1 when none is given)."""
    given = {
        name: int(value)
        for name, value in (
            ("offset_groups", offset_groups),
            ("deform_groups", deform_groups),
            ("deformable_groups", deformable_groups),
        )
        if value is not None
    }
    if len(set(given.values())) > 1:
        raise ValueError(f"conflicting offset group counts: {given}")
    value = next(iter(given.values()), 1)
    if value < 1:
        raise ValueError(f"offset_groups must be >= 1, got {value}")
    return value


class _ObservedOffsets(nn.Module):
    """Mixin: a list of callbacks told about every offset tensor the module uses."""

    __jit_ignored_attributes__ = ["_offset_observers"]

    def __init__(self) -> None:
        super().__init__()
        self._offset_observers: List[OffsetObserver] = []
        self._script_native = False

    @torch.jit.unused
    def _notify(self, record: dict) -> None:
        for observer in list(self._offset_observers):
            observer(self, **record)

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script``: scripted code calls the native op only if it is
        loaded."""
        from dcn_inspect.ops import _backend

        self._script_native = _backend.info().name == "native"
        return self


class DeformConv2d(_ObservedOffsets):
    """Deformable convolution whose offsets (and optional mask) are passed in (torchvision style).

    ``forward(input, offset, mask=None)``: input [B, C, H, W]; offset [B, 2*G*kh*kw, Ho, Wo]
    (dy, dx interleaved per kernel point, G offset groups inferred from its channels); mask
    [B, G*kh*kw, Ho, Wo] or None. See the module docstring for mmcv's ``DeformConv2d``.
    """

    __constants__ = ["_script_native"]

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
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                f"by groups ({groups})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        self.dilation = pair(dilation, "dilation")
        self.groups = groups
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
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

    @torch.jit.unused
    def deform(
        self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Apply the op with the given offsets, telling the observers first."""
        self._notify(dict(input=input, offset=offset, mask=mask))
        return F_ops.deform_conv2d(
            input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )

    def _deform_scripted(
        self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """What a scripted module runs instead of :meth:`deform` (no observers)."""
        if self._script_native:
            empty = torch.empty(0, dtype=input.dtype, device=input.device)
            kernel_points = self.weight.shape[2] * self.weight.shape[3]
            return torch.ops.dcn_inspect.deform_conv2d(
                input,
                self.weight,
                offset,
                mask if mask is not None else empty,
                self.bias if self.bias is not None else empty,
                self.stride[0],
                self.stride[1],
                self.padding[0],
                self.padding[1],
                self.dilation[0],
                self.dilation[1],
                input.shape[1] // self.weight.shape[1],
                offset.shape[1] // (2 * kernel_points),
                mask is not None,
            )
        return deform_conv2d_checked(
            input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )

    def forward(
        self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._deform_scripted(input, offset, mask)
        return self.deform(input, offset, mask)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}"
        )


class DeformConv2dPack(DeformConv2d):
    """Deformable conv v1 with its own zero-initialised offset branch ``conv_offset`` (mmcv
    ``DCN``).

    The offset conv has the same kernel, stride, padding and dilation as the deformable conv
    and ``2 * offset_groups * kh * kw`` output channels (dy, dx interleaved per kernel point).
    Positional order and defaults as mmcv's ``DeformConv2dPack`` (``bias=False``).
    ``offset_groups`` (default 1): offset groups; the keywords ``deform_groups`` (mmcv) and
    ``deformable_groups`` (mmdetection 1.x) are compatibility aliases of it. ``im2col_step`` is
    accepted for mmcv compatibility and has no effect on the results.
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
        offset_groups: Optional[int] = None,
        bias: bool = False,
        im2col_step: int = 32,
        *,
        deform_groups: Optional[int] = None,
        deformable_groups: Optional[int] = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        self.offset_groups = _resolve_offset_groups(offset_groups, deform_groups, deformable_groups)
        if in_channels % self.offset_groups:
            raise ValueError(
                f"in_channels ({in_channels}) must be divisible by offset_groups "
                f"({self.offset_groups})"
            )
        self.im2col_step = int(im2col_step)  # accepted for mmcv compatibility; no effect
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

    @property
    def deform_groups(self) -> int:
        """mmcv's name of :attr:`offset_groups` (read-only compatibility alias)."""
        return self.offset_groups

    def offset_channels(self) -> int:
        return 2 * self.offset_groups * self.kernel_points

    def offsets_and_mask(self, input: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.conv_offset(input), None

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        offset, mask = self.offsets_and_mask(input)
        if torch.jit.is_scripting():
            return self._deform_scripted(input, offset, mask)
        return self.deform(input, offset, mask)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", offset_groups={self.offset_groups}"


class ModulatedDeformConv2dPack(DeformConv2dPack):
    """Modulated deformable conv (DCNv2) with its own offset branch (mmcv ``DCNv2``).

    ``conv_offset`` has ``3 * offset_groups * kh * kw`` channels: the first two thirds are the
    offsets, the last third mask logits passed through a sigmoid (mmcv's chunk-by-3 split).
    ``bias=True`` by default, like mmcv's ``ModulatedDeformConv2d`` / ``DCNv2`` (so their
    checkpoints' ``bias`` keys load); other arguments as :class:`DeformConv2dPack`.
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
        offset_groups: Optional[int] = None,
        bias: bool = True,
        im2col_step: int = 32,
        *,
        deform_groups: Optional[int] = None,
        deformable_groups: Optional[int] = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            offset_groups,
            bias,
            im2col_step,
            deform_groups=deform_groups,
            deformable_groups=deformable_groups,
        )

    def offset_channels(self) -> int:
        return 3 * self.offset_groups * self.kernel_points

    def offsets_and_mask(self, input: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        out = self.conv_offset(input)
        offset_y_part, offset_x_part, mask_logits = torch.chunk(out, 3, dim=1)
        return torch.cat((offset_y_part, offset_x_part), dim=1), torch.sigmoid(mask_logits)


class DeformRoIPool(_ObservedOffsets):
    """Deformable RoI pooling with offsets passed in: ``forward(input, rois, offset=None)``.

    ``sampling_ratio``: samples per bin side; ``<= 0`` adaptive (mmcv 0, torchvision -1).
    """

    def __init__(
        self,
        output_size: IntPair,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.output_size = pair(output_size, "output_size")
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)

    def pool(
        self, input: torch.Tensor, rois: torch.Tensor, offset: Optional[torch.Tensor]
    ) -> torch.Tensor:
        self._notify(dict(input=input, rois=rois, offset=offset))
        return F_ops.deform_roi_pool(
            input,
            rois,
            offset,
            self.output_size,
            self.spatial_scale,
            self.sampling_ratio,
            self.gamma,
        )

    def plain(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """Pooling without offsets (the input of the Pack modules' fc branches)."""
        return F_ops.deform_roi_pool(
            input, rois, None, self.output_size, self.spatial_scale, self.sampling_ratio, self.gamma
        )

    def forward(
        self, input: torch.Tensor, rois: torch.Tensor, offset: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return self.pool(input, rois, offset)


def _fc_branch(inputs: int, hidden: int, outputs: int, layers: int) -> nn.Sequential:
    """mmcv's fc branch: ``layers`` Linear layers with ReLU between, last one zero-initialised."""
    modules: List[nn.Module] = []
    width = inputs
    for _ in range(layers - 1):
        modules += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    last = nn.Linear(width, outputs)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*modules, last)


class DeformRoIPoolPack(DeformRoIPool):
    """Deformable RoI pooling with mmcv's offset fc branch (``offset_fc``, last layer
    zero-initialised).

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
        self.deform_fc_channels = deform_fc_channels
        ph, pw = self.output_size
        self.offset_fc = _fc_branch(
            ph * pw * output_channels, deform_fc_channels, ph * pw * 2, layers=3
        )

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        plain = self.plain(input, rois)
        offset = self.offset_fc(plain.flatten(1)).view(rois.shape[0], 2, *self.output_size)
        return self.pool(input, rois, offset)


class ModulatedDeformRoIPoolPack(DeformRoIPool):
    """Modulated deformable RoI pooling (mmcv ``ModulatedDeformRoIPoolPack``, ``mdpool``).

    As :class:`DeformRoIPoolPack`, plus a ``mask_fc`` branch (Linear, ReLU, Linear, Sigmoid;
    its last Linear zero-initialised, so every bin starts at 0.5) whose [R, 1, ph, pw] output
    multiplies the deformed pooling. Observers see the offsets; the mask is applied after.
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
        self.deform_fc_channels = deform_fc_channels
        ph, pw = self.output_size
        self.offset_fc = _fc_branch(
            ph * pw * output_channels, deform_fc_channels, ph * pw * 2, layers=3
        )
        mask_fc = _fc_branch(ph * pw * output_channels, deform_fc_channels, ph * pw, layers=2)
        self.mask_fc = nn.Sequential(
            *mask_fc, nn.Sigmoid()
        )  # indices as mmcv's: mask_fc[2] is the last Linear

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        plain = self.plain(input, rois).flatten(1)
        offset = self.offset_fc(plain).view(rois.shape[0], 2, *self.output_size)
        mask = self.mask_fc(plain).view(rois.shape[0], 1, *self.output_size)
        return self.pool(input, rois, offset) * mask


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

    def forward(
        self, input: torch.Tensor, rois: torch.Tensor, trans: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        self._notify(dict(input=input, rois=rois, offset=trans))
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
            f"output_dim={self.output_dim}, group_size={self.group_size}, "
            f"pooled_size={self.pooled_size}, part_size={self.part_size}, "
            f"sample_per_part={self.sample_per_part}, trans_std={self.trans_std}, "
            f"spatial_scale={self.spatial_scale}"
        )
