"""``dcn-inspect receptive-field`` on images: the receptive fields of chosen units, image by
image (:func:`receptive_field`).

For each image: one forward with gradients to the model input
(:class:`~dcn_inspect.capture.gradients.GradientForward`, offsets captured as in every command)
-> the layers to follow (:func:`~dcn_inspect.commands.receptive_field.choices.followed_records`,
the top one holds the units) -> the units (:mod:`dcn_inspect.analysis.unit_selection`, as
sample-points chooses them) -> their receptive fields
(:func:`dcn_inspect.analysis.receptive_field.receptive_fields`) -> for ``compare_model`` the same
image positions under a second model -> written
(:mod:`~dcn_inspect.commands.receptive_field.image_outputs`).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dcn_inspect.analysis.receptive_field.erf import erf_memory_bytes
from dcn_inspect.analysis.receptive_field.fields import ReceptiveFields, receptive_fields
from dcn_inspect.analysis.receptive_field.saliency import DEFAULT_SALIENCY_ERROR
from dcn_inspect.analysis.receptive_field.table import RECEPTIVE_FIELD_CSV
from dcn_inspect.analysis.sample_points import GroupChoice, tree_on_image
from dcn_inspect.analysis.unit_selection import (
    Boxes,
    Unit,
    boxes_per_image,
    choose_units,
    nearest_unit,
)
from dcn_inspect.capture.following import unusable_layers
from dcn_inspect.capture.gradients import DEFAULT_BATCH_SIZE, GradientForward
from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.commands.common import CommandRun, image_list, images_of_run, start_run
from dcn_inspect.commands.options import ImageInput, ModelChoice, OutputOptions, UnitOptions
from dcn_inspect.commands.receptive_field.choices import (
    RESPONSE_DEFINITION,
    SALIENCY_SCHEDULE,
    FieldOptions,
    check_options,
    followed_records,
)
from dcn_inspect.commands.receptive_field.image_outputs import (
    ImageFields,
    image_summary,
    output_names,
    write_image_outputs,
)
from dcn_inspect.core.columns import describe
from dcn_inspect.core.defaults import DEFAULT_MAX_PIXELS, DEFAULT_OUT
from dcn_inspect.core.errors import InputError
from dcn_inspect.io.images import ModelInput, to_model_input
from dcn_inspect.io.progress import image_progress
from dcn_inspect.models.loaded_model import LoadedModel
from dcn_inspect.models.loading import open_model

__all__ = ["MAX_ERF_BYTES", "ReceptiveFieldResult", "receptive_field"]

#: The ERF maps of one image may take at most this many bytes (float32, units x H x W).
MAX_ERF_BYTES = 2 * 1024**3


@dataclass
class ReceptiveFieldResult:
    out_dir: Path
    layers: List[str]  # followed layers, top first (the units belong to the first)
    images: List[ImageFields]
    summary: Path
    notes: List[str] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)


def receptive_field(
    images: Optional[Sequence[Path]] = None,
    model: Union[str, LoadedModel, None] = None,
    weights: Optional[Path] = None,
    layers: Optional[Sequence[str]] = None,
    levels: Optional[int] = None,
    at: Sequence[Union[str, Tuple[float, float]]] = (),
    grid: Optional[int] = None,
    boxes: Optional[Path] = None,
    channel: Optional[int] = None,
    group: GroupChoice = 0,
    round_positions: bool = False,
    saliency_error: float = DEFAULT_SALIENCY_ERROR,
    saliency_step: Optional[int] = None,
    compare_model: Union[str, LoadedModel, None] = None,
    compare_weights: Optional[Path] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    resize: Optional[int] = None,
    device: str = "cpu",
    out: Path = Path(DEFAULT_OUT),
    fmt: str = "png",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    strict: bool = False,
) -> ReceptiveFieldResult:
    """Receptive fields of chosen units of the top followed layer, for each image.

    Writes ``<stem>_receptive_field.csv``, ``<stem>_erf.npz`` and ``<stem>_receptive_field.<fmt>``
    per image and ``summary.json`` into ``out``. ``compare_model`` runs a second model (e.g.
    ``dcn-sample-dilated``) on the same image positions: its layers of the same names (regular
    convs count as deformable ones with zero offsets).
    """
    inputs = ImageInput(resize, max_pixels, device, strict)
    units, own, output = check_options(
        UnitOptions(layers, levels, at, grid, boxes, round_positions, group),
        FieldOptions(channel, saliency_error, saliency_step, batch_size),
        inputs,
        OutputOptions(out, fmt, progress),
    )
    image_paths = image_list(images)
    boxes_of_images, boxes_source = boxes_per_image(image_paths, units.boxes)
    compare = ModelChoice(compare_model, compare_weights)
    planned = [
        Path(output.out) / name for path in image_paths for name in output_names(path, output.fmt)
    ]
    run = start_run(
        "receptive-field",
        _parameters(image_paths, units, own, inputs, output, compare),
        ModelChoice(model, weights),
        inputs,
        output.out,
        outputs=planned,
    )
    boxes_of = {path: (b, boxes_source) for path, b in zip(image_paths, boxes_of_images)}
    with run:
        return _run_images(run, image_paths, boxes_of, units, own, inputs, output, compare)


# --------------------------------------------------------------------------------------------
# Steps


def _parameters(
    image_paths: Sequence[Path],
    units: UnitOptions,
    own: FieldOptions,
    inputs: ImageInput,
    output: OutputOptions,
    compare: ModelChoice,
) -> Dict[str, Any]:
    """``summary.json``'s parameters, as checked."""
    return {
        "images": [str(p) for p in image_paths],
        "layers": list(units.layers) if units.layers else None,
        "levels": units.levels,
        "at": [list(p) for p in units.at],
        "grid": units.grid,
        "boxes": units.boxes,
        "channel": own.channel,
        "group": units.group,
        "round": units.round_positions,
        "saliency_error": own.saliency_error,
        "saliency_step": own.saliency_step,
        "compare_model": compare.model
        if not isinstance(compare.model, LoadedModel)
        else compare.model.name,
        "compare_weights": compare.weights,
        "batch_size": own.batch_size,
        "resize": inputs.resize,
        "format": output.fmt,
    }


