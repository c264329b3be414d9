"""``dcn-inspect receptive-field`` for the queries of multi-scale deformable attention
(:func:`query_receptive_field`): the effective receptive field of an object query (decoder) or an
encoder token, and its sampling points in every attention layer of that kind weighted by
``|dr/dp|`` (:mod:`dcn_inspect.analysis.receptive_field.queries`).

For each image: one forward with gradients (every attention core's locations offset by a zero
leaf) -> the queries (decoder: ``query`` indices, else the ``top`` N by the model's class score,
as ``attention`` chooses them; encoder: the token nearest to each ``at`` point on the finest
level, default the image centre) -> one backward per query -> written as

- ``<stem>_query_receptive_field.csv``: one row per sampling point (the attention CSV's columns,
  then dr/dx, dr/dy, |dr/dp| and the Spearman correlation of weight and |dr/dp| of the query's
  points in that layer);
- ``<stem>_query_erf.npz``: ``erf`` [N, H, W] (original-image pixels), ``queries``,
  ``responses`` and ``meta``;
- ``<stem>_query_receptive_field.<fmt>``: one panel per query, the ERF under the points;
- ``summary.json``: the response's definition, the queries (r, ERF numbers) and, per query and
  layer, the correlation numbers, with their mean.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from dcn_inspect.analysis.attention import (
    DecoderPredictions,
    decoder_predictions,
    decoder_queries,
    encoder_points,
    model_class_names,
    nearest_tokens,
    token_centre,
)
from dcn_inspect.analysis.receptive_field.queries import (
    POINT_GRADIENT,
    QUERY_FIELD_CSV,
    AttentionGradients,
    QueryFields,
    attention_gradient_forward,
    field_rows,
    query_fields,
    query_responses,
)
from dcn_inspect.capture.adapters import looked_for
from dcn_inspect.capture.attention_calls import DECODER, ENCODER, AttentionRecord
from dcn_inspect.commands.common import CommandRun, image_list, images_of_run, start_run
from dcn_inspect.commands.options import ImageInput, ModelChoice, OutputOptions
from dcn_inspect.core.checks import check_point_on_image, parse_point
from dcn_inspect.core.columns import describe, present
from dcn_inspect.core.defaults import DEFAULT_MAX_PIXELS, DEFAULT_OUT
from dcn_inspect.core.errors import InputError
from dcn_inspect.io.images import ModelInput, to_model_input
from dcn_inspect.io.outputs import write_csv, write_figure, write_npz
from dcn_inspect.models.loaded_model import LoadedModel

__all__ = ["DEFAULT_TOP", "ImageQueryFields", "QueryFieldResult", "query_receptive_field"]

#: Decoder queries analysed without ``query``: the top N by class score (as ``attention``).
DEFAULT_TOP = 4
#: What ``summary.json`` says the correlation numbers are.
CORRELATION = (
    "per query and layer, over the query's sampling points (all heads, levels and points): "
    "spearman = Spearman rank correlation between the attention weight and |dr/dp|; "
    "top_quarter_share = share of the sum of |dr/dp| carried by the quarter of the points with "
    "the largest attention weights (0.25: no preference)"
)


@dataclass
class ImageQueryFields:
    """What ``query_receptive_field`` produced for one image."""

    image: Path
    kind: str
    queries: List[int]
    fields: QueryFields
    table: pd.DataFrame
    correlations: List[Dict[str, Any]]
    csv: Path
    npz: Path
    figure: Path


@dataclass
class QueryFieldResult:
    out_dir: Path
    layers: List[str]
    images: List[ImageQueryFields]
    summary: Path
    notes: List[str] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Choice:
    kind: str
    query: Tuple[int, ...]
    top: int
    at: Tuple[Tuple[float, float], ...]


def _checked(
    queries: str, query: Sequence[int], top: int, at: Sequence[Union[str, Tuple[float, float]]]
) -> _Choice:
    if queries not in (DECODER, ENCODER):
        raise InputError(f"{queries}: must be decoder or encoder", param="queries")
    if any(int(q) < 0 for q in query):
        raise InputError(f"{min(query)}: query indices start at 0", param="query")
    if int(top) < 1:
        raise InputError(f"{top}: must be 1 or more", param="top")
    points = tuple(parse_point(p) if isinstance(p, str) else (float(p[0]), float(p[1])) for p in at)
    if queries == ENCODER and query:
        raise InputError(
            ": picks decoder queries; encoder tokens are picked with `at`", param="query"
        )
    if queries == DECODER and points:
        raise InputError(
            ": picks encoder tokens; decoder queries are picked with `query` or `top`", param="at"
        )
    return _Choice(
        queries, tuple(dict.fromkeys(int(q) for q in query)), int(top), tuple(dict.fromkeys(points))
    )


def query_receptive_field(
    images: Optional[Sequence[Path]] = None,
    model: Union[str, LoadedModel, None] = None,
    weights: Optional[Path] = None,
    queries: str = DECODER,
    query: Sequence[int] = (),
    top: int = DEFAULT_TOP,
    at: Sequence[Union[str, Tuple[float, float]]] = (),
    resize: Optional[int] = None,
    device: str = "cpu",
    out: Path = Path(DEFAULT_OUT),
    fmt: str = "png",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    strict: bool = False,
) -> QueryFieldResult:
    """ERF and gradient-weighted sampling points of chosen queries of a multi-scale deformable
    attention model. ``queries``: ``"decoder"`` (object queries: ``query`` indices, else the
    ``top`` N by class score) or ``"encoder"`` (the token nearest to each ``at`` (x, y),
    original-image pixels, on the finest level; default: the image centre)."""
    output = OutputOptions(out, fmt, progress).checked()
    inputs = ImageInput(resize, max_pixels, device, strict).checked()
    choice = _checked(queries, query, top, at)
    image_paths = image_list(images)
    parameters = {
        "images": [str(p) for p in image_paths],
        "queries": choice.kind,
        "query": list(choice.query),
        "top": choice.top,
        "at": [list(p) for p in choice.at],
        "resize": resize,
        "format": output.fmt,
    }
    suffixes = ("_query_receptive_field.csv", "_query_erf.npz", f"_query_receptive_field.{fmt}")
    planned = [Path(out) / f"{p.stem}{suffix}" for p in image_paths for suffix in suffixes]
    run = start_run(
        "receptive-field", parameters, ModelChoice(model, weights), inputs, out, outputs=planned
    )
    with run:
        with images_of_run(
            image_paths, inputs, "receptive-field", output.progress, run.loaded.preprocess
        ) as (readable, skipped):
            done = [_image(run, path, image, choice, inputs, output) for path, image in readable]
        items = [item for item, _ in done]
        layers = items[0].fields.layers if items else []
        run.summary["layers"] = layers
        run.summary["response"] = _response(done)
        run.summary["correlation"] = _correlation(items)
        scored = any("score" in item.table for item in items)
        run.summary["columns"] = {
            "<stem>_query_receptive_field.csv": describe(present(QUERY_FIELD_CSV, decoder=scored))
        }
        run.summary["images"] = [summary for _, summary in done]
        summary_path = run.finish(skipped)
    return QueryFieldResult(run.out_dir, layers, items, summary_path, run.notes, skipped.items)


def _response(done: List[Tuple[Any, Dict[str, Any]]]) -> Dict[str, Any]:
    """The response's definition (each image's entry lists its decoder queries' classes) and the
    point gradients'."""
    first = done[0][1]["response"] if done else {}
    return {
        **{key: value for key, value in first.items() if key != "classes"},
        "point_gradient": POINT_GRADIENT,
    }


