"""The set-up every command shares, written once: option checks, the image list, the model, the
output directory and ``summary.json``, and the loop over images with one skipping policy.

A command module reads as: check options (:func:`~dcn_inspect.commands.options.check_figure_format`,
:func:`check_resize`,
:func:`image_list`) -> :func:`start_run` (model, device, output directory, summary) ->
:func:`images_of_run` (each usable image, unusable ones skipped by
:class:`~dcn_inspect.io.images.SkippedImages`) -> its analysis -> its writers -> ``run.finish()``.

What a run writes is one unit (:class:`~dcn_inspect.io.outputs.RunOutputs`): nothing becomes
visible before ``run.finish()`` (or ``run.commit()``) renames it all into place, a failure
removes it all (``with start_run(...) as run:`` does that on the spot; the CLI does it for
every run on any error or signal), the output directory is locked against a second run, and
the run's input files (every existing file among its parameters, the checkpoint, the model
file) are never overwritten.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.commands.options import ImageInput, ModelChoice
from dcn_inspect.core.errors import InputError
from dcn_inspect.io.images import (
    ImageError,
    ModelInput,
    SkippedImages,
    check_image,
    check_max_pixels,
    load_image,
)
from dcn_inspect.io.outputs import RunOutputs, RunSummary, check_out_dir, prepare_out_dir
from dcn_inspect.io.progress import image_progress
from dcn_inspect.models.loaded_model import LoadedModel
from dcn_inspect.models.loading import open_model
from dcn_inspect.models.registry import Preprocess


def check_npz_path(path: Optional[Path], param: str) -> None:
    """An ``.npz`` output path whose directory exists or can be created (nothing but folders on
    the way), checked before any work is done; :func:`make_parent_dir` creates it."""
    if path is None:
        return
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise InputError(f"{path}: the file name must end in .npz", param=param)
    existing = next(p for p in [path.parent, *path.parent.parents] if os.path.lexists(p))
    if not existing.is_dir():
        raise InputError(f"{path}: {existing} exists and is not a directory", param=param)


def make_parent_dir(path: Path, param: str) -> None:
    """Create the directory of the output file ``path`` (and its parents), as ``out`` is."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"{path}: cannot create directory {parent} ({exc.strerror})", param=param
        ) from None


def default_images() -> List[Path]:
    """The bundled example images, used when a command gets no image."""
    from dcn_inspect.io.datasets import bundled_images

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
            raise InputError(
                f"{path}: same file name stem as {stems[path.stem]}; their outputs would "
                "overwrite each other"
            )
        stems[path.stem] = path
    return paths


#: Parameters that name files a command writes, not reads (never protected as inputs).
OUTPUT_PARAMETERS = ("out", "save_offsets")


@dataclass
class CommandRun:
    """What every command holds while it runs: the model, its device, the output directory, the
    summary being filled and the run's files (:class:`~dcn_inspect.io.outputs.RunOutputs`).

    ``with start_run(...) as run:`` commits the files when the block ends normally and removes
    them when it raises; without ``with``, :meth:`finish` commits and the CLI aborts on failure.
    """

    loaded: LoadedModel
    device: torch.device
    out_dir: Path
    summary: RunSummary
    outputs: RunOutputs
    notes: List[str] = field(default_factory=list)

    def finish(self, skipped: SkippedImages) -> Path:
        """Record the skipped images and notes, write ``summary.json`` and make every file of the
        run visible (:meth:`commit`); returns the summary's path."""
        self.summary["skipped"] = skipped.summary()
        self.summary["notes"] = self.notes
        path = self.summary.write(self.out_dir)
        self.commit()
        return path

    def commit(self) -> None:
        """Rename the run's files into place (``summary.json`` last) and release the directory."""
        self.outputs.commit()

    def abort(self) -> None:
        """Remove every file the run wrote and release the directory."""
        self.outputs.abort()

    def __enter__(self) -> "CommandRun":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def input_files(parameters: Dict[str, Any]) -> Dict[str, List[Path]]:
    """Parameter name -> the existing files among its values (paths, or lists of paths), except
    :data:`OUTPUT_PARAMETERS` and ``save_*``: what a run must never overwrite."""
    found: Dict[str, List[Path]] = {}
    for name, value in parameters.items():
        if name in OUTPUT_PARAMETERS or name.startswith("save_"):
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, (str, Path)) and str(item):
                try:
                    if os.path.isfile(item):
                        found.setdefault(name, []).append(Path(item))
                except (OSError, ValueError):
                    continue
    return found


