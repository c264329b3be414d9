"""What a capture records: one record per deformable layer call, and the capture they go into.

The types every capture adapter shares (:mod:`dcn_inspect.capture.session` for dcn-inspect's own
layers, :mod:`dcn_inspect.capture.foreign_layers` for torchvision / mmcv / mmdetection / detectron2
layers):

- :class:`DeformConvRecord`: the offset field (and DCNv2 mask) a deformable conv call used,
  with the layer's kernel arithmetic and the frame of its input (:mod:`dcn_inspect.core.geometry`);
- :class:`RoIPoolRecord`: the RoIs and normalised offsets a deformable (PS) RoI pooling call used;
- :class:`OffsetCapture`: the records of one forward pass, in call order;
- :class:`LayerAdapter`: how one family of layers is recognised and hooked;
- the adapters themselves are listed in :mod:`dcn_inspect.capture.adapters`; the layers an
  analysis follows are chosen by :func:`dcn_inspect.capture.selection.select_layers`.

Offset layout (PAPER.md §1): ``[B, 2*G*kh*kw, Hout, Wout]``, channel ``2*(g*kh*kw + a*kw + b)``
is dy and the next dx, in cells of the layer's input map. Every adapter converts to it:
layers with another native layout (DCNv3 / DCNv4, :mod:`dcn_inspect.capture.internimage_layers`)
are converted at capture time, so every analysis reads one layout.

No call is counted twice: a module-level adapter claims its module's forward
(:func:`opaque_hooks`), and op-level capture (:mod:`dcn_inspect.capture.op_calls`) leaves the op
calls made inside a claimed module to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from dcn_inspect.capture.attention_calls import AttentionRecord, TokenChoice
from dcn_inspect.core.errors import InputError
from dcn_inspect.core.geometry import NCHW, FrameMap, FrameTracker, LayerGeometry, MapLayout, Pair


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
    op: Optional[str] = (
        None  # the op entry point that received the offsets (op-level capture), else None
    )
    weight_shape: Optional[Tuple[int, ...]] = (
        None  # the conv weight the op received, when there is one
    )
    converted_from: Optional[str] = (
        None  # native layout converted into the standard one ("DCNv3", "DCNv4")
    )
    # the layer scales its regular grid by this (DCNv3/v4 ``offset_scale``; folded into the
    # offsets here)
    grid_scale: float = 1.0

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
    offset: Optional[
        torch.Tensor
    ]  # normalised offsets, x first: [R, 2, ph, pw] or [R, 2*C, part, part]
    params: Dict[str, Any]
    input_hw: Pair
    input_frame: Optional[FrameMap]


#: ``rerun(offset)``: a call run again on B copies of its input with ``offset``
#: [B, 2*G*kh*kw, Ho, Wo] (standard layout) in place of the captured one -> the call's output for
#: the B copies (in the autograd graph of ``offset``).
Rerun = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class OpCallRun:
    """One op-level call as it ran (told to :attr:`OffsetCapture.op_listener`)."""

    record: DeformConvRecord
    input: torch.Tensor  # the tensor the op received (in the forward's graph)
    output: torch.Tensor  # what the op returned
    rerun: Callable[
        [], Rerun
    ]  # makes the call's :data:`Rerun` (keeps detached copies of its arguments)


@dataclass
class OffsetCapture:
    """What :func:`capture_offsets` collected; layers in call order.

    ``op_listener`` (optional) is told of every op-level call after it is recorded; what it
    returns (a tensor, or None for the op's own output) is what the caller of the op receives.
    """

    convs: Dict[str, DeformConvRecord] = field(default_factory=dict)
    roi_pools: Dict[str, RoIPoolRecord] = field(default_factory=dict)
    tracker: Optional[FrameTracker] = None
    input_hw: Optional[Pair] = None
    claimed: int = 0  # depth of module-level captures running (their op calls are theirs)
    op_listener: Optional[Callable[[OpCallRun], Optional[torch.Tensor]]] = None
    #: Multi-scale deformable attention calls (:mod:`dcn_inspect.capture.attention_calls`).
    attention: Dict[str, AttentionRecord] = field(default_factory=dict)
    #: Which encoder queries of an attention call to keep (None: all of them).
    keep_tokens: Optional[TokenChoice] = None

    def watch_input(self, images: torch.Tensor) -> None:
        """Declare the model-input image batch [B, 3, H, W] (its frame is the image's)."""
        self.input_hw = (images.shape[-2], images.shape[-1])
        if self.tracker is not None:
            self.tracker.set_frame(images, FrameMap.image())

    def input_frame(
        self, tensor: torch.Tensor, map_hw: Optional[Pair] = None
    ) -> Tuple[FrameMap, str]:
        """The frame of ``tensor``'s map (``map_hw``: its size, default the last two dimensions)."""
        frame = self.tracker.frame_of(tensor) if self.tracker is not None else None
        layout = self.tracker.layout_of(tensor) if self.tracker is not None else None
        if frame is not None and (
            map_hw is None or layout is None or tuple(layout.hw) == tuple(map_hw)
        ):
            return frame, "hooks"
        if self.input_hw is None:
            raise RuntimeError("capture_offsets: call watch_input(images) before the forward pass")
        return FrameMap.from_sizes(self.input_hw, map_hw or tensor.shape[-2:]), "size"

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
        *,
        input_hw: Optional[Pair] = None,
        op: Optional[str] = None,
        weight_shape: Optional[Tuple[int, ...]] = None,
        converted_from: Optional[str] = None,
        grid_scale: float = 1.0,
    ) -> DeformConvRecord:
        """Record one call: ``offset`` (and ``mask``) in the standard layout, the kernel arithmetic,
        and the frame of ``input`` (whose map is ``input_hw``, default its last two dimensions)."""
        map_hw = (
            (int(input.shape[-2]), int(input.shape[-1]))
            if input_hw is None
            else (int(input_hw[0]), int(input_hw[1]))
        )
        frame, method = self.input_frame(input, map_hw)
        kernel_points = kernel[0] * kernel[1]
        geometry = LayerGeometry(
            kernel=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            input_hw=map_hw,
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
            op=op,
            weight_shape=None if weight_shape is None else tuple(int(v) for v in weight_shape),
            converted_from=converted_from,
            grid_scale=float(grid_scale),
        )
        # A sum is finite exactly when no element is NaN/Inf (short of a float overflow that only
        # absurd offsets reach), and costs a sixth of isfinite(...).all().
        if not bool(torch.isfinite(record.offset.sum())) or (
            record.mask is not None and not bool(torch.isfinite(record.mask.sum()))
        ):
            # Tracing or measuring NaN offsets gives silent garbage: stop and name the layer.
            raise InputError(
                f"layer {record.name}: its offsets came out non-finite (NaN/Inf); "
                "the checkpoint's weights or the input are broken"
            )
        self.convs[record.name] = record
        return record


class LayerAdapter:
    """Teaches :func:`capture_offsets` to recognise one family of deformable layers."""

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def attach(
        self, name: str, module: nn.Module, capture: OffsetCapture
    ) -> List[Callable[[], None]]:
        """Install hooks; return callables that remove them."""
        raise NotImplementedError

    def output_layout(self, record: DeformConvRecord, out: torch.Tensor) -> Optional[MapLayout]:
        """Where the output map of the layer call ``record`` lies in the module's output ``out``
        (None: not a map of the recorded size). Default: channels-first."""
        layout = MapLayout.of(out, NCHW)
        return (
            layout if layout is not None and layout.hw == tuple(record.geometry.output_hw) else None
        )

    def rerun(
        self,
        module: nn.Module,
        record: DeformConvRecord,
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
    ) -> Optional[Rerun]:
        """How to run the call ``module(*args, **kwargs)`` (recorded as ``record``) again with
        another offset (:data:`Rerun`); None (the default) when the standard deformable op on
        the module's ``weight`` and ``bias`` is the layer (receptive fields check it reproduces
        the output)."""
        return None


def opaque_hooks(
    module: nn.Module,
    capture: OffsetCapture,
    output_frame: Callable[[], Optional[FrameMap]],
    output_layout: Optional[Callable[[torch.Tensor], Optional[MapLayout]]] = None,
) -> List[Callable[[], None]]:
    """A module-level capture's hooks: the module claims the op calls of its forward (op-level
    capture leaves them to it), is opaque to the frame tracker, and its output gets the
    module's frame (in ``output_layout(out)``, default channels-first)."""
    tracker = capture.tracker

    def pre(mod: nn.Module, args: Any) -> None:
        capture.claimed += 1
        if tracker is not None:
            tracker.enter_opaque()

    def post(mod: nn.Module, args: Any, out: Any) -> None:
        capture.claimed -= 1
        if tracker is None:
            return
        tracker.exit_opaque()
        frame = output_frame()
        if frame is not None and isinstance(out, torch.Tensor):
            tracker.set_frame(out, frame, output_layout(out) if output_layout is not None else None)

    handles = [
        module.register_forward_pre_hook(pre),
        module.register_forward_hook(post, always_call=True),
    ]
    return [h.remove for h in handles]