def _finite_mean(values: Sequence[float]) -> Optional[float]:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else None


def _correlation(items: List[ImageQueryFields]) -> Dict[str, Any]:
    """The definition, then the mean of each number over every (image, query, layer) and per
    layer."""
    rows = [c for item in items for c in item.correlations]
    per_layer: Dict[str, Dict[str, Any]] = {}
    for layer in dict.fromkeys(c["layer"] for c in rows):
        of_layer = [c for c in rows if c["layer"] == layer]
        per_layer[layer] = {
            "spearman": _finite_mean([c["spearman"] for c in of_layer]),
            "top_quarter_share": _finite_mean([c["top_quarter_share"] for c in of_layer]),
        }
    return {
        "definition": CORRELATION,
        "mean_spearman": _finite_mean([c["spearman"] for c in rows]),
        "mean_top_quarter_share": _finite_mean([c["top_quarter_share"] for c in rows]),
        "per_layer": per_layer,
    }


def _forward(run: CommandRun, model_input: ModelInput) -> AttentionGradients:
    """The forward with gradients; an error when the model ran no attention."""
    tensor = model_input.tensor.to(run.device)
    forward = attention_gradient_forward(run.loaded.model, tensor, run.loaded.name)
    if not forward.records and forward.conv_layers:
        raise InputError(
            f"{run.loaded.name}: ran {forward.conv_layers} deformable conv layer(s) and no "
            "multi-scale deformable attention, so it has no queries; `queries` is for attention "
            "models (the Deformable DETR family): leave it out to analyse units",
            param="model",
        )
    if not forward.records:
        raise InputError(
            f"{run.loaded.name}: the model ran no multi-scale deformable attention that "
            f"dcn-inspect recognises, so it has no queries; looked for {looked_for()}",
            param="model",
        )
    return forward