def _open_compare(run: CommandRun, compare: ModelChoice) -> Optional[LoadedModel]:
    """The compare model on the run's device (None: none asked for), its checkpoint protected
    and described in the summary."""
    if compare.model is None:
        return None
    loaded, _ = open_model(compare.model, compare.weights, str(run.device))
    run.outputs.protect(
        "compare_weights" if compare.weights is not None else "compare_model",
        [loaded.checkpoint],
    )
    run.summary["compare_model"] = loaded.summary()
    run.summary["compare_checkpoint_sha256"] = loaded.checkpoint_sha256
    return loaded


def _run_images(
    run: CommandRun,
    image_paths: Sequence[Path],
    boxes_of: Dict[Path, Tuple[Optional[Boxes], str]],
    units: UnitOptions,
    own: FieldOptions,
    inputs: ImageInput,
    output: OutputOptions,
    compare: ModelChoice,
) -> ReceptiveFieldResult:
    """Inside the run: every readable image analysed and written, then ``summary.json``."""
    compare_model = _open_compare(run, compare)
    run.summary["response"] = {
        "definition": RESPONSE_DEFINITION,
        "channel": "sum over channels" if own.channel is None else own.channel,
    }
    run.summary["saliency"] = (
        {"error": own.saliency_error, "schedule": SALIENCY_SCHEDULE}
        if own.saliency_error is not None
        else {"searched": False, "note": "no saliency search (`no_saliency`)"}
    )
    results: List[ImageFields] = []
    per_image: List[Dict[str, Any]] = []
    followed: List[str] = []
    preprocess = run.loaded.preprocess
    with images_of_run(image_paths, inputs, "receptive-field", output.progress, preprocess) as (
        readable,
        skipped,
    ):
        for path, image in readable:
            item, summary = _analyse_image(
                path, image, boxes_of[path], units, own, inputs, output, run, compare_model
            )
            followed = followed or item.fields["model"].levels
            results.append(item)
            per_image.append(summary)
    run.summary["layers"] = followed
    run.summary["images"] = per_image
    run.summary["columns"] = {"<stem>_receptive_field.csv": describe(RECEPTIVE_FIELD_CSV)}
    summary_path = run.finish(skipped)
    return ReceptiveFieldResult(
        run.out_dir, followed, results, summary_path, run.notes, skipped.items
    )


