"""``dcn-inspect explore``: an interactive page per image to explore every unit's sampling tree.

For each image: one forward under :func:`dcn_inspect.capture.session.probe` -> the layers to
follow (:func:`dcn_inspect.capture.records.select_layers`, top first, as sample-points) -> their
offset (and mask) fields with their frames, embedded with the image in one self-contained page
(:mod:`dcn_inspect.report.explore`) whose script traces the hovered or chosen unit's tree with the
rule of :func:`dcn_inspect.analysis.sample_points.trace_sampling_trees`. Writes

- ``<stem>_explore.html``: the page (no network, opens from disk); its points table holds the
  values sample-points writes for ``at`` = that unit (and ``group``: with several offset groups
  the page embeds every group's field and their mean, :mod:`dcn_inspect.report.explore_layers`,
  group 0 and the mean only above its size limit); it can draw each followed layer's dense
  offset map (the flow panel of ``dcn-inspect offsets``) under the trees, and with boxes
  (``boxes``, or a bundled image's annotations) names the unit's category as sample-points;
- ``summary.json``: model, checkpoint hash, layers and their geometry, the pages and their sizes.

With ``attention`` (or a model that runs multi-scale deformable attention and no deformable
conv layer), the page explores ENCODER TOKENS instead (:mod:`dcn_inspect.report.explore_attention`):
the sampling points, by head and level, of each token of the finest level of each encoder
attention layer (``layers``: which ones; default all, the last shown first), with the values
``dcn-inspect attention --queries encoder --at X,Y`` writes for that token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from dcn_inspect.analysis.attention import decoder_predictions, model_class_names
from dcn_inspect.analysis.size_categories import resolve_thresholds
from dcn_inspect.analysis.unit_selection import Boxes, boxes_per_image
from dcn_inspect.capture.attention_calls import DECODER, ENCODER, AttentionRecord
from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.capture.selection import select_layers
from dcn_inspect.capture.session import probe
from dcn_inspect.commands.common import (
    CommandRun,
    image_list,
    images_of_run,
    layer_summary,
    start_run,
)
from dcn_inspect.commands.options import ImageInput, ModelChoice
from dcn_inspect.core.columns import describe
from dcn_inspect.core.defaults import (
    DEFAULT_ATTENTION_MODEL,
    DEFAULT_LEVELS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_OUT,
)
from dcn_inspect.core.errors import InputError, spell_parameters
from dcn_inspect.io.images import ModelInput, to_model_input
from dcn_inspect.io.outputs import write_text
from dcn_inspect.models.loaded_model import LoadedModel

__all__ = ["ExplorePage", "ExploreResult", "explore"]

#: Suffixes of images embedded as JPEG (the others are embedded as PNG).
JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass
class ExplorePage:
    """The page written for one image."""

    image: Path
    page: Path
    size_bytes: int
    top_map_hw: List[int]  # the top layer's output map (rows, columns): the explorable units
    kind: str = "conv"  # "conv" (units of the top deformable layer) or "attention" (tokens)


@dataclass
class ExploreResult:
    out_dir: Path
    layers: List[str]  # followed layers, top first
    pages: List[ExplorePage]
    summary: Path
    notes: List[str] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)


def explore(
    images: Optional[Sequence[Path]] = None,
    model: Union[str, LoadedModel, None] = None,
    weights: Optional[Path] = None,
    layers: Optional[Sequence[str]] = None,
    levels: Optional[int] = None,
    resize: Optional[int] = None,
    device: str = "cpu",
    out: Path = Path(DEFAULT_OUT),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    strict: bool = False,
    attention: bool = False,
    boxes: Optional[Path] = None,
    thresholds: str = "paper",
) -> ExploreResult:
    """Write ``<stem>_explore.html`` per image (and ``summary.json``) into ``out``: the image
    and the offset fields of the followed layers (``layers``, or the last ``levels``, default
    three), to explore every unit's sampling tree in a browser, offline.

    ``attention`` (automatic for a model with deformable attention and no deformable conv):
    explore the encoder tokens of multi-scale deformable attention instead, ``layers`` naming
    encoder attention layers (default: all); ``model`` then defaults to the bundled attention
    detector.

    With boxes (``boxes``, or the bundled annotations of a bundled image, as sample-points) the
    page names the shown unit's category (``thresholds`` as sample-points')."""
    if attention and levels is not None:
        raise InputError(": follows deformable conv layers, not attention", param="levels")
    if levels is not None and levels < 1:
        raise InputError(f"{levels}: must be at least 1", param="levels")
    if layers and levels is not None:
        raise InputError("and `levels`: give one or the other", param="layers")
    inputs = ImageInput(resize, max_pixels, device, strict).checked()
    image_paths = image_list(images)
    boxes_of, threshold_values = _boxes_of(image_paths, boxes, thresholds)
    parameters = {
        "images": [str(p) for p in image_paths],
        "layers": list(layers) if layers else None,
        "levels": levels,
        "resize": inputs.resize,
        "attention": attention,
        "boxes": str(boxes) if boxes is not None else None,
        "thresholds": list(threshold_values),
    }
    planned = [Path(out) / f"{path.stem}_explore.html" for path in image_paths]
    run = start_run(
        "explore",
        parameters,
        ModelChoice(model or (DEFAULT_ATTENTION_MODEL if attention else None), weights),
        inputs,
        out,
        outputs=planned,
    )
    with run:
        preprocess = run.loaded.preprocess
        with images_of_run(image_paths, inputs, "explore", progress, preprocess) as (
            readable,
            skipped,
        ):
            written = [
                _page_of_image(run, path, image, layers, levels, inputs, attention, boxes_of[path])
                for path, image in readable
            ]
        followed = written[0][1]["layers"] if written else None
        run.summary["layers"] = followed
        run.summary["images"] = [summary for _, summary in written]
        run.summary["columns"] = _columns(any(p.kind == "attention" for p, _ in written))
        summary_path = run.finish(skipped)
    return ExploreResult(
        run.out_dir,
        [layer["name"] for layer in followed or []],
        [page for page, _ in written],
        summary_path,
        run.notes,
        skipped.items,
    )


def _page_of_image(
    run: CommandRun,
    path: Path,
    image: np.ndarray,
    layers: Optional[Sequence[str]],
    levels: Optional[int],
    inputs: ImageInput,
    attention: bool = False,
    boxes: Tuple[Optional[Boxes], str, Tuple[float, float]] = (None, "", (0.0, 0.0)),
) -> Tuple[ExplorePage, Dict[str, Any]]:
    """One image: probe, embed the followed layers' fields, write the page; its summary entry.
    ``boxes``: the image's boxes (or None), where they come from, the size thresholds."""
    from dcn_inspect.report.explore import explorer_page, image_data_uri, page_data
    from dcn_inspect.report.explore_layers import category_payload

    model_input = to_model_input(image, run.loaded.preprocess, inputs.resize, inputs.max_pixels)
    captured = probe(
        run.loaded.model, model_input.tensor.to(run.device), model_name=run.loaded.name
    )
    if attention or (not captured.convs and captured.capture.attention):
        if levels is not None:  # the model has no deformable conv: the token page is shown
            raise InputError(": follows deformable conv layers, not attention", param="levels")
        encoder = _encoder_layers(captured.capture.attention, layers, run.loaded.name)
        decoder = [r for r in captured.capture.attention.values() if r.kind == DECODER]
        return _attention_page(run, path, image, model_input, (encoder, decoder), captured.output)
    records = _followed(captured.convs, layers, levels, run.loaded.name)
    data = page_data(
        records,
        model_input.original_hw,
        model_input.scale_to_original,
        run.loaded.summary(),
        path.name,
        categories=category_payload(records[0], model_input.scale_to_original, *boxes),
    )
    uri = image_data_uri(image, path.suffix.lower() in JPEG_SUFFIXES)
    note = _random_weights_note(run.loaded)
    if data["group_note"]:
        run.notes.append(f"{path.name}: {data['group_note']}")
    page_path = run.out_dir / f"{path.stem}_explore.html"
    text = explorer_page(data, uri, note)
    write_text(page_path, text)
    size = len(text.encode("utf-8"))
    approximate = [r.name for r in records if r.geometry.method != "hooks"]
    if approximate:
        run.notes.append(
            f"{path.name}: frames of {', '.join(approximate)} inferred from map sizes "
            "(the forward could not be followed there); positions are approximate"
        )
    top_hw = list(records[0].geometry.output_hw)
    summary = {
        "image": str(path),
        "original_hw": list(model_input.original_hw),
        "input_hw": list(model_input.input_hw),
        "scale_to_original": list(model_input.scale_to_original),
        "top_layer_map_hw": top_hw,
        "layers": [layer_summary(level, r) for level, r in enumerate(records, start=1)],
        "offset_group_choices": data["groups"],
        "offset_groups_note": data["group_note"],
        "offset_maps": [layer["name"] for layer in data["layers"]],
        "boxes": None if boxes[0] is None else boxes[1],
        "outputs": [page_path.name],
        "page_bytes": size,
    }
    return ExplorePage(path, page_path, size, top_hw), summary


