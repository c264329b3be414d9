"""Where feature cells sit in the image.

A :class:`FrameMap` is the affine map from a feature frame's continuous index to image
pixels in the COCO convention ((0, 0) = top-left corner of the top-left pixel): cell
``(row i, column j)`` of a frame has its centre at ``x = offset_x + stride_x * j``,
``y = offset_y + stride_y * i``. The model-input image itself is
``FrameMap(1, 1, 0.5, 0.5)``. A conv (or pool) with kernel k, stride s, padding p and
dilation d maps input index ``j*s - p + d*(k-1)/2`` to output cell j, so its output frame
follows from its input frame by exact arithmetic (:meth:`FrameMap.conv_output`).

:class:`FrameTracker` derives the frame of every deformable layer's input by propagating
frame maps through one real forward pass (a ``TorchFunctionMode`` sees every conv, pool,
pad and element-wise op, so any model built from torch ops is covered, including user
models that cannot be traced by torch.fx). Where a layer's input frame cannot be derived,
the map is inferred from feature-map size versus input size (the official demo's
``(p + 0.5) * image_size / map_size``) and the method is recorded as ``"size"``.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

Pair = Tuple[int, int]


@dataclass(frozen=True)
class FrameMap:
    """Affine map between a feature frame's (row, column) index and image pixels."""

    stride_x: float
    stride_y: float
    offset_x: float
    offset_y: float

    @staticmethod
    def image() -> "FrameMap":
        """The frame of the image itself: pixel j has its centre at j + 0.5."""
        return FrameMap(1.0, 1.0, 0.5, 0.5)

    def to_image(self, col: Any, row: Any) -> Tuple[Any, Any]:
        """Continuous (column, row) index -> image (x, y). Works on floats, arrays and tensors."""
        return self.offset_x + self.stride_x * col, self.offset_y + self.stride_y * row

    def to_index(self, x: Any, y: Any) -> Tuple[Any, Any]:
        """Image (x, y) -> continuous (column, row) index in this frame."""
        return (x - self.offset_x) / self.stride_x, (y - self.offset_y) / self.stride_y

    def conv_output(self, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> "FrameMap":
        """Frame of the output of a conv/pool with this frame as input ((vertical, horizontal) pairs)."""
        return FrameMap(
            self.stride_x * stride[1],
            self.stride_y * stride[0],
            self.offset_x + self.stride_x * (dilation[1] * (kernel[1] - 1) / 2 - padding[1]),
            self.offset_y + self.stride_y * (dilation[0] * (kernel[0] - 1) / 2 - padding[0]),
        )

    def padded(self, left: int, top: int) -> "FrameMap":
        """Frame after padding ``left`` columns and ``top`` rows before the map."""
        return FrameMap(self.stride_x, self.stride_y, self.offset_x - self.stride_x * left, self.offset_y - self.stride_y * top)

    def scaled(self, sx: float, sy: float) -> "FrameMap":
        """The same frame measured in an image scaled by (sx, sy), e.g. model input -> original image."""
        return FrameMap(self.stride_x * sx, self.stride_y * sy, self.offset_x * sx, self.offset_y * sy)

    @staticmethod
    def from_sizes(image_hw: Sequence[int], feature_hw: Sequence[int]) -> "FrameMap":
        """Map inferred from sizes only: cell p centred at (p + 0.5) * image_size / map_size."""
        sy = image_hw[0] / feature_hw[0]
        sx = image_hw[1] / feature_hw[1]
        return FrameMap(sx, sy, 0.5 * sx, 0.5 * sy)

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class LayerGeometry:
    """Geometry of one deformable layer: its kernel arithmetic and its input/output frames.

    Frames are in model-input pixels; scale them with :meth:`FrameMap.scaled` to reach the
    original image.
    """

    kernel: Pair
    stride: Pair
    padding: Pair
    dilation: Pair
    input_hw: Pair
    output_hw: Pair
    input_frame: FrameMap
    method: str  # "hooks" (derived through the forward) or "size" (inferred from sizes)

    @property
    def output_frame(self) -> FrameMap:
        return self.input_frame.conv_output(self.kernel, self.stride, self.padding, self.dilation)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "kernel": list(self.kernel),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "input_hw": list(self.input_hw),
            "output_hw": list(self.output_hw),
            "input_frame": self.input_frame.as_dict(),
            "output_frame": self.output_frame.as_dict(),
            "method": self.method,
        }


def _pair(value: Any) -> Pair:
    if isinstance(value, int):
        return (value, value)
    items = tuple(int(v) for v in value)
    return (items[0], items[0]) if len(items) == 1 else (items[0], items[1])


