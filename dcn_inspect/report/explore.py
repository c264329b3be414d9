"""The explorer page of ``dcn-inspect explore``: one self-contained HTML file per image.

The page embeds the image (a ``data:`` URI) and, for every followed deformable layer (top
first), its offset (and DCNv2 mask) field as :func:`~dcn_inspect.analysis.sample_points.layer_field`
gives it — float32 ``[C, H, W]``, C = K dy's, K dx's (, K masks), base64 — with the layer's
kernel arithmetic and frames (:meth:`~dcn_inspect.core.geometry.LayerGeometry.as_dict`). Its
script (``explore_page.js``, beside this module) computes a unit's sampling tree with the rule
of :func:`~dcn_inspect.analysis.sample_points.trace_sampling_trees` (one commented function,
``traceTree``), so every unit of the top layer can be explored from data that grows with the
maps, not with their trees.
With several offset groups it embeds every group's field and their mean, per layer the flow
image of its mean offset, and with boxes each unit's category
(:mod:`dcn_inspect.report.explore_layers`).

Nothing is fetched: no external script, style, font or image, and a Content-Security-Policy
(:data:`CONTENT_SECURITY_POLICY`) forbids any request but ``data:`` images, so the page works
from disk, offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
from importlib import resources
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from dcn_inspect.analysis.sample_points import POINTS_CSV, GroupChoice, layer_field
from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.report.explore_layers import group_fields, offset_map_payload
from dcn_inspect.report.sample_points import (
    BAND_COLOUR,
    BAND_MAX,
    EDGE_COLOUR,
    LEVEL_COLOURS,
    MIN_ALPHA,
    POINT_COLOUR,
    UNIT_COLOUR,
)

#: The page may load nothing but ``data:`` images, its own inline style and its own inline script.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
)
#: Longer side of the view (image and margin band) in CSS pixels.
VIEW_SIZE = 720
#: JPEG quality of an embedded JPEG image (JPEG sources stay JPEG; others become PNG).
JPEG_QUALITY = 92
#: The page's script, a data file of this package.
SCRIPT_FILE = "explore_page.js"
#: What both explorer pages' scripts share (format, canvas position, copy as CSV).
COMMON_SCRIPT_FILE = "explore_common.js"
#: The columns of the page's points table (``#points``, and the CSV its button copies): those of
#: sample-points' ``<stem>_points.csv``, with the same values for the same unit.
TABLE_ID = "points"
POINTS_TABLE = tuple(c for c in POINTS_CSV if c.name in ("level", "x", "y", "weight"))

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; margin: 0 0 4px; }
.meta { color: #555; margin: 0 0 8px; }
.meta code { font-size: 12px; }
.warning { color: #b00; font-weight: bold; }
.row { display: flex; gap: 16px; align-items: flex-start; flex-wrap: wrap; }
canvas { border: 1px solid #999; cursor: crosshair; }
#levels label { display: block; }
.swatch { display: inline-block; width: 10px; height: 10px; border: 1px solid #000;
  margin: 0 4px; }
.side { max-width: 400px; }
.table-box { max-height: 720px; overflow-y: auto; }
table { border-collapse: collapse; font: 12px monospace; }
th, td { padding: 1px 8px; text-align: right; border-bottom: 1px solid #eee; }
th { position: sticky; top: 0; background: #fff; }
"""


def field_payload(record: DeformConvRecord, group: GroupChoice = 0) -> Dict[str, Any]:
    """One followed layer as the page reads it: name, kernel arithmetic, map sizes, frames
    (model-input pixels), whether it has a mask, and its field (base64 float32 [C, H, W])."""
    values = layer_field(record, 0, group).detach().cpu().numpy()
    geometry = record.geometry.as_dict()
    return {
        "name": record.name,
        **{key: geometry[key] for key in ("kernel", "stride", "padding", "dilation")},
        "input_hw": geometry["input_hw"],
        "output_hw": geometry["output_hw"],
        "input_frame": geometry["input_frame"],
        "output_frame": geometry["output_frame"],
        "method": geometry["method"],
        "modulated": record.mask is not None,
        "channels": int(values.shape[0]),
        "field": base64.b64encode(values.astype("<f4").tobytes()).decode("ascii"),
    }


