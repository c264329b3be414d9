"""Capture multi-scale deformable attention: the sampling locations and attention weights each
call of the op used, with the frames of its feature levels.

Multi-scale deformable attention (Zhu et al. 2021, Deformable DETR) ends, in every
implementation, in one core that receives the value tokens of all levels, the levels' spatial
shapes, ``sampling_locations`` and ``attention_weights``. Capturing that call records exactly
what was sampled, whatever rule the calling module used to make the locations (2-d reference
points plus offsets / map size, 4-d boxes plus offsets scaled by box size / 2 / points, RT-DETRv2's
``offset_scale``, per-level point counts). The cores recognised (:data:`CORE_FUNCTIONS`,
:data:`CORE_FUNCTION_CLASSES`, :data:`CORE_MODULE_CLASSES`) are found by name in the namespaces
of the model's own classes and in its submodules, importing none of their packages:

* functions: Deformable-DETR / DINO ``ms_deform_attn_core_pytorch``, mmcv
  ``multi_scale_deformable_attn_pytorch``, transformers ``multi_scale_deformable_attention``
  (Mask2Former, OneFormer) and ``multi_scale_deformable_attention_v2`` (RT-DETRv2, D-FINE,
  DEIMv2: locations ``[N, Q, heads, sum(points), 2]`` with a per-level point count, and the
  ``"discrete"`` method that reads the nearest cell);
* autograd Functions (``.apply``): ``MSDeformAttnFunction`` (Deformable-DETR / DINO) and
  ``MultiScaleDeformableAttnFunction`` (mmcv);
* modules: transformers' ``MultiScaleDeformableAttention`` kernel module (Deformable DETR,
  Grounding DINO, RT-DETR, LW-DETR, RF-DETR, OmDet-Turbo), a parameter-free module whose
  forward takes ``sampling_locations``.

A call is named after the attention module that made it: the innermost running module
recognised by :func:`is_attention_module` (Deformable-DETR's ``MSDeformAttn``, transformers'
``*MultiscaleDeformableAttention``, mmcv's ``MultiScaleDeformableAttention``: class name plus
``sampling_offsets`` / ``attention_weights`` layers), whose ``reference_points`` argument is
recorded too; failing one, after the innermost running module (``#k`` for repeated calls).

Frames: the op samples each level's padded map with ``grid_sample(align_corners=False)``, so a
normalised location ``(x, y)`` is the continuous cell index ``(x * W_l - 0.5, y * H_l - 0.5)``
of level ``l``; the level's frame (:class:`~dcn_inspect.core.geometry.FrameMap`, model-input
pixels) is that of the latest map of its size the forward made (the flattened maps that become
the value tokens, their frames propagated through the backbone and the extra stride-2 convs by
the :class:`~dcn_inspect.core.geometry.FrameTracker`), else inferred from sizes (``"size"``).

Gradient mode (``location_leaf``, off by default): every call that is recorded receives, in
place of its ``sampling_locations``, the tensor ``location_leaf(sampling_locations)`` returns
(e.g. ``sampling_locations.detach().requires_grad_()``, kept by the caller), called once per
recorded call and in the order of the records, so that autograd gives a response's gradient
with respect to each call's locations. Unused, the capture does exactly what it did without it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from dcn_inspect.core.geometry import FrameMap, Pair

__all__ = [
    "AttentionRecord",
    "CORE_FUNCTIONS",
    "CORE_FUNCTION_CLASSES",
    "CORE_MODULE_CLASSES",
    "ATTENTION_MODULE_CLASSES",
    "capture_attention",
    "is_attention_module",
    "attention_module_shape",
]

#: Core functions, by ``__name__``: who ships each.
CORE_FUNCTIONS: Dict[str, str] = {
    "ms_deform_attn_core_pytorch": "Deformable-DETR / DINO",
    "multi_scale_deformable_attn_pytorch": "mmcv",
    "multi_scale_deformable_attention": "transformers",
    "multi_scale_deformable_attention_v2": "transformers",
}
#: Autograd Functions whose ``apply`` is the core (CUDA kernels with a Python entry).
CORE_FUNCTION_CLASSES: Dict[str, str] = {
    "MSDeformAttnFunction": "Deformable-DETR / DINO",
    "MultiScaleDeformableAttnFunction": "mmcv",
}
#: Parameter-free modules whose forward is the core (transformers' kernel module).
CORE_MODULE_CLASSES: Dict[str, str] = {"MultiScaleDeformableAttention": "transformers"}
#: Attention modules (the callers, named in the outputs): class names, or their ending.
ATTENTION_MODULE_CLASSES: Dict[str, str] = {
    "MSDeformAttn": "Deformable-DETR / DINO",
    "MultiscaleDeformableAttention": "transformers (class names ending so)",
    "MultiScaleDeformableAttention": "mmcv",
}

ENCODER, DECODER = "encoder", "decoder"
BILINEAR, NEAREST = "bilinear", "nearest"


@dataclass
class AttentionRecord:
    """One call of multi-scale deformable attention, as the op received it.

    ``locations[b, q, h, p]`` is point ``p``'s normalised (x, y) in its level's padded map
    (``point_level[p]``), ``weights[b, q, h, p]`` its attention weight (a softmax over every
    point of every level of head ``h``). ``queries`` are the query indices kept (all unless the
    capture kept only some encoder tokens). ``kind``: ``encoder`` when the queries are the
    value tokens themselves (as many queries as tokens), else ``decoder``.
    """

    name: str
    module_type: str
    captured_by: str
    kind: str
    locations: torch.Tensor  # [B, Q_kept, H, P, 2]
    weights: torch.Tensor  # [B, Q_kept, H, P]
    queries: torch.Tensor  # [Q_kept] indices into the call's query sequence
    query_count: int
    point_level: Tuple[int, ...]  # [P]
    spatial_shapes: Tuple[Pair, ...]  # (H_l, W_l) per level
    level_frames: Tuple[FrameMap, ...]  # model-input pixels, per level
    frame_methods: Tuple[str, ...]  # "hooks" (traced) or "size", per level
    reference_points: Optional[torch.Tensor] = None  # [B, Q_kept, L, 2 | 4], normalised
    sampling: str = BILINEAR

    @property
    def heads(self) -> int:
        return int(self.locations.shape[2])

    @property
    def levels(self) -> int:
        return len(self.spatial_shapes)

    @property
    def points_per_level(self) -> Tuple[int, ...]:
        return tuple(self.point_level.count(level) for level in range(self.levels))

    @property
    def level_start(self) -> Tuple[int, ...]:
        """Index of each level's first token in the flattened multi-level sequence."""
        starts, total = [], 0
        for h, w in self.spatial_shapes:
            starts.append(total)
            total += h * w
        return tuple(starts)

    def sampled_cells(self) -> torch.Tensor:
        """``[B, Q, H, P, 2]`` continuous (column, row) cell index of every point in its level:
        ``x * W - 0.5`` (grid_sample, align_corners=False), or for the nearest-cell method the
        cell the op read (RT-DETRv2's ``int(x * W + 0.5)``, clamped to the map)."""
        sizes = torch.tensor(
            [[self.spatial_shapes[lv][1], self.spatial_shapes[lv][0]] for lv in self.point_level],
            dtype=torch.float64,
        )
        scaled = self.locations.double() * sizes
        if self.sampling == NEAREST:
            cells = (scaled + 0.5).to(torch.int64).double()
            return torch.minimum(cells.clamp(min=0), sizes - 1)
        return scaled - 0.5

    def points_in_input(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of every point in model-input pixels, ``[B, Q, H, P]`` each (float64)."""
        cells = self.sampled_cells()
        stride = torch.tensor(
            [
                [self.level_frames[lv].stride_x, self.level_frames[lv].stride_y]
                for lv in self.point_level
            ],
            dtype=torch.float64,
        )
        offset = torch.tensor(
            [
                [self.level_frames[lv].offset_x, self.level_frames[lv].offset_y]
                for lv in self.point_level
            ],
            dtype=torch.float64,
        )
        xy = offset + stride * cells
        return xy[..., 0], xy[..., 1]

    def references_in_input(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) of the reference point of every point's level (a box's centre for 4-d
        references), model-input pixels, ``[B, Q, P]`` each; None without reference points."""
        ref = self.reference_points
        if ref is None or ref.dim() != 4 or ref.shape[2] not in (1, self.levels):
            return None
        per_point = ref[:, :, [lv if ref.shape[2] > 1 else 0 for lv in self.point_level], :2]
        sizes = torch.tensor(
            [[self.spatial_shapes[lv][1], self.spatial_shapes[lv][0]] for lv in self.point_level],
            dtype=torch.float64,
        )
        cells = per_point.double() * sizes - 0.5
        stride = torch.tensor(
            [
                [self.level_frames[lv].stride_x, self.level_frames[lv].stride_y]
                for lv in self.point_level
            ],
            dtype=torch.float64,
        )
        offset = torch.tensor(
            [
                [self.level_frames[lv].offset_x, self.level_frames[lv].offset_y]
                for lv in self.point_level
            ],
            dtype=torch.float64,
        )
        xy = offset + stride * cells
        return xy[..., 0], xy[..., 1]

    def token_cell(self, token: int) -> Tuple[int, int, int]:
        """(level, row, column) of token ``token`` of the flattened multi-level sequence."""
        for level, (start, (h, w)) in enumerate(zip(self.level_start, self.spatial_shapes)):
            if start <= token < start + h * w:
                return level, (token - start) // w, (token - start) % w
        raise IndexError(
            f"token {token} is beyond the {sum(h * w for h, w in self.spatial_shapes)} tokens"
        )

    def summary(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "module_type": self.module_type,
            "captured_by": self.captured_by,
            "kind": self.kind,
            "heads": self.heads,
            "levels": self.levels,
            "points_per_level": list(self.points_per_level),
            "spatial_shapes": [list(s) for s in self.spatial_shapes],
            "level_frames": [f.as_dict() for f in self.level_frames],
            "frame_methods": list(self.frame_methods),
            "queries": self.query_count,
            "reference_points": None
            if self.reference_points is None
            else f"{int(self.reference_points.shape[-1])}-d",
            "sampling": self.sampling,
        }


#: Which encoder queries a capture keeps: given the call's spatial shapes and level frames,
#: the token indices to keep (None: all).
TokenChoice = Callable[[Tuple[Pair, ...], Tuple[FrameMap, ...]], Optional[Sequence[int]]]


def _short_class_name(module: nn.Module) -> str:
    return type(module).__name__


def _has_any(module: nn.Module, names: Sequence[str]) -> bool:
    return any(hasattr(module, name) for name in names)


def is_attention_module(module: nn.Module) -> bool:
    """A multi-scale deformable attention module: a class named as one of
    :data:`ATTENTION_MODULE_CLASSES` (or ending in ``MultiscaleDeformableAttention``) with
    ``sampling_offsets`` and ``attention_weights`` layers and its head / level / point counts."""
    name = _short_class_name(module)
    if not (name in ATTENTION_MODULE_CLASSES or name.endswith("MultiscaleDeformableAttention")):
        return False
    return (
        isinstance(getattr(module, "sampling_offsets", None), nn.Module)
        and isinstance(getattr(module, "attention_weights", None), nn.Module)
        and _has_any(module, ("n_heads", "num_heads"))
        and _has_any(module, ("n_levels", "num_levels"))
        and _has_any(module, ("n_points", "num_points", "num_points_list", "n_points_list"))
    )


def attention_module_shape(module: nn.Module) -> Dict[str, Any]:
    """Heads, levels and points of an attention module, from its attributes (for ``info``)."""

    def first(*names: str) -> Any:
        for name in names:
            if hasattr(module, name):
                value = getattr(module, name)
                return list(value) if isinstance(value, (list, tuple)) else value
        return None

    return {
        "heads": first("n_heads", "num_heads"),
        "levels": first("n_levels", "num_levels"),
        "points": first("num_points_list", "n_points_list", "n_points", "num_points"),
    }


def _is_core_module(module: nn.Module) -> bool:
    if _short_class_name(module) not in CORE_MODULE_CLASSES or is_attention_module(module):
        return False
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "sampling_locations" in parameters and "attention_weights" in parameters


@dataclass
class _CoreCall:
    """What a core call received, bound to its parameter names."""

    locations: torch.Tensor
    weights: torch.Tensor
    spatial_shapes: Tuple[Pair, ...]
    point_level: Tuple[int, ...]
    sampling: str


def _shapes(value: Any) -> Optional[Tuple[Pair, ...]]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    try:
        shapes = tuple((int(h), int(w)) for h, w in value)
    except (TypeError, ValueError):
        return None
    return shapes or None


def _read_core_call(arguments: Dict[str, Any]) -> Optional[_CoreCall]:
    """Normalise a core call's arguments (bound by name) to ``[N, Q, H, P, 2]`` locations and
    ``[N, Q, H, P]`` weights with each point's level; None when they are not readable."""
    locations = arguments.get("sampling_locations")
    weights = arguments.get("attention_weights")
    shapes = None
    for name in (
        "value_spatial_shapes",
        "spatial_shapes",
        "input_spatial_shapes",
        "value_spatial_shapes_list",
    ):
        shapes = _shapes(arguments.get(name))
        if shapes is not None:
            break
    if (
        not isinstance(locations, torch.Tensor)
        or not isinstance(weights, torch.Tensor)
        or shapes is None
    ):
        return None
    levels = len(shapes)
    method = arguments.get("method", "default")
    sampling = NEAREST if method == "discrete" else BILINEAR
    if locations.dim() == 6 and locations.shape[-1] == 2 and locations.shape[3] == levels:
        n, q, h, _, points, _ = locations.shape
        if tuple(weights.shape) != (n, q, h, levels, points):
            return None
        point_level = tuple(lv for lv in range(levels) for _ in range(points))
        return _CoreCall(
            locations.detach().reshape(n, q, h, levels * points, 2),
            weights.detach().reshape(n, q, h, levels * points),
            shapes, point_level, sampling,
        )  # fmt: skip
    if locations.dim() == 5 and locations.shape[-1] == 2:
        counts = arguments.get("num_points_list")
        if counts is None or len(counts) != levels or sum(counts) != locations.shape[3]:
            return None
        if tuple(weights.shape) != tuple(locations.shape[:4]):
            return None
        point_level = tuple(lv for lv, count in enumerate(counts) for _ in range(int(count)))
        return _CoreCall(locations.detach(), weights.detach(), shapes, point_level, sampling)
    return None


def _bind(
    signature: Optional[inspect.Signature], args: Sequence[Any], kwargs: Dict[str, Any]
) -> Dict[str, Any]:
    if signature is None:
        return dict(kwargs)
    try:
        return dict(signature.bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)


def _signature(function: Any) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):
        return None