def _records(forward: AttentionGradients, kind: str, model_name: str) -> List[AttentionRecord]:
    chosen = [r for r in forward.records.values() if r.kind == kind]
    if not chosen:
        other = ENCODER if kind == DECODER else DECODER
        raise InputError(
            f"{kind}: {model_name} has no {kind} attention, only {other} attention",
            param="queries",
        )
    return chosen


def _choose(
    choice: _Choice,
    records: List[AttentionRecord],
    predictions: Optional[DecoderPredictions],
    model_input: ModelInput,
    name: str,
) -> Tuple[List[int], str]:
    """The queries (indices in the calls' query sequence) and how they were chosen."""
    count = records[0].query_count
    if choice.kind == ENCODER:
        inputs = encoder_points(choice.at, model_input.original_hw, model_input.scale_to_original)
        tokens = nearest_tokens(inputs, records[0].spatial_shapes, records[0].level_frames, None)
        how = "nearest token to " + ("`at`" if choice.at else "the image centre")
        return list(dict.fromkeys(tokens)), how
    return decoder_queries(choice.query, choice.top, predictions, count, name)


def _image(
    run: CommandRun,
    path: Path,
    image: np.ndarray,
    choice: _Choice,
    inputs: ImageInput,
    output: OutputOptions,
) -> Tuple[ImageQueryFields, Dict[str, Any]]:
    """One image: forward, queries, gradients, CSV, npz, figure; the result and its summary."""
    model_input = to_model_input(image, run.loaded.preprocess, inputs.resize, inputs.max_pixels)
    for x, y in choice.at:
        check_point_on_image(x, y, path.name, model_input.original_hw)
    forward = _forward(run, model_input)
    records = _records(forward, choice.kind, run.loaded.name)
    predictions = decoder_predictions(
        forward.output, model_input.original_hw, model_class_names(run.loaded.model)
    )
    queries, how = _choose(choice, records, predictions, model_input, run.loaded.name)
    responses, response = query_responses(forward, choice.kind, queries, run.loaded.name)
    scale = model_input.scale_to_original
    boxes = None
    if choice.kind == DECODER and predictions is not None and predictions.boxes is not None:
        boxes = predictions.boxes[queries]
    fields = query_fields(
        forward, responses, choice.kind, queries, records,
        (model_input.original_hw, model_input.content_hw), run.loaded.preprocess.std, scale,
        boxes,
    )  # fmt: skip
    scored = predictions if choice.kind == DECODER else None
    table, correlations = field_rows(fields, records, scale, scored)
    centres = (
        {q: token_centre(records[0], q, scale) for q in queries} if choice.kind == ENCODER else {}
    )
    item = _write(run, path, image, fields, table, correlations, centres, scored, output)
    summary = {
        "image": str(path),
        "original_hw": list(model_input.original_hw),
        "input_hw": list(model_input.input_hw),
        "scale_to_original": list(scale),
        "kind": choice.kind,
        "response": response,
        "queries": _queries_summary(fields, how, scored, centres, correlations),
        "attention_layers": [r.summary() for r in forward.records.values()],
        "outputs": [item.csv.name, item.npz.name, item.figure.name],
    }
    return item, summary


