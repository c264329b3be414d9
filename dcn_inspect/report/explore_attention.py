"""The explorer page of ``dcn-inspect explore --attention``: encoder tokens of multi-scale
deformable attention, one self-contained HTML file per image.

For every encoder attention layer offered (call order) the page embeds, per token of the
finest feature level (row-major), the (x, y) of each of its sampling points in original-image
pixels and its attention weight — computed here from the record's
:meth:`~dcn_inspect.capture.attention_calls.AttentionRecord.points_in_input` with the arithmetic
of :func:`~dcn_inspect.analysis.attention.attention_rows`, so the page's points table holds the
values ``dcn-inspect attention --queries encoder --at X,Y`` writes for that token — as
little-endian float32 ``[T, heads * P, 3]`` (T tokens, P points per head in the record's
order), base64. Its script (``explore_attention_page.js``) only looks the token up and draws.

Nothing is fetched (the Content-Security-Policy of :mod:`dcn_inspect.report.explore`).
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dcn_inspect.analysis.attention import (
    ATTENTION_CSV,
    DecoderPredictions,
    attention_rows,
    finest_level,
    top_queries,
)
from dcn_inspect.capture.attention_calls import AttentionRecord
from dcn_inspect.report.explore import (
    CONTENT_SECURITY_POLICY,
    STYLE,
    TABLE_ID,
    VIEW_SIZE,
    script_text,
)
from dcn_inspect.report.sample_points import (
    BAND_COLOUR,
    BAND_MAX,
    EDGE_COLOUR,
    MIN_ALPHA,
    UNIT_COLOUR,
)

#: The page's script, a data file of this package.
SCRIPT_FILE = "explore_attention_page.js"
#: The columns of the page's points table: those of the attention CSV, same values.
ATTENTION_TABLE = tuple(
    c
    for c in ATTENTION_CSV
    if c.name in ("layer", "head", "feature_level", "point", "x", "y", "weight")
)
#: One colour per attention head (cycled beyond eight).
HEAD_COLOURS = (
    "#ff1a1a", "#1f6bff", "#ffd400", "#ff00d4", "#00d4d4", "#ff8c00", "#8a2be2", "#7cfc00",
)  # fmt: skip
#: Decoder queries listed on the page (the top N by the model's class score).
DECODER_TOP = 10
#: The predicted box of a decoder query (as the attention figure draws it).
BOX_COLOUR = "#00e5ff"
#: Marker per feature level (0 = finest): drawn by the script.
LEVEL_MARKERS = ("circle", "square", "triangle", "diamond")


def _within_level(point_level: Sequence[int]) -> List[int]:
    """Index of each point within its level (the CSV's ``point``)."""
    counts: Dict[int, int] = {}
    out = []
    for level in point_level:
        out.append(counts.get(level, 0))
        counts[level] = counts.get(level, 0) + 1
    return out


def encoder_layer_payload(
    record: AttentionRecord, scale_to_original: Tuple[float, float]
) -> Dict[str, Any]:
    """One encoder layer: name, heads, points' levels and the finest level's tokens' points
    (base64 float32 [T, heads * P, 3]: x, y original-image pixels, weight)."""
    level = finest_level(record.spatial_shapes)
    height, width = record.spatial_shapes[level]
    start = record.level_start[level]
    kept = {int(q): i for i, q in enumerate(record.queries.tolist())}
    rows = [kept[start + t] for t in range(height * width)]  # every token: a KeyError if not
    xs, ys = record.points_in_input()  # [B, Q, H, P] float64, as attention_rows reads them
    x = xs[0, rows].numpy() * scale_to_original[0]
    y = ys[0, rows].numpy() * scale_to_original[1]
    weight = record.weights[0, rows].double().numpy()
    values = np.stack([x, y, weight], axis=-1).reshape(height * width, -1, 3)
    return {
        "name": record.name,
        "heads": record.heads,
        "point_level": list(record.point_level),
        "point_index": _within_level(record.point_level),
        "levels": record.levels,
        "finest": level,
        "token_start": int(start),
        "shape": [int(height), int(width)],
        "frame": record.level_frames[level].as_dict(),
        "points": base64.b64encode(values.astype("<f4").tobytes()).decode("ascii"),
    }


def decoder_payload(
    records: Sequence[AttentionRecord],
    predictions: Optional[DecoderPredictions],
    scale_to_original: Tuple[float, float],
    top: int = DECODER_TOP,
) -> Optional[Dict[str, Any]]:
    """The top decoder queries (by class score) and, per decoder layer (call order), their
    points — :func:`~dcn_inspect.analysis.attention.attention_rows`, the attention CSV's rows
    for ``--queries decoder --query Q`` — as base64 float32 [N, heads * P, 3] (x, y, weight)
    with each query's reference point (its first level's); None without decoder attention or
    class scores."""
    if not records or predictions is None:
        return None
    queries = top_queries(predictions, min(top, records[0].query_count))
    layers = []
    for record in records:
        rows = attention_rows(record, queries, scale_to_original)
        values = rows[["x", "y", "weight"]].to_numpy().reshape(len(queries), -1, 3)
        first = rows.groupby("query", sort=False).first()
        layers.append({
            "name": record.name,
            "heads": record.heads,
            "point_level": list(record.point_level),
            "point_index": _within_level(record.point_level),
            "references": first[["ref_x", "ref_y"]].to_numpy().tolist(),
            "points": base64.b64encode(values.astype("<f4").tobytes()).decode("ascii"),
        })  # fmt: skip
    listed = []
    for q in queries:
        box = predictions.boxes[q].tolist() if predictions.boxes is not None else None
        name = predictions.name_of(q) or f"class {int(predictions.labels[q])}"
        listed.append({"query": int(q), "score": float(predictions.scores[q]), "label": name,
                       "box": box})  # fmt: skip
    return {"queries": listed, "layers": layers}


def attention_page_data(
    records: Sequence[AttentionRecord],
    original_hw: Tuple[int, int],
    scale_to_original: Tuple[float, float],
    model: Dict[str, Any],
    image_name: str,
    decoder: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Everything the page's script reads (``records``: the encoder layers offered, call order;
    the last one is shown first; ``decoder``: :func:`decoder_payload`)."""
    return {
        "image": image_name,
        "model": model,
        "original_hw": [int(v) for v in original_hw],
        "scale_to_original": [float(v) for v in scale_to_original],
        "layers": [encoder_layer_payload(r, scale_to_original) for r in records],
        "decoder": decoder,
        "style": {
            "box": BOX_COLOUR,
            "heads": list(HEAD_COLOURS),
            "markers": list(LEVEL_MARKERS),
            "reference": UNIT_COLOUR,
            "band_colour": BAND_COLOUR,
            "edge": EDGE_COLOUR,
            "band": BAND_MAX,
            "min_alpha": MIN_ALPHA,
            "view_size": VIEW_SIZE,
        },
    }


def _decoder_list(decoder: Optional[Dict[str, Any]]) -> str:
    """The decoder's top queries as buttons, and its layers as a select box ("" without)."""
    if not decoder:
        return ""
    options = "".join(
        f'<option value="{html.escape(layer["name"])}">{html.escape(layer["name"])}</option>'
        for layer in decoder["layers"]
    )
    buttons = "".join(
        f'<li><button type="button" data-query="{q["query"]}">query {q["query"]}: '
        f"{html.escape(q['label'])}, score {q['score']:.2f}</button></li>"
        for q in decoder["queries"]
    )
    return (
        f'<details id="decoder" open><summary>decoder: top {len(decoder["queries"])} queries '
        f"(click one: its points and predicted box)</summary>"
        f'<label>decoder layer <select id="decoder-layer">{options}</select></label>'
        f'<ol id="queries">{buttons}</ol></details>'
    )


def page_script() -> str:
    """The page's JavaScript: the explorers' shared script, then :data:`SCRIPT_FILE`."""
    return script_text(SCRIPT_FILE)


def attention_explorer_page(
    data: Dict[str, Any], image_uri: str, note: Optional[str] = None
) -> str:
    """The whole page: ``data`` (:func:`attention_page_data`) and the image embedded."""
    model = data["model"]
    sha = model.get("checkpoint_sha256") or "none"
    layers = ", ".join(layer["name"] for layer in data["layers"])
    options = "".join(
        f'<option value="{html.escape(layer["name"])}">{html.escape(layer["name"])}</option>'
        for layer in data["layers"]
    )
    height, width = data["original_hw"]
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    warning = f'<p class="warning">{html.escape(note)}</p>' if note else ""
    header = "".join(f"<th>{column.name}</th>" for column in ATTENTION_TABLE)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">
<title>dcn-inspect explore (attention): {html.escape(data["image"])}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>Encoder attention: {html.escape(data["image"])} ({width}x{height} px)</h1>
{warning}
<p class="meta">model <code id="model">{html.escape(str(model.get("name")))}</code>,
checkpoint SHA-256 <code id="sha256">{html.escape(sha)}</code><br>
encoder attention layers: <code id="layers">{html.escape(layers)}</code></p>
<p class="meta">Hover over the image to see the sampling points of the nearest token of the
finest feature level, click to keep it (the address's <code>#token=X,Y&amp;layer=NAME</code>
holds the selection), arrow keys step between tokens. Colour = attention head, marker =
feature level (circle, square, triangle, diamond: finest first), opacity = attention weight
(relative to the token's strongest point); the token's own cell centre is the green square.
Grey band: outside the image (points farther out are pinned to its edge). A decoder query of
the list shows its points in the decoder layer chosen, its reference point (green) and its
predicted box (cyan); the address then holds <code>#query=Q&amp;layer=NAME</code>.</p>
<div class="row">
<canvas id="view"></canvas>
<div>
<p><label>encoder layer <select id="layer">{options}</select></label></p>
<p><span id="what">token</span> <span id="token"></span></p>
{_decoder_list(data.get("decoder"))}
<div id="heads"></div>
<p><button id="copy" type="button">copy points as CSV</button> <span id="copied"></span></p>
<div class="table-box">
<table id="{TABLE_ID}"><caption>the token's points in the chosen layer (original-image
pixels)</caption>
<thead><tr>{header}</tr></thead><tbody></tbody></table>
</div>
</div>
</div>
<img id="image" alt="" hidden src="{image_uri}">
<script type="application/json" id="explore-data">{payload}</script>
<script>
{page_script()}
</script>
</body>
</html>
"""
