"""``dcn-inspect attention``: where multi-scale deformable attention looked (Deformable DETR,
Fig. 6), for chosen queries of every attention layer.

For each image: one forward with the attention captured
(:func:`dcn_inspect.capture.session.capture_offsets`: the sampling locations and weights each
attention core used, :mod:`dcn_inspect.capture.attention_calls`) -> the queries
(decoder: by index or the top N by the model's class score; encoder: the token nearest to each
``at`` point) -> their points in original-image pixels (:mod:`dcn_inspect.analysis.attention`)
-> written as

- ``<stem>_attention.csv``: one row per sampling point (query, layer, head, level, point);
- ``<stem>_attention.<fmt>``: one panel per (query, layer) (:mod:`dcn_inspect.report.attention`);
- ``summary.json``: model, checkpoint hash, the attention layers, the queries and how each was
  chosen, the columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch

from dcn_inspect.analysis.attention import (
    ATTENTION_CSV,
    DecoderPredictions,
    QueryPanel,
    attention_rows,
    decoder_predictions,
    decoder_queries,
    encoder_points,
    model_class_names,
    nearest_tokens,
    query_panels,
    token_centre,
)
from dcn_inspect.analysis.attention_trees import ATTENTION_TREE_CSV, encoder_tree
from dcn_inspect.capture.adapters import looked_for
from dcn_inspect.capture.attention_calls import DECODER, ENCODER, AttentionRecord
from dcn_inspect.capture.session import capture_offsets, forward
from dcn_inspect.commands.common import CommandRun, image_list, images_of_run, start_run
from dcn_inspect.commands.options import ImageInput, ModelChoice, OutputOptions
from dcn_inspect.core.checks import check_point_on_image, parse_point
from dcn_inspect.core.columns import Column, describe, present
from dcn_inspect.core.defaults import DEFAULT_ATTENTION_MODEL, DEFAULT_MAX_PIXELS, DEFAULT_OUT
from dcn_inspect.core.errors import InputError
from dcn_inspect.core.geometry import FrameMap, Pair
from dcn_inspect.io.images import ModelInput, to_model_input
from dcn_inspect.io.outputs import write_csv, write_figure
from dcn_inspect.models.loaded_model import LoadedModel

__all__ = ["AttentionResult", "ImageAttention", "attention", "DEFAULT_TOP"]

#: Decoder queries drawn without ``query``: the top N by class score.
DEFAULT_TOP = 4
QUERY_KINDS = (DECODER, ENCODER)


@dataclass
class ImageAttention:
    """What ``attention`` produced for one image."""

    image: Path
    kind: str
    queries: List[int]
    table: pd.DataFrame
    csv: Path
    figure: Path
    scored: bool  # decoder rows carry the query's score, class and box
    tree: Optional[pd.DataFrame] = None  # encoder queries: their sampling trees
    tree_csv: Optional[Path] = None
    tree_figure: Optional[Path] = None


@dataclass
class AttentionResult:
    out_dir: Path
    layers: List[str]
    images: List[ImageAttention]
    summary: Path
    notes: List[str] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class QueryOptions:
    """Which queries to show: ``kind`` (None: decoder when the model has one), decoder query
    indices or the top N, encoder points (original-image (x, y); none: the image centre) on a
    feature level (None: the finest), and the layers (None: all of that kind)."""

    kind: Optional[str]
    query: Tuple[int, ...]
    top: int
    at: Tuple[Tuple[float, float], ...]
    feature_level: Optional[int]
    layers: Optional[Tuple[str, ...]]
    per_head: bool
    levels: Optional[int] = None  # encoder trees: depths (None: 2, or the encoder's calls)
    min_weight: float = 0.0
    merge: bool = False

    @staticmethod
    def of(
        kind: Optional[str],
        query: Sequence[int],
        top: int,
        at: Sequence[Union[str, Tuple[float, float]]],
        feature_level: Optional[int],
        layers: Optional[Sequence[str]],
        per_head: bool,
        levels: Optional[int],
        min_weight: float,
        merge: bool,
    ) -> "QueryOptions":
        """The options from the command's arguments (``at`` as "X,Y" text or pairs), checked."""
        points = (parse_point(p) if isinstance(p, str) else (float(p[0]), float(p[1])) for p in at)
        return QueryOptions(
            kind, tuple(int(q) for q in dict.fromkeys(query)), int(top),
            tuple(dict.fromkeys(points)), feature_level, tuple(layers) if layers else None,
            per_head, levels, float(min_weight), merge,
        ).checked()  # fmt: skip

    def as_parameters(self) -> Dict[str, Any]:
        """The options as ``summary.json``'s ``parameters`` record them."""
        return {
            "queries": self.kind,
            "query": list(self.query),
            "top": self.top,
            "at": [list(p) for p in self.at],
            "feature_level": self.feature_level,
            "layers": list(self.layers) if self.layers else None,
            "per_head": self.per_head,
            "levels": self.levels,
            "min_weight": self.min_weight,
            "merge": self.merge,
        }

    def checked(self) -> "QueryOptions":
        if self.kind is not None and self.kind not in QUERY_KINDS:
            raise InputError(f"{self.kind}: must be decoder or encoder", param="queries")
        if any(q < 0 for q in self.query):
            raise InputError(f"{min(self.query)}: query indices start at 0", param="query")
        if self.top < 1:
            raise InputError(f"{self.top}: must be 1 or more", param="top")
        if self.levels is not None and self.levels < 1:
            raise InputError(f"{self.levels}: must be 1 or more", param="levels")
        if self.min_weight < 0:
            raise InputError(f"{self.min_weight:g}: must be at least 0", param="min_weight")
        if self.feature_level is not None and self.feature_level < 0:
            raise InputError(
                f"{self.feature_level}: feature levels start at 0",
                param="feature_level",
            )
        if self.kind == ENCODER and self.query:
            raise InputError(
                ": picks decoder queries; encoder tokens are picked with `at`",
                param="query",
            )
        if self.kind == DECODER and (self.at or self.feature_level is not None):
            param = "at" if self.at else "feature_level"
            raise InputError(
                ": picks encoder tokens; decoder queries are picked with `query` or `top`",
                param=param,
            )
        return self


