"""HuggingFace models: ``hf:DIR``, a folder written by ``save_pretrained``, loaded offline.

:func:`load_huggingface` reads ``DIR/config.json`` with transformers' ``AutoConfig``, builds the
class its ``architectures`` names (``DeformableDetrForObjectDetection``; ``AutoModel`` when
transformers has no such class) from the folder's weights (``model.safetensors`` or
``pytorch_model.bin``, sharded or not), in float32 and eval mode. Nothing is fetched from a hub:
``HF_HUB_OFFLINE`` is set and every call passes ``local_files_only``; remote code is never run.

The input preprocessing comes from the folder's ``preprocessor_config.json`` when there is one
(read by transformers' own ``AutoImageProcessor``, so its defaults and legacy keys apply),
mapped exactly onto :class:`~dcn_inspect.models.registry.Preprocess` for the DETR-family
processors (:data:`DETR_PROCESSORS`), as their PIL backend makes ``pixel_values``:

* ``size`` ``{"shortest_edge", "longest_edge"}``: ``resize``/``max_size`` with the
  ``transformers`` size rule (``get_size_with_aspect_ratio``: long side truncated, none of the
  other frameworks' rules); ``{"height", "width"}``: ``fixed_size``, the image stretched to it
  (RT-DETR's 640x640); ``do_resize`` false: the image's own size;
* ``resample`` 2 (PIL bilinear): ``pil-bilinear``;
* ``do_rescale``/``rescale_factor`` ``r`` and ``do_normalize`` + ``image_mean``/``image_std``:
  the processor computes ``(x * r - mean) / std`` on 0-255 values, dcn-inspect
  ``(x / 255 - mean') / std'``, so ``mean' = mean / (255 r)``, ``std' = std / (255 r)`` (``r`` 1
  without rescaling; mean 0 and std 1 without normalising): exact for any factor;
* ``do_pad`` without a ``pad_size``: pads a batch to its largest image, so a single image is
  not padded and its ``pixel_mask`` is all ones (the model's default when it gets none).

Refused, in one line naming the setting: other processors, ``size`` as ``max_height``/
``max_width`` or a lone ``shortest_edge``, any other ``resample``, a ``pad_size``, a centre
crop. transformers' torchvision backend (its default when torchvision is installed) resizes
with torchvision's antialiased bilinear instead of Pillow's, a level apart on some pixels: the
inputs here are the PIL backend's (``backend="pil"``).

Without ``preprocessor_config.json`` the model gets the image at its own size with ImageNet
mean/std, and ``summary.json``'s ``import.preprocess`` says so.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from dcn_inspect.core.errors import InputError, warn
from dcn_inspect.models.checkpoint import sha256_file
from dcn_inspect.models.loaded_model import LoadedModel
from dcn_inspect.models.registry import Preprocess

#: The image processors whose resizing :func:`preprocess_from_processor` reproduces (their
#: ``Fast``/``Pil`` variants included): they all size images with transformers'
#: ``get_size_with_aspect_ratio``.
DETR_PROCESSORS = (
    "DetrImageProcessor",
    "ConditionalDetrImageProcessor",
    "DeformableDetrImageProcessor",
    "RTDetrImageProcessor",
)
#: The weights ``save_pretrained`` writes, in the order transformers prefers them.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: PIL's ``Image.BILINEAR``: the only ``resample`` reproduced.
PIL_BILINEAR = 2
INSTALL_HINT = 'pip install -e ".[transformers]"'


def load_huggingface(spec: str) -> LoadedModel:
    """``hf:DIR`` -> the model ``save_pretrained`` wrote to ``DIR``, with its preprocessing."""
    folder = _checked_folder(spec)
    transformers = _import_transformers(spec)
    config = _read(spec, "config.json", lambda: _auto_config(transformers, folder))
    architectures = list(getattr(config, "architectures", None) or [])
    model_class = _model_class(transformers, architectures)
    weights = _weights_file(spec, folder)
    model = _read(spec, weights.name, lambda: _build(model_class, folder, spec))
    processor = _read(
        spec, "preprocessor_config.json", lambda: _auto_processor(transformers, folder)
    )
    if processor is None:
        preprocess = Preprocess()
        origin = (
            "no preprocessor_config.json: the image at its own size, ImageNet mean/std (an "
            "assumption; give the folder the model's image processor)"
        )
    else:
        name = _processor_name(processor)
        try:
            preprocess = preprocess_from_processor(processor)
        except ValueError as exc:
            raise InputError(f"{spec}: preprocessor_config.json: {exc}", param="model") from None
        origin = f"preprocessor_config.json ({name}, as transformers' PIL backend makes it)"
    config_summary = {
        "dir": str(folder),
        "architectures": architectures,
        "model_type": getattr(config, "model_type", None),
    }
    meta = {"import": {"model_class": type(model).__name__, "preprocess": origin}}
    return LoadedModel(
        model,
        spec,
        getattr(config, "model_type", None),
        config_summary,
        preprocess,
        "huggingface",
        weights,
        sha256_file(weights),
        meta,
    )


def _checked_folder(spec: str) -> Path:
    """``DIR`` of ``hf:DIR``: an existing folder holding a ``config.json``."""
    text = spec[len("hf:") :]
    if not text:
        raise InputError(f"{spec}: give the save_pretrained folder after hf:", param="model")
    folder = Path(text).expanduser()
    if not folder.exists():
        raise InputError(f"{spec}: folder {folder} not found", param="model")
    if not folder.is_dir():
        raise InputError(
            f"{spec}: {folder} is not a folder (hf: takes a save_pretrained folder)", param="model"
        )
    if not (folder / "config.json").is_file():
        raise InputError(
            f"{spec}: {folder} has no config.json (not a save_pretrained folder)", param="model"
        )
    return folder


def _import_transformers(spec: str) -> Any:
    """transformers, imported offline (``HF_HUB_OFFLINE`` set before the import reads it)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError:
        raise InputError(
            f"{spec}: HuggingFace models need transformers ({INSTALL_HINT})", param="model"
        ) from None
    return transformers


