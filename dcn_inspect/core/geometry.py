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

A frame belongs to a tensor together with its :class:`MapLayout`: where the map's rows and
columns are among the tensor's dimensions. Convolutional networks keep ``[N, C, H, W]``
(``nchw``); InternImage's DCNv3 stages work channels-last ``[N, H, W, C]`` (``nhwc``) and
FlashInternImage's DCNv4 stages on flattened tokens ``[N, H*W, C]`` (``tokens``, row-major:
token ``i*W + j`` is cell ``(i, j)``) or ``[N, C, H*W]`` (``tokens_cf``). Permutes,
transposes and reshapes between these layouts keep the frame; ops that keep a layout's map
dimensions (a ``Linear`` or ``LayerNorm`` over the channels of an ``nhwc`` map) inherit it.

Trackers that follow more than frames (the receptive-field extents of
:mod:`dcn_inspect.capture.extent`) subclass :class:`FrameTracker` and read a call with the
public helpers :func:`sliding_window` (a conv's or pool's kernel arithmetic), :func:`is_padding`
and :func:`flat_tensors`; :meth:`MapLayout.to_nchw` / :meth:`MapLayout.from_nchw` move a map
between its layout and ``[N, C, H, W]``.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

Pair = Tuple[int, int]

#: Map layouts (see :class:`MapLayout`).
NCHW, NHWC, TOKENS, TOKENS_CF = "nchw", "nhwc", "tokens", "tokens_cf"