def attention(
    images: Optional[Sequence[Path]] = None,
    model: Union[str, LoadedModel, None] = None,
    weights: Optional[Path] = None,
    queries: Optional[str] = None,
    query: Sequence[int] = (),
    top: int = DEFAULT_TOP,
    at: Sequence[Union[str, Tuple[float, float]]] = (),
    feature_level: Optional[int] = None,
    layers: Optional[Sequence[str]] = None,
    per_head: bool = False,
    levels: Optional[int] = None,
    min_weight: float = 0.0,
    merge: bool = False,
    resize: Optional[int] = None,
    device: str = "cpu",
    out: Path = Path(DEFAULT_OUT),
    fmt: str = "png",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    strict: bool = False,
) -> AttentionResult:
    """The sampling points of chosen queries of every multi-scale deformable attention layer.

    ``queries``: ``"decoder"`` (object queries: ``query`` indices, else the ``top`` N by the
    model's class score) or ``"encoder"`` (the token nearest to each ``at`` (x, y), original-image
    pixels, on ``feature_level``, default the finest; default point: the image centre); None:
    decoder when the model has decoder attention. ``model`` defaults to the bundled attention
    detector (:data:`~dcn_inspect.core.defaults.DEFAULT_ATTENTION_MODEL`). Writes
    ``<stem>_attention.csv``, ``<stem>_attention.<fmt>`` (encoder queries: their trees too,
    ``<stem>_attention_tree.*``) and ``summary.json`` into ``out``.
    """
    output = OutputOptions(out, fmt, progress).checked()
    inputs = ImageInput(resize, max_pixels, device, strict).checked()
    options = QueryOptions.of(
        queries, query, top, at, feature_level, layers, per_head, levels, min_weight, merge
    )
    image_paths = image_list(images)
    parameters = {
        "images": [str(p) for p in image_paths],
        **options.as_parameters(),
        "resize": resize,
        "format": output.fmt,
    }
    suffixes = (".csv", f".{output.fmt}", "_tree.csv", f"_tree.{output.fmt}")
    planned = [Path(out) / f"{p.stem}_attention{suffix}" for p in image_paths
               for suffix in suffixes]  # fmt: skip
    run = start_run(
        "attention",
        parameters,
        ModelChoice(model or DEFAULT_ATTENTION_MODEL, weights),
        inputs,
        out,
        outputs=planned,
    )
    with run:
        with images_of_run(
            image_paths, inputs, "attention", output.progress, run.loaded.preprocess
        ) as (readable, skipped):
            done = [
                _image_attention(run, path, image, options, inputs, output)
                for path, image in readable
            ]
        shown = next((layers for _, _, layers in done), [])
        run.summary["layers"] = shown
        run.summary["columns"] = _columns([item for item, _, _ in done])
        run.summary["conventions"] = CONVENTIONS
        run.summary["images"] = [summary for _, summary, _ in done]
        summary_path = run.finish(skipped)
    return AttentionResult(
        run.out_dir, shown, [item for item, _, _ in done], summary_path, run.notes, skipped.items
    )


