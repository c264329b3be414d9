"""Receptive fields of single units (DCNv2, Zhu et al. 2019, §2.1): the effective receptive field,
gradient-weighted sampling points, the error-bounded saliency region and the theoretical
receptive field.

Definitions. A *unit* is one output cell (row i, column j) of a chosen layer (the top deformable
layer by default); its *response* r is the sum over channels of that layer's output at the unit,
``r = sum_c y[c, i, j]`` (``channel=None``), or one channel's value ``y[channel, i, j]``. ``y`` is
the layer's output as the layer returns it (for a deformable conv: the op's output, before any
norm or activation that follows; for an op-level call, the output of that op call; for a
DCNv3 / DCNv4 layer, its own channels-last ``[N, H, W, C]`` or token ``[N, H*W, C]`` output, cell
(i, j) being row i, column j of its map: :meth:`~dcn_inspect.core.geometry.MapLayout.to_nchw`).

- **Effective receptive field (ERF)**: ``sum_colour |dr / dI(p)|`` for every pixel p of the
  ORIGINAL image, I in 8-bit intensity levels (0..255). See "The resize" below for how the
  gradient gets through the preprocessing.
- **Gradient weight of a sampling point**: ``|dr / dp|`` (Euclidean norm of the 2-vector, in
  response units per original-image pixel), the total derivative of the response with respect
  to the position p of the sampling location: move p, let everything downstream of it (upper
  layers' offsets included) follow, watch r (DCNv2: "the gradient of the network node with
  respect to the sampling locations"). A point whose sample does not matter scores 0.
- **Saliency region**: the smallest axis-aligned box of the model input whose pixels alone
  (everything else set to the dataset mean, i.e. zero after normalisation) give a response
  within ``error`` (relative) of the full image's, found by progressive masking (schedule in
  :func:`saliency_regions`).
- **Theoretical receptive field**: the box of input pixels the unit can depend on through the
  layers' regular grids (offsets taken as zero), derived through the real forward
  (:class:`ExtentTracker`).

How the gradients are computed (:class:`GradientForward`, :meth:`GradientForward.backward_units`)

1. One forward pass of the model input with gradients enabled; the parameters are frozen for its
   duration, so autograd records only the paths from the input and never forms a weight
   gradient. Every analysed call -- a module-level layer (forward hooks, matched with the
   record its capture adapter made during the call), an op-level call (the capture's
   ``op_listener``) or a regular conv compared with a deformable one -- keeps its output (the
   tensor in the graph, in its own layout; downstream code receives a clone, so in-place
   operations after the layer cannot rewrite it) and a way to run the call again with other
   offsets (:data:`~dcn_inspect.capture.records.Rerun`, holding detached copies of its input).
2. One backward per batch of units. The batch is an ordinary batched graph: a forward of B
   copies of the model input (stopped after the units' layer), and one
   ``torch.autograd.grad(y_top, [copies, outputs of the lower analysed layers], E)`` with E the
   one-hot selections (ones over unit b's channels at its cell, in copy b). It returns, per unit,
   dr/d(model input) and dr/dy_l for every lower layer l (the total derivative: through
   everything between y_l and the unit). B is capped so that the copies' saved activations stay
   within :data:`BATCH_MEMORY_BYTES` (measured on the single-image forward); when one copy is
   all that fits, each unit is one backward through the single-image graph. (Batching the
   one-hots with ``is_grads_batched`` instead is kept as ``strategy="vmap"``: on CPU its
   convolution-backward and custom-op fallbacks loop over the batch, which measured slower.)
3. The offsets: dr/d(offset_l) = (dy_l/d(offset_l))^T dr/dy_l. The call is run again on its
   captured input with the captured offsets as leaves, one copy per unit in the batch, and one
   vector-Jacobian product gives every unit's offset gradient field [G, K, 2, Ho, Wo] (dy then
   dx, input-cell units, the standard layout): an op-level call re-runs the entry point it
   called with its own arguments (the offset it received replaced); a DCNv3 / DCNv4 layer runs
   its own forward with its offset branch's output replaced by the leaves converted back to its
   layout (:meth:`~dcn_inspect.capture.records.LayerAdapter.rerun`); other layers run the standard op
   on the module's weight. The re-run must reproduce the captured output (checked), so the
   field is the gradient of the real network at the offsets the op really used. A regular
   convolution (the ``compare`` model's layers) is a deformable one with zero offsets.
4. The tree's points (:mod:`dcn_inspect.analysis.sample_points`): level l's point (parent q, kernel point k)
   sits at kernel point k of a filter centred at a (fractional) position of layer l's output
   frame, whose offsets the tracer read by bilinear interpolation of the four neighbouring
   cells. Its gradient is read from the gradient field at the same position with the same
   interpolation (:func:`tree_gradient_weights`): exactly the gradient of the real sampling
   location at level 1 (the unit is a cell) and with ``round_positions`` at every level, the
   interpolated gradient of the four neighbouring cells' locations otherwise. With
   ``group="mean"`` the tree follows the mean of the groups' locations; moving every group's
   point k by the same step moves the mean by that step, so the groups' gradients are summed.
   Gradients in input cells become gradients per original-image pixel by dividing by the
   layer's input-frame stride and the original/model-input scale.

The resize. ``images.to_model_input`` resizes with PIL's bilinear filter (antialiased when
shrinking) on 8-bit values and rounds back to 8 bits, which is piecewise constant: its exact
derivative is zero. The ERF is therefore the gradient of the LINEAR resize that PIL's rounding
approximates: dr/dI = R^T (dr/dX) / (255 std) per colour channel, X the model input, R the
separable PIL bilinear operator (:func:`bilinear_resize_matrix`, equal to PIL's float resize to
~1e-6). The forward itself runs on the model input the other commands use, bit for bit.

Coordinates: continuous pixels, (0, 0) = top-left corner of the top-left pixel, pixel (r, c)
centred at (c + 0.5, r + 0.5), x right, y down; model-input pixels unless said otherwise.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from dcn_inspect.analysis.sample_points import GroupChoice, SamplingTrees, check_group, read_field
from dcn_inspect.capture.records import (
    DeformConvRecord,
    LayerAdapter,
    OffsetCapture,
    OpCallRun,
    Rerun,
)
from dcn_inspect.capture.registry import adapter_for
from dcn_inspect.capture.session import capture_offsets
from dcn_inspect.capture.session import forward as run_model
from dcn_inspect.core.columns import Column, names, position
from dcn_inspect.core.errors import InputError
from dcn_inspect.core.geometry import (
    NCHW,
    FrameMap,
    FrameTracker,
    LayerGeometry,
    MapLayout,
    flat_tensors,
    is_padding,
    sliding_window,
)
from dcn_inspect.ops import deform_conv2d

#: Default relative error bound of the saliency region (DCNv2's "small error bound").
DEFAULT_SALIENCY_ERROR = 0.1
#: Default number of units per backward (and masked images per forward).
DEFAULT_BATCH_SIZE = 8
#: Saved activations one batched backward may hold (copies of the image x what one forward saves).
BATCH_MEMORY_BYTES = 2 * 1024**3
#: A re-run of a layer's op must match its captured output to this (relative to the output's scale).
RERUN_TOLERANCE = 1e-4

# --------------------------------------------------------------------------------------------
# The resize and its adjoint
# --------------------------------------------------------------------------------------------


def bilinear_resize_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """PIL's ``BILINEAR`` resampling of one axis as a matrix [out_size, in_size] (float64).

    Pillow's ``precompute_coeffs``: output sample i sits at ``center = (i + 0.5) * scale``
    (scale = in/out); the triangle filter is widened by ``max(scale, 1)`` (antialiasing when
    shrinking) and its taps ``j`` in ``[int(center - support + 0.5), int(center + support + 0.5))``
    (clipped to the axis) weigh ``tri((j + 0.5 - center) / max(scale, 1))``, normalised to sum 1.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    if in_size == out_size:
        return matrix.fill_diagonal_(1.0)
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = filter_scale
    for i in range(out_size):
        center = (i + 0.5) * scale
        low = max(int(center - support + 0.5), 0)
        high = min(int(center + support + 0.5), in_size)
        taps = torch.arange(low, high, dtype=torch.float64)
        weights = (1.0 - ((taps - center + 0.5) / filter_scale).abs()).clamp(min=0.0)
        total = float(weights.sum())
        if total != 0.0:
            weights = weights / total
        matrix[i, low:high] = weights
    return matrix


