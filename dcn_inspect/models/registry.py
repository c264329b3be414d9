"""Registry of built-in architectures: a name -> a builder, its preprocessing and bundled weights.

The built-in architectures register themselves when :mod:`dcn_inspect.models` is imported, and
Python imports that package before any of its modules, this one included: whoever can call
:func:`get` sees them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn


#: ``Preprocess.interpolation`` values: Pillow's bilinear resize (antialiased when shrinking:
#: torchvision-style models, detectron2's ``ResizeShortestEdge``) or cv2's ``INTER_LINEAR``
#: (no antialiasing, half-pixel centres, uint8 result: mmdetection / mmcv ``imresize``).
INTERPOLATIONS = ("pil-bilinear", "cv2-bilinear")
#: ``Preprocess.size_rule`` values: how the resized size is rounded (see :func:`dcn_inspect.images.resized_size`).
SIZE_RULES = ("round", "mmdetection", "detectron2")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input tensor (part of a model's metadata).

    The image (RGB, uint8) is resized so its shorter side is ``resize`` pixels (0 keeps the
    image's own size; ``max_size`` caps the longer side), with ``interpolation`` and the size
    rounding ``size_rule`` of the framework the weights come from; converted to floats in
    [0, 1], normalised with ``mean``/``std`` (RGB order), then zero-padded at the bottom and
    right to a multiple of ``size_divisor`` (0: no padding). Padding never changes the
    original <-> model-input scale (original / resized size).
    """

    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize: int = 0
    max_size: int = 0
    interpolation: str = "pil-bilinear"
    size_rule: str = "round"
    size_divisor: int = 0

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: Dict[str, Any]) -> "Preprocess":
        """From a JSON-like dict (a user file's ``PREPROCESS``, a checkpoint's metadata); a
        ``ValueError`` names an unknown ``interpolation`` / ``size_rule`` or a negative ``size_divisor``."""
        interpolation = str(data.get("interpolation", Preprocess.interpolation))
        size_rule = str(data.get("size_rule", Preprocess.size_rule))
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {interpolation!r}: use {' or '.join(INTERPOLATIONS)}")
        if size_rule not in SIZE_RULES:
            raise ValueError(f"size_rule {size_rule!r}: use {', '.join(SIZE_RULES)}")
        if int(data.get("size_divisor", 0)) < 0:
            raise ValueError(f"size_divisor {data.get('size_divisor')}: must be 0 (no padding) or positive")
        return Preprocess(
            mean=tuple(float(v) for v in data.get("mean", Preprocess.mean)),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data.get("std", Preprocess.std)),  # type: ignore[arg-type]
            resize=int(data.get("resize", 0)),
            max_size=int(data.get("max_size", 0)),
            interpolation=str(data.get("interpolation", Preprocess.interpolation)),
            size_rule=str(data.get("size_rule", Preprocess.size_rule)),
            size_divisor=int(data.get("size_divisor", 0)),
        )


@dataclass(frozen=True)
class Architecture:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    default_config: Dict[str, Any] = field(default_factory=dict)
    preprocess: Preprocess = Preprocess()
    bundled_weights: Optional[Path] = None  # a native checkpoint shipped with the package

    def build(self, **config: Any) -> nn.Module:
        merged = {**self.default_config, **config}
        return self.builder(**merged)


ARCHITECTURES: Dict[str, Architecture] = {}


def register(
    name: str,
    description: str,
    default_config: Optional[Dict[str, Any]] = None,
    preprocess: Preprocess = Preprocess(),
    bundled_weights: Optional[Path] = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder function under ``name``."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is registered twice")
        ARCHITECTURES[name] = Architecture(name, builder, description, dict(default_config or {}), preprocess, bundled_weights)
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
