"""DCNv3 and DCNv4 layers written for the tests from their published semantics (pure PyTorch).

Facts followed (InternImage's ``DCNv3_pytorch`` / ``dcnv3_core_pytorch`` and DCNv4's module):
channels-last input; ``input_proj`` / ``output_proj`` Linear layers; a depthwise conv on the
offset branch's input; per cell, ``group * P`` (x, y) offset pairs, x first, group-major, with
the ``P = k*k`` kernel points in column-major order (point ``b*k + a`` is row a, column b);
DCNv3 normalises the modulation with a softmax over each group's points, DCNv4 packs
``[2P offsets | P masks]`` per group in one Linear output (zero-padded to a multiple of 8) and
uses the masks as they are; sampling at ``ref + grid * offset_scale + offset * offset_scale``
with the reference point ``(dilation*(k-1))//2 + 0.5 + i*stride`` of the zero-padded input,
normalised to [0, 1] and read by ``grid_sample(align_corners=False, padding_mode="zeros")``;
optional ``center_feature_scale``: ``out = (1 - t) * dcn + t * x_proj``.

The class names are the real ones so dcn-inspect recognises them by name, as it would
InternImage's own layers. Also: an InternImage-like stage (channels-last, stem, three DCNv3
layers with residuals and MLPs, a downsampling conv between them) and a FlashInternImage-like
one (tokens ``[N, H*W, C]`` with the map size passed as ``shape``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def dcn_core(
    value: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    kernel: int,
    stride: int,
    pad: int,
    dilation: int,
    group: int,
    offset_scale: float,
    remove_center: bool = False,
) -> torch.Tensor:
    """The DCNv3 sampling and aggregation: value [N, H, W, C], offset [N, Ho, Wo, G*P*2],
    mask [N, Ho, Wo, G*P] -> [N, Ho, Wo, C]."""
    batch, _, _, channels = value.shape
    padded = F.pad(value, [0, 0, pad, pad, pad, pad])
    _, height, width, _ = padded.shape
    out_h, out_w = offset.shape[1:3]
    centre = (dilation * (kernel - 1)) // 2
    ref_y = (centre + 0.5 + torch.arange(out_h, dtype=value.dtype) * stride) / height
    ref_x = (centre + 0.5 + torch.arange(out_w, dtype=value.dtype) * stride) / width
    # Kernel points column-major: p = b * kernel + a (x = column b varies slowest).
    steps = torch.arange(kernel, dtype=value.dtype) * dilation - centre
    grid_x = steps.repeat_interleave(kernel) / width
    grid_y = steps.repeat(kernel) / height
    if remove_center:
        keep = [p for p in range(kernel * kernel) if p != (kernel * kernel - 1) // 2]
        grid_x, grid_y = grid_x[keep], grid_y[keep]
    points = grid_x.numel()
    offsets = offset.reshape(batch, out_h, out_w, group, points, 2)
    loc_x = (
        ref_x.view(1, 1, -1, 1, 1)
        + grid_x.view(1, 1, 1, 1, -1) * offset_scale
        + offsets[..., 0] * offset_scale / width
    )
    loc_y = (
        ref_y.view(1, -1, 1, 1, 1)
        + grid_y.view(1, 1, 1, 1, -1) * offset_scale
        + offsets[..., 1] * offset_scale / height
    )
    grid = torch.stack([loc_x, loc_y], dim=-1) * 2 - 1  # [N, Ho, Wo, G, P, 2]
    per_group = channels // group
    source = padded.permute(0, 3, 1, 2).reshape(batch * group, per_group, height, width)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(batch * group, out_h * out_w, points, 2)
    sampled = F.grid_sample(
        source, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )  # [N*G, Cg, HoWo, P]
    weights = (
        mask.reshape(batch, out_h * out_w, group, points)
        .permute(0, 2, 1, 3)
        .reshape(batch * group, 1, out_h * out_w, points)
    )
    out = (sampled * weights).sum(-1).reshape(batch, channels, out_h, out_w)
    return out.permute(0, 2, 3, 1)


class CenterFeatureScaleModule(nn.Module):
    def forward(
        self, query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        return F.linear(query, weight, bias).sigmoid()


class DCNv3_pytorch(nn.Module):
    """DCNv3 (InternImage), channels-last, from the published semantics."""

    def __init__(
        self,
        channels: int = 16,
        kernel_size: int = 3,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 2,
        offset_scale: float = 1.0,
        center_feature_scale: bool = False,
        remove_center: bool = False,
    ) -> None:
        super().__init__()
        self.channels, self.kernel_size, self.stride, self.pad, self.dilation = (
            channels,
            kernel_size,
            stride,
            pad,
            dilation,
        )
        self.group, self.group_channels, self.offset_scale = group, channels // group, offset_scale
        self.center_feature_scale = center_feature_scale
        self.remove_center = int(remove_center)
        points = kernel_size * kernel_size - self.remove_center
        self.dw_conv = nn.Sequential(
            nn.Conv2d(
                channels, channels, kernel_size, padding=(kernel_size - 1) // 2, groups=channels
            )
        )
        self.offset = nn.Linear(channels, group * points * 2)
        self.mask = nn.Linear(channels, group * points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))
            self.center_feature_scale_module = CenterFeatureScaleModule()
        self.seen: dict = {}

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        n, h, w, _ = input.shape
        x = self.input_proj(input)
        x_proj = x
        x1 = self.dw_conv(input.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        offset = self.offset(x1)
        mask = F.softmax(self.mask(x1).reshape(n, h, w, self.group, -1), -1).reshape(n, h, w, -1)
        self.seen = {"value": x, "offset": offset, "mask": mask}
        x = dcn_core(
            x,
            offset,
            mask,
            self.kernel_size,
            self.stride,
            self.pad,
            self.dilation,
            self.group,
            self.offset_scale,
            bool(self.remove_center),
        )
        self.seen["core"] = x
        if self.center_feature_scale:
            scale = self.center_feature_scale_module(
                x1, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias
            )
            self.seen["centre_scale"] = scale
            scale = scale[..., None].repeat(1, 1, 1, 1, self.channels // self.group).flatten(-2)
            x = x * (1 - scale) + x_proj * scale
        return self.output_proj(x)


class DCNv4(nn.Module):
    """DCNv4 (FlashInternImage): tokens [N, H*W, C] in and out, packed offset_mask, no softmax."""

    def __init__(
        self,
        channels: int = 16,
        kernel_size: int = 3,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 2,
        offset_scale: float = 1.0,
        dw_kernel_size: Optional[int] = 3,
    ) -> None:
        super().__init__()
        self.channels, self.kernel_size, self.stride, self.pad, self.dilation = (
            channels,
            kernel_size,
            stride,
            pad,
            dilation,
        )
        self.group, self.group_channels, self.offset_scale = group, channels // group, offset_scale
        self.dw_kernel_size = dw_kernel_size
        self.center_feature_scale = False
        self.remove_center = 0
        self.K = group * kernel_size * kernel_size
        if dw_kernel_size is not None:
            self.offset_mask_dw = nn.Conv2d(
                channels,
                channels,
                dw_kernel_size,
                padding=(dw_kernel_size - 1) // 2,
                groups=channels,
            )
        self.offset_mask = nn.Linear(channels, int(math.ceil(self.K * 3 / 8) * 8))
        self.value_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self.seen: dict = {}

    def forward(self, input: torch.Tensor, shape: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        n, tokens, c = input.shape
        h, w = shape if shape is not None else (int(tokens**0.5), int(tokens**0.5))
        x = self.value_proj(input).reshape(n, h, w, -1)
        if self.dw_kernel_size is not None:
            source = (
                self.offset_mask_dw(input.view(n, h, w, c).permute(0, 3, 1, 2))
                .permute(0, 2, 3, 1)
                .reshape(n, tokens, c)
            )
        else:
            source = input
        packed = self.offset_mask(source).reshape(n, h, w, -1)
        points = self.kernel_size * self.kernel_size
        per_group = packed[..., : self.group * 3 * points].reshape(n, h, w, self.group, 3 * points)
        offset = per_group[..., : 2 * points].reshape(n, h, w, -1)
        mask = per_group[..., 2 * points :].reshape(n, h, w, -1)
        self.seen = {"value": x, "offset": offset, "mask": mask}
        x = dcn_core(
            x,
            offset,
            mask,
            self.kernel_size,
            self.stride,
            self.pad,
            self.dilation,
            self.group,
            self.offset_scale,
        )
        self.seen["core"] = x
        return self.output_proj(x.reshape(n, tokens, -1))


def set_constant_offsets(
    layer: nn.Module,
    stretch: Sequence[float],
    logits: Optional[Sequence[Sequence[float]]] = None,
    masks: Optional[Sequence[Sequence[float]]] = None,
) -> None:
    """Zero-weight offset branch whose bias moves kernel point (a, b) of group g by
    ((a-1)*e_g, (b-1)*e_g) (written in the layer's own layout: x first, column-major points);
    ``logits`` (DCNv3) or ``masks`` (DCNv4): per group, per column-major point."""
    k = layer.kernel_size
    points = k * k
    group = layer.group
    offset_bias = torch.zeros(group * points * 2)
    for g, e in enumerate(stretch):
        for p in range(points):
            b, a = divmod(p, k)  # column-major
            offset_bias[2 * (g * points + p)] = (b - (k - 1) / 2) * e  # x
            offset_bias[2 * (g * points + p) + 1] = (a - (k - 1) / 2) * e  # y
    with torch.no_grad():
        if isinstance(layer, DCNv3_pytorch):
            layer.offset.weight.zero_()
            layer.offset.bias.copy_(offset_bias)
            layer.mask.weight.zero_()
            layer.mask.bias.copy_(
                torch.tensor(logits, dtype=torch.float32).reshape(-1)
                if logits is not None
                else torch.zeros(group * points)
            )
        else:
            packed = torch.zeros(layer.offset_mask.out_features)
            for g in range(group):
                packed[g * 3 * points : g * 3 * points + 2 * points] = offset_bias[
                    g * 2 * points : (g + 1) * 2 * points
                ]
                packed[g * 3 * points + 2 * points : (g + 1) * 3 * points] = (
                    torch.tensor(masks[g]) if masks is not None else 1.0
                )
            layer.offset_mask.weight.zero_()
            layer.offset_mask.bias.copy_(packed)


class ToChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class ToChannelsFirst(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class InternImageLayer(nn.Module):
    """x + dcn(norm(x)), then x + mlp(norm(x)); channels-last."""

    def __init__(self, core: nn.Module, channels: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.dcn = core
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels)
        )

    def forward(self, x: torch.Tensor, shape: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        x = x + (self.dcn(self.norm1(x)) if shape is None else self.dcn(self.norm1(x), shape))
        return x + self.mlp(self.norm2(x))


class InternImageStage(nn.Module):
    """Stem (3x3 s2 conv, to channels-last, LayerNorm), two DCNv3 layers, a stride-2 downsampling
    conv (channels-first and back), a third DCNv3 layer with dilation 2."""

    def __init__(
        self,
        channels: int = 16,
        stretch: Sequence[Sequence[float]] = ((0.5, -0.25), (0.75, 0.5), (0.25, -0.5)),
        offset_scale: float = 1.0,
        logits: Optional[Sequence] = None,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1), ToChannelsLast(), nn.LayerNorm(channels)
        )
        self.layers = nn.ModuleList(
            [
                InternImageLayer(DCNv3_pytorch(channels, offset_scale=offset_scale), channels),
                InternImageLayer(DCNv3_pytorch(channels, offset_scale=offset_scale), channels),
            ]
        )
        self.down = nn.Sequential(
            ToChannelsFirst(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            ToChannelsLast(),
        )
        self.top = InternImageLayer(
            DCNv3_pytorch(channels, pad=2, dilation=2, offset_scale=offset_scale), channels
        )
        for index, layer in enumerate([self.layers[0], self.layers[1], self.top]):
            set_constant_offsets(
                layer.dcn, stretch[index], None if logits is None else logits[index]
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for layer in self.layers:
            x = layer(x)
        return self.top(self.down(x))


class FlashInternImageStage(nn.Module):
    """Stem to tokens, two DCNv4 layers on tokens with the map size passed, a stride-2 conv
    (tokens -> channels-first -> tokens), a third DCNv4 layer."""

    def __init__(
        self,
        channels: int = 16,
        stretch: Sequence[Sequence[float]] = ((0.5, -0.25), (0.75, 0.5), (0.25, -0.5)),
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.layers = nn.ModuleList(
            [
                InternImageLayer(DCNv4(channels), channels),
                InternImageLayer(DCNv4(channels), channels),
            ]
        )
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.top = InternImageLayer(DCNv4(channels, pad=2, dilation=2), channels)
        for index, layer in enumerate([self.layers[0], self.layers[1], self.top]):
            set_constant_offsets(layer.dcn, stretch[index])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        n, c, h, w = x.shape
        x = x.flatten(2).permute(0, 2, 1)  # tokens
        for layer in self.layers:
            x = layer(x, (h, w))
        x = self.down(x.view(n, h, w, c).permute(0, 3, 1, 2))
        h, w = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        return self.top(x, (h, w))