def _columns(items: List[ImageAttention]) -> Dict[str, Any]:
    """``summary.json``'s description of the CSVs the run wrote."""
    scored = next((item.scored for item in items), False)
    columns = {"<stem>_attention.csv": describe(present(ATTENTION_CSV, decoder=scored))}
    if any(item.tree_csv is not None for item in items):
        columns["<stem>_attention_tree.csv"] = describe(TREE_CSV)
    return columns


#: Columns of ``<stem>_attention_tree.csv``: the token, then its tree's
#: (:data:`~dcn_inspect.analysis.attention_trees.ATTENTION_TREE_CSV`).
TREE_CSV = (
    Column("query", "the encoder token whose tree the row belongs to (as in the attention CSV)"),
    *ATTENTION_TREE_CSV,
)

#: ``summary.json``'s ``conventions``: what the positions and weights mean.
CONVENTIONS = {
    "pixels": "original-image pixels, COCO continuous coordinates ((0,0) = top-left corner of "
    "the top-left pixel, x right, y down)",
    "location": "normalised (x, y) of a level's padded map -> cell (x*W - 0.5, y*H - 0.5) "
    "(grid_sample, align_corners=False) -> model input through the level's frame -> original "
    "image through the resize scale",
    "weight": "the op's attention weight: softmax over all levels and points of one head",
    "score": "max over classes of sigmoid(class logit), from the model's own output",
    "encoder_query": "the token whose cell centre is nearest to `at` on the chosen level",
}


def _capture(
    run: CommandRun, model_input: ModelInput, options: QueryOptions
) -> Tuple[Any, Dict[str, AttentionRecord]]:
    """One forward with the attention captured, keeping only the encoder tokens asked for."""
    points = encoder_points(options.at, model_input.original_hw, model_input.scale_to_original)

    def keep(shapes: Tuple[Pair, ...], frames: Tuple[FrameMap, ...]) -> List[int]:
        return nearest_tokens(points, shapes, frames, options.feature_level)

    # Trees need every token of the earlier encoder calls (their queries are the tree's nodes).
    trees = options.kind != DECODER and options.levels != 1
    tensor = model_input.tensor.to(run.device)
    with (
        torch.no_grad(),
        capture_offsets(run.loaded.model, keep_tokens=None if trees else keep) as capture,
    ):
        capture.watch_input(tensor)
        output = forward(run.loaded.model, tensor, run.loaded.name)
    if not capture.attention:
        convs = f" (it ran {len(capture.convs)} deformable conv layer(s))" if capture.convs else ""
        raise InputError(
            f"{run.loaded.name}: the model ran no multi-scale deformable attention that "
            f"dcn-inspect recognises{convs}; looked for {looked_for()}",
            param="model",
        )
    return output, capture.attention


