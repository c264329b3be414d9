"""Capture adapters for dcn-inspect's own layers (:mod:`dcn_inspect.ops.modules`): they report
the offsets they pass to the op through the modules' observer mechanism, so the record holds
exactly what the op received."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from dcn_inspect.capture.records import LayerAdapter, OffsetCapture, RoIPoolRecord, opaque_hooks
from dcn_inspect.core.geometry import FrameMap
from dcn_inspect.ops import modules as ours

__all__ = ["OurDeformConvAdapter", "OurRoIPoolAdapter"]


class OurDeformConvAdapter(LayerAdapter):
    """dcn_inspect's DeformConv2d / DeformConv2dPack / ModulatedDeformConv2dPack."""

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, ours.DeformConv2d)

    def attach(
        self, name: str, module: nn.Module, capture: OffsetCapture
    ) -> List[Callable[[], None]]:
        assert isinstance(module, ours.DeformConv2d)
        last: Dict[str, Optional[FrameMap]] = {"frame": None}

        def observer(
            mod: ours.DeformConv2d,
            input: torch.Tensor,
            offset: torch.Tensor,
            mask: Optional[torch.Tensor],
        ) -> None:
            record = capture.add_conv(
                name,
                mod,
                input,
                offset,
                mask,
                mod.kernel_size,
                mod.stride,
                mod.padding,
                mod.dilation,
                mod.groups,
                weight_shape=tuple(mod.weight.shape),
            )
            last["frame"] = (
                record.geometry.output_frame if record.geometry.method == "hooks" else None
            )

        module._offset_observers.append(observer)
        removers = opaque_hooks(module, capture, lambda: last["frame"])
        return [lambda: module._offset_observers.remove(observer)] + removers


class OurRoIPoolAdapter(LayerAdapter):
    """dcn_inspect's DeformRoIPool(Pack) and DeformPSRoIPool."""

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, (ours.DeformRoIPool, ours.DeformPSRoIPool))

    def attach(
        self, name: str, module: nn.Module, capture: OffsetCapture
    ) -> List[Callable[[], None]]:
        def observer(
            mod: nn.Module, input: torch.Tensor, rois: torch.Tensor, offset: Optional[torch.Tensor]
        ) -> None:
            frame = capture.tracker.frame_of(input) if capture.tracker is not None else None
            if isinstance(mod, ours.DeformPSRoIPool):
                kind = "psroi_pool"
                params: Dict[str, Any] = {
                    "spatial_scale": mod.spatial_scale,
                    "output_dim": mod.output_dim,
                    "group_size": mod.group_size,
                    "pooled_size": mod.pooled_size,
                    "part_size": mod.part_size,
                    "sample_per_part": mod.sample_per_part,
                    "trans_std": mod.trans_std,
                }
            else:
                assert isinstance(mod, ours.DeformRoIPool)
                kind = "roi_pool"
                params = {
                    "spatial_scale": mod.spatial_scale,
                    "output_size": list(mod.output_size),
                    "sampling_ratio": mod.sampling_ratio,
                    "gamma": mod.gamma,
                }
            record = RoIPoolRecord(
                name=capture._unique(capture.roi_pools, name),
                module_type=type(mod).__name__,
                kind=kind,
                rois=rois.detach(),
                offset=None if offset is None or offset.numel() == 0 else offset.detach(),
                params=params,
                input_hw=(input.shape[-2], input.shape[-1]),
                input_frame=frame,
            )
            capture.roi_pools[record.name] = record

        module._offset_observers.append(observer)  # type: ignore[union-attr]
        return [lambda: module._offset_observers.remove(observer)]  # type: ignore[union-attr]
