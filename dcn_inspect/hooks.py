"""Capture the offset fields (and masks) that a model's deformable layers actually use.

``with capture_offsets(model) as capture: model(x)`` records, for every deformable layer
call, the offset tensor and mask passed to the op, the layer's qualified name and its
kernel/stride/padding/dilation/groups, together with the exact frame geometry of its input
(see :mod:`dcn_inspect.geometry`). Model outputs are unchanged and every hook is removed on
exit. RoI-pooling layers (deformable RoI pooling, deformable PS RoI pooling) are recorded
the same way with their RoIs and normalised offsets. The record types live in
:mod:`dcn_inspect.records`.

Two levels of capture, and no call counted twice:

* module level, through adapters (:class:`~dcn_inspect.records.LayerAdapter`): ours report
  their offsets through the observer mechanism of :mod:`dcn_inspect.ops.modules`; foreign
  layers (torchvision / mmcv / mmdetection / detectron2, :mod:`dcn_inspect.foreign_layers`) are
  matched by class name, without importing those libraries, and read their offsets from the
  call arguments or from their ``conv_offset`` branch; DCNv3 / DCNv4 layers
  (:mod:`dcn_inspect.internimage_layers`) are converted into the standard layout;
* op level (:mod:`dcn_inspect.op_capture`): every other deformable-conv op call the forward
  makes (a research module calling ``torchvision.ops.deform_conv2d`` with its own offset and
  modulator convs), named after the innermost module whose forward made the call.

:func:`forward` calls a model the way every command does: an exception the model raises (the
user's code, or an input it cannot take) becomes a one-line :class:`~dcn_inspect.errors.InputError`
naming the model and quoting the exception, instead of a crash.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import nn

from dcn_inspect.errors import InputError
from dcn_inspect.foreign_layers import FOREIGN_ADAPTERS
from dcn_inspect.geometry import FrameMap, FrameTracker
from dcn_inspect.internimage_layers import INTERNIMAGE_ADAPTERS
from dcn_inspect.op_capture import capture_ops
from dcn_inspect.ops import modules as ours
from dcn_inspect.records import LOOKED_FOR, DeformConvRecord, LayerAdapter, OffsetCapture, RoIPoolRecord, opaque_hooks

__all__ = ["ADAPTERS", "ModelRaised", "Probe", "capture_offsets", "forward", "probe", "DeformConvRecord", "RoIPoolRecord", "OffsetCapture"]


LOOKED_FOR.insert(0, "dcn-inspect modules: DeformConv2d, DeformConv2dPack, ModulatedDeformConv2dPack")


class OurDeformConvAdapter(LayerAdapter):
    """dcn_inspect's DeformConv2d / DeformConv2dPack / ModulatedDeformConv2dPack."""

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, ours.DeformConv2d)

    def attach(self, name: str, module: nn.Module, capture: OffsetCapture) -> List[Callable[[], None]]:
        assert isinstance(module, ours.DeformConv2d)
        last: Dict[str, Optional[FrameMap]] = {"frame": None}

        def observer(mod: ours.DeformConv2d, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
            record = capture.add_conv(
                name, mod, input, offset, mask, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.groups,
                weight_shape=tuple(mod.weight.shape),
            )
            last["frame"] = record.geometry.output_frame if record.geometry.method == "hooks" else None

        module._offset_observers.append(observer)
        removers = opaque_hooks(module, capture, lambda: last["frame"])
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


#: Adapters tried in order for every submodule: dcn-inspect's own layers, then the foreign ones.
ADAPTERS: List[LayerAdapter] = [OurDeformConvAdapter(), OurRoIPoolAdapter(), *FOREIGN_ADAPTERS, *INTERNIMAGE_ADAPTERS]


@contextlib.contextmanager
def capture_offsets(model: nn.Module, track_frames: bool = True, tracker: Optional[FrameTracker] = None) -> Iterator[OffsetCapture]:
    """Record the offsets of every deformable layer and op call of ``model`` during the enclosed forward.

    Call ``capture.watch_input(images)`` before ``model(images)`` so frames can be derived.
    ``tracker`` replaces the default :class:`FrameTracker` (e.g. a subclass that follows more
    than frames); it is ignored without ``track_frames``.
    """
    capture = OffsetCapture(tracker=(tracker or FrameTracker()) if track_frames else None)
    removers: List[Callable[[], None]] = []
    try:
        for name, module in model.named_modules():
            for adapter in ADAPTERS:
                if adapter.matches(module):
                    removers.extend(adapter.attach(name or type(module).__name__, module, capture))
                    break
        with contextlib.ExitStack() as stack:
            if capture.tracker is not None:
                stack.enter_context(capture.tracker)
            stack.enter_context(capture_ops(model, capture))  # inside the tracker: sees op calls first
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


class ModelRaised(InputError):
    """The model's forward raised; ``original`` is its exception (the message quotes it)."""

    def __init__(self, message: str, original: BaseException) -> None:
        super().__init__(message, param="model")
        self.original = original


def forward(model: nn.Module, images: torch.Tensor, model_name: Optional[str] = None, **forward_kwargs: Any) -> Any:
    """``model(images, **forward_kwargs)``; an exception from the model becomes :class:`ModelRaised`
    ("<model>: the model raised <type> in its forward: <message>"). Our own input errors pass
    through unchanged; running out of memory says so."""
    try:
        return model(images, **forward_kwargs)
    except InputError:
        raise
    except MemoryError as exc:
        shape = "x".join(str(n) for n in images.shape)
        raise ModelRaised(f"{model_name or type(model).__name__}: out of memory in the forward of a {shape} input (lower `max_pixels` or `resize`)", exc) from exc
    except Exception as exc:  # noqa: BLE001 - whatever the model's code raises is reported as the model's
        text = str(exc).strip()
        first = text.splitlines()[0][:300] if text else ""
        raise ModelRaised(f"{model_name or type(model).__name__}: the model raised {type(exc).__name__} in its forward" + (f": {first}" if first else ""), exc) from exc


def probe(model: nn.Module, images: torch.Tensor, *, model_name: Optional[str] = None, **forward_kwargs: Any) -> Probe:
    """Run ``model(images)`` in eval/no-grad mode and return its output with the captured offsets
    (see :func:`forward` for what happens when the model raises)."""
    with torch.no_grad(), capture_offsets(model) as capture:
        capture.watch_input(images)
        output = forward(model, images, model_name, **forward_kwargs)
    return Probe(output=output, capture=capture)