def _chosen_records(
    records: Dict[str, AttentionRecord], options: QueryOptions, model_name: str
) -> Tuple[str, List[AttentionRecord]]:
    """The kind of queries shown and its attention calls (all, or ``layers``), in call order."""
    kinds = {r.kind for r in records.values()}
    kind = options.kind or (DECODER if DECODER in kinds else ENCODER)
    if kind not in kinds:
        other = ENCODER if kind == DECODER else DECODER
        raise InputError(
            f"{kind}: {model_name} has no {kind} attention, only {other} attention",
            param="queries",
        )
    of_kind = [r for r in records.values() if r.kind == kind]
    if options.layers is None:
        return kind, of_kind
    names = {r.name: r for r in of_kind}
    unknown = [name for name in options.layers if name not in names]
    if unknown:
        raise InputError(
            f"{unknown[0]}: not a {kind} attention layer of {model_name} "
            f"(they are: {', '.join(names)})",
            param="layers",
        )
    return kind, [r for r in of_kind if r.name in options.layers]


def _image_attention(
    run: CommandRun,
    path: Path,
    image: np.ndarray,
    options: QueryOptions,
    inputs: ImageInput,
    output: OutputOptions,
) -> Tuple[ImageAttention, Dict[str, Any], List[str]]:
    """One image: capture, choose queries, rows, figure and CSV; returns the result, its
    summary entry and the layers shown."""
    model_input = to_model_input(image, run.loaded.preprocess, inputs.resize, inputs.max_pixels)
    if options.at:
        for x, y in options.at:
            check_point_on_image(x, y, path.name, model_input.original_hw)
    model_output, records = _capture(run, model_input, options)
    kind, chosen = _chosen_records(records, options, run.loaded.name)
    scale = model_input.scale_to_original
    predictions = decoder_predictions(
        model_output, model_input.original_hw, model_class_names(run.loaded.model)
    )
    query_points: Dict[int, Tuple[float, float]] = {}
    if kind == DECODER:
        queries, how = decoder_queries(
            options.query, options.top, predictions, chosen[0].query_count, run.loaded.name
        )
    else:
        points = encoder_points(options.at, model_input.original_hw, model_input.scale_to_original)
        queries = list(
            dict.fromkeys(
                nearest_tokens(points, chosen[0].spatial_shapes, chosen[0].level_frames,
                               options.feature_level)
            )
        )  # fmt: skip
        how = "nearest token to " + ("`at`" if options.at else "the image centre")
        query_points = {q: token_centre(chosen[0], q, scale) for q in queries}
    table = pd.concat(
        [
            attention_rows(r, queries, scale, predictions if kind == DECODER else None)
            for r in chosen
        ],
        ignore_index=True,
    )
    table = _query_major(table, queries)
    panels = query_panels(table, predictions if kind == DECODER else None, query_points)
    csv_path = run.out_dir / f"{path.stem}_attention.csv"
    scored = kind == DECODER and predictions is not None
    write_csv(csv_path, table, present(ATTENTION_CSV, decoder=scored))
    figure_path = _write_figure(run, path, image, panels, chosen, output, options.per_head)
    summary = {
        "image": str(path),
        "original_hw": list(model_input.original_hw),
        "input_hw": list(model_input.input_hw),
        "scale_to_original": list(scale),
        "kind": kind,
        "queries": _queries_summary(queries, kind, how, predictions, query_points),
        "attention_layers": [r.summary() for r in records.values()],
        "outputs": [csv_path.name, figure_path.name],
    }
    item = ImageAttention(path, kind, queries, table, csv_path, figure_path, scored)
    if kind == ENCODER and options.levels != 1:
        encoder = [r for r in records.values() if r.kind == ENCODER]
        _encoder_trees(
            run, path, image, item, encoder, chosen[-1].name, panels, scale, options, output
        )
        summary["outputs"] += [item.tree_csv.name, item.tree_figure.name]  # type: ignore[union-attr]
        summary["tree"] = {
            "levels": int(item.tree["depth"].max()),  # type: ignore[index]
            "layers": list(dict.fromkeys(item.tree["layer"])),  # type: ignore[index]
            "rows": len(item.tree),  # type: ignore[arg-type]
        }
    return item, summary, [r.name for r in chosen]


