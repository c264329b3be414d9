"""Sampling trees of chosen units drawn on the image (the paper's Fig. 5/6): ``dcn-inspect sample-points``.

For each image: run the model once under :func:`dcn_inspect.hooks.probe` (the offsets and
masks the deformable layers actually used, and the exact frame of every layer), choose units
of the top deformable layer (``--at`` points, a ``--grid``, box centres plus one background
unit from ``--boxes``, or a default), trace their sampling trees through the chosen layers
with :func:`dcn_inspect.tracing.trace_sampling_trees`, and write:

- ``<stem>_points.csv``: one row per point (every level, points outside the maps included);
- ``<stem>_sampling.<fmt>``: one panel per unit, the unit green, its deepest points red;
- ``<stem>_sampling.gif`` (``gif=True``): one frame per unit;
- ``save_offsets``: an ``.npz`` of the captured offset/mask fields with their geometry;
- ``summary.json``: model, checkpoint hash, layers and their geometry, units, parameters.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch

from dcn_inspect.errors import InputError
from dcn_inspect.geometry import FrameMap
from dcn_inspect.hooks import DeformConvRecord, probe
from dcn_inspect.progress import image_progress
from dcn_inspect.images import DEFAULT_MAX_PIXELS, ImageBatchReader, ModelInput, to_model_input
from dcn_inspect.loading import LoadedModel, load_model
from dcn_inspect.outputs import RunSummary, atomic_path, prepare_out_dir, write_csv, write_figure
from dcn_inspect.tracing import GroupChoice, SamplingTrees, check_group, trace_sampling_trees

#: Columns of ``<stem>_points.csv``, in order.
CSV_COLUMNS = ["unit", "unit_x", "unit_y", "level", "point", "parent", "layer", "x", "y", "weight", "inside"]

CSV_UNITS = (
    "unit_x,unit_y (the traced unit's centre) and x,y (sampling points): pixels of the original image, "
    "COCO continuous coordinates ((0,0) = top-left corner of the top-left pixel, x right, y down); "
    "unit: index of the unit (summary.json lists how it was chosen); level: 1 = samples of the top "
    "deformable layer (layer column) down to L; point: index within the level, parent*K + kernel point "
    "(row-major); parent: point of the level above (empty at level 1); weight: product of the DCNv2 "
    "masks along the path (1 without masks; dimensionless, 0..1); inside: 1 if the point lies in the "
    "op's sampling band of the map it samples (-1 < row < H and -1 < col < W of that layer's input), "
    "else 0 (kept, never dropped; offsets read outside a map are zero, as in the op)"
)

#: Number of deformable levels traced when neither layers nor levels are given.
DEFAULT_LEVELS = 3


@dataclass(frozen=True)
class Unit:
    """A unit of the top deformable layer to trace."""

    row: int
    col: int
    x: float  # centre in original-image pixels
    y: float
    source: str  # how it was chosen, short (panel titles)
    detail: str = ""  # more about the choice (summary.json)

    def as_dict(self) -> Dict[str, Any]:
        return {"row": self.row, "col": self.col, "x": self.x, "y": self.y, "source": self.source, "detail": self.detail or self.source}


@dataclass
class ImagePoints:
    """What ``sample_points`` produced for one image."""

    image: Path
    units: List[Unit]
    trees: SamplingTrees
    csv: Path
    figure: Path
    gif: Optional[Path]
    table: pd.DataFrame


@dataclass
class SamplePointsResult:
    out_dir: Path
    layers: List[str]  # traced layers, top first
    images: List[ImagePoints]
    summary: Path
    offsets: Optional[Path]
    notes: List[str] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)  # images that could not be read, with the reason


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def select_layers(convs: Dict[str, DeformConvRecord], layers: Optional[Sequence[str]], levels: Optional[int], model_name: str) -> List[DeformConvRecord]:
    """The records to trace, top (last called) first: named ``layers``, the last ``levels``, or the last three."""
    if not convs:
        raise InputError(f"--model {model_name}: the model ran no deformable conv layer on this image")
    names = list(convs)
    if layers and levels is not None:
        raise InputError("--layers and --levels: give one or the other")
    if layers:
        wanted = list(dict.fromkeys(layers))
        unknown = [n for n in wanted if n not in convs]
        if unknown:
            raise InputError(f"--layers: unknown deformable layer(s) {', '.join(unknown)}; valid: {', '.join(names)}")
        chosen = [n for n in names if n in wanted]
    else:
        count = DEFAULT_LEVELS if levels is None else levels
        if levels is not None and not 1 <= levels <= len(names):
            raise InputError(f"--levels {levels}: the model has {len(names)} deformable conv layer(s) ({', '.join(names)})")
        chosen = names[-count:]
    return [convs[n] for n in reversed(chosen)]


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------


def parse_point(text: str) -> Tuple[float, float]:
    """``"X,Y"`` -> (x, y); one-line error naming ``--at``."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
    except ValueError:
        raise InputError(f"--at {text!r}: expected X,Y in image pixels, e.g. --at 120,80") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise InputError(f"--at {text!r}: X and Y must be finite numbers")
    return x, y


