"""Following the analysed calls of a forward: every deformable call the capture records, and
the regular convs a caller names, each handed over with its output and a way to run it again.

:func:`following_calls` captures offsets during the enclosed forward
(:func:`~dcn_inspect.capture.session.capture_offsets`) and tells its ``on_call`` of

- every call of a module-level deformable layer: forward hooks on each module a registered
  adapter recognises (:func:`~dcn_inspect.capture.adapters.adapter_for`), matched with the
  record the adapter made during the call; its re-run is the adapter's own
  (:meth:`~dcn_inspect.capture.records.LayerAdapter.rerun`: a DCNv3 / DCNv4 layer runs its own
  forward) or else the standard op on the module's weight (:func:`standard_rerun`);
- every op-level call of a deformable-conv op (the capture's
  :attr:`~dcn_inspect.capture.records.OffsetCapture.op_listener`), re-run through the entry
  point it called;
- every call of a regular ``nn.Conv2d`` named in ``regular``, recorded as a deformable conv
  with zero offsets (:func:`regular_record`; ``name#k`` for its k-th call).

What ``on_call`` returns is what the rest of the model receives instead of the call's output.
A :data:`~dcn_inspect.capture.records.Rerun` maps an offset ``[B, 2*G*K, Ho, Wo]`` (B copies)
to the call's output for those offsets, on detached copies of the call's captured input.

:func:`run_until` runs a forward up to one call and returns that call's output (the masked
forwards of the saliency search); :func:`unusable_layers` says which named layers a model
lacks or cannot analyse.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from dcn_inspect.capture.adapters import adapter_for
from dcn_inspect.capture.records import (
    DeformConvRecord,
    LayerAdapter,
    OffsetCapture,
    OpCallRun,
    Rerun,
)
from dcn_inspect.capture.session import capture_offsets
from dcn_inspect.core.geometry import NCHW, FrameTracker, LayerGeometry, MapLayout
from dcn_inspect.ops import deform_conv2d

__all__ = [
    "OnCall",
    "StopForward",
    "following_calls",
    "frozen_parameters",
    "regular_record",
    "run_until",
    "standard_rerun",
    "unusable_layers",
]

#: ``on_call(record, layer_input, output, layout, make_rerun)`` -> what the caller receives
#: instead of ``output`` (None: the output itself).
OnCall = Callable[
    [
        DeformConvRecord,
        torch.Tensor,
        torch.Tensor,
        Optional[MapLayout],
        Callable[[], Optional[Rerun]],
    ],
    Optional[torch.Tensor],
]


class StopForward(BaseException):
    """Ends a forward pass once the layer of interest has run (BaseException: model code's
    ``except Exception`` does not swallow it)."""


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
                    f"a {type(module).__name__}: neither a deformable conv (module or op call) "
                    "nor an nn.Conv2d"
                )
            else:
                problems[name] = "not run on this image"
    return problems


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad inside (autograd then follows only the paths from the input)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def standard_rerun(
    module: nn.Module, record: DeformConvRecord, layer_input: torch.Tensor
) -> Optional[Rerun]:
    """The standard deformable op on the module's ``weight`` and ``bias``, the captured input and
    mask (None: the module has no 4-d ``weight``)."""
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


def _regular_conv_padding(module: nn.Conv2d) -> Tuple[int, int]:
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0)
        return tuple(  # type: ignore[return-value]
            (module.dilation[i] * (module.kernel_size[i] - 1)) // 2 for i in range(2)
        )
    return (int(module.padding[0]), int(module.padding[1]))


def regular_record(
    name: str,
    module: nn.Conv2d,
    layer_input: torch.Tensor,
    out: torch.Tensor,
    capture: OffsetCapture,
) -> Optional[DeformConvRecord]:
    """A regular conv as a deformable conv with zero offsets (frames from the capture's tracker);
    None for padding other than zeros or an output that is not ``[N, C, H, W]``."""
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


def _op_listener(on_call: OnCall) -> Callable[[OpCallRun], Optional[torch.Tensor]]:
    """The capture's ``op_listener`` handing every op-level call to ``on_call`` (its output's
    layout: channels-first when it is a map of the recorded size, else none)."""

    def on_op(run: OpCallRun) -> Optional[torch.Tensor]:
        if not isinstance(run.output, torch.Tensor):
            return None
        layout = MapLayout.of(run.output, NCHW)
        if layout is not None and layout.hw != tuple(run.record.geometry.output_hw):
            layout = None
        return on_call(run.record, run.input, run.output, layout, run.rerun)

    return on_op


def _hook_calls(
    capture: OffsetCapture,
    name: str,
    module: nn.Module,
    adapter: Optional[LayerAdapter],
    on_call: OnCall,
    counts: Dict[str, int],
) -> List[Callable[[], None]]:
    """Forward hooks on ``module`` handing each of its calls to ``on_call``: with an ``adapter``,
    the last module-level record made during the call; without one (a regular conv), the call
    as a zero-offset deformable conv named ``name`` (``name#k`` for its k-th call, counted in
    ``counts``). Returns the hooks' removers."""
    before: List[int] = []

    def pre(mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        before.append(len(capture.convs))

    def post(mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], out: Any) -> Any:
        start = before.pop() if before else len(capture.convs)
        layer_input = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if not isinstance(out, torch.Tensor) or not isinstance(layer_input, torch.Tensor):
            return None
        if adapter is not None:
            made = [r for r in list(capture.convs.values())[start:] if r.op is None]
            if not made:
                return None
            record = made[-1]

            def make_rerun() -> Optional[Rerun]:
                return adapter.rerun(mod, record, args, kwargs) or standard_rerun(
                    mod, record, layer_input
                )

            return on_call(record, layer_input, out, adapter.output_layout(record, out), make_rerun)
        counts[name] = counts.get(name, 0) + 1
        call_name = name if counts[name] == 1 else f"{name}#{counts[name]}"
        zero_offsets = regular_record(call_name, mod, layer_input, out, capture)  # type: ignore[arg-type]
        if zero_offsets is None:
            return None
        return on_call(
            zero_offsets,
            layer_input,
            out,
            MapLayout.of(out, NCHW),
            lambda: standard_rerun(mod, zero_offsets, layer_input),
        )

    return [
        module.register_forward_pre_hook(pre, with_kwargs=True).remove,
        module.register_forward_hook(post, with_kwargs=True, always_call=True).remove,
    ]