def _columns(attention: bool = False) -> Dict[str, Any]:
    """summary.json's ``columns``: the page's points table (no CSV file is written)."""
    from dcn_inspect.report.explore import POINTS_TABLE, TABLE_ID
    from dcn_inspect.report.explore_attention import ATTENTION_TABLE

    table = ATTENTION_TABLE if attention else POINTS_TABLE
    return {f"<stem>_explore.html#{TABLE_ID}": describe(table)}


def _encoder_layers(
    records: Dict[str, AttentionRecord], layers: Optional[Sequence[str]], model_name: str
) -> List[AttentionRecord]:
    """The encoder attention calls offered on the page (``layers``, or all), call order."""
    encoder = {name: r for name, r in records.items() if r.kind == ENCODER}
    if not encoder:
        other = f" (only decoder attention: {', '.join(records)})" if records else ""
        raise InputError(
            f"{model_name}: the model ran no encoder multi-scale deformable attention that "
            f"dcn-inspect recognises{other}",
            param="model",
        )
    unknown = [name for name in layers or () if name not in encoder]
    if unknown:
        raise InputError(
            f"{unknown[0]}: not an encoder attention layer of {model_name} "
            f"(they are: {', '.join(encoder)})",
            param="layers",
        )
    return [r for name, r in encoder.items() if not layers or name in layers]