def _analyse_image(
    path: Path,
    image: np.ndarray,
    boxes: Tuple[Optional[Boxes], str],
    units: UnitOptions,
    own: FieldOptions,
    inputs: ImageInput,
    output: OutputOptions,
    run: CommandRun,
    compare: Optional[LoadedModel],
) -> Tuple[ImageFields, Dict[str, Any]]:
    """One image: its forward, layers, units and receptive fields (and the compare model's),
    written; returns them with the image's summary entry."""
    model_input = to_model_input(image, run.loaded.preprocess, inputs.resize, inputs.max_pixels)
    forward = GradientForward(run.loaded.model, model_input.tensor.to(run.device))
    records = followed_records(forward, units, run.loaded.name)
    chosen = _choose_units(path, model_input, records, boxes, units, run.notes)
    models = 2 if compare is not None else 1
    _check_memory(path, len(chosen) * models, model_input.original_hw)
    box_array = (
        None if boxes[0] is None else np.asarray(boxes[0][0], dtype=np.float64).reshape(-1, 4)
    )
    fields: Dict[str, ReceptiveFields] = {}
    with _UnitBars(path.name, output.progress, len(chosen), models > 1) as bars:
        cells = [(u.row, u.col) for u in chosen]
        fields["model"] = _fields(
            forward, records, cells, model_input, run.loaded, units, own, box_array, bars.model
        )
        if compare is not None:
            names = [r.name for r in records]
            fields["compare"], compare_units = _compare_fields(
                image, chosen, names, compare, units, own, inputs, run.device, box_array, bars
            )
    for role, item in fields.items():
        run.notes.extend(f"{path.name} ({role}): {note}" for note in item.notes)
    _note_approximate_frames(path, records, run.notes)
    random = [
        role
        for role, loaded in (("model", run.loaded), ("compare", compare))
        if loaded is not None and loaded.random_weights
    ]
    written = write_image_outputs(
        path, image, chosen, fields, box_array, output.fmt, run, random_weights=random
    )
    summary = image_summary(path, model_input, records, chosen, fields, written)
    if compare is not None:
        summary["compare_units"] = [u.as_dict() for u in compare_units]
    return written, summary


def _choose_units(
    path: Path,
    model_input: ModelInput,
    records: Sequence[DeformConvRecord],
    boxes: Tuple[Optional[Boxes], str],
    units: UnitOptions,
    notes: List[str],
) -> List[Unit]:
    """The units of the top layer, as sample-points chooses them (the background unit keeps
    its tree on the image)."""
    sx, sy = model_input.scale_to_original
    top = records[0]
    return choose_units(
        path,
        top.geometry.output_frame.scaled(sx, sy),
        top.geometry.output_hw,
        model_input.original_hw,
        units.at,  # type: ignore[arg-type]
        units.grid,
        boxes[0],
        boxes[1],
        notes,
        tree_on_image(
            records, model_input.original_hw, units.group, units.round_positions, (sx, sy)
        ),
    )


def _check_memory(path: Path, units: int, original_hw: Tuple[int, int]) -> None:
    needed = erf_memory_bytes(units, original_hw)
    if needed > MAX_ERF_BYTES:
        raise InputError(
            f"{path.name}: {units} units x {original_hw[1]}x{original_hw[0]} pixels of ERF maps "
            f"need {needed / 1024**3:.1f} GiB (limit {MAX_ERF_BYTES / 1024**3:.0f} GiB): choose "
            "fewer units (`at`, `grid`) or a smaller image"
        )


