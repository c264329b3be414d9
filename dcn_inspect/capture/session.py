"""Capture the offset fields (and masks) that a model's deformable layers actually use.

``with capture_offsets(model) as capture: model(x)`` records, for every deformable layer
call, the offset tensor and mask passed to the op, the layer's qualified name and its
kernel/stride/padding/dilation/groups, together with the exact frame geometry of its input
(see :mod:`dcn_inspect.core.geometry`). Model outputs are unchanged and every hook is removed on
exit. RoI-pooling layers (deformable RoI pooling, deformable PS RoI pooling) are recorded
the same way with their RoIs and normalised offsets. The record types live in
:mod:`dcn_inspect.capture.records`.

Two levels of capture, and no call counted twice:

* module level, through adapters (:class:`~dcn_inspect.capture.records.LayerAdapter`): ours report
  their offsets through the observer mechanism of :mod:`dcn_inspect.ops.modules`; foreign
  layers (torchvision / mmcv / mmdetection / detectron2,
  :mod:`dcn_inspect.capture.foreign_layers`) are matched by class name, without importing those
  libraries, and read their offsets from the call arguments or from their ``conv_offset``
  branch; DCNv3 / DCNv4 layers
  (:mod:`dcn_inspect.capture.internimage_layers`) are converted into the standard layout;
* op level (:mod:`dcn_inspect.capture.op_calls`): every other deformable-conv op call the forward
  makes (a research module calling ``torchvision.ops.deform_conv2d`` with its own offset and
  modulator convs), named after the innermost module whose forward made the call.

:func:`forward` calls a model the way every command does: an exception the model raises (the
user's code, or an input it cannot take) becomes a one-line
:class:`~dcn_inspect.core.errors.InputError` naming the model and quoting the exception, instead
of a crash.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import nn

from dcn_inspect.capture.adapters import ADAPTERS
from dcn_inspect.capture.attention_calls import TokenChoice, capture_attention
from dcn_inspect.capture.op_calls import capture_ops
from dcn_inspect.capture.records import (
    DeformConvRecord,
    OffsetCapture,
    RoIPoolRecord,
)
from dcn_inspect.core.errors import InputError
from dcn_inspect.core.geometry import FrameTracker

__all__ = [
    "ModelRaised",
    "Probe",
    "capture_offsets",
    "forward",
    "probe",
    "DeformConvRecord",
    "RoIPoolRecord",
    "OffsetCapture",
]


@contextlib.contextmanager
def capture_offsets(
    model: nn.Module,
    track_frames: bool = True,
    tracker: Optional[FrameTracker] = None,
    keep_tokens: Optional[TokenChoice] = None,
) -> Iterator[OffsetCapture]:
    """Record the offsets of every deformable layer and op call of ``model`` during the enclosed
    forward.

    Call ``capture.watch_input(images)`` before ``model(images)`` so frames can be derived.
    ``tracker`` replaces the default :class:`FrameTracker` (e.g. a subclass that follows more
    than frames); it is ignored without ``track_frames``.
    """
    capture = OffsetCapture(
        tracker=(tracker or FrameTracker()) if track_frames else None, keep_tokens=keep_tokens
    )
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
            stack.enter_context(
                capture_ops(model, capture)
            )  # inside the tracker: sees op calls first
            tracker = capture.tracker
            stack.enter_context(
                capture_attention(
                    model,
                    capture.attention,
                    tracker.frame_of_size if tracker is not None else lambda hw: None,
                    lambda: capture.input_hw,
                    capture.keep_tokens,
                )
            )
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


def forward(
    model: nn.Module, images: torch.Tensor, model_name: Optional[str] = None, **forward_kwargs: Any
) -> Any:
    """``model(images, **forward_kwargs)``; an exception from the model becomes :class:`ModelRaised`
    ("<model>: the model raised <type> in its forward: <message>"). Our own input errors pass
    through unchanged; running out of memory says so."""
    try:
        return model(images, **forward_kwargs)
    except InputError:
        raise
    except MemoryError as exc:
        shape = "x".join(str(n) for n in images.shape)
        raise ModelRaised(
            f"{model_name or type(model).__name__}: out of memory in the forward of a {shape} "
            "input (lower `max_pixels` or `resize`)",
            exc,
        ) from exc
    except Exception as exc:  # noqa: BLE001 - whatever the model's code raises is reported as the model's
        text = str(exc).strip()
        first = text.splitlines()[0][:300] if text else ""
        raise ModelRaised(
            f"{model_name or type(model).__name__}: the model raised {type(exc).__name__} "
            "in its forward" + (f": {first}" if first else ""),
            exc,
        ) from exc


def probe(
    model: nn.Module,
    images: torch.Tensor,
    *,
    model_name: Optional[str] = None,
    **forward_kwargs: Any,
) -> Probe:
    """Run ``model(images)`` in eval/no-grad mode and return its output with the captured offsets
    (see :func:`forward` for what happens when the model raises)."""
    with torch.no_grad(), capture_offsets(model) as capture:
        capture.watch_input(images)
        output = forward(model, images, model_name, **forward_kwargs)
    return Probe(output=output, capture=capture)