def _attention_page(
    run: CommandRun,
    path: Path,
    image: np.ndarray,
    model_input: ModelInput,
    calls: Tuple[List[AttentionRecord], List[AttentionRecord]],
    model_output: Any,
) -> Tuple[ExplorePage, Dict[str, Any]]:
    """The encoder-token page of one image (:mod:`dcn_inspect.report.explore_attention`), with
    the decoder's top queries when the model has decoder attention and class logits."""
    from dcn_inspect.report.explore import image_data_uri
    from dcn_inspect.report.explore_attention import (
        attention_explorer_page,
        attention_page_data,
        decoder_payload,
    )

    scale = model_input.scale_to_original
    predictions = decoder_predictions(
        model_output, model_input.original_hw, model_class_names(run.loaded.model)
    )
    encoder, decoder = calls
    data = attention_page_data(
        encoder,
        model_input.original_hw,
        scale,
        run.loaded.summary(),
        path.name,
        decoder_payload(decoder, predictions, scale),
    )
    uri = image_data_uri(image, path.suffix.lower() in JPEG_SUFFIXES)
    page_path = run.out_dir / f"{path.stem}_explore.html"
    text = attention_explorer_page(data, uri, _random_weights_note(run.loaded))
    write_text(page_path, text)
    size = len(text.encode("utf-8"))
    if any(method != "hooks" for r in encoder for method in r.frame_methods):
        run.notes.append(
            f"{path.name}: feature-level frames of the attention inferred from map sizes; "
            "positions are approximate"
        )
    token_hw = list(data["layers"][0]["shape"])
    summary = {
        "image": str(path),
        "original_hw": list(model_input.original_hw),
        "input_hw": list(model_input.input_hw),
        "scale_to_original": list(model_input.scale_to_original),
        "kind": "attention",
        "token_map_hw": token_hw,
        "layers": [r.summary() for r in encoder],
        "decoder_queries": [q["query"] for q in (data["decoder"] or {}).get("queries", [])],
        "outputs": [page_path.name],
        "page_bytes": size,
    }
    return ExplorePage(path, page_path, size, token_hw, "attention"), summary


def _followed(
    convs: Dict[str, DeformConvRecord],
    layers: Optional[Sequence[str]],
    levels: Optional[int],
    model_name: str,
) -> List[DeformConvRecord]:
    """The layers to follow, top (last called) first: the same choice as sample-points."""
    chosen = select_layers(
        convs, layers, levels, default_count=DEFAULT_LEVELS, model_name=model_name
    )
    return list(reversed(chosen))


def _boxes_of(
    image_paths: Sequence[Path], boxes: Optional[Path], thresholds: str
) -> Tuple[Dict[Path, Tuple[Optional[Boxes], str, Tuple[float, float]]], Tuple[float, float]]:
    """Per image its boxes (``boxes``, else the bundled annotations of a bundled image, else
    None), where they come from and the size thresholds; and the thresholds (as sample-points)."""
    boxes_of_images, source = boxes_per_image(image_paths, boxes)
    areas = [_box_areas(b) for b in boxes_of_images if b is not None]
    _, values = resolve_thresholds(thresholds, np.concatenate(areas or [np.zeros(0)]))
    return {p: (b, source, values) for p, b in zip(image_paths, boxes_of_images)}, values


def _box_areas(boxes: Boxes) -> np.ndarray:
    coords = np.asarray(boxes[0], dtype=np.float64).reshape(-1, 4)
    return (coords[:, 2] - coords[:, 0]) * (coords[:, 3] - coords[:, 1])


def _random_weights_note(loaded: LoadedModel) -> Optional[str]:
    if not loaded.random_weights:
        return None
    return spell_parameters(
        f"{loaded.name}: random weights (no `weights` given), the offsets are untrained"
    )
