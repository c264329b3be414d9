"""DCNv3 (InternImage) and DCNv4 (FlashInternImage) layers, captured in the standard layout.

The layers are recognised by class name and attributes, without importing their packages:
``DCNv3`` / ``DCNv3_pytorch`` (attributes ``kernel_size``, ``stride``, ``pad``, ``dilation``,
``group``, ``group_channels``, ``offset_scale``; Linear branches ``offset`` and ``mask``) and
``DCNv4`` (the same attributes; one Linear branch ``offset_mask``). A subclass counts only if
it keeps the parent's ``forward``.

Their semantics (InternImage's pure-PyTorch ``dcnv3_core_pytorch``; DCNv4's op computes the
same sampling, checked against it by its authors), for output cell (i, j), group g and kernel
point (a, b) (row a, column b):

* tensors are channels-last: input ``[N, H, W, C]`` (DCNv4: tokens ``[N, H*W, C]`` with the
  map size passed as ``shape``); a depthwise conv (``dw_conv`` / ``offset_mask_dw``) then the
  Linear branches give, per cell, ``G*P`` (x, y) offset pairs -- x FIRST -- and ``G*P``
  modulation values, group-major; ``P = kh*kw`` kernel points in COLUMN-major order
  (point ``p = b*kh + a``), or ``P - 1`` with ``remove_center`` (the centre point left out);
* DCNv4 packs both into one ``offset_mask`` tensor: per group ``[2P offsets | P masks]``,
  zero-padded to a multiple of 8 channels;
* modulation: DCNv3 applies a softmax over each group's P points; DCNv4 uses the values as
  they are;
* the sampling location, in input-index coordinates (pixel centres at integers), is
  ``x = j*stride - pad + c + s*(b*dilation - c) + s*dx`` (``y`` likewise with i, a, dy),
  where ``s = offset_scale`` and ``c = (dilation*(k-1)) // 2``: the regular grid itself is
  scaled by ``offset_scale`` around the reference point ``c``; samples are bilinear with zeros
  outside the map (``grid_sample``, ``align_corners=False``);
* ``center_feature_scale`` (optional): the output is ``(1 - t) * DCN(x) + t * x_proj``, with
  ``t = sigmoid(Linear(...))`` per cell and group.

Conversion into the standard layout (PAPER.md §1) at capture time, so every analysis reads
these layers like any other: kernel points reordered row-major; each (x, y) pair becomes
``(dy, dx)`` with ``dx_std = s*dx + (s - 1)*(b*dilation - c)`` (so ``x = j*stride - pad +
b*dilation + dx_std`` exactly, whatever ``offset_scale``); the mask is the modulation as
applied (after the softmax for DCNv3), multiplied by ``1 - t`` where ``center_feature_scale``
blends the output with the undeformed projection (the weight ``t`` of that centre path is no
sampling point and is not recorded); a removed centre point is recorded undeformed with mask 0.
``groups`` is recorded as the channel count (each channel aggregates its own samples;
channels are mixed by the layer's Linear projections).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dcn_inspect.capture.records import LayerAdapter, OffsetCapture, opaque_hooks
from dcn_inspect.core.geometry import NHWC, TOKENS, MapLayout, Pair, as_pair


@dataclass(frozen=True)
class InternImageLayer:
    """A recognised family: class names, the offset branches and the input layout."""

    version: str  # "DCNv3" or "DCNv4"
    class_names: Tuple[str, ...]
    branches: Tuple[str, ...]  # submodules that must exist


FAMILIES = (
    InternImageLayer("DCNv3", ("DCNv3", "DCNv3_pytorch"), ("offset", "mask")),
    InternImageLayer("DCNv4", ("DCNv4",), ("offset_mask",)),
)
_ATTRIBUTES = (
    "kernel_size",
    "stride",
    "pad",
    "dilation",
    "group",
    "group_channels",
    "offset_scale",
)


def identify(module: nn.Module) -> Optional[InternImageLayer]:
    """The DCNv3/DCNv4 family of ``module`` (its class or a parent whose ``forward`` it keeps)."""
    for cls in type(module).__mro__:
        for family in FAMILIES:
            if cls.__name__ in family.class_names:
                if type(module).forward is not cls.forward:
                    return None
                if all(hasattr(module, a) for a in _ATTRIBUTES) and all(
                    isinstance(getattr(module, b, None), nn.Module) for b in family.branches
                ):
                    return family
                return None
    return None


# ----------------------------------------------------------------------------- conversion


def kernel_order(kernel: Pair) -> torch.Tensor:
    """Index into the column-major points (``b*kh + a``) of each row-major point (``a*kw + b``)."""
    kh, kw = kernel
    return torch.tensor([b * kh + a for a in range(kh) for b in range(kw)], dtype=torch.long)


def _with_centre(values: torch.Tensor, points: int, fill: float) -> torch.Tensor:
    """Insert the removed centre point (``remove_center``) as point ``(points - 1) // 2`` of
    dim -2."""
    centre = (points - 1) // 2
    filler = values.new_full(values.shape[:-2] + (1,) + values.shape[-1:], fill)
    return torch.cat([values[..., :centre, :], filler, values[..., centre:, :]], dim=-2)


def to_standard_layout(
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    kernel: Pair,
    dilation: Pair,
    group: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """DCNv3/DCNv4 offsets and modulation -> the standard layout (see the module docstring).

    ``offset`` [N, H, W, G*P*2] (x, y per point, column-major points), ``mask`` [N, H, W, G*P]
    (the modulation as applied) -> offset [N, 2*G*kh*kw, H, W] (dy, dx per point, row-major),
    mask [N, G*kh*kw, H, W].
    """
    kh, kw = kernel
    points = kh * kw
    batch, height, width, _ = offset.shape
    native = points - 1 if remove_center else points
    xy = offset.reshape(batch, height, width, group, native, 2)
    if remove_center:
        xy = _with_centre(xy, points, 0.0)
    order = kernel_order(kernel).to(offset.device)
    xy = xy[..., order, :]  # [N, H, W, G, K, 2], row-major points
    s = float(offset_scale)
    centre_y, centre_x = (dilation[0] * (kh - 1)) // 2, (dilation[1] * (kw - 1)) // 2
    rows = (
        torch.arange(kh, dtype=offset.dtype, device=offset.device).repeat_interleave(kw)
        * dilation[0]
        - centre_y
    )
    cols = (
        torch.arange(kw, dtype=offset.dtype, device=offset.device).repeat(kh) * dilation[1]
        - centre_x
    )
    dy = s * xy[..., 1] + (s - 1.0) * rows
    dx = s * xy[..., 0] + (s - 1.0) * cols
    standard = (
        torch.stack([dy, dx], dim=-1)
        .permute(0, 3, 4, 5, 1, 2)
        .reshape(batch, 2 * group * points, height, width)
    )
    if mask is None:
        return standard.contiguous(), None
    weights = mask.reshape(batch, height, width, group, native, 1)
    if remove_center:
        weights = _with_centre(weights, points, 0.0)
    weights = (
        weights[..., order, 0].permute(0, 3, 4, 1, 2).reshape(batch, group * points, height, width)
    )
    return standard.contiguous(), weights.contiguous()


def from_standard_layout(
    offset: torch.Tensor,
    kernel: Pair,
    dilation: Pair,
    group: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
) -> torch.Tensor:
    """The inverse of :func:`to_standard_layout` for the offsets: [N, 2*G*kh*kw, H, W] (dy, dx,
    row-major points) -> the layer's own [N, H, W, G*P*2] (x, y, column-major points; the centre
    point left out with ``remove_center``), ``dx = (dx_std - (s - 1)*(b*dilation - c)) / s``."""
    kh, kw = kernel
    points = kh * kw
    batch, _, height, width = offset.shape
    s = float(offset_scale)
    centre_y, centre_x = (dilation[0] * (kh - 1)) // 2, (dilation[1] * (kw - 1)) // 2
    rows = (
        torch.arange(kh, dtype=offset.dtype, device=offset.device).repeat_interleave(kw)
        * dilation[0]
        - centre_y
    )
    cols = (
        torch.arange(kw, dtype=offset.dtype, device=offset.device).repeat(kh) * dilation[1]
        - centre_x
    )
    pairs = offset.reshape(batch, group, points, 2, height, width).permute(
        0, 4, 5, 1, 2, 3
    )  # [N, H, W, G, K, (dy, dx)]
    dy = (pairs[..., 0] - (s - 1.0) * rows) / s
    dx = (pairs[..., 1] - (s - 1.0) * cols) / s
    native = torch.stack([dx, dy], dim=-1)  # [N, H, W, G, K row-major, (x, y)]
    row_major_of = torch.argsort(kernel_order(kernel)).to(
        offset.device
    )  # column-major point p -> its row-major index
    native = native[..., row_major_of, :]
    if remove_center:
        centre = (points - 1) // 2
        native = torch.cat([native[..., :centre, :], native[..., centre + 1 :, :]], dim=-2)
    return native.reshape(batch, height, width, -1)


def split_offset_mask(
    offset_mask: torch.Tensor, group: int, points: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DCNv4's packed ``[N, H, W, D]`` (per group ``[2P offsets | P masks]``, zero-padded) ->
    (offset [N, H, W, G*P*2], mask [N, H, W, G*P])."""
    batch, height, width, _ = offset_mask.shape
    packed = offset_mask[..., : group * 3 * points].reshape(batch, height, width, group, 3 * points)
    offset = packed[..., : 2 * points].reshape(batch, height, width, group * 2 * points)
    mask = packed[..., 2 * points :].reshape(batch, height, width, group * points)
    return offset, mask