def _arg(args: Sequence[Any], kwargs: Dict[str, Any], index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _conv_frame(frame: FrameMap, args: Sequence[Any], kwargs: Dict[str, Any], out: torch.Tensor) -> Optional[FrameMap]:
    weight = _arg(args, kwargs, 1, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        return None
    kernel = (weight.shape[2], weight.shape[3])
    stride = _pair(_arg(args, kwargs, 3, "stride", 1))
    dilation = _pair(_arg(args, kwargs, 5, "dilation", 1))
    padding_arg = _arg(args, kwargs, 4, "padding", 0)
    if isinstance(padding_arg, str):
        if padding_arg == "valid":
            padding: Pair = (0, 0)
        else:  # "same": PyTorch pads total d*(k-1), the smaller half first
            padding = tuple((dilation[i] * (kernel[i] - 1)) // 2 for i in range(2))  # type: ignore[assignment]
    else:
        padding = _pair(padding_arg)
    return frame.conv_output(kernel, stride, padding, dilation)


def _pool_frame(frame: FrameMap, args: Sequence[Any], kwargs: Dict[str, Any], with_dilation: bool) -> FrameMap:
    kernel = _pair(_arg(args, kwargs, 1, "kernel_size", 1))
    stride_arg = _arg(args, kwargs, 2, "stride", None)
    stride = kernel if stride_arg in (None, [], ()) else _pair(stride_arg)
    padding = _pair(_arg(args, kwargs, 3, "padding", 0))
    dilation = _pair(_arg(args, kwargs, 4, "dilation", 1)) if with_dilation else (1, 1)
    return frame.conv_output(kernel, stride, padding, dilation)


def _pad_frame(frame: FrameMap, args: Sequence[Any], kwargs: Dict[str, Any]) -> FrameMap:
    pad = list(_arg(args, kwargs, 1, "pad", ()))
    left = pad[0] if len(pad) > 0 else 0
    top = pad[2] if len(pad) > 2 else 0
    return frame.padded(left, top)


_CONV_FUNCS = {torch.conv2d, F.conv2d}
_MAXPOOL_FUNCS = {F.max_pool2d, torch.max_pool2d, torch.nn.functional.max_pool2d_with_indices}
_AVGPOOL_FUNCS = {F.avg_pool2d, torch._C._nn.avg_pool2d}
_PAD_FUNCS = {F.pad, torch._C._nn.pad, torch.constant_pad_nd}


def _spatial(t: Any) -> Optional[Pair]:
    if isinstance(t, torch.Tensor) and t.dim() == 4:
        return (t.shape[2], t.shape[3])
    return None


def _flat_tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _flat_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _flat_tensors(item)


class FrameTracker(TorchFunctionMode):
    """Propagates :class:`FrameMap` s through one forward pass.

    Convs, pools and pads apply their arithmetic; any other op whose 4-D output has the same
    spatial size as a 4-D input with a known frame inherits that frame (activations, norms,
    residual sums, channel concatenations, chunks). Anything else (resizes, flattening)
    loses the frame. Deformable modules are registered with :meth:`enter_opaque` /
    :meth:`exit_opaque` so the ops inside them are skipped and the module's own conv
    arithmetic is applied instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self._frames: Dict[int, Tuple["weakref.ReferenceType[torch.Tensor]", FrameMap]] = {}
        self._opaque_depth = 0

    def set_frame(self, tensor: torch.Tensor, frame: FrameMap) -> None:
        # Weak references: keeping every intermediate activation alive for the whole forward
        # would multiply a large model's memory. A dead tensor's id may be reused by a new
        # tensor, so lookups check that the reference still points at the very same object.
        key = id(tensor)
        frames = self._frames

        def forget(ref: "weakref.ReferenceType[torch.Tensor]") -> None:
            entry = frames.get(key)
            if entry is not None and entry[0] is ref:
                del frames[key]

        frames[key] = (weakref.ref(tensor, forget), frame)

    def frame_of(self, tensor: Any) -> Optional[FrameMap]:
        if not isinstance(tensor, torch.Tensor):
            return None
        entry = self._frames.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def enter_opaque(self) -> None:
        self._opaque_depth += 1

    def exit_opaque(self) -> None:
        self._opaque_depth -= 1

    def __torch_function__(self, func: Callable, types: Any, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._opaque_depth > 0:
            return out
        inputs = list(_flat_tensors(args)) + list(_flat_tensors(kwargs))
        known = [(t, self.frame_of(t)) for t in inputs if self.frame_of(t) is not None and _spatial(t) is not None]
        if not known:
            return out
        first_tensor, first_frame = known[0]
        assert first_frame is not None
        if func in _CONV_FUNCS:
            frame = _conv_frame(first_frame, args, kwargs, out)
            if frame is not None and isinstance(out, torch.Tensor):
                self.set_frame(out, frame)
            return out
        if func in _MAXPOOL_FUNCS or func in _AVGPOOL_FUNCS:
            frame = _pool_frame(first_frame, args, kwargs, with_dilation=func in _MAXPOOL_FUNCS)
            for t in _flat_tensors(out):
                if _spatial(t) is not None:
                    self.set_frame(t, frame)
            return out
        if func in _PAD_FUNCS:
            if isinstance(out, torch.Tensor):
                self.set_frame(out, _pad_frame(first_frame, args, kwargs))
            return out
        for t in _flat_tensors(out):
            hw = _spatial(t)
            if hw is None:
                continue
            for source, frame in known:
                if _spatial(source) == hw:
                    self.set_frame(t, frame)  # type: ignore[arg-type]
                    break
        return out