def image_gradient(
    input_grad: torch.Tensor, original_hw: Tuple[int, int], std: Sequence[float]
) -> torch.Tensor:
    """dr/dI of the original image [..., 3, H, W] (per 8-bit level) from dr/dX of the model input [..., 3, h, w].

    X_c = (R I_c / 255 - mean_c) / std_c with R the separable PIL bilinear resize (identity when
    the sizes agree), so dr/dI_c = R^T (dr/dX_c) / (255 std_c) = Ry^T G_c Rx / (255 std_c).
    """
    height, width = original_hw
    in_h, in_w = input_grad.shape[-2:]
    grad = input_grad / (
        255.0 * torch.tensor(std, dtype=input_grad.dtype, device=input_grad.device).view(3, 1, 1)
    )
    if (in_h, in_w) != (height, width):
        rows = bilinear_resize_matrix(height, in_h).to(grad)  # [h, H]
        cols = bilinear_resize_matrix(width, in_w).to(grad)  # [w, W]
        grad = rows.transpose(0, 1) @ grad @ cols
    return grad


def effective_receptive_field(
    input_grad: torch.Tensor, original_hw: Tuple[int, int], std: Sequence[float]
) -> torch.Tensor:
    """The ERF [..., H, W]: ``sum_colour |dr/dI|`` over the original image's pixels."""
    return image_gradient(input_grad, original_hw, std).abs().sum(dim=-3)


# --------------------------------------------------------------------------------------------
# Theoretical receptive field: extents followed through the forward
# --------------------------------------------------------------------------------------------


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
    taps = [
        c + scale * (b * dilation - c) for b in range(kernel)
    ]  # positions relative to t0 - centre
    before = centre - math.floor(min(taps) + 1e-9)
    after = math.ceil(max(taps) - 1e-9) - centre
    return (max(before, 0.0), max(after, 0.0))


@dataclass(frozen=True)
class Extent:
    """How far a cell's receptive field reaches from the cell's centre, in model-input pixels.

    The receptive field of a cell centred at (x, y) is ``[x - left, x + right] x [y - top, y + bottom]``.
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
        """Through a k x k window of dilation d on a map with ``frame``: :func:`grid_reach` input cells each side
        ((k - 1) / 2 * d for an unscaled grid)."""
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
    """A :class:`~dcn_inspect.core.geometry.FrameTracker` that also follows each map's receptive-field extent.

    An extent goes wherever the frame goes, in every map layout the frame tracker follows
    (channels-first, channels-last, tokens): convs and pools widen it by their window
    (:func:`~dcn_inspect.core.geometry.sliding_window`: (k - 1) / 2 * dilation input cells each side),
    pads keep it, and every other op whose output keeps a frame (activations, norms and
    ``Linear`` layers over channels, residual sums, concatenations, permutes and reshapes between
    layouts) takes the union of the extents of its inputs of the same map size. Deformable layers
    are opaque to the tracker; :class:`GradientForward` widens their extent by their regular grid
    (offsets as zero). A map whose frame is lost (resizes, global pooling) has no extent: the
    theoretical receptive field of a layer after it is unknown.
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
        if not known:
            return out
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
        return out


# --------------------------------------------------------------------------------------------
# The gradient forward
# --------------------------------------------------------------------------------------------


@dataclass
class LayerCall:
    """One call of an analysed layer during :class:`GradientForward`'s forward: a module-level
    deformable layer, an op-level deformable-conv call, or a regular conv treated as one."""

    record: DeformConvRecord  # offsets, masks, geometry (zero offsets for a regular conv)
    output: torch.Tensor  # the call's output in the autograd graph, in its own layout
    layout: Optional[
        MapLayout
    ]  # where the output map lies in ``output`` (None: not a map of the recorded size)
    extent: Optional[Extent]  # receptive-field extent of the output cells (None: unknown)
    rerun: Optional[Rerun]  # the call as a function of its offset (None: it cannot be run again)

    @property
    def name(self) -> str:
        return self.record.name


class _Stop(BaseException):
    """Ends a forward pass once the layer of interest has run (BaseException: model code's
    ``except Exception`` does not swallow it)."""