class _UnitBars:
    """The progress of one image's units, counted in units: one bar per phase, each model's
    gradients then its saliency search (a bar opens when its phase starts, closing the last)."""

    def __init__(self, name: str, enabled: bool, units: int, compared: bool) -> None:
        self.name, self.enabled, self.units, self.compared = name, enabled, units, compared
        self._stack = ExitStack()
        self._label: Optional[str] = None
        self._advance: Callable[[int], None] = lambda n: None

    def __enter__(self) -> "_UnitBars":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _open(self, label: str) -> None:
        self._stack.close()
        self._stack = ExitStack()
        self._label = label
        self._advance = self._stack.enter_context(
            image_progress(f"{self.name}: {label}", self.enabled, self.units, noun="units")
        )

    def phase(self, phase: str, role: str) -> Callable[[int], None]:
        """``advance(n)`` of ``phase`` ("gradients", "saliency search") of model ``role``; its
        bar opens on the first call (n = 0: the phase starts)."""
        label = f"{phase} ({role})" if self.compared else phase

        def advance(n: int) -> None:
            if self._label != label:
                self._open(label)
            if n:
                self._advance(n)

        return advance

    def model(self, phase: str) -> Callable[[int], None]:
        return self.phase(phase, "model")

    def compare(self, phase: str) -> Callable[[int], None]:
        return self.phase(phase, "compare")


def _fields(
    forward: GradientForward,
    records: Sequence[DeformConvRecord],
    cells: Sequence[Tuple[int, int]],
    model_input: ModelInput,
    loaded: LoadedModel,
    units: UnitOptions,
    own: FieldOptions,
    boxes: Optional[np.ndarray],
    progress: Callable[[str], Callable[[int], None]],
) -> ReceptiveFields:
    """The receptive fields of the units at ``cells``; ``progress(phase)`` gives each phase's
    ``advance``."""
    progress("gradients")(0)
    return receptive_fields(
        forward,
        records,
        torch.tensor(cells, dtype=torch.long).reshape(-1, 2),
        model_input.original_hw,
        loaded.preprocess.std,
        channel=own.channel,
        group=units.group,
        round_positions=units.round_positions,
        saliency_error=own.saliency_error,
        saliency_step=own.saliency_step,
        boxes=boxes,
        batch_size=own.batch_size,
        on_batch=progress("gradients"),
        content_hw=model_input.content_hw,
        on_saliency=progress("saliency search"),
        keep_graph=False,  # the graph's activations are freed before the masked forwards
    )


def _compare_records(
    compare: LoadedModel, forward: GradientForward, names: Sequence[str]
) -> List[DeformConvRecord]:
    """The compare model's calls of the followed layers' names; an error naming every one it
    did not run or cannot analyse."""
    found = forward.records
    problems = unusable_layers(compare.model, names, found=list(found))
    if problems:
        raise InputError(
            f"{compare.name}: "
            + "; ".join(f"layer {name}: {problem}" for name, problem in problems.items()),
            param="compare_model",
        )
    return [found[name] for name in names]


def _compare_fields(
    image: np.ndarray,
    chosen: Sequence[Unit],
    names: Sequence[str],
    compare: LoadedModel,
    units: UnitOptions,
    own: FieldOptions,
    inputs: ImageInput,
    device: torch.device,
    boxes: Optional[np.ndarray],
    bars: _UnitBars,
) -> Tuple[ReceptiveFields, List[Unit]]:
    """The same image positions under the compare model, through its layers of the same
    names."""
    missing = list(unusable_layers(compare.model, names))
    if missing:
        raise InputError(
            f"{compare.name}: no layer named {', '.join(missing)} "
            "(the followed layers of the model)",
            param="compare_model",
        )
    model_input = to_model_input(image, compare.preprocess, inputs.resize, inputs.max_pixels)
    forward = GradientForward(compare.model, model_input.tensor.to(device), regular=list(names))
    records = _compare_records(compare, forward, names)
    sx, sy = model_input.scale_to_original
    top = records[0]
    frame = top.geometry.output_frame.scaled(sx, sy)
    compare_units = [
        nearest_unit(frame, top.geometry.output_hw, u.x, u.y, u.source, u.detail) for u in chosen
    ]
    cells = [(u.row, u.col) for u in compare_units]
    fields = _fields(forward, records, cells, model_input, compare, units, own, boxes, bars.compare)
    return fields, compare_units


def _note_approximate_frames(
    path: Path, records: Sequence[DeformConvRecord], notes: List[str]
) -> None:
    approximate = [r.name for r in records if r.geometry.method != "hooks"]
    if approximate:
        notes.append(
            f"{path.name}: frames of {', '.join(approximate)} inferred from map sizes (the "
            "forward could not be followed there); positions are approximate"
        )