@contextmanager
def following_calls(
    model: nn.Module, regular: Sequence[str], tracker: Optional[FrameTracker], on_call: OnCall
) -> Iterator[OffsetCapture]:
    """Capture offsets during the enclosed forward and tell ``on_call`` of every call of a
    deformable layer -- module level (the record its adapter made during the call) or op level
    (:data:`~dcn_inspect.capture.records.OffsetCapture.op_listener`) -- and of every call of a
    regular conv named in ``regular`` (a deformable conv with zero offsets), each once, with its
    output."""
    regular_names = {name.split("#")[0] for name in regular}
    counts: Dict[str, int] = {}
    with capture_offsets(model, track_frames=tracker is not None, tracker=tracker) as capture:
        capture.op_listener = _op_listener(on_call)
        removers: List[Callable[[], None]] = []
        try:
            for name, module in model.named_modules():
                adapter = adapter_for(module)
                if adapter is not None or (
                    name and name in regular_names and isinstance(module, nn.Conv2d)
                ):
                    label = name or type(module).__name__
                    removers.extend(_hook_calls(capture, label, module, adapter, on_call, counts))
            yield capture
        finally:
            for remove in removers:
                remove()
            capture.op_listener = None


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
            raise StopForward
        return None

    with torch.no_grad(), following_calls(model, regular, None, on_call) as capture:
        capture.watch_input(images)
        try:
            model(images)
        except StopForward:
            pass
    if "output" not in seen:
        raise RuntimeError(f"layer {layer} did not run on the masked images")
    return seen["output"]
