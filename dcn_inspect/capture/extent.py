"""Theoretical receptive fields: how far each map's cells reach into the model input, followed
through the real forward with the layers' regular grids (offsets taken as zero).

An :class:`Extent` is the reach of a cell's receptive field from the cell's centre (left,
right, top, bottom, model-input pixels): the field of a cell centred at (x, y) is
``[x - left, x + right] x [y - top, y + bottom]``. An input pixel reaches half a pixel each side
(:meth:`Extent.pixel`). A k-tap window of dilation d on a map of stride s widens it by
:func:`grid_reach` input cells each side, times s ((k - 1) / 2 * d cells for a grid that is not
scaled); ops that keep the frame take the union of their inputs' extents.

:class:`ExtentTracker` is the :class:`~dcn_inspect.core.geometry.FrameTracker` that does this
bookkeeping for every tensor of the forward; the gradient forward
(:class:`~dcn_inspect.capture.gradients.GradientForward`) widens the extent of each deformable
layer it sees, which the tracker treats as opaque.

Coordinates: continuous pixels, (0, 0) = top-left corner of the top-left pixel, x right, y down.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from dcn_inspect.core.geometry import (
    FrameMap,
    FrameTracker,
    flat_tensors,
    is_padding,
    sliding_window,
)

__all__ = ["Extent", "ExtentTracker", "grid_reach"]


def grid_reach(kernel: int, dilation: int, scale: float = 1.0) -> Tuple[float, float]:
    """How many input cells (before, after) a k-tap grid of ``dilation`` reads around an output
    cell's centre along one axis, offsets zero.

    The output cell's centre is input index ``t0 = j*stride - pad + dilation*(k-1)/2`` (the frame
    arithmetic); tap b sits at ``t0 - dilation*(k-1)/2 + c + scale*(b*dilation - c)``, ``c =
    (dilation*(k-1)) // 2`` (a layer that scales its grid, DCNv3/v4's ``offset_scale``; scale 1:
    at ``t0 + b*dilation - dilation*(k-1)/2``). A tap at a fractional index reads the two cells
    around it (bilinear). Scale 1 gives ``(k-1)/2*dilation`` each side.
    """
    centre = dilation * (kernel - 1) / 2
    c = (dilation * (kernel - 1)) // 2
    # tap positions relative to t0 - centre
    taps = [c + scale * (b * dilation - c) for b in range(kernel)]
    before = centre - math.floor(min(taps) + 1e-9)
    after = math.ceil(max(taps) - 1e-9) - centre
    return (max(before, 0.0), max(after, 0.0))


@dataclass(frozen=True)
class Extent:
    """How far a cell's receptive field reaches from the cell's centre, in model-input pixels.

    The receptive field of a cell centred at (x, y) is
    ``[x - left, x + right] x [y - top, y + bottom]``.
    """

    left: float
    right: float
    top: float
    bottom: float

    @staticmethod
    def pixel() -> "Extent":
        """An input pixel: the unit square around its centre."""
        return Extent(0.5, 0.5, 0.5, 0.5)

    def grown(
        self,
        kernel: Tuple[int, int],
        dilation: Tuple[int, int],
        frame: FrameMap,
        scale: float = 1.0,
    ) -> "Extent":
        """Through a k x k window of dilation d on a map with ``frame``: :func:`grid_reach` input
        cells each side ((k - 1) / 2 * d for an unscaled grid)."""
        top, bottom = grid_reach(kernel[0], dilation[0], scale)
        left, right = grid_reach(kernel[1], dilation[1], scale)
        sx, sy = frame.stride_x, frame.stride_y
        return Extent(
            self.left + left * sx,
            self.right + right * sx,
            self.top + top * sy,
            self.bottom + bottom * sy,
        )

    def union(self, other: "Extent") -> "Extent":
        return Extent(
            max(self.left, other.left),
            max(self.right, other.right),
            max(self.top, other.top),
            max(self.bottom, other.bottom),
        )

    def box(self, x: float, y: float) -> Tuple[float, float, float, float]:
        """(x1, y1, x2, y2) of the receptive field of a cell centred at (x, y)."""
        return (x - self.left, y - self.top, x + self.right, y + self.bottom)


class ExtentTracker(FrameTracker):
    """A :class:`~dcn_inspect.core.geometry.FrameTracker` that also follows each map's
    receptive-field extent.

    An extent goes wherever the frame goes, in every map layout the frame tracker follows
    (channels-first, channels-last, tokens): convs and pools widen it by their window
    (:func:`~dcn_inspect.core.geometry.sliding_window`: (k - 1) / 2 * dilation input cells each
    side), pads keep it, and every other op whose output keeps a frame (activations, norms and
    ``Linear`` layers over channels, residual sums, concatenations, permutes and reshapes between
    layouts) takes the union of the extents of its inputs of the same map size. Deformable layers
    are opaque to the tracker; :class:`~dcn_inspect.capture.gradients.GradientForward` widens
    their extent by their regular grid (offsets as zero). A map whose frame is lost (resizes,
    global pooling) has no extent: the theoretical receptive field of a layer after it is unknown.
    """

    def __init__(self) -> None:
        super().__init__()
        self._extents: Dict[int, Tuple["weakref.ReferenceType[torch.Tensor]", Extent]] = {}

    def set_extent(self, tensor: torch.Tensor, extent: Extent) -> None:
        key = id(tensor)
        extents = self._extents

        def forget(ref: "weakref.ReferenceType[torch.Tensor]") -> None:
            entry = extents.get(key)
            if entry is not None and entry[0] is ref:
                del extents[key]

        extents[key] = (weakref.ref(tensor, forget), extent)

    def extent_of(self, tensor: Any) -> Optional[Extent]:
        if not isinstance(tensor, torch.Tensor):
            return None
        entry = self._extents.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def __torch_function__(
        self,
        func: Callable,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = super().__torch_function__(func, types, args, kwargs)
        if self._opaque_depth > 0:
            return out
        known = [
            (t, e)
            for t in list(flat_tensors(args)) + list(flat_tensors(kwargs))
            if (e := self.extent_of(t)) is not None
        ]
        if known:
            self._pass_on(func, args, kwargs, out, known)
        return out

    def _pass_on(
        self,
        func: Callable,
        args: Sequence[Any],
        kwargs: Dict[str, Any],
        out: Any,
        known: Sequence[Tuple[torch.Tensor, Extent]],
    ) -> None:
        """Give every framed output of ``func`` its extent from the inputs' ``known`` extents:
        grown by a sliding window, kept by a pad, else the union of the same-size inputs'."""
        window = sliding_window(func, args, kwargs)
        source, extent = known[0]
        for t in flat_tensors(out):
            layout = self.layout_of(t)
            if layout is None:
                continue  # the frame tracker gave it no frame: no extent either
            if window is not None:
                frame = self.frame_of(source)
                if frame is not None:
                    self.set_extent(t, extent.grown(window.kernel, window.dilation, frame))
            elif is_padding(func):
                self.set_extent(t, extent)
            else:
                same = [
                    e
                    for s, e in known
                    if (other := self.layout_of(s)) is not None and other.hw == layout.hw
                ]
                if same:
                    merged = same[0]
                    for more in same[1:]:
                        merged = merged.union(more)
                    self.set_extent(t, merged)