def _unit(frame: FrameMap, row: int, col: int, source: str, detail: str = "") -> Unit:
    x, y = frame.to_image(float(col), float(row))
    return Unit(row, col, float(x), float(y), source, detail)


def nearest_unit(frame: FrameMap, map_hw: Tuple[int, int], x: float, y: float, source: str, detail: str = "") -> Unit:
    """The unit whose centre is nearest to image point (x, y), clamped into the map."""
    col, row = frame.to_index(x, y)
    row_i = int(min(max(math.floor(row + 0.5), 0), map_hw[0] - 1))
    col_i = int(min(max(math.floor(col + 0.5), 0), map_hw[1] - 1))
    return _unit(frame, row_i, col_i, source, detail)


def grid_units(frame: FrameMap, map_hw: Tuple[int, int], step: int) -> List[Unit]:
    """Every ``step``-th unit in both directions, starting at ``step // 2`` (the demo's layout)."""
    if step < 1:
        raise InputError(f"--grid {step}: STEP must be a positive number of units")
    start = step // 2
    return [
        _unit(frame, row, col, f"grid {step}")
        for row in range(min(start, map_hw[0] - 1), map_hw[0], step)
        for col in range(min(start, map_hw[1] - 1), map_hw[1], step)
    ]


def background_unit(frame: FrameMap, map_hw: Tuple[int, int], boxes: np.ndarray, image_hw: Tuple[int, int]) -> Unit:
    """The unit farthest from every box and from the image border (the middle of the largest empty area).

    The border counts like a box so that the background unit's tree stays on the image; ties go
    to the first unit in row-major order.
    """
    rows, cols = np.meshgrid(np.arange(map_hw[0]), np.arange(map_hw[1]), indexing="ij")
    xs, ys = frame.to_image(cols.astype(np.float64), rows.astype(np.float64))
    gap_x = np.maximum(np.maximum(boxes[:, 0][None, None] - xs[..., None], xs[..., None] - boxes[:, 2][None, None]), 0.0)
    gap_y = np.maximum(np.maximum(boxes[:, 1][None, None] - ys[..., None], ys[..., None] - boxes[:, 3][None, None]), 0.0)
    to_boxes = np.hypot(gap_x, gap_y).min(axis=-1)
    to_border = np.minimum(np.minimum(xs, image_hw[1] - xs), np.minimum(ys, image_hw[0] - ys))
    score = np.minimum(to_boxes, to_border)  # negative for a centre outside the image
    flat = int(np.argmax(score))
    row, col = divmod(flat, map_hw[1])
    detail = f"background: the unit farthest from every box and the image border ({to_boxes.flat[flat]:.1f} px from the nearest box)"
    return _unit(frame, row, col, "background", detail)


