"""Capture at the op: every deformable-conv op call a forward makes, whoever makes it.

Research code rarely wraps the op in a library module: a module computes its offsets with its
own ``offset_conv`` / ``modulator_conv`` and calls the functional op. :func:`capture_ops`
records those calls, for the entry points of :data:`OP_KINDS` that are already imported in
this process (nothing here imports torchvision, mmcv or detectron2):

* Python entry points (``dcn_inspect.ops.deform_conv2d``, ``torchvision.ops.deform_conv2d``,
  mmcv's ``deform_conv2d`` / ``modulated_deform_conv2d``, mmdetection 1.x's and detectron2's
  ``deform_conv`` / ``modulated_deform_conv``) are replaced, for the duration of the capture,
  wherever a module-level name, a class attribute or an instance attribute of the model holds
  them (so ``from torchvision.ops import deform_conv2d`` in the user's file is covered), and
  restored afterwards;
* torchvision's C++ op ``torch.ops.torchvision.deform_conv2d`` (what its Python entry point
  calls) is seen by a ``TorchFunctionMode`` whatever name the caller holds it by.

A record holds what the op received (offset, mask, weight shape, stride, padding, dilation,
groups, offset groups; all of these ops take the standard layout of PAPER.md §1) and is named
after the innermost module whose forward made the call (the model's qualified name, ``#k``
for repeated calls). Calls made inside a module that a module-level adapter captures
(:func:`dcn_inspect.capture.records.opaque_hooks` claims it) are left to that adapter, and a call
made inside another captured call (a Python entry point calling the C++ op) is its own:
no call is counted twice. The frame tracker treats the op call as a conv of the op's own
kernel arithmetic (:meth:`~dcn_inspect.core.geometry.FrameMap.conv_output`). An
``op_listener`` on the capture (receptive fields) is told of each recorded call with its output
and :func:`rerun_of`, the call as a function of its offset.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from dcn_inspect.capture.records import OffsetCapture, OpCallRun
from dcn_inspect.core.geometry import Pair, as_pair


@dataclass(frozen=True)
class OpCall:
    """What one deformable-conv op call received."""

    input: torch.Tensor
    offset: torch.Tensor
    mask: Optional[torch.Tensor]
    weight: torch.Tensor
    stride: Pair
    padding: Pair
    dilation: Pair

    @property
    def kernel(self) -> Pair:
        return (int(self.weight.shape[2]), int(self.weight.shape[3]))

    @property
    def groups(self) -> int:
        return max(1, int(self.input.shape[1]) // max(1, int(self.weight.shape[1])))

    def fits_standard_layout(self) -> bool:
        """The offset is ``[B, 2*G*kh*kw, Ho, Wo]`` (and the mask ``[B, G*kh*kw, Ho, Wo]``)."""
        points = self.kernel[0] * self.kernel[1]
        if self.input.dim() != 4 or self.offset.dim() != 4 or self.weight.dim() != 4 or points < 1:
            return False
        if self.offset.shape[1] == 0 or self.offset.shape[1] % (2 * points):
            return False
        if self.mask is not None and (
            self.mask.dim() != 4 or self.mask.shape[1] * 2 != self.offset.shape[1]
        ):
            return False
        return True


def _get(
    args: Sequence[Any],
    kwargs: Dict[str, Any],
    index: int,
    names: Tuple[str, ...],
    default: Any = None,
) -> Any:
    if len(args) > index:
        return args[index]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return default


def _tensor(value: Any) -> Optional[torch.Tensor]:
    return value if isinstance(value, torch.Tensor) else None


def _parse_torchvision_style(args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[OpCall]:
    """``(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None)``:
    torchvision's ``deform_conv2d`` and dcn-inspect's."""
    input_, offset, weight = (
        _tensor(_get(args, kwargs, i, (n,))) for i, n in enumerate(("input", "offset", "weight"))
    )
    if input_ is None or offset is None or weight is None:
        return None
    return OpCall(
        input_, offset, _tensor(_get(args, kwargs, 7, ("mask",))), weight,
        as_pair(_get(args, kwargs, 4, ("stride",), 1)),
        as_pair(_get(args, kwargs, 5, ("padding",), 0)),
        as_pair(_get(args, kwargs, 6, ("dilation",), 1)),
    )  # fmt: skip


def _parse_v1_style(args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[OpCall]:
    """``(input, offset, weight, stride=1, padding=0, dilation=1, groups=1, deform_groups=1, ...)``:
    mmcv's ``deform_conv2d``, mmdetection 1.x's and detectron2's ``deform_conv``."""
    input_, offset, weight = (
        _tensor(_get(args, kwargs, i, (n,))) for i, n in enumerate(("input", "offset", "weight"))
    )
    if input_ is None or offset is None or weight is None:
        return None
    return OpCall(
        input_, offset, None, weight,
        as_pair(_get(args, kwargs, 3, ("stride",), 1)),
        as_pair(_get(args, kwargs, 4, ("padding",), 0)),
        as_pair(_get(args, kwargs, 5, ("dilation",), 1)),
    )  # fmt: skip