def _regular_conv_padding(module: nn.Conv2d) -> Tuple[int, int]:
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0)
        return tuple((module.dilation[i] * (module.kernel_size[i] - 1)) // 2 for i in range(2))  # type: ignore[return-value]
    return (int(module.padding[0]), int(module.padding[1]))


def unusable_layers(
    model: nn.Module, names: Sequence[str], found: Optional[Sequence[str]] = None
) -> Dict[str, str]:
    """Of ``names`` (``name`` or ``name#k``), those ``model`` lacks or cannot analyse, with the
    reason. Before a forward (``found`` None) only a missing module is a problem (any module may
    call a deformable op); after it, every name not ``found`` among the followed calls is."""
    modules = dict(model.named_modules())
    problems: Dict[str, str] = {}
    for name in names:
        module = modules.get(name.split("#")[0])
        if module is None:
            problems[name] = "missing"
        elif found is not None and name not in found:
            if not isinstance(module, nn.Conv2d) and adapter_for(module) is None:
                problems[name] = (
                    f"a {type(module).__name__}: neither a deformable conv (module or op call) nor an nn.Conv2d"
                )
            else:
                problems[name] = "not run on this image"
    return problems


@contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad inside (autograd then follows only the paths from the input)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _standard_rerun(
    module: nn.Module, record: DeformConvRecord, layer_input: torch.Tensor
) -> Optional[Rerun]:
    """The standard deformable op on the module's ``weight`` and ``bias``, the captured input and mask."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        return None
    bias = getattr(module, "bias", None)
    bias = bias.detach() if isinstance(bias, torch.Tensor) else None
    kept_input = layer_input.detach().clone()
    mask = record.mask
    geometry = record.geometry

    def rerun(offset: torch.Tensor) -> torch.Tensor:
        batch = int(offset.shape[0])
        copies = kept_input.expand(batch, *kept_input.shape[1:]).contiguous()
        masks = (
            None if mask is None else mask.to(copies).expand(batch, *mask.shape[1:]).contiguous()
        )
        return deform_conv2d(
            copies,
            offset.to(copies),
            weight.detach(),
            bias,
            geometry.stride,
            geometry.padding,
            geometry.dilation,
            masks,
        )

    return rerun


#: ``on_call(record, layer_input, output, layout, make_rerun)`` -> what the caller receives instead
#: of ``output`` (None: the output itself).
_OnCall = Callable[
    [
        DeformConvRecord,
        torch.Tensor,
        torch.Tensor,
        Optional[MapLayout],
        Callable[[], Optional[Rerun]],
    ],
    Optional[torch.Tensor],
]


@contextmanager
def _following_calls(
    model: nn.Module, regular: Sequence[str], tracker: Optional[FrameTracker], on_call: _OnCall
) -> Iterator[OffsetCapture]:
    """Capture offsets during the enclosed forward and tell ``on_call`` of every call of a
    deformable layer -- module level (the record its adapter made during the call) or op level
    (:data:`~dcn_inspect.capture.records.OffsetCapture.op_listener`) -- and of every call of a regular
    conv named in ``regular`` (a deformable conv with zero offsets), each once, with its output."""
    regular_names = {name.split("#")[0] for name in regular}
    counts: Dict[str, int] = {}
    with capture_offsets(model, track_frames=tracker is not None, tracker=tracker) as capture:

        def on_op(run: OpCallRun) -> Optional[torch.Tensor]:
            if not isinstance(run.output, torch.Tensor):
                return None
            layout = MapLayout.of(run.output, NCHW)
            if layout is not None and layout.hw != tuple(run.record.geometry.output_hw):
                layout = None
            return on_call(run.record, run.input, run.output, layout, run.rerun)

        capture.op_listener = on_op
        removers: List[Callable[[], None]] = []

        def hooks_for(name: str, module: nn.Module, adapter: Optional[LayerAdapter]) -> None:
            before: List[int] = []

            def pre(mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
                before.append(len(capture.convs))

            def post(
                mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], out: Any
            ) -> Any:
                start = before.pop() if before else len(capture.convs)
                layer_input = args[0] if args else kwargs.get("input", kwargs.get("x"))
                if not isinstance(out, torch.Tensor) or not isinstance(layer_input, torch.Tensor):
                    return None
                if adapter is not None:
                    made = [r for r in list(capture.convs.values())[start:] if r.op is None]
                    if not made:
                        return None
                    record = made[-1]
                    layout = adapter.output_layout(record, out)

                    def make_rerun() -> Optional[Rerun]:
                        return adapter.rerun(mod, record, args, kwargs) or _standard_rerun(
                            mod, record, layer_input
                        )

                    return on_call(record, layer_input, out, layout, make_rerun)
                counts[name] = counts.get(name, 0) + 1
                call_name = name if counts[name] == 1 else f"{name}#{counts[name]}"
                regular_record = _regular_record(call_name, mod, layer_input, out, capture)  # type: ignore[arg-type]
                if regular_record is None:
                    return None
                return on_call(
                    regular_record,
                    layer_input,
                    out,
                    MapLayout.of(out, NCHW),
                    lambda: _standard_rerun(mod, regular_record, layer_input),
                )

            removers.append(module.register_forward_pre_hook(pre, with_kwargs=True).remove)
            removers.append(
                module.register_forward_hook(post, with_kwargs=True, always_call=True).remove
            )

        try:
            for name, module in model.named_modules():
                adapter = adapter_for(module)
                if adapter is not None or (
                    name and name in regular_names and isinstance(module, nn.Conv2d)
                ):
                    hooks_for(name or type(module).__name__, module, adapter)
            yield capture
        finally:
            for remove in removers:
                remove()
            capture.op_listener = None


def _regular_record(
    name: str,
    module: nn.Conv2d,
    layer_input: torch.Tensor,
    out: torch.Tensor,
    capture: OffsetCapture,
) -> Optional[DeformConvRecord]:
    """A regular conv as a deformable conv with zero offsets (frames from the capture's tracker)."""
    if module.padding_mode != "zeros" or out.dim() != 4:
        return None
    frame, method = capture.input_frame(layer_input)
    kernel = (int(module.kernel_size[0]), int(module.kernel_size[1]))
    geometry = LayerGeometry(
        kernel=kernel,
        stride=(int(module.stride[0]), int(module.stride[1])),
        padding=_regular_conv_padding(module),
        dilation=(int(module.dilation[0]), int(module.dilation[1])),
        input_hw=(int(layer_input.shape[-2]), int(layer_input.shape[-1])),
        output_hw=(int(out.shape[-2]), int(out.shape[-1])),
        input_frame=frame,
        method=method,
    )
    offset = out.new_zeros(
        out.shape[0], 2 * kernel[0] * kernel[1], out.shape[-2], out.shape[-1]
    ).detach()
    return DeformConvRecord(
        name, type(module).__name__, offset, None, int(module.groups), 1, geometry
    )


class GradientForward:
    """One forward of ``images`` [1, 3, H, W] (the model input) with gradients to the input.

    Keeps a :class:`LayerCall` for every call of a deformable layer the capture records --
    module-level layers (including DCNv3/DCNv4, whose output stays in their own channels-last or
    token layout), op-level calls of a deformable-conv op made by any module (named as the
    capture names them, ``#k`` for repeated calls) -- and of every regular ``nn.Conv2d`` named in
    ``regular`` (treated as a deformable conv with zero offsets: the layers of a baseline model
    compared with a deformable one). ``stop_after`` (a call name) ends the forward once that call
    has run.
    """

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        regular: Sequence[str] = (),
        stop_after: Optional[str] = None,
    ) -> None:
        if images.dim() != 4:
            raise ValueError(
                f"GradientForward takes images [B, 3, H, W], got {tuple(images.shape)}"
            )
        self.model = model
        self.images = images.detach().clone().requires_grad_(True)
        self.calls: Dict[str, LayerCall] = {}
        self.capture: Optional[OffsetCapture] = None
        self.regular = list(regular)
        self.saved_bytes = (
            0  # memory autograd keeps for the backward (what each replica of the image costs)
        )
        problems = unusable_layers(model, regular)
        if problems:
            raise ValueError(f"layers that cannot be analysed: {problems}")
        self._run(stop_after)

    def _run(self, stop_after: Optional[str]) -> None:
        tracker = ExtentTracker()

        def on_call(
            record: DeformConvRecord,
            layer_input: torch.Tensor,
            out: torch.Tensor,
            layout: Optional[MapLayout],
            make_rerun: Callable[[], Optional[Rerun]],
        ) -> torch.Tensor:
            in_extent = tracker.extent_of(layer_input)
            in_frame = tracker.frame_of(layer_input)
            extent = None
            if in_extent is not None and in_frame is not None and record.geometry.method == "hooks":
                extent = in_extent.grown(
                    record.geometry.kernel, record.geometry.dilation, in_frame, record.grid_scale
                )
            if layer_input.requires_grad and not out.requires_grad:
                raise InputError(
                    f"the model's layer {record.name}: its {record.op or record.module_type} passes no gradient back to its input "
                    "(no autograd formula in this environment), so receptive fields cannot be followed through it"
                )
            self.calls[record.name] = LayerCall(record, out, layout, extent, make_rerun())
            passed_on = out.clone()  # later in-place ops rewrite the clone, never the kept output
            frame = tracker.frame_of(out)
            if frame is not None:
                tracker.set_frame(passed_on, frame, tracker.layout_of(out))
            if extent is not None:
                tracker.set_extent(passed_on, extent)
            if stop_after is not None and record.name == stop_after:
                raise _Stop
            return passed_on

        storages: Dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with (
            _frozen_parameters(self.model),
            torch.enable_grad(),
            _following_calls(self.model, self.regular, tracker, on_call) as capture,
        ):
            self.capture = capture
            capture.watch_input(self.images)
            tracker.set_extent(self.images, Extent.pixel())
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                try:
                    run_model(self.model, self.images)
                except _Stop:
                    pass
        self.saved_bytes = sum(storages.values())

    # ----------------------------------------------------------------------------------------

    @property
    def records(self) -> Dict[str, DeformConvRecord]:
        """Every kept layer call's record, in call order."""
        return {name: call.record for name, call in self.calls.items()}

    def deformable_records(self) -> Dict[str, DeformConvRecord]:
        """The records of the deformable layers only (what :func:`~dcn_inspect.capture.records.select_layers` offers)."""
        assert self.capture is not None
        return {name: self.calls[name].record for name in self.capture.convs if name in self.calls}

    def theoretical_box(self, layer: str, unit_xy: torch.Tensor) -> Optional[torch.Tensor]:
        """Theoretical receptive field [U, 4] (x1, y1, x2, y2, model-input pixels) of units centred at ``unit_xy`` [U, 2]."""
        extent = self.calls[layer].extent
        if extent is None:
            return None
        x, y = unit_xy[:, 0].to(torch.float64), unit_xy[:, 1].to(torch.float64)
        return torch.stack(
            [x - extent.left, y - extent.top, x + extent.right, y + extent.bottom], dim=1
        )

    def layout(self, layer: str) -> MapLayout:
        """Where the output map of call ``layer`` lies in its output; an :class:`InputError` when
        the output is no map of the recorded size (its units cannot be read)."""
        call = self.calls[layer]
        if call.layout is None:
            h, w = call.record.geometry.output_hw
            shape = "x".join(str(n) for n in call.output.shape)
            raise InputError(
                f": the output of layer {layer} ({shape}) is not a {h}x{w} map in a layout dcn-inspect reads "
                "(channels-first, channels-last or tokens), so its units cannot be followed; choose another layer",
                param="layers",
            )
        return call.layout

    def output_map(self, layer: str) -> torch.Tensor:
        """The output of call ``layer`` as ``[1, C, Ho, Wo]`` (a view of the kept output, in the graph)."""
        return self.layout(layer).to_nchw(self.calls[layer].output)

    def responses(self, layer: str, units: torch.Tensor, channel: Optional[int]) -> torch.Tensor:
        """r of every unit [U] (float64) on the unmasked image."""
        output = self.output_map(layer).detach()
        check_channel(channel, output.shape[1], layer)
        rows, cols = units[:, 0], units[:, 1]
        values = output[0, :, rows, cols]  # [C, U]
        return (values.sum(dim=0) if channel is None else values[channel]).to(torch.float64)

    def replicas(self, batch_size: int, memory_bytes: int) -> int:
        """How many copies of the image one batched backward may use: ``batch_size``, at most
        ``memory_bytes`` of saved activations (measured on this forward)."""
        if self.saved_bytes <= 0:
            return max(1, batch_size)
        return max(1, min(batch_size, memory_bytes // self.saved_bytes))

    def backward_units(
        self,
        layer: str,
        units: torch.Tensor,
        channel: Optional[int] = None,
        levels: Sequence[str] = (),
        batch_size: int = DEFAULT_BATCH_SIZE,
        strategy: str = "replicate",
        memory_bytes: int = BATCH_MEMORY_BYTES,
    ) -> Iterator["UnitGradients"]:
        """dr/d(model input) and dr/d(offsets of each of ``levels``) for ``units`` [U, 2] (row, col) of ``layer``.

        Yields one :class:`UnitGradients` per batch of units, in order. ``levels`` are layer names
        (``layer`` itself may be one of them) whose offset gradient fields are wanted.
        ``strategy``: ``"replicate"`` (default) runs one forward of B copies of the image (B =
        :meth:`replicas`, at most ``batch_size``) and one backward whose ``grad_outputs`` select
        unit b in copy b; with room for one copy only, every unit is one backward through this
        forward's graph. ``"vmap"`` runs ``torch.autograd.grad(..., is_grads_batched=True)``
        through this forward's graph (on CPU its convolution-backward and custom-op fallbacks loop
        per sample: slower, see ``bench/receptive_field.py``). The one-hot selections are built
        on the ``[C, Ho, Wo]`` map and put into the output's own layout (channels-last, tokens).
        """
        top = self.calls[layer]
        layout = self.layout(layer)
        output = top.output
        channels = int(layout.to_nchw(output).shape[1])
        check_channel(channel, channels, layer)
        units = torch.as_tensor(units, dtype=torch.long).reshape(-1, 2)
        out_h, out_w = layout.hw
        if units.numel() and (
            units[:, 0].min() < 0
            or units[:, 0].max() >= out_h
            or units[:, 1].min() < 0
            or units[:, 1].max() >= out_w
        ):
            raise ValueError(f"units outside the {out_h}x{out_w} output map of {layer}")
        if strategy not in ("replicate", "vmap"):
            raise ValueError(f"strategy must be 'replicate' or 'vmap', got {strategy!r}")
        lower = [name for name in levels if name != layer]
        step = max(1, batch_size) if strategy == "vmap" else self.replicas(batch_size, memory_bytes)
        for start in range(0, units.shape[0], step):
            chunk = units[start : start + step]
            count = int(chunk.shape[0])
            grid = torch.zeros(
                (count, channels, out_h, out_w), dtype=output.dtype, device=output.device
            )
            index = torch.arange(count, device=output.device)
            rows, cols = chunk[:, 0].to(output.device), chunk[:, 1].to(output.device)
            if channel is None:
                grid[index, :, rows, cols] = 1.0
            else:
                grid[index, channel, rows, cols] = 1.0
            selection = layout.from_nchw(grid)  # [count, *output.shape[1:]]
            with torch.enable_grad():
                if strategy == "vmap":
                    wanted = [self.images] + [self.calls[name].output for name in lower]
                    grads = [
                        g if g is None else g[:, 0]
                        for g in torch.autograd.grad(
                            output,
                            wanted,
                            selection[:, None],
                            retain_graph=True,
                            allow_unused=True,
                            is_grads_batched=True,
                        )
                    ]
                elif count == 1:
                    wanted = [self.images] + [self.calls[name].output for name in lower]
                    grads = list(
                        torch.autograd.grad(
                            output, wanted, selection, retain_graph=True, allow_unused=True
                        )
                    )
                else:
                    copies = GradientForward(
                        self.model,
                        self.images.detach().expand(count, -1, -1, -1),
                        regular=self.regular,
                        stop_after=layer,
                    )
                    wanted = [copies.images] + [copies.calls[name].output for name in lower]
                    grads = list(
                        torch.autograd.grad(
                            copies.calls[layer].output, wanted, selection, allow_unused=True
                        )
                    )
            input_grad = (
                grads[0]
                if grads[0] is not None
                else torch.zeros(
                    (count,) + tuple(self.images.shape[1:]),
                    dtype=self.images.dtype,
                    device=self.images.device,
                )
            )
            output_grads = {layer: selection}
            for name, grad in zip(lower, grads[1:]):
                output_grads[name] = (
                    grad
                    if grad is not None
                    else torch.zeros(
                        (count,) + tuple(self.calls[name].output.shape[1:]),
                        dtype=output.dtype,
                        device=output.device,
                    )
                )
            offset_grads = {name: self.offset_gradient(name, output_grads[name]) for name in levels}
            yield UnitGradients(
                start, input_grad.detach(), {k: v for k, v in offset_grads.items() if v is not None}
            )

    def offset_gradient(self, name: str, output_grad: torch.Tensor) -> Optional[torch.Tensor]:
        """dr/d(offset) [B, G, K, 2, Ho, Wo] of call ``name`` from dr/d(output) [B, ...] (the
        output's own layout): one vector-Jacobian product through the call run again on its
        captured input with the captured offsets as leaves (:attr:`LayerCall.rerun`: the op
        itself for op-level calls, the layer's own forward for DCNv3/DCNv4, the standard op on
        the module's weight otherwise). None when the call cannot be run again or the re-run does
        not reproduce the captured output (a layer doing more than the op)."""
        call = self.calls[name]
        if call.rerun is None:
            return None
        record = call.record
        batch = output_grad.shape[0]
        captured = call.output.detach()
        with torch.enable_grad(), _frozen_parameters(self.model):
            offset = (
                record.offset.to(device=captured.device)
                .expand(batch, -1, -1, -1)
                .clone()
                .requires_grad_(True)
            )
            try:
                rerun = call.rerun(offset)
            except (RuntimeError, ValueError, TypeError, IndexError, InputError):
                return None
            if not isinstance(rerun, torch.Tensor) or not rerun.requires_grad:
                return None
            scale = float(captured.abs().max()) if captured.numel() else 0.0
            if rerun.shape[1:] != captured.shape[1:] or float(
                (rerun[:1].detach() - captured).abs().max()
            ) > RERUN_TOLERANCE * max(scale, 1e-12):
                return None
            (grad,) = torch.autograd.grad(rerun, offset, output_grad.to(rerun))
        out_h, out_w = grad.shape[-2:]
        return grad.detach().reshape(
            batch, record.offset_groups, record.kernel_points, 2, out_h, out_w
        )

    def evaluate_masked(
        self,
        layer: str,
        units: torch.Tensor,
        boxes: torch.Tensor,
        channel: Optional[int],
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> torch.Tensor:
        """r of unit ``units[n]`` [N, 2] with the model input kept only inside ``boxes[n]``
        [N, 4] (x1, y1, x2, y2 integer pixel edges) and zero (the dataset mean) elsewhere -> [N] float64."""
        image = self.images.detach()
        height, width = image.shape[-2:]
        ys = torch.arange(height, device=image.device)
        xs = torch.arange(width, device=image.device)
        layout = self.layout(layer)
        results = []
        for start in range(0, units.shape[0], batch_size):
            box = boxes[start : start + batch_size].to(image.device)
            keep_y = (ys[None] >= box[:, 1:2]) & (ys[None] < box[:, 3:4])  # [n, H]
            keep_x = (xs[None] >= box[:, 0:1]) & (xs[None] < box[:, 2:3])  # [n, W]
            masks = (keep_y[:, :, None] & keep_x[:, None, :]).to(image.dtype)[:, None]
            output = run_until(self.model, image * masks, layer, self.regular)
            output = MapLayout(layout.kind, layout.hw).to_nchw(output)
            chunk = units[start : start + batch_size]
            values = output[torch.arange(chunk.shape[0]), :, chunk[:, 0], chunk[:, 1]]  # [n, C]
            results.append(
                (values.sum(dim=1) if channel is None else values[:, channel])
                .to(torch.float64)
                .cpu()
            )
        return torch.cat(results) if results else torch.zeros(0, dtype=torch.float64)


def run_until(
    model: nn.Module, images: torch.Tensor, layer: str, regular: Sequence[str] = ()
) -> torch.Tensor:
    """The output of call ``layer`` (a record name as the capture gives it: a module-level layer,
    an op-level call, ``#k`` for repeated calls, or a regular conv in ``regular``) for ``images``,
    in the call's own layout, without gradients; the forward stops there."""
    seen: Dict[str, torch.Tensor] = {}

    def on_call(
        record: DeformConvRecord,
        layer_input: torch.Tensor,
        out: torch.Tensor,
        layout: Optional[MapLayout],
        make_rerun: Callable[[], Optional[Rerun]],
    ) -> None:
        if record.name == layer:
            seen["output"] = out
            raise _Stop
        return None

    with torch.no_grad(), _following_calls(model, regular, None, on_call) as capture:
        capture.watch_input(images)
        try:
            model(images)
        except _Stop:
            pass
    if "output" not in seen:
        raise RuntimeError(f"layer {layer} did not run on the masked images")
    return seen["output"]


def check_channel(channel: Optional[int], channels: int, layer: str) -> None:
    if channel is not None and not 0 <= channel < channels:
        raise InputError(
            f"{channel}: layer {layer} has {channels} channels (0..{channels - 1})", param="channel"
        )


@dataclass
class UnitGradients:
    """Gradients of one batch of units (units ``start .. start + B - 1``)."""

    start: int
    input_grad: torch.Tensor  # [B, 3, h, w]: dr/d(model input)
    offset_grads: Dict[
        str, torch.Tensor
    ]  # layer -> [B, G, K, 2, Ho, Wo]: dr/d(dy, dx) in input cells


# --------------------------------------------------------------------------------------------
# Gradient weights of the sampling trees
# --------------------------------------------------------------------------------------------


@dataclass
class PointGradients:
    """dr/dp of every tree point, per level [U, P_l], in response units per original-image pixel."""

    grad_x: List[torch.Tensor]
    grad_y: List[torch.Tensor]

    @property
    def weights(self) -> List[torch.Tensor]:
        """``|dr/dp|`` per level [U, P_l]."""
        return [torch.hypot(gx, gy) for gx, gy in zip(self.grad_x, self.grad_y)]


def tree_gradient_weights(
    trees: SamplingTrees,
    records: Sequence[DeformConvRecord],
    offset_grads: Dict[str, torch.Tensor],
    group: GroupChoice = 0,
    scale_to_original: Tuple[float, float] = (1.0, 1.0),
) -> PointGradients:
    """dr/dp of every point of ``trees`` (traced through ``records``, top first) from the units'
    offset gradient fields ``offset_grads[layer]`` [U, G, K, 2, Ho, Wo].

    Level l's points are read from layer l's field at the positions where the tracer read that
    layer's offsets (``trees.read_at``), by the same bilinear interpolation and border rule.
    """
    group = check_group(group)
    if len(trees.read_at) != trees.num_levels:
        raise ValueError("trees without read positions (traced by an older tracer)")
    sx, sy = float(scale_to_original[0]), float(scale_to_original[1])
    grad_x: List[torch.Tensor] = []
    grad_y: List[torch.Tensor] = []
    for level, record in enumerate(records[: trees.num_levels]):
        field_all = offset_grads[record.name].to(torch.float64).cpu()  # [U, G, K, 2, Ho, Wo]
        groups = field_all.shape[1]
        if group == "mean":
            field = field_all.sum(dim=1)
        else:
            g = 0 if groups == 1 else int(group)
            if not 0 <= g < groups:
                raise InputError(
                    f"{group}: layer {record.name} has {groups} offset groups (0..{groups - 1})",
                    param="group",
                )
            field = field_all[:, g]
        kernel_points = field.shape[1]
        rows, cols = trees.read_at[level]
        per_unit_x, per_unit_y = [], []
        for u in range(trees.num_units):
            table = torch.cat(
                [field[u, :, 0], field[u, :, 1]], dim=0
            )  # [2K, Ho, Wo]: d/d(dy), d/d(dx)
            values = read_field(table, rows[u], cols[u])  # [N, 2K]
            per_unit_y.append(values[:, :kernel_points].reshape(-1))
            per_unit_x.append(values[:, kernel_points:].reshape(-1))
        frame = record.geometry.input_frame
        empty = torch.zeros(0, trees.points_per_unit(level + 1), dtype=torch.float64)
        gx = torch.stack(per_unit_x) if per_unit_x else empty
        gy = torch.stack(per_unit_y) if per_unit_y else empty
        grad_x.append(gx / (frame.stride_x * sx))
        grad_y.append(gy / (frame.stride_y * sy))
    return PointGradients(grad_x, grad_y)


def sampling_point_gradients(
    model: nn.Module,
    images: torch.Tensor,
    levels: Sequence[str],
    trees: SamplingTrees,
    *,
    group: GroupChoice = 0,
    scale_to_original: Tuple[float, float] = (1.0, 1.0),
    channel: Optional[int] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Optional[PointGradients]:
    """dr/dp of every point of ``trees`` (traced through the layers ``levels``, top first, on
    ``images`` [1, 3, H, W]), r the response of each tree's unit; None when a layer's op cannot be
    re-run (see :meth:`GradientForward.offset_gradient`)."""
    forward = GradientForward(model, images, stop_after=levels[0])
    records = [forward.calls[name].record for name in levels]
    fields: Dict[str, List[torch.Tensor]] = {name: [] for name in levels}
    for batch in forward.backward_units(levels[0], trees.units, channel, levels, batch_size):
        if set(batch.offset_grads) != set(levels):
            return None
        for name in levels:
            fields[name].append(batch.offset_grads[name].cpu())
    if trees.num_units == 0:
        empty = [
            torch.zeros(0, trees.points_per_unit(level), dtype=torch.float64)
            for level in range(1, trees.num_levels + 1)
        ]
        return PointGradients(empty, [e.clone() for e in empty])
    return tree_gradient_weights(
        trees,
        records,
        {name: torch.cat(parts) for name, parts in fields.items()},
        group,
        scale_to_original,
    )


# --------------------------------------------------------------------------------------------
# Summary numbers of an ERF
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErfNumbers:
    """Summary of one ERF map (original-image pixels)."""

    mass: float  # sum of the map
    centroid_x: float  # gradient-weighted mean of the pixel centres
    centroid_y: float
    radius_50: float  # smallest radius around the centroid holding 50 % of the mass
    radius_90: float
    mass_in_box: Optional[float]  # fraction of the mass on pixels whose centre lies in the box


def erf_numbers(erf: np.ndarray, box: Optional[Sequence[float]] = None) -> ErfNumbers:
    """Centroid, 50 % / 90 % mass radii (discs around the centroid, pixel centres; the radius of
    the first pixel, in order of distance, at which the cumulative mass reaches the fraction) and
    the fraction of mass inside ``box`` (x1, y1, x2, y2; edges inclusive)."""
    erf = np.asarray(erf, dtype=np.float64)
    height, width = erf.shape
    mass = float(erf.sum())
    nan = float("nan")
    if not mass > 0:
        return ErfNumbers(mass, nan, nan, nan, nan, None if box is None else nan)
    xs = np.arange(width, dtype=np.float64) + 0.5
    ys = np.arange(height, dtype=np.float64) + 0.5
    centroid_x = float((erf.sum(axis=0) * xs).sum() / mass)
    centroid_y = float((erf.sum(axis=1) * ys).sum() / mass)
    nonzero = np.nonzero(erf)
    values = erf[nonzero]
    distance = np.hypot(xs[nonzero[1]] - centroid_x, ys[nonzero[0]] - centroid_y)
    order = np.argsort(distance, kind="stable")
    cumulative = np.cumsum(values[order])
    radii = []
    for fraction in (0.5, 0.9):
        k = int(np.searchsorted(cumulative, fraction * cumulative[-1], side="left"))
        radii.append(float(distance[order][min(k, len(order) - 1)]))
    in_box: Optional[float] = None
    if box is not None:
        x1, y1, x2, y2 = (float(v) for v in box)
        keep_x = (xs >= x1) & (xs <= x2)
        keep_y = (ys >= y1) & (ys <= y2)
        in_box = float(erf[np.ix_(keep_y, keep_x)].sum() / mass)
    return ErfNumbers(mass, centroid_x, centroid_y, radii[0], radii[1], in_box)


def unit_box(unit_xy: Tuple[float, float], boxes: np.ndarray) -> Optional[int]:
    """Index of the smallest box containing the unit centre (edges inclusive), None if none does
    (the rule of :func:`dcn_inspect.analysis.dilation_stats.unit_categories`)."""
    if boxes is None or len(boxes) == 0:
        return None
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x, y = unit_xy
    inside = (boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])
    if not inside.any():
        return None
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    candidates = np.nonzero(inside)[0]
    return int(candidates[np.argsort(areas[candidates], kind="stable")[0]])


# --------------------------------------------------------------------------------------------
# Error-bounded saliency regions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaliencyRegion:
    """The box found for one unit: (x1, y1, x2, y2) integer pixel edges of the model input."""

    box: Tuple[int, int, int, int]
    response: float  # r with only the box kept
    full_response: float  # r on the whole image
    relative_error: float  # |response - full_response| / |full_response|
    evaluations: int  # masked forwards spent on this unit

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


#: ``evaluate(indices [N], boxes [N, 4])`` -> response of unit ``indices[n]`` with only ``boxes[n]`` kept, [N].
Evaluator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _passes(value: torch.Tensor, full: torch.Tensor, error: float) -> torch.Tensor:
    return (value - full).abs() <= error * full.abs()


def saliency_regions(
    evaluate: Evaluator,
    centres: torch.Tensor,
    full: torch.Tensor,
    image_hw: Tuple[int, int],
    error: float = DEFAULT_SALIENCY_ERROR,
    step: int = 1,
) -> List[SaliencyRegion]:
    """The error-bounded saliency region of every unit, by progressive masking.

    ``centres`` [U, 2] (x, y) are the units' centres and ``full`` [U] their responses on the
    whole image; a box passes when ``|r_box - r_full| <= error * |r_full|``. Boxes move in
    multiples of ``step`` pixels (the search's resolution; the image border is always
    reachable). Schedule, every step one batched ``evaluate`` over the units still searching:

    1. grow: square windows centred on the unit (its centre clamped into the image) with
       half-sizes ``step * 2^k`` (k = 0, 1, ...), clipped to the image, up to the one covering
       the whole image (which passes by definition, without a forward): the first that passes;
    2. bisect: the smallest half-size (a multiple of ``step``) between the last failing and the
       first passing square that passes (assumes the error shrinks as the square grows between
       those two);
    3. refine: each side in turn (left, top, right, bottom) is moved inward by the largest
       multiple of ``step`` that keeps the box passing (bisection, same assumption), leaving at
       least one pixel.

    Boxes are (x1, y1, x2, y2) integer pixel edges: pixels x1..x2-1, y1..y2-1 are kept.
    """
    if not error >= 0:
        raise InputError(f"{error}: the relative error bound must be >= 0", param="saliency_error")
    if step < 1:
        raise InputError(
            f"{step}: the search resolution must be at least 1 pixel", param="saliency_step"
        )
    height, width = image_hw
    count = int(centres.shape[0])
    if count == 0:
        return []
    centres = centres.to(torch.float64)
    full = full.to(torch.float64)
    cx = centres[:, 0].clamp(0.0, width - 1e-9)
    cy = centres[:, 1].clamp(0.0, height - 1e-9)
    evaluations = torch.zeros(count, dtype=torch.long)

    def square(multiples: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Square windows of half-size ``multiples * step`` around the centres of ``indices``, clipped."""
        h = multiples.to(torch.float64) * step
        x, y = cx[indices], cy[indices]
        x1 = torch.floor(x - h).clamp(0, width)
        y1 = torch.floor(y - h).clamp(0, height)
        x2 = torch.ceil(x + h).clamp(0, width)
        y2 = torch.ceil(y + h).clamp(0, height)
        return torch.stack([x1, y1, x2, y2], dim=1).to(torch.long)

    def whole(boxes: torch.Tensor) -> torch.Tensor:
        return (
            (boxes[:, 0] == 0)
            & (boxes[:, 1] == 0)
            & (boxes[:, 2] == width)
            & (boxes[:, 3] == height)
        )

    def check(indices: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Which boxes pass; the whole image passes without a forward."""
        passed = whole(boxes)
        ask = torch.nonzero(~passed).flatten()
        if ask.numel():
            values = evaluate(indices[ask], boxes[ask]).to(torch.float64)
            evaluations[indices[ask]] += 1
            passed[ask] = _passes(values, full[indices[ask]], error)
        return passed

    everyone = torch.arange(count)
    # 1. grow
    multiples: List[int] = [1]
    while multiples[-1] * step < max(height, width):
        multiples.append(multiples[-1] * 2)
    first_pass = torch.full((count,), len(multiples) - 1, dtype=torch.long)
    searching = torch.ones(count, dtype=torch.bool)
    for k, m in enumerate(multiples):
        indices = torch.nonzero(searching).flatten()
        if indices.numel() == 0:
            break
        passed = check(indices, square(torch.full((indices.numel(),), m), indices))
        first_pass[indices[passed]] = k
        searching[indices[passed]] = False
    # 2. bisect the half-size between the last failing and the first passing square
    sizes = torch.tensor(multiples, dtype=torch.long)
    high = sizes[first_pass]
    low = torch.where(first_pass > 0, sizes[(first_pass - 1).clamp(min=0)], torch.zeros_like(high))
    while True:
        active = torch.nonzero(high - low > 1).flatten()
        if active.numel() == 0:
            break
        middle = (low[active] + high[active]) // 2
        passed = check(active, square(middle, active))
        high[active[passed]] = middle[passed]
        low[active[~passed]] = middle[~passed]
    boxes = square(high, everyone)
    # 3. refine each side: cut c steps (the last step may stop at the image border or one pixel before the opposite side)
    for side in range(4):
        inward = 1 if side < 2 else -1
        opposite = side + 2 if side < 2 else side - 2
        room = (boxes[:, opposite] - boxes[:, side]) * inward - 1  # pixels that may go
        low = torch.zeros(count, dtype=torch.long)  # cut (in steps) known to pass
        high = (room + step - 1) // step + 1  # cut known impossible

        def moved(indices: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
            trial = boxes[indices].clone()
            trial[:, side] += inward * torch.minimum(cut * step, room[indices])
            return trial

        while True:
            active = torch.nonzero(high - low > 1).flatten()
            if active.numel() == 0:
                break
            middle = (low[active] + high[active]) // 2
            passed = check(active, moved(active, middle))
            low[active[passed]] = middle[passed]
            high[active[~passed]] = middle[~passed]
        boxes = torch.where(low[:, None] > 0, moved(everyone, low), boxes)
    final = torch.zeros(count, dtype=torch.float64)
    ask = torch.nonzero(~whole(boxes)).flatten()
    final[whole(boxes)] = full[whole(boxes)]
    if ask.numel():
        final[ask] = evaluate(ask, boxes[ask]).to(torch.float64)
        evaluations[ask] += 1
    regions = []
    for u in range(count):
        value, reference = float(final[u]), float(full[u])
        relative = (
            abs(value - reference) / abs(reference)
            if reference != 0
            else (0.0 if value == reference else math.inf)
        )
        regions.append(
            SaliencyRegion(
                tuple(int(v) for v in boxes[u].tolist()),
                value,
                reference,
                relative,
                int(evaluations[u]),
            )
        )  # type: ignore[arg-type]
    return regions


# --------------------------------------------------------------------------------------------
# Everything for the units of one image
# --------------------------------------------------------------------------------------------


@dataclass
class ReceptiveFields:
    """The receptive fields of U units of one image under one model (original-image pixels
    unless said otherwise)."""

    layer: str  # the units' layer
    levels: List[str]  # the traced layers, top first (levels[0] == layer)
    channel: Optional[int]  # None: the response sums the channels
    units: torch.Tensor  # [U, 2] (row, col) in the layer's output map
    unit_xy: torch.Tensor  # [U, 2] unit centres (x, y)
    responses: torch.Tensor  # [U] float64
    erf: torch.Tensor  # [U, H, W] float32: sum_colour |dr/dI| per 8-bit level
    trees: SamplingTrees
    point_gradients: Optional[PointGradients]  # None when a layer's op could not be re-run
    theoretical: Optional[torch.Tensor]  # [U, 4] (x1, y1, x2, y2), None when a frame was lost
    saliency: List[SaliencyRegion]  # boxes in model-input pixels
    saliency_boxes: torch.Tensor  # [U, 4] float64 the same boxes in original-image pixels
    numbers: List[ErfNumbers]
    notes: List[str] = field(default_factory=list)

    @property
    def num_units(self) -> int:
        return int(self.units.shape[0])


def default_saliency_step(record: DeformConvRecord) -> int:
    """The saliency search's default resolution: the layer's output stride in model-input pixels (at least 1)."""
    frame = record.geometry.output_frame
    return max(1, int(round(min(frame.stride_x, frame.stride_y))))


def erf_memory_bytes(units: int, original_hw: Tuple[int, int]) -> int:
    """Bytes the ERF maps of ``units`` units take (float32), to check before allocating."""
    return units * original_hw[0] * original_hw[1] * 4


def receptive_fields(
    forward: GradientForward,
    records: Sequence[DeformConvRecord],
    units: torch.Tensor,
    original_hw: Tuple[int, int],
    std: Sequence[float],
    *,
    channel: Optional[int] = None,
    group: GroupChoice = 0,
    round_positions: bool = False,
    saliency_error: Optional[float] = DEFAULT_SALIENCY_ERROR,
    saliency_step: Optional[int] = None,
    boxes: Optional[np.ndarray] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Optional[Callable[[int], None]] = None,
) -> ReceptiveFields:
    """ERF, gradient-weighted sampling trees, theoretical receptive field, saliency region and
    summary numbers of ``units`` [U, 2] of ``records[0]``'s layer, traced through ``records``
    (top first), for the image of ``forward``. ``boxes`` [N, 4] (original pixels): the unit's
    box is the smallest containing its centre (for ``ErfNumbers.mass_in_box``).
    ``saliency_error=None`` skips the saliency search; ``saliency_step`` is its resolution in
    model-input pixels (default: the layer's stride, rounded, at least 1). ``on_batch(n)`` is told
    of every batch of n units done.
    """
    from dcn_inspect.analysis.sample_points import trace_sampling_trees

    layer = records[0].name
    input_hw = (int(forward.images.shape[-2]), int(forward.images.shape[-1]))
    sx, sy = original_hw[1] / input_hw[1], original_hw[0] / input_hw[0]
    units = torch.as_tensor(units, dtype=torch.long).reshape(-1, 2)
    count = int(units.shape[0])
    trees = trace_sampling_trees(
        records, units, group=group, round_positions=round_positions, scale_to_original=(sx, sy)
    )
    responses = forward.responses(layer, units, channel)
    erf = torch.zeros((count,) + tuple(original_hw), dtype=torch.float32)
    levels = [r.name for r in records]
    offset_fields: Dict[str, List[torch.Tensor]] = {name: [] for name in levels}
    for batch in forward.backward_units(layer, units, channel, levels, batch_size):
        size = batch.input_grad.shape[0]
        erf[batch.start : batch.start + size] = effective_receptive_field(
            batch.input_grad.float().cpu(), original_hw, std
        )
        for name in levels:
            if name in batch.offset_grads:
                offset_fields[name].append(batch.offset_grads[name].cpu())
        if on_batch is not None:
            on_batch(size)
    notes: List[str] = []
    point_gradients = None
    missing = [name for name in levels if sum(t.shape[0] for t in offset_fields[name]) != count]
    if missing:
        notes.append(
            f"re-running the op of {', '.join(missing)} did not reproduce its output: no gradient weights for the sampling points"
        )
    elif count:
        point_gradients = tree_gradient_weights(
            trees,
            records,
            {name: torch.cat(offset_fields[name]) for name in levels},
            group,
            (sx, sy),
        )
    unit_xy_input = torch.stack(
        records[0].geometry.output_frame.to_image(
            units[:, 1].to(torch.float64), units[:, 0].to(torch.float64)
        ),
        dim=1,
    )
    theoretical = forward.theoretical_box(layer, unit_xy_input)
    scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
    if theoretical is not None:
        theoretical = theoretical * scale
    else:
        notes.append(
            f"the frames before {layer} were not all derived through the forward: no theoretical receptive field"
        )
    regions: List[SaliencyRegion] = []
    if saliency_error is not None and count:
        masked_batch = forward.replicas(
            batch_size, BATCH_MEMORY_BYTES
        )  # what a gradient forward saves bounds a plain one's peak

        def evaluate(indices: torch.Tensor, boxes_in: torch.Tensor) -> torch.Tensor:
            return forward.evaluate_masked(layer, units[indices], boxes_in, channel, masked_batch)

        step = saliency_step if saliency_step is not None else default_saliency_step(records[0])
        regions = saliency_regions(
            evaluate, unit_xy_input, responses, input_hw, saliency_error, step
        )
    saliency_boxes = (
        torch.tensor([r.box for r in regions], dtype=torch.float64).reshape(-1, 4) * scale
    )
    unit_xy = trees.unit_xy
    numbers = []
    for u in range(count):
        box_index = (
            unit_box((float(unit_xy[u, 0]), float(unit_xy[u, 1])), boxes)
            if boxes is not None
            else None
        )
        box = None if box_index is None else boxes[box_index]  # type: ignore[index]
        numbers.append(erf_numbers(erf[u].numpy(), box))
    return ReceptiveFields(
        layer=layer,
        levels=levels,
        channel=channel,
        units=units,
        unit_xy=unit_xy,
        responses=responses,
        erf=erf,
        trees=trees,
        point_gradients=point_gradients,
        theoretical=theoretical,
        saliency=regions,
        saliency_boxes=saliency_boxes,
        numbers=numbers,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# The per-unit table
# --------------------------------------------------------------------------------------------

_PX2 = "original-image pixels²"

#: ``<stem>_receptive_field.csv``: one row per unit and model, in this column order.
RECEPTIVE_FIELD_CSV: Tuple[Column, ...] = (
    Column("model", "`model` or `compare` (summary.json names them)"),
    Column("unit", "index of the unit (summary.json lists how each was chosen)"),
    Column("layer", "the deformable layer the unit belongs to"),
    Column(
        "channel",
        "the channel whose value is the response (empty: the sum over the layer's channels)",
    ),
    Column("unit_row", "the unit's row in the layer's output map"),
    Column("unit_col", "the unit's column in the layer's output map"),
    position("unit_x", "the unit's centre, x"),
    position("unit_y", "the unit's centre, y"),
    Column("response", "the layer's output at the unit (the response r)", "layer output"),
    Column(
        "erf_mass",
        "total effective receptive field: sum over pixels and colours of |dr/dI|",
        "r per 8-bit level",
    ),
    position("erf_centroid_x", "gradient-weighted centroid of the ERF, x"),
    position("erf_centroid_y", "gradient-weighted centroid of the ERF, y"),
    position(
        "erf_radius_50", "radius of the disc around the centroid holding 50 % of the ERF mass"
    ),
    position(
        "erf_radius_90", "radius of the disc around the centroid holding 90 % of the ERF mass"
    ),
    position(
        "box_x1", "the smallest ground-truth box containing the unit centre, left (empty: none)"
    ),
    position("box_y1", "that box, top"),
    position("box_x2", "that box, right"),
    position("box_y2", "that box, bottom"),
    Column("erf_mass_in_box", "fraction of the ERF mass inside that box", "0..1"),
    position("rf_x1", "theoretical receptive field (regular grids, offsets as zero), left"),
    position("rf_y1", "theoretical receptive field, top"),
    position("rf_x2", "theoretical receptive field, right"),
    position("rf_y2", "theoretical receptive field, bottom"),
    position(
        "saliency_x1",
        "error-bounded saliency region (the smallest box found by progressive masking whose pixels alone give the response within the error bound), left",
    ),
    position("saliency_y1", "saliency region, top"),
    position("saliency_x2", "saliency region, right"),
    position("saliency_y2", "saliency region, bottom"),
    Column("saliency_area", "area of the saliency region", _PX2),
    Column(
        "saliency_error", "relative error of the response the saliency region reaches", "fraction"
    ),
)
#: Columns of ``<stem>_receptive_field.csv``, in order.
CSV_COLUMNS = names(RECEPTIVE_FIELD_CSV)

#: ``receptive_field_units.csv`` (dataset mode): one row per unit, layer and image.
STATS_UNITS_CSV: Tuple[Column, ...] = (
    Column("image", "image file name as the dataset lists it"),
    Column("layer", "the followed deformable layer"),
    position("unit_x", "the unit's centre, x"),
    position("unit_y", "the unit's centre, y"),
    Column(
        "category",
        "small / medium / large / background (as dilation-stats), or ignored / outside: counted nowhere",
    ),
    position("erf_radius_50", "radius around the ERF centroid holding 50 % of the gradient mass"),
    position("erf_radius_90", "radius around the ERF centroid holding 90 % of the gradient mass"),
    Column("saliency_area", "area of the error-bounded saliency region", _PX2),
)


def units_table(fields: Dict[str, ReceptiveFields], boxes: Optional[np.ndarray] = None) -> "Any":
    """One row per unit and model (``fields``: model role -> its receptive fields), models in the given order."""
    import pandas as pd

    rows: List[Dict[str, Any]] = []
    nan = float("nan")
    for role, item in fields.items():
        for u in range(item.num_units):
            x, y = (float(v) for v in item.unit_xy[u])
            box_index = unit_box((x, y), boxes) if boxes is not None else None
            box = [nan] * 4 if box_index is None else [float(v) for v in boxes[box_index]]  # type: ignore[index]
            numbers = item.numbers[u]
            rf = [nan] * 4 if item.theoretical is None else [float(v) for v in item.theoretical[u]]
            if item.saliency:
                region = item.saliency[u]
                saliency = [float(v) for v in item.saliency_boxes[u]]
                area = (saliency[2] - saliency[0]) * (saliency[3] - saliency[1])
                error = region.relative_error
            else:
                saliency, area, error = [nan] * 4, nan, nan
            rows.append(
                {
                    "model": role,
                    "unit": u,
                    "layer": item.layer,
                    "channel": "" if item.channel is None else str(item.channel),
                    "unit_row": int(item.units[u, 0]),
                    "unit_col": int(item.units[u, 1]),
                    "unit_x": x,
                    "unit_y": y,
                    "response": float(item.responses[u]),
                    "erf_mass": numbers.mass,
                    "erf_centroid_x": numbers.centroid_x,
                    "erf_centroid_y": numbers.centroid_y,
                    "erf_radius_50": numbers.radius_50,
                    "erf_radius_90": numbers.radius_90,
                    "box_x1": box[0],
                    "box_y1": box[1],
                    "box_x2": box[2],
                    "box_y2": box[3],
                    "erf_mass_in_box": nan if numbers.mass_in_box is None else numbers.mass_in_box,
                    "rf_x1": rf[0],
                    "rf_y1": rf[1],
                    "rf_x2": rf[2],
                    "rf_y2": rf[3],
                    "saliency_x1": saliency[0],
                    "saliency_y1": saliency[1],
                    "saliency_x2": saliency[2],
                    "saliency_y2": saliency[3],
                    "saliency_area": area,
                    "saliency_error": error,
                }  # fmt: skip
            )
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


def field_arrays(role: str, item: ReceptiveFields) -> Dict[str, np.ndarray]:
    """The arrays of ``<stem>_erf.npz`` for one model, keyed ``"<role>/..."``."""
    arrays: Dict[str, np.ndarray] = {
        f"{role}/erf": item.erf.numpy(),
        f"{role}/units": item.units.numpy(),
        f"{role}/unit_xy": item.unit_xy.numpy(),
        f"{role}/response": item.responses.numpy(),
        f"{role}/saliency_box": item.saliency_boxes.numpy(),
    }
    if item.theoretical is not None:
        arrays[f"{role}/theoretical_rf"] = item.theoretical.numpy()
    for level in range(1, item.trees.num_levels + 1):
        key = f"{role}/level{level}"
        arrays[f"{key}/x"] = item.trees.xs[level - 1].numpy()
        arrays[f"{key}/y"] = item.trees.ys[level - 1].numpy()
        arrays[f"{key}/mask_weight"] = item.trees.weights[level - 1].numpy()
        if item.point_gradients is not None:
            arrays[f"{key}/grad_x"] = item.point_gradients.grad_x[level - 1].numpy()
            arrays[f"{key}/grad_y"] = item.point_gradients.grad_y[level - 1].numpy()
            arrays[f"{key}/grad_weight"] = item.point_gradients.weights[level - 1].numpy()
    return arrays