def _read(spec: str, what: str, step: Callable[[], Any]) -> Any:
    """``step()``, whatever transformers raises becoming one line naming ``what``."""
    try:
        return step()
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for bad folders
        text = str(exc).strip()
        reason = text.splitlines()[0][:200] if text else type(exc).__name__
        raise InputError(f"{spec}: cannot load {what}: {reason}", param="model") from None


def _auto_config(transformers: Any, folder: Path) -> Any:
    return transformers.AutoConfig.from_pretrained(
        str(folder), local_files_only=True, trust_remote_code=False
    )


def _model_class(transformers: Any, architectures: Sequence[str]) -> Any:
    """The class the config's first architecture names, if transformers has it; else
    ``AutoModel``."""
    for name in architectures[:1]:
        found = getattr(transformers, str(name), None)
        if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel):
            return found
    return transformers.AutoModel


def _weights_file(spec: str, folder: Path) -> Path:
    """The weights file (or shard index) ``from_pretrained`` will read."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise InputError(
        f"{spec}: {folder} has no weights ({' or '.join(WEIGHT_FILES[::2])})", param="model"
    )


def _build(model_class: Any, folder: Path, spec: str) -> nn.Module:
    """The model in float32, eval mode; weights the folder lacks (initialised at random) are a
    warning naming them."""
    model, info = model_class.from_pretrained(
        str(folder),
        local_files_only=True,
        trust_remote_code=False,
        dtype=torch.float32,
        output_loading_info=True,
    )
    missing: List[str] = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        shown = ", ".join(missing[:3]) + more
        warn(f"{spec}: {len(missing)} weight(s) not in the folder, initialised at random ({shown})")
    return model.eval()


def _auto_processor(transformers: Any, folder: Path) -> Optional[Any]:
    """The folder's image processor (PIL backend), or None without ``preprocessor_config.json``."""
    if not (folder / "preprocessor_config.json").is_file():
        return None
    return transformers.AutoImageProcessor.from_pretrained(
        str(folder), local_files_only=True, trust_remote_code=False, backend="pil"
    )


