"""Capture the offset fields (and masks) that a model's deformable layers actually use.

``with capture_offsets(model) as capture: model(x)`` records, for every deformable layer
call, the offset tensor and mask passed to the op, the layer's qualified name and its
kernel/stride/padding/dilation/groups, together with the exact frame geometry of its input
(see :mod:`dcn_inspect.geometry`). Model outputs are unchanged and every hook is removed on
exit. RoI-pooling layers (deformable RoI pooling, deformable PS RoI pooling) are recorded
the same way with their RoIs and normalised offsets.

Layers are recognised through adapters (:class:`LayerAdapter`): ours report their offsets
through the observer mechanism of :mod:`dcn_inspect.ops.modules`; foreign layers
(torchvision / mmcv) are matched by class name, without importing those libraries, and read
their offsets from the call arguments or from their ``conv_offset`` branch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from dcn_inspect.errors import InputError
from dcn_inspect.geometry import FrameMap, FrameTracker, LayerGeometry, Pair
from dcn_inspect.ops import modules as ours


@dataclass
class DeformConvRecord:
    """One call of a deformable conv layer."""

    name: str
    module_type: str
    offset: torch.Tensor  # [B, 2*G*kh*kw, Hout, Wout], dy then dx per kernel point
    mask: Optional[torch.Tensor]  # [B, G*kh*kw, Hout, Wout] after the sigmoid, or None
    groups: int
    offset_groups: int
    geometry: LayerGeometry

    @property
    def modulated(self) -> bool:
        return self.mask is not None

    @property
    def kernel_points(self) -> int:
        return self.geometry.kernel[0] * self.geometry.kernel[1]


@dataclass
class RoIPoolRecord:
    """One call of a deformable RoI pooling layer (plain or position-sensitive)."""

    name: str
    module_type: str
    kind: str  # "roi_pool" (mmcv DeformRoIPool layout) or "psroi_pool" (R-FCN)
    rois: torch.Tensor  # [R, 5] (batch_index, x1, y1, x2, y2) in model-input pixels
    offset: Optional[torch.Tensor]  # normalised offsets, x first: [R, 2, ph, pw] or [R, 2*C, part, part]
    params: Dict[str, Any]
    input_hw: Pair
    input_frame: Optional[FrameMap]


@dataclass
class OffsetCapture:
    """What :func:`capture_offsets` collected; layers in call order."""

    convs: Dict[str, DeformConvRecord] = field(default_factory=dict)
    roi_pools: Dict[str, RoIPoolRecord] = field(default_factory=dict)
    tracker: Optional[FrameTracker] = None
    input_hw: Optional[Pair] = None

    def watch_input(self, images: torch.Tensor) -> None:
        """Declare the model-input image batch [B, 3, H, W] (its frame is the image's)."""
        self.input_hw = (images.shape[-2], images.shape[-1])
        if self.tracker is not None:
            self.tracker.set_frame(images, FrameMap.image())

    def input_frame(self, tensor: torch.Tensor) -> Tuple[FrameMap, str]:
        frame = self.tracker.frame_of(tensor) if self.tracker is not None else None
        if frame is not None:
            return frame, "hooks"
        if self.input_hw is None:
            raise RuntimeError("capture_offsets: call watch_input(images) before the forward pass")
        return FrameMap.from_sizes(self.input_hw, tensor.shape[-2:]), "size"

    def _unique(self, table: Dict[str, Any], name: str) -> str:
        if name not in table:
            return name
        k = 2
        while f"{name}#{k}" in table:
            k += 1
        return f"{name}#{k}"

    def add_conv(
        self,
        name: str,
        module: nn.Module,
        input: torch.Tensor,
        offset: torch.Tensor,
        mask: Optional[torch.Tensor],
        kernel: Pair,
        stride: Pair,
        padding: Pair,
        dilation: Pair,
        groups: int,
    ) -> DeformConvRecord:
        frame, method = self.input_frame(input)
        kernel_points = kernel[0] * kernel[1]
        geometry = LayerGeometry(
            kernel=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            input_hw=(input.shape[-2], input.shape[-1]),
            output_hw=(offset.shape[-2], offset.shape[-1]),
            input_frame=frame,
            method=method,
        )
        record = DeformConvRecord(
            name=self._unique(self.convs, name),
            module_type=type(module).__name__,
            offset=offset.detach(),
            mask=None if mask is None else mask.detach(),
            groups=groups,
            offset_groups=offset.shape[1] // (2 * kernel_points),
            geometry=geometry,
        )
        if not bool(torch.isfinite(record.offset).all()) or (record.mask is not None and not bool(torch.isfinite(record.mask).all())):
            # Tracing or measuring NaN offsets gives silent garbage: stop and name the layer.
            raise InputError(
                f"layer {record.name}: its offsets came out non-finite (NaN/Inf); the checkpoint's weights or the input are broken"
            )
        self.convs[record.name] = record
        return record


class LayerAdapter:
    """Teaches :func:`capture_offsets` to recognise one family of deformable layers."""

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def attach(self, name: str, module: nn.Module, capture: OffsetCapture) -> List[Callable[[], None]]:
        """Install hooks; return callables that remove them."""
        raise NotImplementedError


def _opaque_hooks(module: nn.Module, capture: OffsetCapture, output_frame: Callable[[], Optional[FrameMap]]) -> List[Callable[[], None]]:
    """Make the module opaque to the frame tracker and give its output the module's frame."""
    tracker = capture.tracker
    if tracker is None:
        return []

    def pre(mod: nn.Module, args: Any) -> None:
        tracker.enter_opaque()

    def post(mod: nn.Module, args: Any, out: Any) -> None:
        tracker.exit_opaque()
        frame = output_frame()
        if frame is not None and isinstance(out, torch.Tensor):
            tracker.set_frame(out, frame)

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return [h.remove for h in handles]


class OurDeformConvAdapter(LayerAdapter):
    """dcn_inspect's DeformConv2d / DeformConv2dPack / ModulatedDeformConv2dPack."""

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, ours.DeformConv2d)

    def attach(self, name: str, module: nn.Module, capture: OffsetCapture) -> List[Callable[[], None]]:
        assert isinstance(module, ours.DeformConv2d)
        last: Dict[str, Optional[FrameMap]] = {"frame": None}

        def observer(mod: ours.DeformConv2d, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
            record = capture.add_conv(
                name, mod, input, offset, mask, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.groups
            )
            last["frame"] = record.geometry.output_frame if record.geometry.method == "hooks" else None

        module._offset_observers.append(observer)
        removers = _opaque_hooks(module, capture, lambda: last["frame"])
        return [lambda: module._offset_observers.remove(observer)] + removers


class OurRoIPoolAdapter(LayerAdapter):
    """dcn_inspect's DeformRoIPool(Pack) and DeformPSRoIPool."""

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, (ours.DeformRoIPool, ours.DeformPSRoIPool))

    def attach(self, name: str, module: nn.Module, capture: OffsetCapture) -> List[Callable[[], None]]:
        def observer(mod: nn.Module, input: torch.Tensor, rois: torch.Tensor, offset: Optional[torch.Tensor]) -> None:
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


