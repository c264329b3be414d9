"""The gradient forward: one forward of the model input with gradients to the input, keeping
every analysed call, then per batch of units the gradients of their responses.

A *unit* is one output cell (row i, column j) of a chosen call; its *response* r is the sum
over channels of that call's output at the cell, ``r = sum_c y[c, i, j]`` (``channel=None``), or
one channel's value ``y[channel, i, j]``. ``y`` is the output as the call returns it, in its own
layout (a DCNv3 / DCNv4 layer's channels-last ``[N, H, W, C]`` or token ``[N, H*W, C]`` output:
cell (i, j) is row i, column j of its map, :meth:`~dcn_inspect.core.geometry.MapLayout.to_nchw`).

How the gradients are computed (:class:`GradientForward`, :meth:`GradientForward.backward_units`)

1. One forward pass of the model input with gradients enabled; the parameters are frozen for
   its duration, so autograd records only the paths from the input and never forms a weight
   gradient. Every analysed call -- a module-level layer, an op-level call or a regular conv
   compared with a deformable one (:func:`~dcn_inspect.capture.following.following_calls`) --
   keeps its output (the tensor in the graph, in its own layout; downstream code receives a
   clone, so in-place operations after the layer cannot rewrite it) and a way to run the call
   again with other offsets (:data:`~dcn_inspect.capture.records.Rerun`, holding detached copies
   of its input).
2. One backward per batch of units. The batch is an ordinary batched graph: a forward of B
   copies of the model input (stopped after the units' layer), and one
   ``torch.autograd.grad(y_top, [copies, outputs of the lower analysed layers], E)`` with E the
   one-hot selections (ones over unit b's channels at its cell, in copy b). It returns, per
   unit, dr/d(model input) and dr/dy_l for every lower layer l (the total derivative: through
   everything between y_l and the unit). B is capped by the memory the copies need
   (:meth:`GradientForward.replicas`, the rule below); when one copy is all that fits, each
   unit is one backward through the single-image graph. (Batching the
   one-hots with ``is_grads_batched`` instead is kept as ``strategy="vmap"``: on CPU its
   convolution-backward and custom-op fallbacks loop over the batch, which measured slower.)
3. The offsets: dr/d(offset_l) = (dy_l/d(offset_l))^T dr/dy_l. The call is run again on its
   captured input with the captured offsets as leaves, one copy per unit in the batch, and one
   vector-Jacobian product gives every unit's offset gradient field [G, K, 2, Ho, Wo] (dy then
   dx, input-cell units, the standard layout). The re-run must reproduce the captured output
   (checked, :data:`RERUN_TOLERANCE`), so the field is the gradient of the real network at the
   offsets the op really used. A regular convolution (a compared model's layers) is a
   deformable one with zero offsets.

Memory (:meth:`GradientForward.memory_budget`, :meth:`GradientForward.copy_bytes`): the batched
copies -- the gradient copies of step 2 and the masked images of the saliency search
(:meth:`GradientForward.evaluate_masked`) -- may use at most :data:`EXTRA_MEMORY_SHARE` of what
the single-image forward+backward itself needs, ``budget = share * (baseline + weights +
saved)``: ``saved`` the bytes autograd saved for the backward in the single-image forward (each
storage once, :attr:`GradientForward.saved_bytes`), ``weights`` the model's parameters and
buffers, ``baseline`` :data:`PROCESS_BASELINE_BYTES` on the CPU (the libraries; none on an
accelerator, whose memory holds tensors only) for the masked images only: a gradient copy's
forward+backward costs more arithmetic than one more backward through the single-image graph
(measured: dcn-sample on a quiet 2-core CPU, 0.02 s per unit one at a time against 0.04 s in
copies), so gradient copies get no share of the libraries. One gradient copy costs
:data:`BACKWARD_FACTOR` x what the forward had saved when the units' layer ran (its saved
maps, then their gradients in the backward); one masked image without gradients holds at
most a few maps at a time: :data:`LIVE_MAPS` x the largest map saved before the layer, plus
the masked input and its mask (and never more than the forward had saved). ``B =
min(batch_size, max(1, budget // copy))``: fixed by the input's shapes and the model, never
by the memory free at the moment, so the same inputs give the same batches (and the same
bytes).

The forward also follows the theoretical receptive field of every map
(:class:`~dcn_inspect.capture.extent.ExtentTracker`); each analysed call widens its input's
extent by its regular grid (offsets as zero).

Coordinates: continuous pixels, (0, 0) = top-left corner of the top-left pixel, pixel (r, c)
centred at (c + 0.5, r + 0.5), x right, y down; model-input pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from dcn_inspect.capture.extent import Extent, ExtentTracker
from dcn_inspect.capture.following import (
    StopForward,
    following_calls,
    frozen_parameters,
    run_until,
    unusable_layers,
)
from dcn_inspect.capture.records import DeformConvRecord, OffsetCapture, Rerun
from dcn_inspect.capture.session import forward as run_model
from dcn_inspect.core.errors import InputError
from dcn_inspect.core.geometry import MapLayout

__all__ = [
    "BACKWARD_FACTOR",
    "DEFAULT_BATCH_SIZE",
    "EXTRA_MEMORY_SHARE",
    "LIVE_MAPS",
    "PROCESS_BASELINE_BYTES",
    "RERUN_TOLERANCE",
    "GradientForward",
    "LayerCall",
    "UnitGradients",
    "check_channel",
]

#: Default number of units per backward (and masked images per forward).
DEFAULT_BATCH_SIZE = 8
#: The batched copies (gradient copies, masked images) may use at most this share of the
#: single-image forward+backward's own memory (:meth:`GradientForward.memory_budget`): the
#: command's peak stays within 1 + share of the model's own forward+backward (issue 24: 1.5x).
EXTRA_MEMORY_SHARE = 0.5
#: What a process holding the libraries (torch) needs before any model, counted into the
#: forward+backward's memory on the CPU (``import torch``: ~220 MiB resident).
PROCESS_BASELINE_BYTES = 200 * 1024**2
#: One gradient copy of the image costs this many times what its forward saves: the saved maps,
#: then their gradients during the backward (measured on dcn-sample: ~2.2x).
BACKWARD_FACTOR = 2
#: Maps a forward without gradients holds at once, at most (a block's input, its residual, its
#: output and the op's buffer): one masked image costs this many of the largest saved map.
LIVE_MAPS = 4
#: A re-run of a layer's op must match its captured output to this (relative to the output's
#: scale).
RERUN_TOLERANCE = 1e-4


@dataclass
class LayerCall:
    """One call of an analysed layer during :class:`GradientForward`'s forward: a module-level
    deformable layer, an op-level deformable-conv call, or a regular conv treated as one."""

    record: DeformConvRecord  # offsets, masks, geometry (zero offsets for a regular conv)
    output: torch.Tensor  # the call's output in the autograd graph, in its own layout
    # where the output map lies in ``output`` (None: not a map of the recorded size)
    layout: Optional[MapLayout]
    extent: Optional[Extent]  # receptive-field extent of the output cells (None: unknown)
    rerun: Optional[Rerun]  # the call as a function of its offset (None: it cannot be run again)

    @property
    def name(self) -> str:
        return self.record.name


@dataclass
class UnitGradients:
    """Gradients of one batch of units (units ``start .. start + B - 1``)."""

    start: int
    input_grad: torch.Tensor  # [B, 3, h, w]: dr/d(model input)
    # layer -> [B, G, K, 2, Ho, Wo]: dr/d(dy, dx) in input cells
    offset_grads: Dict[str, torch.Tensor]


def check_channel(channel: Optional[int], channels: int, layer: str) -> None:
    if channel is not None and not 0 <= channel < channels:
        raise InputError(
            f"{channel}: layer {layer} has {channels} channels (0..{channels - 1})", param="channel"
        )


def _one_hots(
    layout: MapLayout,
    cells: torch.Tensor,
    channels: int,
    channel: Optional[int],
    like: torch.Tensor,
) -> torch.Tensor:
    """The selections E of units ``cells`` [B, 2] (row, col), one per copy: ones over the
    unit's channels (or ``channel`` alone) at its cell, built on ``[B, C, Ho, Wo]`` and put into
    the output's own layout -> ``[B, *like.shape[1:]]``."""
    count = int(cells.shape[0])
    out_h, out_w = layout.hw
    grid = torch.zeros((count, channels, out_h, out_w), dtype=like.dtype, device=like.device)
    index = torch.arange(count, device=like.device)
    rows, cols = cells[:, 0].to(like.device), cells[:, 1].to(like.device)
    if channel is None:
        grid[index, :, rows, cols] = 1.0
    else:
        grid[index, channel, rows, cols] = 1.0
    return layout.from_nchw(grid)