def _queries_summary(
    fields: QueryFields,
    how: str,
    predictions: Optional[DecoderPredictions],
    centres: Dict[int, Tuple[float, float]],
    correlations: List[Dict[str, Any]],
) -> Dict[str, Any]:
    listed = []
    for i, q in enumerate(fields.queries):
        numbers = fields.numbers[i]
        entry: Dict[str, Any] = {"query": q, "r": float(fields.responses[i])}
        if predictions is not None:
            entry["score"] = float(predictions.scores[q])
            entry["class"] = int(predictions.labels[q])
            entry["class_name"] = predictions.name_of(q)
            if predictions.boxes is not None:
                entry["box"] = [round(float(v), 4) for v in predictions.boxes[q]]
        if q in centres:
            entry["token_centre"] = [round(v, 4) for v in centres[q]]
        entry["erf"] = {
            key: (None if value is None or math.isnan(value) else round(float(value), 4))
            for key, value in vars(numbers).items()
        }
        entry["correlation"] = [
            {k: v for k, v in c.items() if k != "query"} for c in correlations if c["query"] == q
        ]
        listed.append(entry)
    return {"chosen": how, "list": listed}


def _write(
    run: CommandRun,
    path: Path,
    image: np.ndarray,
    fields: QueryFields,
    table: pd.DataFrame,
    correlations: List[Dict[str, Any]],
    centres: Dict[int, Tuple[float, float]],
    predictions: Optional[DecoderPredictions],
    output: OutputOptions,
) -> ImageQueryFields:
    csv_path = run.out_dir / f"{path.stem}_query_receptive_field.csv"
    write_csv(csv_path, table, present(QUERY_FIELD_CSV, decoder=predictions is not None))
    npz_path = run.out_dir / f"{path.stem}_query_erf.npz"
    meta = {"kind": fields.kind, "coordinates": "original-image pixels", "layers": fields.layers}
    write_npz(
        npz_path,
        {
            "erf": fields.erf.numpy(),
            "queries": np.asarray(fields.queries, dtype=np.int64),
            "responses": fields.responses,
            "meta": np.array(json.dumps(meta, sort_keys=True)),
        },
    )
    from dcn_inspect.report.receptive_field import draw_receptive_field_figure

    panels = _panels(fields, table, correlations, centres, predictions)
    figure = draw_receptive_field_figure(
        image,
        panels,
        legend_labels=("token (its cell centre)", "", "")
        if fields.kind == ENCODER
        else ("object query (its reference point)", "", "predicted box"),
    )
    figure_path = run.out_dir / f"{path.stem}_query_receptive_field.{output.fmt}"
    write_figure(figure_path, figure, dpi=100)
    return ImageQueryFields(
        path, fields.kind, fields.queries, fields, table, correlations, csv_path, npz_path,
        figure_path,
    )  # fmt: skip


def _panels(
    fields: QueryFields,
    table: pd.DataFrame,
    correlations: List[Dict[str, Any]],
    centres: Dict[int, Tuple[float, float]],
    predictions: Optional[DecoderPredictions],
) -> List[Any]:
    """One figure panel per query: its ERF, its points per layer sized by |dr/dp|."""
    from dcn_inspect.report.receptive_field import ErfPanel, PointLevel

    panels = []
    for i, q in enumerate(fields.queries):
        rows = table[table["query"] == q]
        levels = [
            PointLevel(
                f"layer {k}: {layer}",
                rows.loc[rows["layer"] == layer, "x"].to_numpy(),
                rows.loc[rows["layer"] == layer, "y"].to_numpy(),
                rows.loc[rows["layer"] == layer, "grad_weight"].to_numpy(),
                base_size=20.0,
            )
            for k, layer in enumerate(fields.layers)
        ]
        first = rows.iloc[0]
        if q in centres:
            anchor = centres[q]
        elif not pd.isna(first["ref_x"]):
            anchor = (float(first["ref_x"]), float(first["ref_y"]))
        else:
            anchor = (fields.numbers[i].centroid_x, fields.numbers[i].centroid_y)
        box = None
        if predictions is not None and predictions.boxes is not None:
            box = tuple(float(v) for v in predictions.boxes[q])
        rho = ", ".join(f"{c['spearman']:.2f}" for c in correlations if c["query"] == q)
        label = f"token {q}" if fields.kind == ENCODER else f"query {q}"
        if predictions is not None:
            name = predictions.name_of(q) or f"class {int(predictions.labels[q])}"
            label += f": {name}, score {predictions.scores[q]:.2f}"
        title = (
            f"{label}\nr {fields.responses[i]:.3g}, ERF r90 {fields.numbers[i].radius_90:.0f} px,"
            f" spearman(weight, |dr/dp|) per layer {rho}"
        )
        panels.append(ErfPanel(title, fields.erf[i].numpy(), anchor, None, box, levels))  # type: ignore[arg-type]
    return panels