def page_data(
    records: Sequence[DeformConvRecord],
    original_hw: Tuple[int, int],
    scale_to_original: Tuple[float, float],
    model: Dict[str, Any],
    image_name: str,
    group: GroupChoice = 0,
    categories: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Everything the page's script reads (``records`` top first; ``model``: the run's model
    summary; ``group``: the offset group shown first; ``categories``:
    :func:`~dcn_inspect.report.explore_layers.category_payload`). With several offset groups
    the fields of every group and of their mean
    (:func:`~dcn_inspect.report.explore_layers.group_fields`), and per layer its flow-coloured
    offset maps."""
    choices, extra, group_note = group_fields(records)
    layers = [field_payload(record, 0) for record in records]  # other groups: group_fields
    for layer, fields in zip(layers, extra):
        layer["group_fields"] = fields
    return {
        "image": image_name,
        "model": model,
        "original_hw": [int(v) for v in original_hw],
        "scale_to_original": [float(v) for v in scale_to_original],
        "group": str(group) if str(group) in choices else "0",
        "groups": choices,  # the offset-group choices embedded (empty: one group)
        "group_note": group_note,
        "layers": layers,
        "offset_maps": offset_map_payload(records, scale_to_original, choices),
        "categories": categories,
        "style": {
            "unit": UNIT_COLOUR,
            "deepest": POINT_COLOUR,
            "levels": list(LEVEL_COLOURS),
            "band_colour": BAND_COLOUR,
            "edge": EDGE_COLOUR,
            "band": BAND_MAX,
            "min_alpha": MIN_ALPHA,
            "view_size": VIEW_SIZE,
        },
    }


def image_data_uri(image: np.ndarray, jpeg: bool) -> str:
    """The RGB uint8 image [H, W, 3] as a ``data:`` URI: JPEG when ``jpeg`` (a JPEG source),
    else PNG (lossless)."""
    buffer = io.BytesIO()
    picture = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    if jpeg:
        picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        picture.save(buffer, format="PNG", optimize=True)
    kind = "jpeg" if jpeg else "png"
    return f"data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def page_script() -> str:
    """The page's JavaScript: :data:`COMMON_SCRIPT_FILE` (what both explorer pages share),
    then :data:`SCRIPT_FILE`."""
    return script_text(SCRIPT_FILE)


def script_text(name: str) -> str:
    """The shared script, then the page script ``name`` (both beside this module)."""
    folder = resources.files("dcn_inspect.report")
    return "\n".join(
        folder.joinpath(file).read_text("utf-8") for file in (COMMON_SCRIPT_FILE, name)
    )


def _controls(data: Dict[str, Any]) -> str:
    """The category line, the offset-group select (several groups) and the offset-map toggle;
    the script fills the selects."""
    parts = []
    if data.get("categories"):
        source = html.escape(data["categories"]["source"])
        parts.append(f'<p>category (boxes: {source}): <span id="category"></span></p>')
    if data["groups"]:
        parts.append('<p><label>offset group: <select id="group"></select></label></p>')
        if data["group_note"]:
            parts.append(
                f'<p class="warning" id="group-note">{html.escape(data["group_note"])}</p>'
            )
    parts.append(
        '<p><label><input type="checkbox" id="offset-map"> offset map</label> '
        '<select id="offset-map-layer"></select><br><small>flow colours of the mean offset '
        "(hue = direction, saturation = magnitude up to its 98th percentile), as "
        "<code>dcn-inspect offsets</code> draws it</small></p>"
    )
    return "\n".join(parts)


def explorer_page(data: Dict[str, Any], image_uri: str, note: Optional[str] = None) -> str:
    """The whole page: ``data`` (:func:`page_data`) and the image embedded; ``note`` (e.g. that
    the weights are random) shown as a warning under the title."""
    model = data["model"]
    sha = model.get("checkpoint_sha256") or "none"
    layers = ", ".join(
        f"{layer['name']} ({'x'.join(map(str, layer['kernel']))}, frames: {layer['method']})"
        for layer in data["layers"]
    )
    height, width = data["original_hw"]
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    warning = f'<p class="warning">{html.escape(note)}</p>' if note else ""
    header = "".join(f"<th>{column.name}</th>" for column in POINTS_TABLE)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">
<title>dcn-inspect explore: {html.escape(data["image"])}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>Sampling trees: {html.escape(data["image"])} ({width}x{height} px)</h1>
{warning}
<p class="meta">model <code id="model">{html.escape(str(model.get("name")))}</code>,
checkpoint SHA-256 <code id="sha256">{html.escape(sha)}</code><br>
layers, top first: <code id="layers">{html.escape(layers)}</code></p>
<p class="meta">Hover over the image to see a unit's sampling tree, click to keep it (the
address's <code>#unit=X,Y&amp;levels=...</code> holds the selection), arrow keys step between
units. Points: deepest level red, opacity = product of the DCNv2 masks along the path (relative
to the strongest point of the level), crosses = outside the map the point samples; the unit is
the green square. Grey band: outside the image (points farther out are pinned to its edge).</p>
<div class="row">
<canvas id="view"></canvas>
<div class="side">
<p>unit <span id="unit"></span><br>spread (mask-weighted RMS distance of the deepest points
from the unit) <span id="spread"></span> px</p>
{_controls(data)}
<fieldset id="levels"><legend>levels drawn</legend></fieldset>
<p><button id="copy" type="button">copy points as CSV</button> <span id="copied"></span></p>
<div class="table-box">
<table id="{TABLE_ID}"><caption>the unit's points, every level (original-image pixels)</caption>
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