def box_units(frame: FrameMap, map_hw: Tuple[int, int], boxes: np.ndarray, labels: Sequence[Optional[str]], image_hw: Tuple[int, int], source: str) -> List[Unit]:
    """Fig. 6 triplets: one background unit, then one unit at each box centre, smallest box first."""
    if len(boxes) == 0:
        return []
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    units = [background_unit(frame, map_hw, boxes, image_hw)]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for n in np.argsort(areas, kind="stable"):
        x1, y1, x2, y2 = boxes[n]
        label = f" {labels[n]}" if labels[n] else ""
        detail = f"centre of box {int(n)}{label} [{x1:g},{y1:g},{x2:g},{y2:g}] ({source}), area {areas[n]:.0f} px^2"
        short = f"box {int(n)}{label} ({x2 - x1:g}x{y2 - y1:g} px)"
        units.append(nearest_unit(frame, map_hw, 0.5 * (x1 + x2), 0.5 * (y1 + y2), short, detail))
    return units


Boxes = Tuple[np.ndarray, List[Optional[str]]]


def read_boxes(image_path: Path, boxes_file: Path) -> Optional[Boxes]:
    """Boxes (x1, y1, x2, y2 original pixels, non-ignored) and labels of ``image_path`` from a CSV
    (every box) or a COCO/VOC annotation (``None`` when the image is not listed)."""
    from dcn_inspect.annotations import annotation_for_image, read_box_csv

    if boxes_file.suffix.lower() == ".csv":
        return read_box_csv(boxes_file)
    annotation = annotation_for_image(boxes_file, image_path)
    if annotation is None:
        return None
    keep = ~np.asarray(annotation.ignore, dtype=bool)
    return annotation.boxes[keep], [label for label, k in zip(annotation.labels, keep) if k]


def bundled_boxes(image_path: Path) -> Optional[Boxes]:
    """The bundled annotations of ``image_path`` when it is one of the bundled images, else ``None``."""
    from dcn_inspect.datasets import bundled_images, bundled_images_annotations

    resolved = image_path.resolve()
    if resolved not in {p.resolve() for p in bundled_images()}:
        return None
    annotations = bundled_images_annotations()
    return read_boxes(image_path, annotations) if annotations.is_file() else None