def _parse_v2_style(args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[OpCall]:
    """``(input, offset, mask, weight, bias, stride=1, padding=0, dilation=1, groups=1,
    deform_groups=1)``: mmcv's ``modulated_deform_conv2d``, mmdetection 1.x's and detectron2's
    ``modulated_deform_conv``."""
    names = ("input", "offset", "mask", "weight")
    input_, offset, mask, weight = (
        _tensor(_get(args, kwargs, i, (n,))) for i, n in enumerate(names)
    )
    if input_ is None or offset is None or weight is None:
        return None
    return OpCall(
        input_, offset, mask, weight,
        as_pair(_get(args, kwargs, 5, ("stride",), 1)),
        as_pair(_get(args, kwargs, 6, ("padding",), 0)),
        as_pair(_get(args, kwargs, 7, ("dilation",), 1)),
    )  # fmt: skip


def _parse_torchvision_op(args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[OpCall]:
    """``torch.ops.torchvision.deform_conv2d(input, weight, offset, mask, bias, stride_h, stride_w,
    pad_h, pad_w, dilation_h, dilation_w, groups, offset_groups, use_mask)``."""
    if len(args) < 14:
        return None
    input_, weight, offset, mask = (_tensor(args[i]) for i in range(4))
    if input_ is None or offset is None or weight is None:
        return None
    return OpCall(
        input_, offset, mask if bool(args[13]) else None, weight,
        (int(args[5]), int(args[6])), (int(args[7]), int(args[8])), (int(args[9]), int(args[10])),
    )  # fmt: skip


Slot = Tuple[int, Optional[str]]  # (position, keyword) of an argument

_TORCHVISION_SLOTS: Tuple[Slot, ...] = ((0, "input"), (1, "offset"), (7, "mask"))
_V1_SLOTS: Tuple[Slot, ...] = ((0, "input"), (1, "offset"))
_V2_SLOTS: Tuple[Slot, ...] = ((0, "input"), (1, "offset"), (2, "mask"))


@dataclass(frozen=True)
class OpKind:
    """One deformable-conv op entry point: where it lives and how its arguments read."""

    name: str  # how records and messages name it
    homes: Tuple[Tuple[str, str], ...]  # (module, attribute) pairs holding the entry point
    parse: Callable[[Sequence[Any], Dict[str, Any]], Optional[OpCall]]
    # where input, offset (and mask) are: the arguments with a batch dimension
    slots: Tuple[Slot, ...] = _TORCHVISION_SLOTS


def _read_slot(args: Sequence[Any], kwargs: Dict[str, Any], slot: Slot) -> Any:
    index, name = slot
    if len(args) > index:
        return args[index]
    return kwargs.get(name) if name is not None else None


def _write_slot(args: List[Any], kwargs: Dict[str, Any], slot: Slot, value: Any) -> None:
    index, name = slot
    if len(args) > index:
        args[index] = value
    elif name is not None and name in kwargs:
        kwargs[name] = value


def rerun_of(
    kind: OpKind, original: Callable, args: Sequence[Any], kwargs: Dict[str, Any]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The call ``original(*args, **kwargs)`` as a function of its offset (see
    :data:`dcn_inspect.capture.records.Rerun`): the same entry point, the same arguments
    (detached; input and mask copied now, so later in-place changes do not reach them), the input
    and mask expanded to the offset's batch size. The offset is the op's own, the standard
    layout."""

    def frozen(value: Any, copy: bool) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        return value.detach().clone() if copy else value.detach()

    batched = {slot[0] for slot in kind.slots}
    kept_args = [frozen(a, i in batched) for i, a in enumerate(args)]
    batched_names = {slot[1] for slot in kind.slots}
    kept_kwargs = {k: frozen(v, k in batched_names) for k, v in kwargs.items()}
    input_, offset_slot = _read_slot(kept_args, kept_kwargs, kind.slots[0]), kind.slots[1]
    captured_batch = (
        int(input_.shape[0]) if isinstance(input_, torch.Tensor) and input_.dim() else 1
    )

    def rerun(offset: torch.Tensor) -> torch.Tensor:
        batch = int(offset.shape[0])
        new_args, new_kwargs = list(kept_args), dict(kept_kwargs)
        for slot in kind.slots:
            if slot == offset_slot:
                _write_slot(new_args, new_kwargs, slot, offset)
                continue
            value = _read_slot(new_args, new_kwargs, slot)
            if (
                isinstance(value, torch.Tensor)
                and value.dim()
                and int(value.shape[0]) == captured_batch
            ):
                _write_slot(
                    new_args, new_kwargs, slot, value.expand(batch, *value.shape[1:]).contiguous()
                )
        return original(*new_args, **new_kwargs)

    return rerun


#: The Python entry points captured when their module is imported.
OP_KINDS: Tuple[OpKind, ...] = (
    OpKind(
        "dcn_inspect.ops.deform_conv2d",
        (("dcn_inspect.ops.functional", "deform_conv2d"), ("dcn_inspect.ops", "deform_conv2d")),
        _parse_torchvision_style,
    ),
    OpKind(
        "torchvision.ops.deform_conv2d",
        (("torchvision.ops.deform_conv", "deform_conv2d"), ("torchvision.ops", "deform_conv2d")),
        _parse_torchvision_style,
    ),
    OpKind(
        "mmcv.ops.deform_conv2d",
        (("mmcv.ops.deform_conv", "deform_conv2d"), ("mmcv.ops", "deform_conv2d")),
        _parse_v1_style,
        _V1_SLOTS,
    ),
    OpKind(
        "mmcv.ops.modulated_deform_conv2d",
        (
            ("mmcv.ops.modulated_deform_conv", "modulated_deform_conv2d"),
            ("mmcv.ops", "modulated_deform_conv2d"),
        ),
        _parse_v2_style,
        _V2_SLOTS,
    ),
    OpKind(
        "mmdet.ops.dcn.deform_conv",
        (
            ("mmdet.ops.dcn.deform_conv", "deform_conv"),
            ("mmdet.ops.dcn", "deform_conv"),
            ("mmdet.ops", "deform_conv"),
        ),
        _parse_v1_style,
        _V1_SLOTS,
    ),
    OpKind(
        "mmdet.ops.dcn.modulated_deform_conv",
        (
            ("mmdet.ops.dcn.deform_conv", "modulated_deform_conv"),
            ("mmdet.ops.dcn", "modulated_deform_conv"),
            ("mmdet.ops", "modulated_deform_conv"),
        ),
        _parse_v2_style,
        _V2_SLOTS,
    ),
    OpKind(
        "detectron2.layers.deform_conv",
        (("detectron2.layers.deform_conv", "deform_conv"),),
        _parse_v1_style,
        _V1_SLOTS,
    ),
    OpKind(
        "detectron2.layers.modulated_deform_conv",
        (("detectron2.layers.deform_conv", "modulated_deform_conv"),),
        _parse_v2_style,
        _V2_SLOTS,
    ),
)

#: torchvision's C++ op, seen through a ``TorchFunctionMode`` when it is registered
#: (positional: input 0, weight 1, offset 2, mask 3).
TORCHVISION_OP = OpKind(
    "torch.ops.torchvision.deform_conv2d",
    (),
    _parse_torchvision_op,
    ((0, None), (2, None), (3, None)),
)
TORCHVISION_OP_NAME = "torchvision::deform_conv2d"


#: Module-name prefixes never searched for references to an entry point (they hold none that
#: a model's forward calls through, and there are many of them).
_SKIPPED_MODULES = (
    "torch",
    "numpy",
    "pandas",
    "matplotlib",
    "PIL",
    "rich",
    "typer",
    "click",
    "pygments",
    "_pytest",
    "pytest",
    "hypothesis",
)


def _entry_points() -> Dict[int, Tuple[OpKind, Callable]]:
    """id(original callable) -> (kind, callable) for the entry points importable right now."""
    found: Dict[int, Tuple[OpKind, Callable]] = {}
    for kind in OP_KINDS:
        for module_name, attribute in kind.homes:
            module = sys.modules.get(module_name)
            function = getattr(module, attribute, None) if module is not None else None
            if callable(function) and id(function) not in found:
                found[id(function)] = (kind, function)
    return found


def _namespaces(model: nn.Module) -> List[Dict[str, Any]]:
    """Every namespace a model's forward may call an op through: imported modules (the user's
    files, the libraries), the model's classes and its modules' instance attributes."""
    spaces: Dict[int, Dict[str, Any]] = {
        id(namespace): namespace for namespace in _module_namespaces()
    }
    for module in model.modules():
        spaces[id(module.__dict__)] = module.__dict__
        for cls in type(module).__mro__:
            if cls is nn.Module or cls is object:
                break
            owner = sys.modules.get(cls.__module__)
            if owner is not None:
                spaces[id(owner.__dict__)] = owner.__dict__
    return list(spaces.values())


#: The imported modules' namespaces, for one set of imported modules (their ids, in order).
_MODULE_SPACES: Tuple[Tuple[int, ...], List[Dict[str, Any]]] = ((), [])


def _module_namespaces() -> List[Dict[str, Any]]:
    global _MODULE_SPACES
    modules = tuple(map(id, list(sys.modules.values())))
    if _MODULE_SPACES[0] != modules:
        spaces = []
        for name, module in list(sys.modules.items()):
            top = name.split(".")[0]
            if (
                module is None or top in _SKIPPED_MODULES or top in sys.stdlib_module_names
            ):  # submodules too (asyncio.events, ...)
                continue
            namespace = getattr(module, "__dict__", None)
            if isinstance(namespace, dict):
                spaces.append(namespace)
        _MODULE_SPACES = (modules, spaces)
    return _MODULE_SPACES[1]


class _Holders:
    """Which names of a module namespace hold an entry point, remembered between captures.

    Every capture searches every namespace; a module's is searched again only when its number
    of names changed (an import, a ``from x import deform_conv2d``) or the entry points did.
    Rebinding an existing name to an entry point between two captures is the one change this
    does not see. Instances' attribute dicts are small and always searched.
    """

    def __init__(self) -> None:
        self.targets: frozenset = frozenset()
        self.known: Dict[
            int, Tuple[Dict[str, Any], int, List[str]]
        ] = {}  # id -> (namespace, size, names)

    def names(
        self, namespace: Dict[str, Any], targets: Dict[int, Any], remember: bool
    ) -> List[str]:
        if not remember:
            return [name for name, value in namespace.items() if id(value) in targets]
        if self.targets != frozenset(targets):
            self.known.clear()
            self.targets = frozenset(targets)
        known = self.known.get(id(namespace))
        if known is not None and known[0] is namespace and known[1] == len(namespace):
            return known[2]
        names = [
            name for name, value in namespace.items() if id(value) in targets
        ]  # C-speed filter first
        self.known[id(namespace)] = (namespace, len(namespace), names)
        return names


_HOLDERS = _Holders()


class _TorchOpsMode(TorchFunctionMode):
    """Sees calls of torchvision's C++ op whatever name the caller holds it by."""

    def __init__(self, session: "_OpSession") -> None:
        super().__init__()
        self.session = session

    def __torch_function__(
        self,
        func: Callable,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "_qualified_op_name", None) or getattr(
            getattr(func, "_schema", None), "name", None
        )
        if name == TORCHVISION_OP_NAME:
            return self.session.call(TORCHVISION_OP, func, args, kwargs)
        return func(*args, **kwargs)


class _OpSession:
    """The state of one capture: the running modules (innermost last) and the capture."""

    def __init__(self, model: nn.Module, capture: OffsetCapture) -> None:
        self.capture = capture
        self.root = model
        self.root_name = type(model).__name__
        self.names: Dict[int, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(module), name or self.root_name)
        self.running: List[nn.Module] = []
        self.busy = 0  # inside a captured op call: nested op calls are part of it

    def enter(self, module: nn.Module, args: Any) -> None:
        self.running.append(module)

    def leave(self, module: nn.Module, args: Any, out: Any) -> None:
        # Pop up to and including this module (a forward that raised may have left others).
        for index in range(len(self.running) - 1, -1, -1):
            if self.running[index] is module:
                del self.running[index:]
                break

    def innermost(self) -> Tuple[str, nn.Module]:
        """The innermost running module and its qualified name (the model when none runs)."""
        module = self.running[-1] if self.running else self.root
        return self.names.get(id(module), type(module).__name__), module

    def call(
        self, kind: OpKind, original: Callable, args: Sequence[Any], kwargs: Dict[str, Any]
    ) -> Any:
        """Run ``original`` as the op; record the call unless it belongs to another capture."""
        if self.busy or self.capture.claimed:
            return original(*args, **kwargs)
        call = kind.parse(args, kwargs)
        if call is None or not call.fits_standard_layout():
            return original(
                *args, **kwargs
            )  # called in a way we cannot read: run it, record nothing
        tracker = self.capture.tracker
        self.busy += 1
        if tracker is not None:
            tracker.enter_opaque()
        try:
            out = original(*args, **kwargs)
        finally:
            self.busy -= 1
            if tracker is not None:
                tracker.exit_opaque()
        name, module = self.innermost()
        record = self.capture.add_conv(
            name,
            module,
            call.input,
            call.offset,
            call.mask,
            call.kernel,
            call.stride,
            call.padding,
            call.dilation,
            call.groups,
            op=kind.name,
            weight_shape=tuple(call.weight.shape),
        )
        listener = self.capture.op_listener
        if listener is not None:
            replaced = listener(
                OpCallRun(record, call.input, out, lambda: rerun_of(kind, original, args, kwargs))
            )
            if replaced is not None:
                out = replaced
        if (
            tracker is not None
            and record.geometry.method == "hooks"
            and isinstance(out, torch.Tensor)
        ):
            tracker.set_frame(out, record.geometry.output_frame)
        return out


def _wrapper(session: _OpSession, kind: OpKind, original: Callable) -> Callable:
    @functools.wraps(original)
    def captured(*args: Any, **kwargs: Any) -> Any:
        return session.call(kind, original, args, kwargs)

    captured.__dcn_inspect_original__ = original  # type: ignore[attr-defined]
    return captured


def torchvision_op_registered() -> bool:
    """Whether ``torch.ops.torchvision.deform_conv2d`` exists in this process (never imports
    torchvision)."""
    try:
        return bool(torch._C._jit_get_schemas_for_operator(TORCHVISION_OP_NAME))
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def capture_ops(model: nn.Module, capture: OffsetCapture) -> Iterator[None]:
    """Record into ``capture`` every deformable-conv op call made during the enclosed forward."""
    session = _OpSession(model, capture)
    patched: List[
        Tuple[Dict[str, Any], str, Callable, Callable]
    ] = []  # (namespace, name, original, wrapper)
    handles: List[Any] = []
    try:
        entry_points = _entry_points()
        if entry_points:
            wrappers = {
                key: _wrapper(session, kind, original)
                for key, (kind, original) in entry_points.items()
            }
            instance_spaces = {id(module.__dict__) for module in model.modules()}
            for namespace in _namespaces(model):
                for name in _HOLDERS.names(
                    namespace, wrappers, remember=id(namespace) not in instance_spaces
                ):
                    value = namespace.get(name)
                    if id(value) in entry_points and entry_points[id(value)][1] is value:
                        namespace[name] = wrappers[id(value)]
                        patched.append((namespace, name, value, wrappers[id(value)]))
        watch_torchvision = torchvision_op_registered()
        if (
            patched or watch_torchvision
        ):  # otherwise no op call can reach the session: no module hooks needed
            for module in model.modules():
                handles.append(module.register_forward_pre_hook(session.enter))
                handles.append(module.register_forward_hook(session.leave, always_call=True))
        with _TorchOpsMode(session) if watch_torchvision else contextlib.nullcontext():
            yield
    finally:
        for handle in handles:
            handle.remove()
        for namespace, name, original, wrapper in reversed(patched):
            if namespace.get(name) is wrapper:
                namespace[name] = original