@dataclass
class _Running:
    module: nn.Module
    name: str
    attention: bool
    reference_points: Optional[torch.Tensor] = None


@dataclass
class _AttentionSession:
    """One capture: the running modules (innermost last), the records, the frames."""

    model: nn.Module
    records: Dict[str, AttentionRecord]
    frame_of_size: Callable[[Pair], Optional[FrameMap]]
    input_hw: Callable[[], Optional[Pair]]
    keep_tokens: Optional[TokenChoice] = None
    location_leaf: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # gradient mode
    names: Dict[int, str] = field(default_factory=dict)
    running: List[_Running] = field(default_factory=list)
    busy: int = 0

    def __post_init__(self) -> None:
        root = type(self.model).__name__
        for name, module in self.model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(module), name or root)

    def enter(self, module: nn.Module, args: Any, kwargs: Dict[str, Any]) -> None:
        attention = is_attention_module(module)
        reference = None
        if attention:
            bound = _bind(_signature(module.forward), args, kwargs)
            value = bound.get("reference_points")
            reference = value.detach() if isinstance(value, torch.Tensor) else None
        self.running.append(
            _Running(
                module, self.names.get(id(module), type(module).__name__), attention, reference
            )
        )

    def leave(self, module: nn.Module, args: Any, kwargs: Any, out: Any = None) -> None:
        for index in range(len(self.running) - 1, -1, -1):
            if self.running[index].module is module:
                del self.running[index:]
                break

    def caller(self, core: Optional[nn.Module]) -> Tuple[Optional[_Running], str, str]:
        """(the innermost running attention module, the name, the module type) of a call."""
        for entry in reversed(self.running):
            if entry.attention:
                return entry, entry.name, type(entry.module).__name__
        for entry in reversed(self.running):
            if entry.module is not core:
                return None, entry.name, type(entry.module).__name__
        return None, type(self.model).__name__, type(self.model).__name__

    def level_frames(
        self, shapes: Tuple[Pair, ...]
    ) -> Tuple[Tuple[FrameMap, ...], Tuple[str, ...]]:
        frames, methods = [], []
        for hw in shapes:
            frame = self.frame_of_size(hw)
            if frame is None:
                input_hw = self.input_hw()
                if input_hw is None:
                    raise RuntimeError(
                        "capture_attention: call watch_input(images) before the forward"
                    )
                frame = FrameMap.from_sizes(input_hw, hw)
                methods.append("size")
            else:
                methods.append("hooks")
            frames.append(frame)
        return tuple(frames), tuple(methods)

    def record(
        self, arguments: Dict[str, Any], captured_by: str, core: Optional[nn.Module]
    ) -> None:
        call = _read_core_call(arguments)
        if call is None:
            return
        caller, name, module_type = self.caller(core)
        frames, methods = self.level_frames(call.spatial_shapes)
        query_count = int(call.locations.shape[1])
        tokens = sum(h * w for h, w in call.spatial_shapes)
        kind = ENCODER if query_count == tokens else DECODER
        kept: Optional[Sequence[int]] = None
        if kind == ENCODER and self.keep_tokens is not None:
            kept = self.keep_tokens(call.spatial_shapes, frames)
        index = (
            torch.arange(query_count)
            if kept is None
            else torch.as_tensor(list(kept), dtype=torch.long)
        )
        reference = caller.reference_points if caller is not None else None
        if reference is not None and (
            reference.dim() != 4 or int(reference.shape[1]) != query_count
        ):
            reference = None
        unique = name
        k = 2
        while unique in self.records:
            unique = f"{name}#{k}"
            k += 1
        self.records[unique] = AttentionRecord(
            name=unique,
            module_type=module_type,
            captured_by=captured_by,
            kind=kind,
            locations=_kept(call.locations, index),
            weights=_kept(call.weights, index),
            queries=index,
            query_count=query_count,
            point_level=call.point_level,
            spatial_shapes=call.spatial_shapes,
            level_frames=frames,
            frame_methods=methods,
            reference_points=None if reference is None else _kept(reference, index),
            sampling=call.sampling,
        )

    def substituted(
        self, signature: Optional[inspect.Signature], args: Sequence[Any], kwargs: Dict[str, Any]
    ) -> Tuple[Sequence[Any], Dict[str, Any]]:
        """Gradient mode: the call's arguments with ``sampling_locations`` replaced by
        ``location_leaf``'s tensor when the call will be recorded; else unchanged."""
        if self.location_leaf is None:
            return args, kwargs
        bound = None
        if signature is not None:
            try:
                bound = signature.bind_partial(*args, **kwargs)
            except TypeError:
                bound = None
        arguments = dict(bound.arguments) if bound is not None else dict(kwargs)
        if _read_core_call(arguments) is None:
            return args, kwargs
        leaf = self.location_leaf(arguments["sampling_locations"])
        if bound is None:
            return args, {**kwargs, "sampling_locations": leaf}
        bound.arguments["sampling_locations"] = leaf
        return bound.args, bound.kwargs

    def call(self, original: Callable, signature: Optional[inspect.Signature], captured_by: str,
             args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:  # fmt: skip
        """Run a core function; record what it received unless inside another core call."""
        if self.busy:
            return original(*args, **kwargs)
        args, kwargs = self.substituted(signature, args, kwargs)
        self.busy += 1
        try:
            out = original(*args, **kwargs)
        finally:
            self.busy -= 1
        self.record(_bind(signature, args, kwargs), captured_by, None)
        return out


def _kept(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The kept queries' rows, copied to the CPU: records outlive the forward, and every
    analysis of them mixes them with CPU tensors (frames, image sizes)."""
    return values[:, index.to(values.device)].detach().to("cpu", copy=True)


def _class_namespaces(model: nn.Module) -> List[Dict[str, Any]]:
    """The namespaces of the modules that define the model's classes (where a forward finds
    the core it calls by a global name), and the instance dicts of the model's modules (where
    a forward finds a core it stored as an attribute, e.g. D-FINE's
    ``self.ms_deformable_attn_core = multi_scale_deformable_attention_v2``)."""
    spaces: Dict[int, Dict[str, Any]] = {}
    for module in model.modules():
        spaces[id(module.__dict__)] = module.__dict__
        for cls in type(module).__mro__:
            if cls is nn.Module or cls is object:
                break
            owner = sys.modules.get(cls.__module__)
            if owner is not None:
                spaces[id(owner.__dict__)] = owner.__dict__
    return list(spaces.values())


def _function_wrapper(session: _AttentionSession, original: Callable, captured_by: str) -> Callable:
    signature = _signature(original)

    @functools.wraps(original)
    def captured(*args: Any, **kwargs: Any) -> Any:
        return session.call(original, signature, captured_by, args, kwargs)

    return captured


def _apply_wrapper(session: _AttentionSession, cls: type, captured_by: str) -> Callable:
    original = cls.apply
    forward = _signature(cls.forward)
    # ``forward(ctx, value, ...)``: the parameters after ``ctx`` are ``apply``'s.
    signature = (
        forward.replace(parameters=list(forward.parameters.values())[1:]) if forward else None
    )

    def captured(*args: Any, **kwargs: Any) -> Any:
        return session.call(original, signature, captured_by, args, kwargs)

    return captured


@contextlib.contextmanager
def capture_attention(
    model: nn.Module,
    records: Dict[str, AttentionRecord],
    frame_of_size: Callable[[Pair], Optional[FrameMap]],
    input_hw: Callable[[], Optional[Pair]],
    keep_tokens: Optional[TokenChoice] = None,
    location_leaf: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Iterator[None]:
    """Record into ``records`` every multi-scale deformable attention core call of the enclosed
    forward (see the module docstring); ``keep_tokens`` chooses the encoder queries kept;
    ``location_leaf`` turns on gradient mode (the module docstring)."""
    session = _AttentionSession(model, records, frame_of_size, input_hw, keep_tokens, location_leaf)
    patched: List[Tuple[Any, str, Any, bool]] = []  # (owner, name, original, was a dict entry)
    handles: List[Any] = []
    try:
        for namespace in _class_namespaces(model):
            for name, value in list(namespace.items()):
                label = CORE_FUNCTIONS.get(getattr(value, "__name__", ""))
                if label is not None and inspect.isfunction(value):
                    namespace[name] = _function_wrapper(session, value, f"{label} {value.__name__}")
                    patched.append((namespace, name, value, True))
                label = CORE_FUNCTION_CLASSES.get(getattr(value, "__name__", ""))
                if (
                    label is not None
                    and isinstance(value, type)
                    and issubclass(value, torch.autograd.Function)
                    and not any(p[0] is value for p in patched)
                ):
                    had = "apply" in value.__dict__
                    original = value.__dict__.get("apply")
                    value.apply = staticmethod(
                        _apply_wrapper(session, value, f"{label} {value.__name__}.apply")
                    )  # type: ignore[method-assign]
                    patched.append((value, "apply", original, had))
        cores = [m for m in model.modules() if _is_core_module(m)]
        for core in cores:
            signature = _signature(core.forward)
            label = f"{CORE_MODULE_CLASSES[type(core).__name__]} {type(core).__name__} module"

            def pre(
                module: nn.Module, args: Any, kwargs: Dict[str, Any], _s=signature, _l=label
            ) -> Any:
                if not session.busy:
                    session.record(_bind(_s, args, kwargs), _l, module)
                    if session.location_leaf is not None:
                        return tuple(session.substituted(_s, args, kwargs))
                return None

            handles.append(core.register_forward_pre_hook(pre, with_kwargs=True))
        if patched or cores:
            for module in model.modules():
                handles.append(module.register_forward_pre_hook(session.enter, with_kwargs=True))
                handles.append(
                    module.register_forward_hook(session.leave, with_kwargs=True, always_call=True)
                )
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, name, original, was_entry in reversed(patched):
            if isinstance(owner, dict):
                owner[name] = original
            elif was_entry:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