def choose_units(
    image_path: Path,
    frame: FrameMap,
    map_hw: Tuple[int, int],
    image_hw: Tuple[int, int],
    at: Sequence[Tuple[float, float]],
    grid: Optional[int],
    boxes: Optional[Boxes],
    boxes_source: str,
    notes: List[str],
) -> List[Unit]:
    """Units of the top layer (output frame ``frame`` in original pixels) for one image, duplicates removed.

    ``boxes`` come from ``--boxes`` (``boxes_source`` names it) or, when nothing else chose
    units, from the bundled annotations; with no units at all the image centre is traced.
    """
    height, width = image_hw
    units: List[Unit] = []
    for x, y in at:
        if not (0 <= x <= width and 0 <= y <= height):
            raise InputError(f"--at {x:g},{y:g}: outside {image_path.name} ({width}x{height} pixels)")
        units.append(nearest_unit(frame, map_hw, x, y, f"--at {x:g},{y:g}", f"--at {x:g},{y:g}: the nearest unit, clamped into the map"))
    if grid is not None:
        units.extend(grid_units(frame, map_hw, grid))
    if boxes is not None:
        found = box_units(frame, map_hw, boxes[0], boxes[1], image_hw, boxes_source)
        if not found:
            notes.append(f"{image_path.name}: {boxes_source} has no box for this image")
        units.extend(found)
    if not units:
        units.append(nearest_unit(frame, map_hw, width / 2, height / 2, "image centre"))
    unique: Dict[Tuple[int, int], Unit] = {}
    for unit in units:
        if (unit.row, unit.col) in unique:
            notes.append(f"{image_path.name}: {unit.detail or unit.source} falls on the same unit ({unit.row}, {unit.col}) as {unique[(unit.row, unit.col)].source}; traced once")
        else:
            unique[(unit.row, unit.col)] = unit
    return list(unique.values())


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def points_table(trees: SamplingTrees) -> pd.DataFrame:
    """One row per point, units outermost, then levels, then points (the CSV's row order)."""
    columns: Dict[str, List[np.ndarray]] = {name: [] for name in CSV_COLUMNS}
    num_units = trees.num_units
    unit_index = np.arange(num_units)
    for level in range(1, trees.num_levels + 1):
        count = trees.points_per_unit(level)
        columns["unit"].append(np.repeat(unit_index, count))
        columns["unit_x"].append(np.repeat(trees.unit_xy[:, 0].numpy(), count))
        columns["unit_y"].append(np.repeat(trees.unit_xy[:, 1].numpy(), count))
        columns["level"].append(np.full(num_units * count, level))
        columns["point"].append(np.tile(np.arange(count), num_units))
        parent = trees.parents(level).numpy().astype(np.float64) if level > 1 else np.full(count, np.nan)
        columns["parent"].append(np.tile(parent, num_units))
        columns["layer"].append(np.full(num_units * count, trees.layers[level - 1], dtype=object))
        columns["x"].append(trees.xs[level - 1].numpy().reshape(-1))
        columns["y"].append(trees.ys[level - 1].numpy().reshape(-1))
        columns["weight"].append(trees.weights[level - 1].numpy().reshape(-1))
        columns["inside"].append(trees.inside[level - 1].numpy().reshape(-1).astype(np.int64))
    table = pd.DataFrame({name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in columns.items()})
    table["parent"] = table["parent"].astype("Int64")  # integers, empty at level 1
    # Units outermost: a stable sort keeps levels and points in order within each unit.
    order = np.argsort(table["unit"].to_numpy(), kind="stable")
    return table.iloc[order].reset_index(drop=True)


def _offsets_payload(stem: str, convs: Dict[str, DeformConvRecord], model_input: ModelInput) -> Dict[str, np.ndarray]:
    arrays: Dict[str, np.ndarray] = {}
    for name, record in convs.items():
        key = f"{stem}/{name}"
        arrays[f"{key}/offset"] = record.offset.detach().cpu().numpy()
        if record.mask is not None:
            arrays[f"{key}/mask"] = record.mask.detach().cpu().numpy()
        geometry = {
            **record.geometry.as_dict(),
            "module_type": record.module_type,
            "offset_groups": record.offset_groups,
            "groups": record.groups,
            "frames_in": "model-input pixels (multiply by scale_to_original for the original image)",
            "scale_to_original": list(model_input.scale_to_original),
            "original_hw": list(model_input.original_hw),
            "input_hw": list(model_input.input_hw),
            "offset_layout": "[B, 2*G*kh*kw, Hout, Wout]; channel 2*(g*kh*kw + a*kw + b) = dy, next = dx (input-index units)",
        }
        arrays[f"{key}/geometry"] = np.array(json.dumps(geometry, sort_keys=True))
    return arrays


