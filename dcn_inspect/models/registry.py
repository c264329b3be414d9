"""Registry of built-in architectures: a name -> a builder, its preprocessing and bundled weights.

The built-in architectures register themselves when :mod:`dcn_inspect.models` is imported, and
Python imports that package before any of its modules, this one included: whoever can call
:func:`get` sees them.

Configs and preprocessing often come from files (a checkpoint's ``config`` and
``meta.preprocess``, a user file's ``PREPROCESS``), so both are checked before anything is
built: :meth:`Preprocess.from_dict` checks every field's type and range,
:meth:`Architecture.check_config` checks each option against the type of its default, and
:meth:`Architecture.build_skeleton` builds the network on PyTorch's ``meta`` device (shapes,
no memory) so a checkpoint's weights can be checked against it before the real build.
Problems are ``ValueError`` naming the field; callers add the file.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from dcn_inspect.core.defaults import MAX_RESIZE_SIDE

#: The largest integer a config option may hold (a width, a class count...): 2**31 - 1. Memory
#: is bounded by building on the meta device first, not by this.
MAX_CONFIG_INT = 2**31 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


#: ``Preprocess.interpolation`` values: Pillow's bilinear resize (antialiased when shrinking:
#: torchvision-style models, detectron2's ``ResizeShortestEdge``) or cv2's ``INTER_LINEAR``
#: (no antialiasing, half-pixel centres, uint8 result: mmdetection / mmcv ``imresize``).
INTERPOLATIONS = ("pil-bilinear", "cv2-bilinear")
#: ``Preprocess.size_rule`` values: how the resized size is rounded (see
#: :func:`dcn_inspect.io.images.resized_size`).
SIZE_RULES = ("round", "mmdetection", "detectron2", "transformers")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input tensor (part of a model's metadata).

    The image (RGB, uint8) is resized so its shorter side is ``resize`` pixels (0 keeps the
    image's own size; ``max_size`` caps the longer side), with ``interpolation`` and the size
    rounding ``size_rule`` of the framework the weights come from; converted to floats in
    [0, 1], normalised with ``mean``/``std`` (RGB order), then zero-padded at the bottom and
    right to a multiple of ``size_divisor`` (0: no padding). Padding never changes the
    original <-> model-input scale (original / resized size).

    ``fixed_size`` (height, width), when not (0, 0), replaces ``resize``/``max_size``: every
    image is stretched to that size, its aspect ratio NOT kept (RT-DETR's 640x640), so the
    scale differs per axis. :meth:`as_dict` leaves it out while it is (0, 0), so the records of
    every other model read as before.
    """

    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize: int = 0
    max_size: int = 0
    interpolation: str = "pil-bilinear"
    size_rule: str = "round"
    size_divisor: int = 0
    fixed_size: Tuple[int, int] = (0, 0)

    def as_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        if not any(self.fixed_size):
            del data["fixed_size"]
        return data

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "Preprocess":
        """A :class:`Preprocess` from a dict (a checkpoint's ``meta.preprocess``, a user file's
        ``PREPROCESS``); ``ValueError`` naming the field for an unknown field, a wrong type or a
        value out of range. Missing fields take their defaults."""
        if not isinstance(data, Mapping):
            raise ValueError(
                f"expected a dict of {', '.join(f.name for f in fields(Preprocess))}, "
                f"got {type(data).__name__}"
            )
        known = {f.name: f for f in fields(Preprocess)}
        unknown = [str(key) for key in data if key not in known]
        if unknown:
            raise ValueError(f"unknown field {_short(unknown[0])} (known: {', '.join(known)})")
        values = {
            name: _check_preprocess_field(name, data[name], known[name].default)
            for name in known
            if name in data
        }
        fixed = any(values.get("fixed_size", (0, 0)))
        if fixed and (values.get("resize") or values.get("max_size")):
            raise ValueError("fixed_size replaces resize and max_size: give one or the other")
        return Preprocess(**values)


def _check_preprocess_field(name: str, value: Any, default: Any) -> Any:
    """One preprocessing field, checked against its rule (or, for fields without one, its
    default's type)."""
    if name in ("mean", "std"):
        if not (
            isinstance(value, (list, tuple))
            and len(value) == 3
            and all(_is_number(v) for v in value)
        ):
            raise ValueError(f"{name} must be 3 finite numbers (R, G, B), got {_short(value)}")
        if name == "std" and not all(v > 0 for v in value):
            raise ValueError(f"std must be positive, got {_short(value)}")
        return tuple(float(v) for v in value)
    if name in ("resize", "max_size"):
        if not _is_int(value) or not 0 <= value <= MAX_RESIZE_SIDE:
            raise ValueError(
                f"{name} must be a whole number of pixels from 0 to {MAX_RESIZE_SIDE}, "
                f"got {_short(value)}"
            )
        return int(value)
    if name == "fixed_size":
        if not (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(_is_int(v) and 0 <= v <= MAX_RESIZE_SIDE for v in value)
            and (all(value) or not any(value))
        ):
            raise ValueError(
                f"fixed_size must be (height, width) in pixels up to {MAX_RESIZE_SIDE}, or (0, 0) "
                f"for none, got {_short(value)}"
            )
        return (int(value[0]), int(value[1]))
    if name == "interpolation" and value not in INTERPOLATIONS:
        raise ValueError(f"interpolation {_short(value)}: use {' or '.join(INTERPOLATIONS)}")
    if name == "size_rule" and value not in SIZE_RULES:
        raise ValueError(f"size_rule {_short(value)}: use {', '.join(SIZE_RULES)}")
    if name == "size_divisor":
        if not _is_int(value) or not 0 <= value <= MAX_RESIZE_SIDE:
            raise ValueError(
                f"size_divisor {_short(value)}: must be 0 (no padding) or a positive number of "
                f"pixels up to {MAX_RESIZE_SIDE}"
            )
        return int(value)
    return _check_like_default(name, value, default)


