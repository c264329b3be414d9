"""The capture registry: every family of deformable calls dcn-inspect recognises, in ONE table.

Like fvcore's table of per-op handles, :data:`CAPTURE_REGISTRY` is the only place that says
what capture looks for and in which order: each :class:`CaptureEntry` names a family, says in
words what it recognises (the "looked for" list of the error raised when a forward ran none of
them) and holds its module-level :class:`~dcn_inspect.capture.records.LayerAdapter`, or none
for the op-level capture (:mod:`dcn_inspect.capture.op_calls`), which needs no module to match.
Adding a layer family means adding one entry here; the order is this table's, never the
order in which modules happen to be imported.

Module adapters are tried in table order for every submodule; the first that matches claims it
(dcn-inspect's own layers first, so a subclass of ours is never read as a foreign layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from torch import nn

from dcn_inspect.capture.attention_calls import (
    ATTENTION_MODULE_CLASSES,
    CORE_FUNCTION_CLASSES,
    CORE_FUNCTIONS,
    CORE_MODULE_CLASSES,
)
from dcn_inspect.capture.foreign_layers import FOREIGN_LAYERS, ForeignDeformConvAdapter
from dcn_inspect.capture.internimage_layers import FAMILIES, InternImageAdapter
from dcn_inspect.capture.op_calls import OP_KINDS, TORCHVISION_OP
from dcn_inspect.capture.our_layers import OurDeformConvAdapter, OurRoIPoolAdapter
from dcn_inspect.capture.records import LayerAdapter

__all__ = ["ADAPTERS", "CAPTURE_REGISTRY", "CaptureEntry", "adapter_for", "looked_for"]


@dataclass(frozen=True)
class CaptureEntry:
    """One family of deformable calls: what it recognises, and how (``adapter``: module level;
    ``None``: op-level calls, captured by :func:`dcn_inspect.capture.op_calls.capture_ops`)."""

    family: str
    recognises: str  # in the "looked for" message; empty: not named there
    adapter: Optional[LayerAdapter] = None


CAPTURE_REGISTRY: Tuple[CaptureEntry, ...] = (
    CaptureEntry(
        "dcn-inspect modules",
        "DeformConv2d, DeformConv2dPack, ModulatedDeformConv2dPack",
        OurDeformConvAdapter(),
    ),
    # RoI pooling is captured but not named: the message is about deformable conv layers.
    CaptureEntry("dcn-inspect RoI pools", "", OurRoIPoolAdapter()),
    CaptureEntry(
        "library modules",
        ", ".join(dict.fromkeys(f"{layer.library} {layer.class_name}" for layer in FOREIGN_LAYERS)),
        ForeignDeformConvAdapter(),
    ),
    CaptureEntry(
        "InternImage layers",
        ", ".join(name for family in FAMILIES for name in family.class_names),
        InternImageAdapter(),
    ),
    CaptureEntry("op calls", ", ".join([kind.name for kind in OP_KINDS] + [TORCHVISION_OP.name])),
    # Multi-scale deformable attention: the core calls are captured, named after the modules.
    CaptureEntry(
        "deformable attention modules",
        ", ".join(f"{owner} {name}" for name, owner in ATTENTION_MODULE_CLASSES.items()),
    ),
    CaptureEntry(
        "deformable attention cores",
        ", ".join(
            [f"{owner} {name}" for name, owner in CORE_FUNCTIONS.items()]
            + [f"{owner} {name}.apply" for name, owner in CORE_FUNCTION_CLASSES.items()]
            + [f"{owner} {name} module" for name, owner in CORE_MODULE_CLASSES.items()]
        ),
    ),
)

#: The module-level adapters, in the registry's order.
ADAPTERS: Tuple[LayerAdapter, ...] = tuple(
    entry.adapter for entry in CAPTURE_REGISTRY if entry.adapter is not None
)


def adapter_for(module: nn.Module) -> Optional[LayerAdapter]:
    """The first registered adapter that recognises ``module`` (None: no module-level capture)."""
    return next((adapter for adapter in ADAPTERS if adapter.matches(module)), None)


def looked_for() -> str:
    """What capture looks for, family by family ("family: what; ..."), for error messages."""
    return "; ".join(f"{e.family}: {e.recognises}" for e in CAPTURE_REGISTRY if e.recognises)