def write_offsets(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    """Write an ``.npz`` atomically (a file object keeps numpy from appending another suffix)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"--save-offsets {path}: directory {path.parent} does not exist")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _layer_summary(level: int, record: DeformConvRecord) -> Dict[str, Any]:
    return {
        "level": level,
        "name": record.name,
        "module_type": record.module_type,
        "kernel_points": record.kernel_points,
        "offset_groups": record.offset_groups,
        "modulated": record.modulated,
        "geometry": record.geometry.as_dict(),
    }


def default_images() -> List[Path]:
    from dcn_inspect.datasets import bundled_images

    images = bundled_images()
    if not images:
        raise InputError("IMAGE: no image given and no bundled images are installed")
    return images


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def sample_points(
    images: Optional[Sequence[Path]] = None,
    model: Union[str, LoadedModel, None] = None,
    weights: Optional[Path] = None,
    layers: Optional[Sequence[str]] = None,
    levels: Optional[int] = None,
    at: Sequence[Union[str, Tuple[float, float]]] = (),
    grid: Optional[int] = None,
    boxes: Optional[Path] = None,
    round_positions: bool = False,
    group: GroupChoice = 0,
    resize: Optional[int] = None,
    device: str = "cpu",
    out: Path = Path("dcn-inspect-out"),
    fmt: str = "png",
    gif: bool = False,
    save_offsets: Optional[Path] = None,
    color_by_level: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    strict: bool = False,
) -> SamplePointsResult:
    """Run ``dcn-inspect sample-points``: trace sampling trees of chosen units for each image.

    Writes ``<stem>_points.csv`` and ``<stem>_sampling.<fmt>`` (and ``<stem>_sampling.gif``)
    per image, ``save_offsets`` if given, and ``summary.json`` into ``out``.
    """
    fmt = fmt.lower().lstrip(".")
    if fmt not in ("png", "svg", "pdf"):
        raise InputError(f"--format {fmt!r}: use png, svg or pdf")
    if resize is not None and resize < 0:
        raise InputError(f"--resize {resize}: must be 0 (the image's own size) or a positive shorter-side length")
    group = check_group(group)
    points_at = [parse_point(p) if isinstance(p, str) else (float(p[0]), float(p[1])) for p in at]
    if grid is not None and grid < 1:
        raise InputError(f"--grid {grid}: STEP must be a positive number of units")
    if levels is not None and levels < 1:
        raise InputError(f"--levels {levels}: must be at least 1")
    if layers and levels is not None:
        raise InputError("--layers and --levels: give one or the other")
    if boxes is not None and not Path(boxes).exists():
        raise InputError(f"--boxes {boxes}: file not found")
    if save_offsets is not None and Path(save_offsets).suffix.lower() != ".npz":
        raise InputError(f"--save-offsets {save_offsets}: the file name must end in .npz")
    image_paths = [Path(p) for p in images] if images else default_images()
    stems: Dict[str, Path] = {}
    for path in image_paths:
        if path.stem in stems and stems[path.stem] != path:
            raise InputError(f"{path}: same file name stem as {stems[path.stem]}; their outputs would overwrite each other")
        stems[path.stem] = path

    # Read every image's boxes before any work, so a bad annotation fails fast and writes nothing.
    boxes_per_image: List[Optional[Boxes]] = []
    for path in image_paths:
        if boxes is not None:
            found = read_boxes(path, Path(boxes))
            if found is None:
                raise InputError(f"--boxes {boxes}: no annotation for image {path.name}")
            boxes_per_image.append(found)
        elif not points_at and grid is None:
            boxes_per_image.append(bundled_boxes(path))
        else:
            boxes_per_image.append(None)
    boxes_source = f"--boxes {boxes}" if boxes is not None else "the bundled annotations"

    loaded = model if isinstance(model, LoadedModel) else load_model(model, weights, device)
    dev = next((p.device for p in loaded.model.parameters()), torch.device("cpu"))
    out_dir = prepare_out_dir(Path(out))
    summary = RunSummary(
        "sample-points",
        {
            "images": [str(p) for p in image_paths],
            "layers": list(layers) if layers else None,
            "levels": levels,
            "at": [list(p) for p in points_at],
            "grid": grid,
            "boxes": boxes,
            "round": round_positions,
            "group": group,
            "resize": resize,
            "device": str(dev),
            "format": fmt,
            "gif": gif,
            "save_offsets": save_offsets,
            "color_by_level": color_by_level,
        },
    )
    summary["model"] = loaded.summary()
    summary["checkpoint_sha256"] = loaded.checkpoint_sha256

    from dcn_inspect.plots.sampling import MAX_PANELS, draw_sampling_figure, gif_frames, write_sampling_gif

    notes: List[str] = []
    reader = ImageBatchReader(image_paths, max_pixels, strict)
    results: List[ImagePoints] = []
    per_image: List[Dict[str, Any]] = []
    offsets_arrays: Dict[str, np.ndarray] = {}
    traced_layers: Optional[List[Dict[str, Any]]] = None
    with image_progress("sample-points", progress, len(image_paths)) as advance:
        for path, image_boxes in zip(image_paths, boxes_per_image):
            image = reader.read(path)
            if image is None:
                advance()
                continue
            model_input = to_model_input(image, loaded.preprocess, resize)
            sx, sy = model_input.scale_to_original
            captured = probe(loaded.model, model_input.tensor.to(dev))
            records = select_layers(captured.convs, layers, levels, loaded.name)
            top = records[0]
            top_frame = top.geometry.output_frame.scaled(sx, sy)
            units = choose_units(path, top_frame, top.geometry.output_hw, model_input.original_hw, points_at, grid, image_boxes, boxes_source, notes)
            trees = trace_sampling_trees(
                records,
                torch.tensor([[u.row, u.col] for u in units], dtype=torch.long),
                group=group,
                round_positions=round_positions,
                scale_to_original=(sx, sy),
            )
            table = points_table(trees)
            csv_path = out_dir / f"{path.stem}_points.csv"
            write_csv(csv_path, table, CSV_UNITS)
            titles = [f"unit {k} ({u.row}, {u.col}): {u.source}" for k, u in enumerate(units)]
            figure_path = out_dir / f"{path.stem}_sampling.{fmt}"
            write_figure(figure_path, draw_sampling_figure(image, trees, titles, color_by_level), dpi=100)
            if trees.num_units > MAX_PANELS:
                notes.append(f"{path.name}: the figure shows the first {MAX_PANELS} of {trees.num_units} units; the CSV{' and GIF have' if gif else ' has'} all")
            gif_path = None
            if gif:
                gif_path = out_dir / f"{path.stem}_sampling.gif"
                write_sampling_gif(gif_path, gif_frames(image, trees, color_by_level))
            if save_offsets is not None:
                offsets_arrays.update(_offsets_payload(path.stem, captured.convs, model_input))
            methods = {r.name: r.geometry.method for r in records}
            if any(m != "hooks" for m in methods.values()):
                notes.append(
                    f"{path.name}: frames of {', '.join(n for n, m in methods.items() if m != 'hooks')} inferred from map sizes "
                    "(the forward could not be followed there); positions are approximate"
                )
            layer_info = [_layer_summary(level, r) for level, r in enumerate(records, start=1)]
            traced_layers = traced_layers or layer_info
            per_image.append(
                {
                    "image": str(path),
                    "original_hw": list(model_input.original_hw),
                    "input_hw": list(model_input.input_hw),
                    "scale_to_original": [sx, sy],
                    "top_layer_map_hw": list(top.geometry.output_hw),
                    "layers": layer_info,
                    "units": [{"unit": k, **u.as_dict()} for k, u in enumerate(units)],
                    "points": int(len(table)),
                    "points_outside": int(len(table) - int(table["inside"].sum())),
                    "outputs": [csv_path.name, figure_path.name] + ([gif_path.name] if gif_path else []),
                }
            )
            results.append(ImagePoints(path, units, trees, csv_path, figure_path, gif_path, table))
            advance()
    reader.check_any_read()
    offsets_path = None
    if save_offsets is not None:
        offsets_path = Path(save_offsets)
        write_offsets(offsets_path, offsets_arrays)
    summary["layers"] = traced_layers
    summary["images"] = per_image
    summary["notes"] = notes
    summary["skipped"] = reader.summary()
    summary_path = summary.write(out_dir)
    return SamplePointsResult(out_dir, [r["name"] for r in traced_layers or []], results, summary_path, offsets_path, notes, reader.skipped)