#: Adapters tried in order for every submodule; :mod:`dcn_inspect.foreign_layers` may extend it.
ADAPTERS: List[LayerAdapter] = [OurDeformConvAdapter(), OurRoIPoolAdapter()]


@contextlib.contextmanager
def capture_offsets(model: nn.Module, track_frames: bool = True) -> Iterator[OffsetCapture]:
    """Record the offsets of every deformable layer of ``model`` during the enclosed forward.

    Call ``capture.watch_input(images)`` before ``model(images)`` so frames can be derived.
    """
    capture = OffsetCapture(tracker=FrameTracker() if track_frames else None)
    removers: List[Callable[[], None]] = []
    try:
        for name, module in model.named_modules():
            for adapter in ADAPTERS:
                if adapter.matches(module):
                    removers.extend(adapter.attach(name or type(module).__name__, module, capture))
                    break
        if capture.tracker is not None:
            with capture.tracker:
                yield capture
        else:
            yield capture
    finally:
        for remove in reversed(removers):
            remove()


@dataclass
class Probe:
    """The result of one forward pass with offsets captured."""

    output: Any
    capture: OffsetCapture

    @property
    def convs(self) -> Dict[str, DeformConvRecord]:
        return self.capture.convs


def probe(model: nn.Module, images: torch.Tensor, **forward_kwargs: Any) -> Probe:
    """Run ``model(images)`` in eval/no-grad mode and return its output with the captured offsets."""
    with torch.no_grad(), capture_offsets(model) as capture:
        capture.watch_input(images)
        output = model(images, **forward_kwargs)
    return Probe(output=output, capture=capture)


# Foreign layers (torchvision, mmcv, mmdetection 1.x, detectron2): importing the module appends
# its adapter to ADAPTERS. At the bottom because it imports the names defined above.
from dcn_inspect import foreign_layers  # noqa: E402,F401