@dataclass(frozen=True)
class MapLayout:
    """Where a feature map's rows and columns are in a tensor: ``kind`` and the map size ``hw``.

    ``nchw``: ``[..., C, H, W]``; ``nhwc``: ``[N, H, W, C]``; ``tokens``: ``[N, H*W, C]`` and
    ``tokens_cf``: ``[N, C, H*W]`` (row-major token order).
    """

    kind: str
    hw: Pair

    @staticmethod
    def of(
        tensor: torch.Tensor, kind: str = NCHW, hw: Optional[Pair] = None
    ) -> Optional["MapLayout"]:
        """The layout ``kind`` of ``tensor`` (``hw`` needed for token layouts), or None if it does
        not fit."""
        if kind == NCHW and tensor.dim() == 4:
            layout = MapLayout(NCHW, (int(tensor.shape[2]), int(tensor.shape[3])))
        elif kind == NHWC and tensor.dim() == 4:
            layout = MapLayout(NHWC, (int(tensor.shape[1]), int(tensor.shape[2])))
        elif kind in (TOKENS, TOKENS_CF) and hw is not None:
            layout = MapLayout(kind, (int(hw[0]), int(hw[1])))
        else:
            return None
        return layout if layout.fits(tensor) else None

    def fits(self, tensor: Any) -> bool:
        """Whether ``tensor`` holds a map of this layout and size."""
        if not isinstance(tensor, torch.Tensor):
            return False
        shape = tuple(tensor.shape)
        if self.kind == NCHW:
            return len(shape) == 4 and shape[2:] == self.hw
        if self.kind == NHWC:
            return len(shape) == 4 and shape[1:3] == self.hw
        cells = self.hw[0] * self.hw[1]
        if self.kind == TOKENS:
            return len(shape) == 3 and shape[1] == cells
        return len(shape) == 3 and shape[2] == cells  # TOKENS_CF

    def map_axes(self) -> Tuple[int, ...]:
        """The tensor dimensions that hold the map: (rows, columns), or (tokens,)."""
        return {NCHW: (2, 3), NHWC: (1, 2), TOKENS: (1,), TOKENS_CF: (2,)}[self.kind]

    def to_nchw(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (a map in this layout, any batch size) as ``[N, C, H, W]``: cell (i, j),
        channel c of sample n at ``[n, c, i, j]`` (a view where the strides allow)."""
        height, width = self.hw
        if self.kind == NCHW:
            return tensor
        if self.kind == NHWC:
            return tensor.permute(0, 3, 1, 2)
        if self.kind == TOKENS:
            return tensor.transpose(1, 2).reshape(tensor.shape[0], tensor.shape[2], height, width)
        return tensor.reshape(tensor.shape[0], tensor.shape[1], height, width)  # TOKENS_CF

    def from_nchw(self, tensor: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_nchw`: an ``[N, C, H, W]`` map in this layout."""
        if self.kind == NCHW:
            return tensor
        if self.kind == NHWC:
            return tensor.permute(0, 2, 3, 1)
        if self.kind == TOKENS:
            return tensor.flatten(2).transpose(1, 2)
        return tensor.flatten(2)  # TOKENS_CF


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
        """Frame of the output of a conv/pool with this frame as input ((vertical, horizontal)
        pairs)."""
        return FrameMap(
            self.stride_x * stride[1],
            self.stride_y * stride[0],
            self.offset_x + self.stride_x * (dilation[1] * (kernel[1] - 1) / 2 - padding[1]),
            self.offset_y + self.stride_y * (dilation[0] * (kernel[0] - 1) / 2 - padding[0]),
        )

    def padded(self, left: int, top: int) -> "FrameMap":
        """Frame after padding ``left`` columns and ``top`` rows before the map."""
        return FrameMap(
            self.stride_x,
            self.stride_y,
            self.offset_x - self.stride_x * left,
            self.offset_y - self.stride_y * top,
        )

    def scaled(self, sx: float, sy: float) -> "FrameMap":
        """The same frame measured in an image scaled by (sx, sy), e.g. model input -> original
        image."""
        return FrameMap(
            self.stride_x * sx, self.stride_y * sy, self.offset_x * sx, self.offset_y * sy
        )

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


def as_pair(value: Any) -> Pair:
    """A (h, w) pair from what layers and op calls pass as kernel size, stride, padding or
    dilation: an int, a float, a 1- or 2-element sequence, or a tensor of those."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (int, float)):
        return (int(value), int(value))
    items = [int(v) for v in value]
    return (items[0], items[0]) if len(items) == 1 else (items[0], items[1])


def _arg(args: Sequence[Any], kwargs: Dict[str, Any], index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


@dataclass(frozen=True)
class Window:
    """The sliding window of one 2-D conv or pool call ((vertical, horizontal) pairs, in cells of
    its input)."""

    kernel: Pair
    stride: Pair
    padding: Pair
    dilation: Pair

    def output_frame(self, frame: FrameMap) -> FrameMap:
        """The frame of the call's output when its input has ``frame``."""
        return frame.conv_output(self.kernel, self.stride, self.padding, self.dilation)


def sliding_window(func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[Window]:
    """The :class:`Window` of a call ``func(*args, **kwargs)`` of ``conv2d``, ``max_pool2d`` or
    ``avg_pool2d`` (functional or ``torch.*`` forms, as a ``TorchFunctionMode`` sees them);
    None for any other function, or a conv whose weight is not a 4-D tensor. Padding ``"same"``
    is PyTorch's (total ``d*(k-1)``, the smaller half first); a pool without a stride strides by
    its kernel; ``avg_pool2d`` has no dilation."""
    if func in _CONV_FUNCS:
        weight = _arg(args, kwargs, 1, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            return None
        kernel = (int(weight.shape[2]), int(weight.shape[3]))
        stride = as_pair(_arg(args, kwargs, 3, "stride", 1))
        dilation = as_pair(_arg(args, kwargs, 5, "dilation", 1))
        padding_arg = _arg(args, kwargs, 4, "padding", 0)
        if isinstance(padding_arg, str):
            if padding_arg == "valid":
                padding: Pair = (0, 0)
            else:
                padding = tuple((dilation[i] * (kernel[i] - 1)) // 2 for i in range(2))  # type: ignore[assignment]
        else:
            padding = as_pair(padding_arg)
        return Window(kernel, stride, padding, dilation)
    if func in _MAXPOOL_FUNCS or func in _AVGPOOL_FUNCS:
        kernel = as_pair(_arg(args, kwargs, 1, "kernel_size", 1))
        stride_arg = _arg(args, kwargs, 2, "stride", None)
        stride = kernel if stride_arg in (None, [], ()) else as_pair(stride_arg)
        padding = as_pair(_arg(args, kwargs, 3, "padding", 0))
        dilation = (
            as_pair(_arg(args, kwargs, 4, "dilation", 1)) if func in _MAXPOOL_FUNCS else (1, 1)
        )
        return Window(kernel, stride, padding, dilation)
    return None


def is_padding(func: Callable) -> bool:
    """Whether ``func`` is ``F.pad`` (or the ``torch`` op it calls): the map grows, its cells
    keep their content."""
    return func in _PAD_FUNCS


def _pad_frame(
    frame: FrameMap, layout: "MapLayout", ndim: int, args: Sequence[Any], kwargs: Dict[str, Any]
) -> Optional[FrameMap]:
    """``F.pad``: pair k of ``pad`` pads dimension ``ndim - 1 - k`` (before, after)."""
    if layout.kind not in (NCHW, NHWC):
        return None
    pad = [int(v) for v in _arg(args, kwargs, 1, "pad", ())]
    rows, cols = layout.map_axes()

    def before(axis: int) -> int:
        k = ndim - 1 - axis
        return pad[2 * k] if len(pad) > 2 * k else 0

    return frame.padded(before(cols), before(rows))


def _method_and_function(name: str) -> set:
    found = set()
    for owner in (torch, torch.Tensor):
        function = getattr(owner, name, None)
        if function is not None:
            found.add(function)
    return found


_CONV_FUNCS = {torch.conv2d, F.conv2d}
_MAXPOOL_FUNCS = {F.max_pool2d, torch.max_pool2d, torch.nn.functional.max_pool2d_with_indices}
_AVGPOOL_FUNCS = {F.avg_pool2d, torch._C._nn.avg_pool2d}
_PAD_FUNCS = {F.pad, torch._C._nn.pad, torch.constant_pad_nd}
_PERMUTE_FUNCS = _method_and_function("permute")
_TRANSPOSE_FUNCS = set().union(
    *(_method_and_function(n) for n in ("transpose", "swapaxes", "swapdims"))
)
_RESHAPE_FUNCS = set().union(
    *(_method_and_function(n) for n in ("view", "reshape", "flatten", "unflatten"))
)


def flat_tensors(obj: Any) -> Iterable[torch.Tensor]:
    """Every tensor in ``obj`` (a tensor, or lists, tuples and dicts of them, nested), in order:
    the tensors a ``TorchFunctionMode`` call received or returned."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from flat_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from flat_tensors(item)


def _permutation(
    func: Callable, args: Sequence[Any], kwargs: Dict[str, Any], ndim: int
) -> Optional[List[int]]:
    """Output dimension i = input dimension perm[i], for a permute or transpose call."""
    try:
        if func in _PERMUTE_FUNCS:
            dims = list(args[1:]) if len(args) > 1 else list(kwargs.get("dims", ()))
            if len(dims) == 1 and isinstance(dims[0], (list, tuple, torch.Size)):
                dims = list(dims[0])
            perm = [int(d) % ndim for d in dims]
            return perm if sorted(perm) == list(range(ndim)) else None
        first = _arg(args, kwargs, 1, "dim0", None)
        second = _arg(args, kwargs, 2, "dim1", None)
        if first is None or second is None:
            return None
        a, b = int(first) % ndim, int(second) % ndim
        perm = list(range(ndim))
        perm[a], perm[b] = b, a
        return perm
    except (TypeError, ValueError):
        return None


def _permuted_layout(layout: "MapLayout", perm: List[int]) -> Optional["MapLayout"]:
    """The layout after moving input dimension perm[i] to output dimension i (batch stays first)."""
    if not perm or perm[0] != 0:
        return None
    axes = tuple(perm.index(axis) for axis in layout.map_axes())
    kind = {(2, 3): NCHW, (1, 2): NHWC, (1,): TOKENS, (2,): TOKENS_CF}.get(axes)
    if kind is None or (len(perm) == 4) != (kind in (NCHW, NHWC)):
        return None
    return MapLayout(kind, layout.hw)


def _reshaped_layout(
    layout: "MapLayout", source: torch.Tensor, out: torch.Tensor
) -> Optional["MapLayout"]:
    """The layout after a view/reshape/flatten that merges or splits the map's rows and columns."""
    if layout.fits(out) and out.shape[0] == source.shape[0] and out.dim() == source.dim():
        return layout
    height, width = layout.hw
    shape, new = tuple(source.shape), tuple(out.shape)
    if new[:1] != shape[:1]:
        return None
    if layout.kind == NHWC and new == (shape[0], height * width, shape[3]):
        return MapLayout(TOKENS, layout.hw)
    if layout.kind == NCHW and len(shape) == 4 and new == (shape[0], shape[1], height * width):
        return MapLayout(TOKENS_CF, layout.hw)
    if layout.kind == TOKENS and new == (shape[0], height, width, shape[2]):
        return MapLayout(NHWC, layout.hw)
    if layout.kind == TOKENS_CF and new == (shape[0], shape[1], height, width):
        return MapLayout(NCHW, layout.hw)
    return None


class FrameTracker(TorchFunctionMode):
    """Propagates :class:`FrameMap` s through one forward pass.

    Convs, pools and pads apply their arithmetic; permutes, transposes and reshapes move a
    map between its layouts (:class:`MapLayout`); any other op whose output holds a map of the
    same layout and size as an input with a known frame inherits that frame (activations,
    norms, residual sums, channel concatenations, chunks, ``Linear`` layers over channels-last
    maps). Anything else (resizes, pooling to vectors) loses the frame. Deformable modules and
    ops are registered with :meth:`enter_opaque` / :meth:`exit_opaque` so the ops inside them
    are skipped and the layer's own conv arithmetic is applied instead (:meth:`set_frame` on
    its output).
    """

    def __init__(self) -> None:
        super().__init__()
        self._frames: Dict[
            int, Tuple["weakref.ReferenceType[torch.Tensor]", FrameMap, MapLayout]
        ] = {}
        self._opaque_depth = 0
        # The latest frame declared for a map of each (layout, size): deformable attention
        # flattens its levels into one token sequence (a concatenation loses frames), so its
        # levels find their frames by size among the maps the forward made just before.
        self.latest_by_size: Dict[Tuple[str, Pair], FrameMap] = {}

    def set_frame(
        self, tensor: torch.Tensor, frame: FrameMap, layout: Optional[MapLayout] = None
    ) -> None:
        """Declare ``tensor``'s frame; ``layout`` defaults to ``nchw`` (a 4-D tensor)."""
        if layout is None:
            layout = MapLayout.of(tensor, NCHW)
            if layout is None:
                return
        # Weak references: keeping every intermediate activation alive for the whole forward
        # would multiply a large model's memory. A dead tensor's id may be reused by a new
        # tensor, so lookups check that the reference still points at the very same object.
        key = id(tensor)
        frames = self._frames

        def forget(ref: "weakref.ReferenceType[torch.Tensor]") -> None:
            entry = frames.get(key)
            if entry is not None and entry[0] is ref:
                del frames[key]

        frames[key] = (weakref.ref(tensor, forget), frame, layout)
        self.latest_by_size[(layout.kind, tuple(layout.hw))] = frame

    def frame_of_size(self, hw: Pair) -> Optional[FrameMap]:
        """The frame of the latest map of size ``hw`` the forward made, preferring flattened
        maps (``tokens``, ``tokens_cf``: what becomes an attention level) to ``nchw`` ones."""
        for kind in (TOKENS, TOKENS_CF, NCHW, NHWC):
            frame = self.latest_by_size.get((kind, (int(hw[0]), int(hw[1]))))
            if frame is not None:
                return frame
        return None

    def _entry(self, tensor: Any) -> Optional[Tuple[FrameMap, MapLayout]]:
        if not isinstance(tensor, torch.Tensor):
            return None
        entry = self._frames.get(id(tensor))
        return (entry[1], entry[2]) if entry is not None and entry[0]() is tensor else None

    def frame_of(self, tensor: Any) -> Optional[FrameMap]:
        entry = self._entry(tensor)
        return entry[0] if entry is not None else None

    def layout_of(self, tensor: Any) -> Optional[MapLayout]:
        entry = self._entry(tensor)
        return entry[1] if entry is not None else None

    def enter_opaque(self) -> None:
        self._opaque_depth += 1

    def exit_opaque(self) -> None:
        self._opaque_depth -= 1

    def __torch_function__(
        self,
        func: Callable,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._opaque_depth > 0:
            return out
        known: List[Tuple[torch.Tensor, FrameMap, MapLayout]] = []
        for t in list(flat_tensors(args)) + list(flat_tensors(kwargs)):
            entry = self._entry(t)
            if entry is not None:
                known.append((t, entry[0], entry[1]))
        if not known:
            return out
        first_tensor, first_frame, first_layout = known[0]
        if func in _CONV_FUNCS or func in _MAXPOOL_FUNCS or func in _AVGPOOL_FUNCS:
            window = sliding_window(func, args, kwargs) if first_layout.kind == NCHW else None
            if window is not None:
                for t in flat_tensors(out):  # a pool's indices too
                    if t.dim() == 4:
                        self.set_frame(t, window.output_frame(first_frame))
            return out
        if func in _PAD_FUNCS:
            frame = _pad_frame(first_frame, first_layout, first_tensor.dim(), args, kwargs)
            if frame is not None and isinstance(out, torch.Tensor):
                layout = MapLayout.of(out, first_layout.kind)
                if layout is not None:
                    self.set_frame(out, frame, layout)
            return out
        if (
            (func in _PERMUTE_FUNCS or func in _TRANSPOSE_FUNCS)
            and isinstance(out, torch.Tensor)
            and args
            and args[0] is first_tensor
        ):
            perm = _permutation(func, args, kwargs, first_tensor.dim())
            layout = _permuted_layout(first_layout, perm) if perm is not None else None
            if layout is not None and layout.fits(out):
                self.set_frame(out, first_frame, layout)
            return out
        if (
            func in _RESHAPE_FUNCS
            and isinstance(out, torch.Tensor)
            and args
            and args[0] is first_tensor
        ):
            layout = _reshaped_layout(first_layout, first_tensor, out)
            if layout is not None:
                self.set_frame(out, first_frame, layout)
            return out
        for t in flat_tensors(out):
            for source, frame, layout in known:
                # Channels-first maps keep today's rule (any leading size); the others must keep
                # the batch.
                if layout.fits(t) and (layout.kind == NCHW or t.shape[0] == source.shape[0]):
                    self.set_frame(t, frame, layout)
                    break
        return out