def start_run(
    command: str,
    parameters: Dict[str, Any],
    model: ModelChoice,
    inputs: ImageInput,
    out: Path,
    create_out: bool = True,
    outputs: Sequence[Path] = (),
) -> CommandRun:
    """Load the model (unless given loaded), create and lock the output directory and start the
    summary.

    ``parameters`` are recorded as given, plus the device the model runs on; the files among
    them are the run's inputs (:func:`input_files`), never overwritten. ``outputs``: the paths
    of the files the command will write, as far as known now (``out/summary.json`` is added);
    each is checked against the inputs before any work, even before the model is loaded.
    ``create_out`` is False on the ranks of a distributed run that do not write (rank 0 creates it).
    """
    out = check_out_dir(out)  # "" (an unset shell variable) is not the current directory
    input_paths = input_files(parameters)
    if create_out:
        _refuse_outputs_onto_inputs(Path(out), outputs, input_paths)
    loaded, dev = open_model(model.model, model.weights, inputs.device)
    existed = os.path.lexists(out)
    out_dir = prepare_out_dir(Path(out)) if create_out else Path(out)
    run_outputs = RunOutputs(out_dir if create_out else None, created=create_out and not existed)
    for name, paths in input_paths.items():
        run_outputs.protect(name, paths)
    run_outputs.protect("weights" if model.weights is not None else "model", [loaded.checkpoint])
    if loaded.source == "user-file":
        run_outputs.protect("model", [loaded.config.get("file")])
    summary = RunSummary(command, {**parameters, "device": str(dev)})
    summary["model"] = loaded.summary()
    summary["checkpoint_sha256"] = loaded.checkpoint_sha256
    return CommandRun(loaded, dev, out_dir, summary, run_outputs)


def _refuse_outputs_onto_inputs(
    out: Path, outputs: Sequence[Path], inputs: Dict[str, List[Path]]
) -> None:
    """An error, before the model is even loaded, when a planned output is one of the inputs."""
    identities: Dict[Tuple[int, int], Tuple[str, Path]] = {}
    for name, paths in inputs.items():
        for path in paths:
            try:
                status = os.stat(path)
            except OSError:
                continue
            identities.setdefault((status.st_dev, status.st_ino), (name, path))
    for target in [*outputs, out / "summary.json"]:
        try:
            status = os.stat(target)
        except (OSError, ValueError):
            continue
        hit = identities.get((status.st_dev, status.st_ino))
        if hit is not None:
            raise InputError(
                f"{target}: is an input of this run (`{hit[0]}` {hit[1]}); refusing to "
                "overwrite it: choose another `out`",
                param="out",
            )


def read_images(
    paths: Sequence[Path],
    skipped: SkippedImages,
    max_pixels: int,
    label: str,
    progress: bool,
    preprocess: Optional[Preprocess] = None,
    resize: Optional[int] = None,
) -> Iterator[Tuple[Path, np.ndarray]]:
    """Each readable image of ``paths`` as (path, RGB uint8 array), with a progress bar;
    unreadable ones (and, with ``preprocess``, ones whose model input would exceed
    ``max_pixels``) go to ``skipped`` (which raises under its policy)."""
    with image_progress(label, progress, len(paths)) as advance:
        for path in paths:
            try:
                image = load_image(path, max_pixels, preprocess, resize)
            except ImageError as exc:
                skipped.skip(str(path), exc)
                advance()
                continue
            yield path, image
            advance()


@contextmanager
def images_of_run(
    paths: Sequence[Path],
    inputs: ImageInput,
    label: str,
    progress: bool,
    preprocess: Optional[Preprocess] = None,
) -> Iterator[Tuple[Iterator[Tuple[Path, np.ndarray]], SkippedImages]]:
    """``read_images`` with its :class:`SkippedImages`; fails at the end when no image was usable.

    With ``inputs.strict`` every image's header is checked first (found, readable, within
    ``max_pixels``, its model input too when ``preprocess`` is given), so a bad last image
    stops the run before any work.
    """
    max_pixels = check_max_pixels(inputs.max_pixels)
    resize = inputs.resize
    skipped = SkippedImages(len(paths), inputs.strict)
    if inputs.strict:
        for path in paths:
            try:
                check_image(path, max_pixels, preprocess, resize)
            except ImageError as exc:
                skipped.skip(str(path), exc)
    used = [0]

    def counted() -> Iterator[Tuple[Path, np.ndarray]]:
        for item in read_images(paths, skipped, max_pixels, label, progress, preprocess, resize):
            used[0] += 1
            yield item

    yield counted(), skipped
    skipped.check_any_used(used[0], f"{len(paths)} images")


def offset_field_arrays(
    stem: str, convs: Dict[str, DeformConvRecord], model_input: ModelInput
) -> Dict[str, np.ndarray]:
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
            "frames_in": "model-input pixels (multiply by scale_to_original for the original "
            "image)",
            "scale_to_original": list(model_input.scale_to_original),
            "original_hw": list(model_input.original_hw),
            "model_input_hw": list(
                model_input.input_hw
            ),  # the image as the model saw it; input_hw is the layer's input map
            "offset_layout": "[B, 2*G*kh*kw, Hout, Wout]; channel 2*(g*kh*kw + a*kw + b) = dy, "
            "next = dx (input-index units)",
        }
        arrays[f"{key}/geometry"] = np.array(json.dumps(geometry, sort_keys=True))
    return arrays


def layer_summary(level: int, record: DeformConvRecord) -> Dict[str, Any]:
    """A followed layer's entry of ``summary.json`` (level 1 = the top layer)."""
    return {
        "level": level,
        "name": record.name,
        "module_type": record.module_type,
        "kernel_points": record.kernel_points,
        "offset_groups": record.offset_groups,
        "modulated": record.modulated,
        # the op entry point that received the offsets (op-level capture), else null
        "op": record.op,
        # "DCNv3"/"DCNv4": offsets converted to the standard layout
        "converted_from": record.converted_from,
        "geometry": record.geometry.as_dict(),
    }