def fold_centre_feature_scale(mask: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """mask [N, G*K, H, W] times ``1 - t`` of its group (``t``: [N, H, W, G])."""
    batch, channels, height, width = mask.shape
    keep = (1.0 - scale).permute(0, 3, 1, 2).reshape(batch, group, 1, height, width)
    return (mask.reshape(batch, group, channels // group, height, width) * keep).reshape(
        batch, channels, height, width
    )


# ----------------------------------------------------------------------------- capture


class InternImageAdapter(LayerAdapter):
    """Records DCNv3 / DCNv4 layers in the standard layout (module-level capture)."""

    def matches(self, module: nn.Module) -> bool:
        return identify(module) is not None

    def attach(
        self, name: str, module: nn.Module, capture: OffsetCapture
    ) -> List[Callable[[], None]]:
        family = identify(module)
        assert family is not None
        kernel = as_pair(module.kernel_size)
        stride, padding, dilation = (
            as_pair(module.stride),
            as_pair(module.pad),
            as_pair(module.dilation),
        )
        group = int(module.group)
        remove_center = bool(int(getattr(module, "remove_center", 0) or 0))
        seen: Dict[str, Any] = {}
        last: Dict[str, Any] = {"frame": None, "layout": None}

        def pre(mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
            seen.clear()
            last.update(frame=None, layout=None)
            seen["input"] = args[0] if args else kwargs.get("input")
            seen["shape"] = args[1] if len(args) > 1 else kwargs.get("shape")

        def keep(key: str) -> Callable[[nn.Module, Any, Any], None]:
            def hook(mod: nn.Module, args: Any, out: Any) -> None:
                seen[key] = out

            return hook

        def post(mod: nn.Module, args: Any, out: Any) -> None:
            record = self._record(
                name,
                mod,
                family,
                seen,
                kernel,
                stride,
                padding,
                dilation,
                group,
                remove_center,
                capture,
            )
            if record is not None and record.geometry.method == "hooks":
                last["frame"] = record.geometry.output_frame
                last["layout"] = (
                    MapLayout(TOKENS, record.geometry.output_hw)
                    if family.version == "DCNv4"
                    else None
                )
            seen.clear()

        removers: List[Callable[[], None]] = [
            module.register_forward_pre_hook(pre, with_kwargs=True).remove
        ]
        for branch in family.branches:
            removers.append(getattr(module, branch).register_forward_hook(keep(branch)).remove)
        scale_module = getattr(module, "center_feature_scale_module", None)
        if getattr(module, "center_feature_scale", False) and isinstance(scale_module, nn.Module):
            removers.append(scale_module.register_forward_hook(keep("centre_feature_scale")).remove)
        removers.append(module.register_forward_hook(post).remove)

        def output_layout(out: torch.Tensor) -> Optional[MapLayout]:
            layout = last["layout"]
            if layout is not None:
                return layout if layout.fits(out) else None
            return MapLayout.of(out, NHWC)

        return removers + opaque_hooks(module, capture, lambda: last["frame"], output_layout)

    @staticmethod
    def _record(
        name: str,
        module: nn.Module,
        family: InternImageLayer,
        seen: Dict[str, Any],
        kernel: Pair,
        stride: Pair,
        padding: Pair,
        dilation: Pair,
        group: int,
        remove_center: bool,
        capture: OffsetCapture,
    ) -> Any:
        input_ = seen.get("input")
        if not isinstance(input_, torch.Tensor):
            return None
        points = kernel[0] * kernel[1]
        native = points - 1 if remove_center else points
        if family.version == "DCNv3":
            offset, logits = seen.get("offset"), seen.get("mask")
            if (
                not isinstance(offset, torch.Tensor)
                or not isinstance(logits, torch.Tensor)
                or input_.dim() != 4
            ):
                return None
            map_hw = (int(input_.shape[1]), int(input_.shape[2]))
            batch, height, width = offset.shape[:3]
            weights = F.softmax(
                logits.reshape(batch, height, width, group, native).float(), dim=-1
            ).to(logits.dtype)
            weights = weights.reshape(batch, height, width, group * native)
        else:
            packed = seen.get("offset_mask")
            if not isinstance(packed, torch.Tensor) or input_.dim() != 3:
                return None
            shape = seen.get("shape")
            tokens = int(input_.shape[1])
            map_hw = (
                (int(shape[0]), int(shape[1]))
                if shape is not None
                else (int(math.isqrt(tokens)), int(math.isqrt(tokens)))
            )
            out_tokens = int(packed.shape[1])
            out_hw = (
                map_hw
                if out_tokens == tokens
                else (int(math.isqrt(out_tokens)), int(math.isqrt(out_tokens)))
            )
            packed = packed.reshape(packed.shape[0], out_hw[0], out_hw[1], -1)
            offset, weights = split_offset_mask(packed, group, native)
        standard, mask = to_standard_layout(
            offset, weights, kernel, dilation, group, float(module.offset_scale), remove_center
        )
        scale = seen.get("centre_feature_scale")
        if isinstance(scale, torch.Tensor) and mask is not None:
            mask = fold_centre_feature_scale(
                mask, scale.reshape(mask.shape[0], mask.shape[2], mask.shape[3], group), group
            )
        return capture.add_conv(
            name,
            module,
            input_,
            standard,
            mask,
            kernel,
            stride,
            padding,
            dilation,
            int(getattr(module, "channels", group * int(module.group_channels))),
            input_hw=map_hw,
            converted_from=family.version,
            grid_scale=float(module.offset_scale),
        )

    def output_layout(self, record: Any, out: torch.Tensor) -> Optional[MapLayout]:
        """DCNv3: ``[N, H, W, C]``; DCNv4: tokens ``[N, H*W, C]`` (or ``[N, H, W, C]``)."""
        hw = tuple(record.geometry.output_hw)
        for kind in (NHWC,) if record.converted_from == "DCNv3" else (TOKENS, NHWC):
            layout = MapLayout.of(out, kind, hw)
            if layout is not None and layout.hw == hw:
                return layout
        return None

    def rerun(
        self, module: nn.Module, record: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """The layer's own forward on B copies of its input, the output of its offset branch
        (DCNv3 ``offset``, DCNv4 the offset part of ``offset_mask``) replaced by the given
        standard-layout offset converted back (:func:`from_standard_layout`): every path from
        the offsets to the output is the layer's own."""
        family = identify(module)
        if family is None or not args or not isinstance(args[0], torch.Tensor):
            return None
        kernel, dilation = as_pair(module.kernel_size), as_pair(module.dilation)
        group = int(module.group)
        remove_center = bool(int(getattr(module, "remove_center", 0) or 0))
        native_points = kernel[0] * kernel[1] - int(remove_center)
        scale = float(module.offset_scale)
        layer_input = args[0].detach().clone()
        rest = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[1:])
        kept_kwargs = {
            k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
        }
        branch = getattr(module, family.branches[0])

        def rerun(offset: torch.Tensor) -> torch.Tensor:
            batch = int(offset.shape[0])
            native = from_standard_layout(
                offset, kernel, dilation, group, scale, remove_center
            )  # [B, H, W, G*P*2]

            def replace(mod: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
                if family.version == "DCNv3":
                    return native.reshape(out.shape)
                packed = out.reshape(batch, native.shape[1], native.shape[2], -1)
                per_group = native.reshape(
                    batch, native.shape[1], native.shape[2], group, 2 * native_points
                )
                parts = []
                for g in range(group):
                    start = g * 3 * native_points
                    parts += [
                        per_group[..., g, :],
                        packed[..., start + 2 * native_points : start + 3 * native_points],
                    ]
                parts.append(packed[..., group * 3 * native_points :])
                return torch.cat(parts, dim=-1).reshape(out.shape)

            handle = branch.register_forward_hook(replace)
            try:
                return module(
                    layer_input.expand(batch, *layer_input.shape[1:]), *rest, **kept_kwargs
                )
            finally:
                handle.remove()

        return rerun