def _processor_name(processor: Any) -> str:
    """The processor's class name without its backend suffix (``Pil``, ``Fast``)."""
    name = type(processor).__name__
    for suffix in ("Pil", "Fast"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def preprocess_from_processor(processor: Any) -> Preprocess:
    """The :class:`Preprocess` making a single image's ``pixel_values`` exactly as ``processor``
    (a DETR-family image processor, PIL backend) does; ``ValueError`` naming the setting that
    cannot be reproduced (module docstring)."""
    name = _processor_name(processor)
    if name not in DETR_PROCESSORS:
        raise ValueError(
            f"image processor {name} is not supported (supported: {', '.join(DETR_PROCESSORS)})"
        )
    if getattr(processor, "do_center_crop", None):
        raise ValueError("do_center_crop: a centre crop cannot be reproduced")
    if getattr(processor, "do_pad", None) and getattr(processor, "pad_size", None):
        raise ValueError(f"pad_size {processor.pad_size}: padding to a fixed size is not supported")
    # do_pad alone pads a batch to its largest image: one image is not padded (pixel_mask all 1)
    sizes: Dict[str, Any] = {}
    if processor.do_resize:
        resample = processor.resample
        if int(getattr(resample, "value", resample)) != PIL_BILINEAR:
            raise ValueError(
                f"resample {resample!r}: only PIL bilinear ({PIL_BILINEAR}) is reproduced"
            )
        sizes = _sizes(processor.size)
    mean, std = _normalisation(processor)
    return Preprocess.from_dict(
        {"mean": mean, "std": std, "interpolation": "pil-bilinear", **sizes}
    )


def _sizes(size: Any) -> Dict[str, Any]:
    """``Preprocess`` size fields of a DETR processor's ``size``, in the order its ``resize``
    tries them."""
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    if get("shortest_edge") and get("longest_edge"):
        return {
            "resize": int(get("shortest_edge")),
            "max_size": int(get("longest_edge")),
            "size_rule": "transformers",
        }
    if get("max_height") and get("max_width"):
        raise ValueError(
            f"size max_height/max_width ({get('max_height')}x{get('max_width')}) is not supported"
        )
    if get("height") and get("width"):
        return {"fixed_size": (int(get("height")), int(get("width")))}
    raise ValueError(f"size {dict(size) if isinstance(size, dict) else size}: not supported")


def _three(name: str, value: Any) -> Tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3 or not all(math.isfinite(float(v)) for v in values):
        raise ValueError(f"{name} must be 3 finite numbers (R, G, B), got {value!r}")
    return float(values[0]), float(values[1]), float(values[2])


def _normalisation(processor: Any) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean', std') for inputs in [0, 1]: the processor's ``(x * r - mean) / std`` on 0-255
    values is ``(x / 255 - mean / (255 r)) / (std / (255 r))``."""
    factor = float(processor.rescale_factor) if processor.do_rescale else 1.0
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"rescale_factor {processor.rescale_factor!r} must be positive")
    mean: Tuple[float, ...] = (0.0, 0.0, 0.0)
    std: Tuple[float, ...] = (1.0, 1.0, 1.0)
    if processor.do_normalize:
        mean = _three("image_mean", processor.image_mean)
        std = _three("image_std", processor.image_std)
        if not all(v > 0 for v in std):
            raise ValueError(f"image_std must be positive, got {processor.image_std!r}")
    unit = 255.0 * factor
    if abs(unit - 1.0) < 1e-9:  # rescale_factor 1/255 (to float precision): mean/std as given
        return mean, std
    return tuple(m / unit for m in mean), tuple(s / unit for s in std)