def _encoder_trees(
    run: CommandRun,
    path: Path,
    image: np.ndarray,
    item: ImageAttention,
    encoder: List[AttentionRecord],
    top: str,
    panels: List[QueryPanel],
    scale: Tuple[float, float],
    options: QueryOptions,
    output: OutputOptions,
) -> None:
    """Each encoder query's sampling tree through the encoder calls up to ``top``: CSV and
    figure (depth by colour), into ``item``."""
    from dcn_inspect.report.attention_trees import draw_tree_figure

    position = [r.name for r in encoder].index(top)
    levels = options.levels if options.levels is not None else min(2, position + 1)
    trees = []
    for query in item.queries:
        tree = encoder_tree(
            encoder, query, levels, layer=top, scale_to_original=scale,
            min_weight=options.min_weight, merge=options.merge,
        )  # fmt: skip
        trees.append(tree.assign(query=query))
    table = pd.concat(trees, ignore_index=True)
    table = table[["query"] + [c for c in table.columns if c != "query"]]
    item.tree = table
    item.tree_csv = run.out_dir / f"{path.stem}_attention_tree.csv"
    write_csv(item.tree_csv, table, TREE_CSV)
    own = {p.query: p for p in panels}
    depth_layers = list(dict.fromkeys(zip(table["depth"].astype(int), table["layer"])))
    figure = draw_tree_figure(
        image,
        [(own[q], table[table["query"] == q]) for q in item.queries],
        depth_layers,
        run.loaded.titled(f"{path.name}: sampling trees through the encoder"),
    )
    item.tree_figure = run.out_dir / f"{path.stem}_attention_tree.{output.fmt}"
    write_figure(item.tree_figure, figure, dpi=100)


def _query_major(table: pd.DataFrame, queries: Sequence[int]) -> pd.DataFrame:
    """Rows grouped by query (in the order chosen), then layer (call order), head, point."""
    order = {q: i for i, q in enumerate(queries)}
    ranked = table.assign(_rank=table["query"].map(order), _row=np.arange(len(table)))
    return (
        ranked.sort_values(["_rank", "_row"], kind="stable")
        .drop(columns=["_rank", "_row"])
        .reset_index(drop=True)
    )


def _queries_summary(
    queries: Sequence[int],
    kind: str,
    how: str,
    predictions: Optional[DecoderPredictions],
    query_points: Dict[int, Tuple[float, float]],
) -> Dict[str, Any]:
    listed = []
    for q in queries:
        entry: Dict[str, Any] = {"query": int(q)}
        if kind == DECODER and predictions is not None:
            entry["score"] = float(predictions.scores[q])
            entry["class"] = int(predictions.labels[q])
            entry["class_name"] = predictions.name_of(q)
            if predictions.boxes is not None:
                entry["box"] = [round(float(v), 4) for v in predictions.boxes[q]]
        if q in query_points:
            entry["token_centre"] = [round(v, 4) for v in query_points[q]]
        listed.append(entry)
    return {"chosen": how, "list": listed}


def _write_figure(
    run: CommandRun,
    path: Path,
    image: np.ndarray,
    panels: List[QueryPanel],
    chosen: List[AttentionRecord],
    output: OutputOptions,
    per_head: bool,
) -> Path:
    from dcn_inspect.report.attention import draw_attention_figure

    figure_path = run.out_dir / f"{path.stem}_attention.{output.fmt}"
    title = run.loaded.titled(f"{path.name}: deformable attention sampling points")
    figure = draw_attention_figure(
        image,
        panels,
        levels=max(r.levels for r in chosen),
        heads=max(r.heads for r in chosen),
        title=title,
        per_head=per_head,
    )
    write_figure(figure_path, figure, dpi=100)
    return figure_path