def _check_plain(name: str, value: Any, depth: int = 0) -> Any:
    """A value of an option without a default: a bool, a bounded int, a finite float, a short
    string, None, or a short list of those."""
    if value is None or isinstance(value, bool) or (isinstance(value, str) and len(value) <= 1000):
        return value
    if _is_int(value):
        return _check_like_default(name, value, 0)
    if isinstance(value, float):
        return _check_like_default(name, value, 0.0)
    if isinstance(value, (list, tuple)) and len(value) <= 64 and depth == 0:
        return [_check_plain(f"{name}[{i}]", v, depth + 1) for i, v in enumerate(value)]
    raise ValueError(
        f"{name} must be a number, a string, true/false or a short list of them, "
        f"got {_short(value)}"
    )


def _check_like_default(name: str, value: Any, default: Any) -> Any:
    """``value`` if it has the type of ``default`` (ints and floats bounded and finite, sequences
    of the same length and element types); ``ValueError`` naming ``name`` otherwise."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {_short(value)}")
        return value
    if default is None or _is_int(default):
        if value is None and default is None:
            return None
        if not _is_int(value) or abs(value) > MAX_CONFIG_INT:
            raise ValueError(
                f"{name} must be a whole number (like {default!r}), got {_short(value)}"
            )
        return value
    if isinstance(default, float):
        if not _is_number(value):
            raise ValueError(
                f"{name} must be a finite number (like {default!r}), got {_short(value)}"
            )
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string (like {default!r}), got {_short(value)}")
        return value
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ValueError(
                f"{name} must be a list of {len(default)} values (like {list(default)!r}), "
                f"got {_short(value)}"
            )
        checked = [
            _check_like_default(f"{name}[{i}]", v, d)
            for i, (v, d) in enumerate(zip(value, default))
        ]
        return type(default)(checked) if isinstance(default, tuple) else checked
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a dict, got {_short(value)}")
        return value
    return value


@dataclass(frozen=True)
class Architecture:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    default_config: Dict[str, Any] = field(default_factory=dict)
    preprocess: Preprocess = Preprocess()
    bundled_weights: Optional[Path] = None  # a native checkpoint shipped with the package
    config_aliases: Dict[str, str] = field(
        default_factory=dict
    )  # older option names -> current ones

    def check_config(self, config: Mapping[str, Any]) -> Dict[str, Any]:
        """The full config (defaults + ``config``, aliases renamed) with every option checked
        against the type of its default (an option without a default: a plain JSON value; the
        builder says whether it takes it); ``ValueError`` naming the option otherwise."""
        if not isinstance(config, Mapping):
            raise ValueError(f"the config must be a dict of options, got {type(config).__name__}")
        merged = dict(self.default_config)
        for key, value in config.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(f"option names must be identifiers, got {_short(key)}")
            name = self.config_aliases.get(key, key)
            merged[name] = (
                _check_like_default(name, value, self.default_config[name])
                if name in self.default_config
                else _check_plain(name, value)
            )
        return merged

    def build(self, **config: Any) -> nn.Module:
        """The network for ``config`` (checked first, see :meth:`check_config`)."""
        return self.builder(**self.check_config(config))

    def build_skeleton(self, **config: Any) -> nn.Module:
        """The network for ``config`` on the ``meta`` device: every shape, no memory. A config
        the builder refuses (or cannot size) is a ``ValueError``."""
        merged = self.check_config(config)
        try:
            with torch.device("meta"):
                return self.builder(**merged)
        except (TypeError, ValueError, RuntimeError, OverflowError, ZeroDivisionError) as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(text[:200]) from None


ARCHITECTURES: Dict[str, Architecture] = {}


def register(
    name: str,
    description: str,
    default_config: Optional[Dict[str, Any]] = None,
    preprocess: Preprocess = Preprocess(),
    bundled_weights: Optional[Path] = None,
    config_aliases: Optional[Dict[str, str]] = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder function under ``name``."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is registered twice")
        ARCHITECTURES[name] = Architecture(
            name,
            builder,
            description,
            dict(default_config or {}),
            preprocess,
            bundled_weights,
            dict(config_aliases or {}),
        )
        return builder

    return decorate


def get(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES)) or "none"
        raise KeyError(f"unknown architecture {name!r} (known: {known})") from None


def names() -> List[str]:
    return sorted(ARCHITECTURES)