def vector_jacobian(
    output: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    grad_output: torch.Tensor,
    retain_graph: bool = False,
    allow_unused: bool = False,
) -> Tuple[Optional[torch.Tensor], ...]:
    """``torch.autograd.grad(output, inputs, grad_output)``, taken as the gradient of the scalar
    ``sum(output * grad_output)``: the same numbers (its gradient with respect to ``output`` is
    ``1 * grad_output``, exactly), without torch checking a tensor ``grad_output``'s shape
    through torch.fx's symbolic shapes, whose first use imports sympy (0.45 s of a run on a
    2-core CPU, ``python -X importtime``)."""
    if output.shape != grad_output.shape:
        raise ValueError(
            f"grad_output of shape {tuple(grad_output.shape)} for an output of shape "
            f"{tuple(output.shape)}"
        )
    scalar = (output * grad_output.to(output)).sum()
    return torch.autograd.grad(
        scalar, list(inputs), retain_graph=retain_graph, allow_unused=allow_unused
    )


def _zeros(
    count: int, like: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Zeros ``[count, *like.shape[1:]]``: the gradient of what r does not depend on."""
    return torch.zeros((count,) + tuple(like.shape[1:]), dtype=dtype, device=device)


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
        # memory autograd keeps for the backward (each storage once)
        self.saved_bytes = 0
        # call name -> (bytes saved, largest storage saved) when the call had run
        self.saved_until: Dict[str, Tuple[int, int]] = {}
        # False once :meth:`release_graph` freed the graph: no more backwards
        self.has_graph = True
        problems = unusable_layers(model, regular)
        if problems:
            raise ValueError(f"layers that cannot be analysed: {problems}")
        self._run(stop_after)

    def release_graph(self) -> None:
        """Free the forward's autograd graph (the activations it saved, most of its memory) once
        no more backward is wanted: the kept outputs become detached tensors of the same values
        and the re-runs are dropped. Responses, layouts, theoretical boxes and masked forwards
        still work; :meth:`backward_units` and :meth:`offset_gradient` refuse afterwards."""
        for name, call in self.calls.items():
            self.calls[name] = replace(call, output=call.output.detach(), rerun=None)
        self.has_graph = False

    def _keep_call(
        self,
        tracker: ExtentTracker,
        record: DeformConvRecord,
        layer_input: torch.Tensor,
        out: torch.Tensor,
        layout: Optional[MapLayout],
        make_rerun: Callable[[], Optional[Rerun]],
    ) -> torch.Tensor:
        """Keep one analysed call (its output, its extent: the input's grown by the call's
        regular grid, its re-run) and return the clone the rest of the model receives."""
        in_extent = tracker.extent_of(layer_input)
        in_frame = tracker.frame_of(layer_input)
        extent = None
        if in_extent is not None and in_frame is not None and record.geometry.method == "hooks":
            extent = in_extent.grown(
                record.geometry.kernel, record.geometry.dilation, in_frame, record.grid_scale
            )
        if layer_input.requires_grad and not out.requires_grad:
            raise InputError(
                f"the model's layer {record.name}: its {record.op or record.module_type} passes "
                "no gradient back to its input (no autograd formula in this environment), so "
                "receptive fields cannot be followed through it"
            )
        self.calls[record.name] = LayerCall(record, out, layout, extent, make_rerun())
        passed_on = out.clone()  # later in-place ops rewrite the clone, never the kept output
        frame = tracker.frame_of(out)
        if frame is not None:
            tracker.set_frame(passed_on, frame, tracker.layout_of(out))
        if extent is not None:
            tracker.set_extent(passed_on, extent)
        return passed_on

    def _run(self, stop_after: Optional[str]) -> None:
        """The forward: every analysed call kept (:meth:`_keep_call`), the bytes autograd saves
        for the backward counted (each storage once) into :attr:`saved_bytes`."""
        tracker = ExtentTracker()

        def on_call(
            record: DeformConvRecord,
            layer_input: torch.Tensor,
            out: torch.Tensor,
            layout: Optional[MapLayout],
            make_rerun: Callable[[], Optional[Rerun]],
        ) -> torch.Tensor:
            passed_on = self._keep_call(tracker, record, layer_input, out, layout, make_rerun)
            sizes = storages.values()
            self.saved_until[record.name] = (sum(sizes), max(sizes, default=0))
            if stop_after is not None and record.name == stop_after:
                raise StopForward
            return passed_on

        storages: Dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            # a detached alias (same storage; autograd restores the metadata on unpacking): a
            # node saving its own output would otherwise hold that output's Python object, a
            # cycle through C++ that no garbage collection frees (the graph would never go)
            return tensor.detach()

        with (
            frozen_parameters(self.model),
            torch.enable_grad(),
            following_calls(self.model, self.regular, tracker, on_call) as capture,
        ):
            self.capture = capture
            capture.watch_input(self.images)
            tracker.set_extent(self.images, Extent.pixel())
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                try:
                    run_model(self.model, self.images)
                except StopForward:
                    pass
        self.saved_bytes = sum(storages.values())

    # ----------------------------------------------------------------------------------------

    @property
    def records(self) -> Dict[str, DeformConvRecord]:
        """Every kept layer call's record, in call order."""
        return {name: call.record for name, call in self.calls.items()}

    def deformable_records(self) -> Dict[str, DeformConvRecord]:
        """The records of the deformable layers only (what
        :func:`~dcn_inspect.capture.selection.select_layers` offers)."""
        assert self.capture is not None
        return {name: self.calls[name].record for name in self.capture.convs if name in self.calls}

    def theoretical_box(self, layer: str, unit_xy: torch.Tensor) -> Optional[torch.Tensor]:
        """Theoretical receptive field [U, 4] (x1, y1, x2, y2, model-input pixels) of units
        centred at ``unit_xy`` [U, 2]."""
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
                f": the output of layer {layer} ({shape}) is not a {h}x{w} map in a layout "
                "dcn-inspect reads (channels-first, channels-last or tokens), so its units cannot "
                "be followed; choose another layer",
                param="layers",
            )
        return call.layout

    def output_map(self, layer: str) -> torch.Tensor:
        """The output of call ``layer`` as ``[1, C, Ho, Wo]`` (a view of the kept output, in the
        graph)."""
        return self.layout(layer).to_nchw(self.calls[layer].output)

    def responses(self, layer: str, units: torch.Tensor, channel: Optional[int]) -> torch.Tensor:
        """r of every unit [U] (float64) on the unmasked image."""
        output = self.output_map(layer).detach()
        check_channel(channel, output.shape[1], layer)
        rows, cols = units[:, 0], units[:, 1]
        values = output[0, :, rows, cols]  # [C, U]
        return (values.sum(dim=0) if channel is None else values[channel]).to(torch.float64)

    def memory_budget(self, gradients: bool = False) -> int:
        """Bytes the batched copies may use: :data:`EXTRA_MEMORY_SHARE` of this forward+backward's
        own memory (``baseline + weights + saved``, see the module docstring); for ``gradients``
        copies without the libraries' ``baseline``: a copy's forward+backward costs more
        arithmetic than one more backward through this forward's graph, so gradient copies are
        taken only where the model's own tensors leave room for them."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        weights = sum(t.numel() * t.element_size() for t in tensors)
        cpu = self.images.device.type == "cpu" and not gradients
        baseline = PROCESS_BASELINE_BYTES if cpu else 0
        return int(EXTRA_MEMORY_SHARE * (baseline + weights + self.saved_bytes))

    def copy_bytes(self, layer: Optional[str] = None, gradients: bool = True) -> int:
        """What one more copy of the image costs, up to call ``layer`` (None: the whole
        forward): with ``gradients`` :data:`BACKWARD_FACTOR` x what this forward had saved when
        the call ran, else (a forward without gradients) :data:`LIVE_MAPS` x the largest map
        saved by then plus the masked input and its mask, at most what had been saved."""
        saved, largest = self.saved_until.get(layer or "", (self.saved_bytes, 0))
        if gradients:
            return BACKWARD_FACTOR * saved
        if not largest:
            return saved
        image = self.images.numel() * self.images.element_size()
        return min(saved, LIVE_MAPS * largest + 2 * image)

    def replicas(
        self,
        batch_size: int,
        memory_bytes: Optional[int] = None,
        layer: Optional[str] = None,
        gradients: bool = True,
    ) -> int:
        """How many copies of the image one batch may use: ``batch_size``, at most ``memory_bytes``
        (default :meth:`memory_budget`) at :meth:`copy_bytes` each, at least 1."""
        budget = self.memory_budget(gradients) if memory_bytes is None else memory_bytes
        each = self.copy_bytes(layer, gradients)
        if each <= 0:
            return max(1, batch_size)
        return max(1, min(batch_size, budget // each))

    # ----------------------------------------------------------------------------------------

    def _checked_units(
        self, layer: str, units: torch.Tensor, channel: Optional[int], strategy: str
    ) -> Tuple[torch.Tensor, MapLayout, int]:
        """``units`` as [U, 2] long inside ``layer``'s map, its layout and channel count (errors
        for a bad channel, a unit off the map or an unknown strategy, in that order)."""
        layout = self.layout(layer)
        channels = int(layout.to_nchw(self.calls[layer].output).shape[1])
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
        return units, layout, channels

    def _batch_gradients(
        self, layer: str, lower: Sequence[str], selection: torch.Tensor, strategy: str
    ) -> List[Optional[torch.Tensor]]:
        """``[dr/d(model input), dr/dy_l for l in lower]`` of one batch of one-hot
        ``selection`` [B, ...] (None where r does not depend on it), by ``strategy``: vmap
        through this forward's graph, one backward through it for one unit, else a forward of B
        copies and one backward."""
        output = self.calls[layer].output
        count = int(selection.shape[0])
        if strategy == "vmap":
            wanted = [self.images] + [self.calls[name].output for name in lower]
            return [
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
        if count == 1:
            wanted = [self.images] + [self.calls[name].output for name in lower]
            return list(
                vector_jacobian(output, wanted, selection, retain_graph=True, allow_unused=True)
            )
        copies = GradientForward(
            self.model,
            self.images.detach().expand(count, -1, -1, -1),
            regular=self.regular,
            stop_after=layer,
        )
        wanted = [copies.images] + [copies.calls[name].output for name in lower]
        return list(
            vector_jacobian(copies.calls[layer].output, wanted, selection, allow_unused=True)
        )

    def backward_units(
        self,
        layer: str,
        units: torch.Tensor,
        channel: Optional[int] = None,
        levels: Sequence[str] = (),
        batch_size: int = DEFAULT_BATCH_SIZE,
        strategy: str = "replicate",
        memory_bytes: Optional[int] = None,
    ) -> Iterator[UnitGradients]:
        """dr/d(model input) and dr/d(offsets of each of ``levels``) for ``units`` [U, 2]
        (row, col) of ``layer``.

        Yields one :class:`UnitGradients` per batch of units, in order. ``levels`` are layer
        names (``layer`` itself may be one of them) whose offset gradient fields are wanted.
        ``strategy``: ``"replicate"`` (default) runs one forward of B copies of the image (B =
        :meth:`replicas` within ``memory_bytes``, default :meth:`memory_budget`, at most
        ``batch_size``) and one backward whose ``grad_outputs`` select unit b in copy b; with
        room for one copy only, every unit is one backward through this forward's graph.
        ``"vmap"`` runs ``torch.autograd.grad(..., is_grads_batched=True)`` through this
        forward's graph (on CPU its convolution-backward and custom-op fallbacks loop per
        sample: slower, see ``bench/receptive_field.py``). The one-hot selections are built on
        the ``[C, Ho, Wo]`` map and put into the output's own layout (channels-last, tokens).
        """
        if not self.has_graph:
            raise RuntimeError("the gradient forward's graph was released: no more backwards")
        output = self.calls[layer].output
        units, layout, channels = self._checked_units(layer, units, channel, strategy)
        lower = [name for name in levels if name != layer]
        step = (
            max(1, batch_size)
            if strategy == "vmap"
            else self.replicas(batch_size, memory_bytes, layer)
        )
        for start in range(0, units.shape[0], step):
            chunk = units[start : start + step]
            count = int(chunk.shape[0])
            selection = _one_hots(layout, chunk, channels, channel, output)
            with torch.enable_grad():
                grads = self._batch_gradients(layer, lower, selection, strategy)
            input_grad = grads[0]
            if input_grad is None:
                input_grad = _zeros(count, self.images, self.images.dtype, self.images.device)
            output_grads = {layer: selection}
            for name, grad in zip(lower, grads[1:]):
                output_grads[name] = (
                    grad
                    if grad is not None
                    else _zeros(count, self.calls[name].output, output.dtype, output.device)
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
        if not self.has_graph:
            raise RuntimeError("the gradient forward's graph was released: no more backwards")
        call = self.calls[name]
        if call.rerun is None:
            return None
        record = call.record
        batch = output_grad.shape[0]
        captured = call.output.detach()
        with torch.enable_grad(), frozen_parameters(self.model):
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
            (grad,) = vector_jacobian(rerun, [offset], output_grad)
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
        [N, 4] (x1, y1, x2, y2 integer pixel edges) and zero (the dataset mean) elsewhere -> [N]
        float64."""
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
