"""Hook adapters for deformable layers of other libraries, matched without importing them.

torchvision, mmcv, mmdetection 1.x and detectron2 layers are recognised by class name and
defining module (so a model built with those libraries is inspected even where they cannot be
imported, and nothing here imports them). Two families:

* offsets passed in (torchvision ``DeformConv2d``, mmcv ``DeformConv2d`` /
  ``ModulatedDeformConv2d``, detectron2 ``DeformConv`` / ``ModulatedDeformConv``): the offset
  (and mask) are read from the call's arguments;
* offsets computed inside (mmcv ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``): the
  output of the layer's ``conv_offset`` branch is captured and split the way the layer splits it
  (v2: first 2N channels offsets, last N mask logits through a sigmoid).

Every layer records its kernel, stride, padding, dilation and groups from its attributes; the
offset layout of all of them is the standard one (PAPER.md §1). A subclass counts as its parent
only if it does not override ``forward`` (an overriding subclass may take other arguments).
Its adapter is registered in :data:`dcn_inspect.capture.adapters.CAPTURE_REGISTRY`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from dcn_inspect.capture.records import LayerAdapter, OffsetCapture, opaque_hooks
from dcn_inspect.core.geometry import FrameMap, as_pair


@dataclass(frozen=True)
class ForeignLayer:
    """One foreign deformable layer class and how it gets its offsets."""

    library: str
    module_prefixes: Tuple[str, ...]  # where the class is defined
    class_name: str
    offsets_from: (
        str  # "arguments" (forward(input, offset[, mask])) or "conv_offset" (Pack modules)
    )
    modulated: bool  # for "conv_offset": the branch also predicts mask logits

    def defines(self, cls: type) -> bool:
        module = getattr(cls, "__module__", "") or ""
        return cls.__name__ == self.class_name and any(
            module == p or module.startswith(p + ".") for p in self.module_prefixes
        )


#: The foreign layers recognised. mmcv 1.x/2.x define them in mmcv.ops.*; mmdetection 1.x in
#: mmdet.ops.dcn.
FOREIGN_LAYERS: Tuple[ForeignLayer, ...] = (
    ForeignLayer("torchvision", ("torchvision.ops",), "DeformConv2d", "arguments", False),
    ForeignLayer("mmcv", ("mmcv.ops",), "DeformConv2d", "arguments", False),
    ForeignLayer("mmcv", ("mmcv.ops",), "ModulatedDeformConv2d", "arguments", True),
    ForeignLayer("mmcv", ("mmcv.ops",), "DeformConv2dPack", "conv_offset", False),
    ForeignLayer("mmcv", ("mmcv.ops",), "ModulatedDeformConv2dPack", "conv_offset", True),
    ForeignLayer("mmdet", ("mmdet.ops",), "DeformConv", "arguments", False),
    ForeignLayer("mmdet", ("mmdet.ops",), "ModulatedDeformConv", "arguments", True),
    ForeignLayer("mmdet", ("mmdet.ops",), "DeformConvPack", "conv_offset", False),
    ForeignLayer("mmdet", ("mmdet.ops",), "ModulatedDeformConvPack", "conv_offset", True),
    ForeignLayer("detectron2", ("detectron2.layers",), "DeformConv", "arguments", False),
    ForeignLayer("detectron2", ("detectron2.layers",), "ModulatedDeformConv", "arguments", True),
)


def identify(module: nn.Module) -> Optional[ForeignLayer]:
    """The foreign layer kind of ``module`` (its class or a parent whose ``forward`` it keeps)."""
    return _identify_class(type(module))


@functools.lru_cache(maxsize=4096)
def _identify_class(module_class: type) -> Optional[ForeignLayer]:
    # Decided by the class alone, so once per class: every capture scans every submodule.
    for cls in module_class.__mro__:
        for layer in FOREIGN_LAYERS:
            if layer.defines(cls):
                return layer if module_class.forward is cls.forward else None
    return None


def _argument(
    args: Tuple[Any, ...], kwargs: Dict[str, Any], index: int, names: Tuple[str, ...]
) -> Any:
    if len(args) > index:
        return args[index]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return None


def _offset_branch(module: nn.Module) -> Optional[nn.Module]:
    for name in (
        "conv_offset",
        "conv_offset_mask",
    ):  # mmdetection 1.0 named the v2 branch conv_offset_mask
        branch = getattr(module, name, None)
        if isinstance(branch, nn.Module):
            return branch
    return None


class ForeignDeformConvAdapter(LayerAdapter):
    """Records the offsets (and masks) of torchvision / mmcv / mmdetection / detectron2 deformable
    convs."""

    def matches(self, module: nn.Module) -> bool:
        layer = identify(module)
        return layer is not None and (
            layer.offsets_from == "arguments" or _offset_branch(module) is not None
        )

    def attach(
        self, name: str, module: nn.Module, capture: OffsetCapture
    ) -> List[Callable[[], None]]:
        layer = identify(module)
        assert layer is not None
        last: Dict[str, Any] = {"frame": None, "input": None, "branch_out": None}

        def record(input: Any, offset: Any, mask: Any) -> None:
            if not isinstance(input, torch.Tensor) or not isinstance(offset, torch.Tensor):
                return  # called in a way we cannot interpret: leave it unrecorded rather than guess
            entry = capture.add_conv(
                name,
                module,
                input,
                offset,
                mask if isinstance(mask, torch.Tensor) else None,
                as_pair(module.kernel_size),
                as_pair(module.stride),
                as_pair(module.padding),
                as_pair(module.dilation),
                int(getattr(module, "groups", 1)),
                weight_shape=tuple(module.weight.shape)
                if isinstance(getattr(module, "weight", None), torch.Tensor)
                else None,
            )
            last["frame"] = (
                entry.geometry.output_frame if entry.geometry.method == "hooks" else None
            )

        removers: List[Callable[[], None]] = []
        if layer.offsets_from == "arguments":

            def pre(mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
                last["frame"] = None
                record(
                    _argument(args, kwargs, 0, ("input", "x")),
                    _argument(args, kwargs, 1, ("offset",)),
                    _argument(args, kwargs, 2, ("mask",)),
                )

            removers.append(module.register_forward_pre_hook(pre, with_kwargs=True).remove)
        else:
            branch = _offset_branch(module)
            assert branch is not None

            def pre_pack(mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
                last.update(
                    frame=None, input=_argument(args, kwargs, 0, ("input", "x")), branch_out=None
                )

            def branch_out(mod: nn.Module, args: Any, out: Any) -> None:
                last["branch_out"] = out

            def post_pack(mod: nn.Module, args: Any, out: Any) -> None:
                raw = last["branch_out"]
                if isinstance(raw, torch.Tensor):
                    if layer.modulated:
                        # mmcv: o1, o2, mask = chunk(out, 3); offset = cat(o1, o2);
                        # mask = sigmoid(mask)
                        first, second, logits = torch.chunk(raw, 3, dim=1)
                        record(
                            last["input"], torch.cat((first, second), dim=1), torch.sigmoid(logits)
                        )
                    else:
                        record(last["input"], raw, None)
                last.update(input=None, branch_out=None)

            removers.append(module.register_forward_pre_hook(pre_pack, with_kwargs=True).remove)
            removers.append(branch.register_forward_hook(branch_out).remove)
            removers.append(module.register_forward_hook(post_pack).remove)

        # Registered after ours, so the output frame is known when the tracker asks for it.
        def frame_of_output() -> Optional[FrameMap]:
            return last["frame"]

        return removers + opaque_hooks(module, capture, frame_of_output)
