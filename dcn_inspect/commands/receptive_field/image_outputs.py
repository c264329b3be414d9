"""What ``receptive-field`` writes for one image: ``<stem>_receptive_field.csv`` (one row per
unit and model), ``<stem>_erf.npz`` (the ERF maps and the gradient-weighted trees, original-image
pixels), ``<stem>_receptive_field.<fmt>`` (one panel per unit and model, at most
:data:`~dcn_inspect.report.receptive_field.MAX_PANELS`) and the image's entry of
``summary.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from dcn_inspect.analysis.receptive_field.fields import ReceptiveFields
from dcn_inspect.analysis.receptive_field.saliency import MAX_FORWARDS_PER_UNIT, saliency_cost
from dcn_inspect.analysis.receptive_field.table import (
    RECEPTIVE_FIELD_CSV,
    field_arrays,
    units_table,
)
from dcn_inspect.analysis.unit_selection import Unit
from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.commands.common import CommandRun
from dcn_inspect.commands.receptive_field.choices import RESPONSE_DEFINITION
from dcn_inspect.core.errors import spell_parameters
from dcn_inspect.io.images import ModelInput
from dcn_inspect.io.outputs import write_csv, write_figure, write_npz
from dcn_inspect.models.loaded_model import RANDOM_WEIGHTS_TITLE

__all__ = [
    "ImageFields",
    "image_summary",
    "output_names",
    "saliency_summary",
    "write_image_outputs",
]


@dataclass
class ImageFields:
    """What ``receptive_field`` produced for one image."""

    image: Path
    units: List[Unit]
    fields: Dict[str, ReceptiveFields]  # "model" (and "compare") -> receptive fields
    csv: Path
    npz: Path
    figure: Path
    table: pd.DataFrame


def output_names(path: Path, fmt: str) -> List[str]:
    """The files :func:`write_image_outputs` writes for ``path`` (in the output directory)."""
    return [
        f"{path.stem}_receptive_field.csv",
        f"{path.stem}_erf.npz",
        f"{path.stem}_receptive_field.{fmt}",
    ]


def _panel(u: int, unit: Unit, item: ReceptiveFields, prefix: str) -> Any:
    """The figure panel of unit ``u`` under one model: its ERF, boxes and weighted points."""
    from dcn_inspect.report.receptive_field import ErfPanel, PointLevel

    levels = []
    for level in range(1, item.trees.num_levels + 1):
        weights = (
            None
            if item.point_gradients is None
            else item.point_gradients.weights[level - 1][u].numpy()
        )
        levels.append(
            PointLevel(
                f"level {level}: {item.levels[level - 1]}",
                item.trees.xs[level - 1][u].numpy(),
                item.trees.ys[level - 1][u].numpy(),
                weights,
            )
        )
    x, y = (float(v) for v in item.unit_xy[u])
    numbers = item.numbers[u]
    title = f"{prefix}unit {u} ({x:.1f}, {y:.1f}) {unit.source}\n"
    if item.channel is not None:
        title += spell_parameters(f"r: `channel` {item.channel}") + ", "
    title += f"ERF r90 {numbers.radius_90:.0f} px"
    saliency = None
    if item.saliency and item.saliency[u].box is None:
        title += ", no saliency region"
    elif item.saliency:
        saliency = tuple(float(v) for v in item.saliency_boxes[u])
        area = (saliency[2] - saliency[0]) * (saliency[3] - saliency[1])
        title += f", saliency {area:.0f} px²"
    theoretical = None if item.theoretical is None else tuple(float(v) for v in item.theoretical[u])
    return ErfPanel(title, item.erf[u].numpy(), (x, y), theoretical, saliency, levels)  # type: ignore[arg-type]


def _panels(
    units: Sequence[Unit],
    fields: Dict[str, ReceptiveFields],
    names: Dict[str, str],
    random_weights: Sequence[str] = (),
) -> List[Any]:
    """One panel per unit and model (models side by side), at most ``MAX_PANELS``; the titles
    of a model in ``random_weights`` (roles) say so."""
    from dcn_inspect.report.receptive_field import MAX_PANELS

    panels = []
    for u, unit in enumerate(units):
        for role, item in fields.items():
            if len(panels) >= MAX_PANELS:
                break
            random = role in random_weights
            if len(fields) > 1:
                prefix = (
                    f"{names[role]} ({RANDOM_WEIGHTS_TITLE}): " if random else f"{names[role]}: "
                )
            else:
                prefix = f"{RANDOM_WEIGHTS_TITLE}: " if random else ""
            panels.append(_panel(u, unit, item, prefix))
    return panels


def _npz_arrays(fields: Dict[str, ReceptiveFields]) -> Dict[str, np.ndarray]:
    """Every model's arrays and ``meta``: the response's definition, the layers, the
    coordinates."""
    arrays: Dict[str, np.ndarray] = {}
    for role, item in fields.items():
        arrays.update(field_arrays(role, item))
    arrays["meta"] = np.array(
        json.dumps(
            {
                "response": RESPONSE_DEFINITION,
                "layers": {role: item.levels for role, item in fields.items()},
                "coordinates": "original-image pixels",
            },
            sort_keys=True,
        )
    )
    return arrays


def write_image_outputs(
    path: Path,
    image: np.ndarray,
    units: List[Unit],
    fields: Dict[str, ReceptiveFields],
    boxes: Optional[np.ndarray],
    fmt: str,
    run: CommandRun,
    random_weights: Sequence[str] = (),
) -> ImageFields:
    """Write the CSV, the npz and the figure of one image (a note when the figure leaves units
    out); the figure's titles say "random weights" for the models (roles) in
    ``random_weights``."""
    from dcn_inspect.report.receptive_field import MAX_PANELS, draw_receptive_field_figure

    table = units_table(fields, boxes)
    csv_path = run.out_dir / f"{path.stem}_receptive_field.csv"
    write_csv(csv_path, table, RECEPTIVE_FIELD_CSV)
    npz_path = run.out_dir / f"{path.stem}_erf.npz"
    write_npz(npz_path, _npz_arrays(fields))
    names = {  # a file's name without its folders (summary.json has the path)
        "model": Path(run.loaded.name).name,
        "compare": Path(str(run.summary.data.get("compare_model", {}).get("name", "compare"))).name,
    }
    panels = _panels(units, fields, names, random_weights)
    figure_path = run.out_dir / f"{path.stem}_receptive_field.{fmt}"
    write_figure(
        figure_path,
        draw_receptive_field_figure(image, panels, columns=2 if len(fields) > 1 else 4),
        dpi=100,
    )
    if len(units) * len(fields) > MAX_PANELS:
        run.notes.append(
            f"{path.name}: the figure shows the first {MAX_PANELS} panels; "
            "the CSV and npz have every unit"
        )
    return ImageFields(path, units, fields, csv_path, npz_path, figure_path, table)


def saliency_summary(item: ReceptiveFields) -> Dict[str, Any]:
    """What one model's saliency search cost and reached on one image: the error bound, the
    budget of masked forwards per unit, the forwards each unit took (max, mean) and the relative
    error reached (max, mean over the units with a region); ``searched`` False without a
    search."""
    if item.saliency_error is None:
        return {"searched": False}
    return {
        "searched": True,
        "error_bound": item.saliency_error,
        "max_forwards_per_unit": MAX_FORWARDS_PER_UNIT,
        **saliency_cost(item.saliency),
    }


def image_summary(
    path: Path,
    model_input: ModelInput,
    records: Sequence[DeformConvRecord],
    units: List[Unit],
    fields: Dict[str, ReceptiveFields],
    item: ImageFields,
) -> Dict[str, Any]:
    """The image's entry of ``summary.json``: sizes, followed layers, units, saliency cost."""
    model_fields = fields["model"]
    return {
        "image": str(path),
        "original_hw": list(model_input.original_hw),
        "input_hw": list(model_input.input_hw),
        "scale_to_original": list(model_input.scale_to_original),
        "layers": [
            {
                "level": level,
                "name": r.name,
                "module_type": r.module_type,
                "geometry": r.geometry.as_dict(),
            }
            for level, r in enumerate(records, start=1)
        ],
        "units": [{"unit": k, **u.as_dict()} for k, u in enumerate(units)],
        "saliency_evaluations": {
            role: [r.evaluations for r in f.saliency] for role, f in fields.items()
        },
        "saliency": {role: saliency_summary(f) for role, f in fields.items()},
        "point_gradients": model_fields.point_gradients is not None,
        "outputs": [item.csv.name, item.npz.name, item.figure.name],
    }
