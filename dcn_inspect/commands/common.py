"""The set-up every command shares, written once: option checks, the image list, the model, the
output directory and ``summary.json``, and the loop over images with one skipping policy.

A command module reads as: check options (:func:`check_figure_format`, :func:`check_resize`,
:func:`image_list`) -> :func:`start_run` (model, device, output directory, summary) ->
:func:`read_images` (each usable image, unusable ones skipped by
:class:`~dcn_inspect.images.SkippedImages`) -> its analysis -> its writers -> ``run.finish()``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dcn_inspect.defaults import FIGURE_FORMATS
from dcn_inspect.errors import InputError
from dcn_inspect.images import ImageError, ModelInput, SkippedImages, load_image
from dcn_inspect.loaded_model import LoadedModel
from dcn_inspect.loading import open_model
from dcn_inspect.outputs import RunSummary, prepare_out_dir
from dcn_inspect.progress import image_progress
from dcn_inspect.records import DeformConvRecord


def check_figure_format(fmt: str) -> str:
    """``fmt`` lower-cased without a dot; an error unless it is one of :data:`FIGURE_FORMATS`."""
    fmt = fmt.lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        raise InputError(f"{fmt!r}: use png, svg or pdf", param="fmt")
    return fmt


def check_resize(resize: Optional[int]) -> None:
    """``resize`` is None (the model's own), 0 (the image's size) or a positive shorter side."""
    if resize is not None and resize < 0:
        raise InputError(f"{resize}: must be 0 (the image's own size) or a positive shorter-side length", param="resize")


def check_npz_path(path: Optional[Path], param: str) -> None:
    """An ``.npz`` output path whose directory exists (checked before any work is done)."""
    if path is None:
        return
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise InputError(f"{path}: the file name must end in .npz", param=param)
    if not path.parent.is_dir():
        raise InputError(f"{path}: directory {path.parent} does not exist", param=param)


def default_images() -> List[Path]:
    """The bundled example images, used when a command gets no image."""
    from dcn_inspect.datasets import bundled_images

    images = [Path(p) for p in bundled_images()]
    if not images:
        raise InputError("no image given and no bundled images are installed", param="images")
    return images


def image_list(images: Optional[Sequence[Path]]) -> List[Path]:
    """The images to process (the bundled ones by default); two files with the same stem would
    overwrite each other's outputs, so that is an error."""
    paths = [Path(p) for p in images] if images else default_images()
    stems: Dict[str, Path] = {}
    for path in paths:
        if path.stem in stems and stems[path.stem] != path:
            raise InputError(f"{path}: same file name stem as {stems[path.stem]}; their outputs would overwrite each other")
        stems[path.stem] = path
    return paths


@dataclass
class CommandRun:
    """What every command holds while it runs: the model, its device, the output directory and
    the summary being filled."""

    loaded: LoadedModel
    device: torch.device
    out_dir: Path
    summary: RunSummary
    notes: List[str] = field(default_factory=list)

    def finish(self, skipped: SkippedImages) -> Path:
        """Record the skipped images and notes, then write ``summary.json``; returns its path."""
        self.summary["skipped"] = skipped.summary()
        self.summary["notes"] = self.notes
        return self.summary.write(self.out_dir)


def start_run(
    command: str,
    parameters: Dict[str, Any],
    model: Union[str, LoadedModel, None],
    weights: Optional[Path],
    device: str,
    out: Path,
    create_out: bool = True,
) -> CommandRun:
    """Load the model (unless given loaded), create the output directory and start the summary.

    ``parameters`` are recorded as given, plus the device the model runs on. ``create_out``
    is False on the ranks of a distributed run that do not write (rank 0 creates it).
    """
    loaded, dev = open_model(model, weights, device)
    out_dir = prepare_out_dir(Path(out)) if create_out else Path(out)
    summary = RunSummary(command, {**parameters, "device": str(dev)})
    summary["model"] = loaded.summary()
    summary["checkpoint_sha256"] = loaded.checkpoint_sha256
    return CommandRun(loaded, dev, out_dir, summary)


def read_images(
    paths: Sequence[Path], skipped: SkippedImages, max_pixels: int, label: str, progress: bool
) -> Iterator[Tuple[Path, np.ndarray]]:
    """Each readable image of ``paths`` as (path, RGB uint8 array), with a progress bar;
    unreadable ones go to ``skipped`` (which raises under its policy)."""
    with image_progress(label, progress, len(paths)) as advance:
        for path in paths:
            try:
                image = load_image(path, max_pixels)
            except ImageError as exc:
                skipped.skip(str(path), exc)
                advance()
                continue
            yield path, image
            advance()


@contextmanager
def images_of_run(paths: Sequence[Path], strict: bool, max_pixels: int, label: str, progress: bool) -> Iterator[Tuple[Iterator[Tuple[Path, np.ndarray]], SkippedImages]]:
    """``read_images`` with its :class:`SkippedImages`; fails at the end when no image was usable."""
    skipped = SkippedImages(len(paths), strict)
    used = [0]

    def counted() -> Iterator[Tuple[Path, np.ndarray]]:
        for item in read_images(paths, skipped, max_pixels, label, progress):
            used[0] += 1
            yield item

    yield counted(), skipped
    skipped.check_any_used(used[0], f"{len(paths)} images")


def offset_field_arrays(stem: str, convs: Dict[str, DeformConvRecord], model_input: ModelInput) -> Dict[str, np.ndarray]:
    """The captured offset (and mask) fields of one image with their geometry, keyed
    ``"<stem>/<layer>/offset|mask|geometry"`` (the ``--save-offsets`` npz layout)."""
    arrays: Dict[str, np.ndarray] = {}
    for name, record in convs.items():
        key = f"{stem}/{name}"
        arrays[f"{key}/offset"] = record.offset.detach().cpu().numpy()
        if record.mask is not None:
            arrays[f"{key}/mask"] = record.mask.detach().cpu().numpy()
        geometry = {
            **record.geometry.as_dict(),
            "module_type": record.module_type,
            "op": record.op,
            "converted_from": record.converted_from,
            "offset_groups": record.offset_groups,
            "groups": record.groups,
            "frames_in": "model-input pixels (multiply by scale_to_original for the original image)",
            "scale_to_original": list(model_input.scale_to_original),
            "original_hw": list(model_input.original_hw),
            "model_input_hw": list(model_input.input_hw),  # the image as the model saw it; input_hw is the layer's input map
            "offset_layout": "[B, 2*G*kh*kw, Hout, Wout]; channel 2*(g*kh*kw + a*kw + b) = dy, next = dx (input-index units)",
        }
        arrays[f"{key}/geometry"] = np.array(json.dumps(geometry, sort_keys=True))
    return arrays
