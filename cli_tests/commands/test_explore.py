"""``dcn-inspect explore``: the self-contained explorer page, checked in a real browser.

The page computes a unit's sampling tree in JavaScript from the embedded offset fields; headless
Chromium opens it at ``#unit=X,Y`` and the points it lists must be sample-points' CSV for
``at`` = X,Y (same model, layers, levels), for a module-level and an op-level capture. The
formula is also mirrored in Python (:func:`_trace_like_the_page`, line by line the page's
``traceTree``) over the data decoded from the page, for units all over the map, so the
embedded data is checked without a browser too.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd
import pytest
import torch
from deformable_twins import ThreeFunctional, module_twin
from internimage_like import FlashInternImageStage, InternImageStage
from PIL import Image
from typer.testing import CliRunner

from dcn_inspect.analysis.sample_points import trace_sampling_trees
from dcn_inspect.capture.session import probe
from dcn_inspect.commands.explore import explore
from dcn_inspect.commands.sample_points import sample_points
from dcn_inspect.io.images import load_image, to_model_input
from dcn_inspect.models import registry
from dcn_inspect.models.loaded_model import LoadedModel
from dcn_inspect.models.registry import Preprocess
from dcn_inspect.report.explore import CONTENT_SECURITY_POLICY

CHROMIUM = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None
)
needs_browser = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (`apt-get install chromium`, or `make browser`): the explorer "
    "page's browser tests need one",
)

#: The capture kinds checked: dcn-inspect's module, the op called functionally, DCNv3 and DCNv4
#: layers (converted to the standard layout).
KINDS = ["module", "op", "dcnv3", "dcnv4"]
LAYERS = ["a.conv", "b.conv", "c.conv"]
INTERNIMAGE_LAYERS = ["layers.0.dcn", "layers.1.dcn", "top.dcn"]
#: Units to open the page at (original-image pixels), the corner included.
POINTS = [(10.0, 7.0), (40.0, 25.0), (0.0, 0.0)]
TINY_ARCH = "test-tiny-explore"


def _loaded(kind: str) -> LoadedModel:
    """ThreeFunctional: the op called functionally (op-level capture), or its module twin; an
    InternImage-like (DCNv3) or FlashInternImage-like (DCNv4) stage."""
    if kind in ("module", "op"):
        model = ThreeFunctional().eval()
        if kind == "module":
            model = module_twin(model, LAYERS).eval()
    else:
        model = (InternImageStage if kind == "dcnv3" else FlashInternImageStage)().eval()
    return LoadedModel(model, f"three-{kind}", None, {}, Preprocess(resize=0), "user-file")


def _layers(kind: str) -> List[str]:
    """The model's deformable layers in call order."""
    return LAYERS if kind in ("module", "op") else INTERNIMAGE_LAYERS


@pytest.fixture()
def image_path(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    pixels = (rng.random((32, 48, 3)) * 255).astype(np.uint8)
    path = tmp_path / "scene.png"
    Image.fromarray(pixels).save(path)
    return path


def _page_data(page: Path) -> Dict[str, Any]:
    text = page.read_text(encoding="utf-8")
    found = re.search(r'<script type="application/json" id="explore-data">(.*?)</script>', text)
    assert found is not None
    return json.loads(found.group(1))


def _chromium(page: Path, fragment: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``page#fragment`` with its own profile; scripts get time to run. The
    page logs nothing: a request the CSP blocked or a script error would be a CONSOLE line."""
    args = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
            f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--enable-logging=stderr",
            *extra, page.as_uri() + fragment]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ":CONSOLE" not in done.stderr, done.stderr[-2000:]
    return done


def _points_in_dom(dom: str) -> np.ndarray:
    """The ``#points`` table of a dumped DOM as [N, 4] (level, x, y, weight)."""
    table = re.search(r'<table id="points">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert table is not None
    rows = re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S)
    return np.array([[float(html.unescape(v)) for v in re.findall(r"<td>(.*?)</td>", r)]
                     for r in rows])  # fmt: skip


def _assert_makes_no_requests(page: Path) -> None:
    """The CSP meta forbids every request but data: images; nothing in the markup points out."""
    text = page.read_text(encoding="utf-8")
    meta = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', text)
    assert meta is not None and meta.group(1) == CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY
    assert not re.search(r"""(src|href|action|poster)\s*=\s*["']?\s*(https?:|//)""", text, re.I)
    assert not re.search(r"<link\b|@import|url\(|<iframe\b|<object\b|<embed\b", text, re.I)
    assert not re.search(r"\bfetch\(|XMLHttpRequest|WebSocket|EventSource|\bimport\(", text)
    sources = re.findall(r"""\bsrc\s*=\s*["']([^"']*)""", text)
    assert sources and all(s.startswith("data:image/") for s in sources)


@needs_browser
@pytest.mark.parametrize(
    ("kind", "resize"), [(kind, None) for kind in KINDS] + [("module", 20)]
)  # resize 20: the model sees the image at 20x30, the page still speaks original pixels
def test_page_lists_the_points_sample_points_writes_for_that_unit(
    kind: str, resize: Optional[int], image_path: Path, tmp_path: Path
) -> None:
    loaded = _loaded(kind)
    result = explore(
        [image_path], model=loaded, resize=resize, out=tmp_path / "explore", progress=False
    )
    page = result.pages[0].page
    assert page == tmp_path / "explore" / "scene_explore.html"
    assert result.layers == list(reversed(_layers(kind)))
    _assert_makes_no_requests(page)
    at = [f"{x:g},{y:g}" for x, y in POINTS]
    points = sample_points(
        [image_path], model=loaded, at=at, resize=resize, out=tmp_path / "sp", progress=False
    )
    table = pd.read_csv(points.images[0].csv)
    summary = json.loads(result.summary.read_text())
    assert summary["images"][0]["scale_to_original"] == ([1.6, 1.6] if resize else [1.0, 1.0])
    recorded = [(layer["op"], layer["converted_from"]) for layer in summary["layers"]]
    expected_kind = {"module": (None, None), "dcnv3": (None, "DCNv3"), "dcnv4": (None, "DCNv4")}
    if kind == "op":
        assert all(op is not None and converted is None for op, converted in recorded), recorded
    else:
        assert set(recorded) == {expected_kind[kind]}, recorded

    for unit, (x, y) in enumerate(POINTS):
        done = _chromium(page, f"#unit={x:g},{y:g}", tmp_path / "profile", "--dump-dom")
        shown = _points_in_dom(done.stdout)
        expected = table[table["unit"] == unit][["level", "x", "y", "weight"]].to_numpy()
        assert shown.shape == expected.shape == (9 + 81 + 729, 4)
        np.testing.assert_array_equal(shown[:, 0], expected[:, 0])
        np.testing.assert_allclose(shown[:, 1:], expected[:, 1:], atol=1e-3, rtol=0)
        unit_x, unit_y = table[table["unit"] == unit][["unit_x", "unit_y"]].iloc[0]
        label = re.search(r'<span id="unit">(.*?)</span>', done.stdout).group(1)
        assert f"({unit_x:g}, {unit_y:g})" in label
        spread = float(re.search(r'<span id="spread">(.*?)</span>', done.stdout).group(1))
        assert spread == pytest.approx(_spread(table[table["unit"] == unit]), abs=0.01)


def _spread(points: pd.DataFrame) -> float:
    """Mask-weighted RMS distance of the deepest level's points from the unit centre."""
    deepest = points[points["level"] == points["level"].max()]
    distance2 = (deepest["x"] - deepest["unit_x"]) ** 2 + (deepest["y"] - deepest["unit_y"]) ** 2
    return float(np.sqrt((deepest["weight"] * distance2).sum() / deepest["weight"].sum()))


@needs_browser
@pytest.mark.parametrize("kind", ["module", "op"])
def test_screenshot_draws_the_image_the_unit_and_its_points(
    kind: str, image_path: Path, tmp_path: Path
) -> None:
    result = explore([image_path], model=_loaded(kind), out=tmp_path / "explore", progress=False)
    shot = tmp_path / "shot.png"
    _chromium(result.pages[0].page, "#unit=24,16&levels=1,3", tmp_path / "profile",
              f"--screenshot={shot}", "--window-size=1200,900", "--hide-scrollbars")  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int64)
    assert pixels.std() > 20  # not blank
    colours = pixels[..., 0] * 65536 + pixels[..., 1] * 256 + pixels[..., 2]
    assert (colours == 0x00E000).sum() > 20  # the green unit marker
    assert (colours == 0xFF1A1A).sum() > 20  # red deepest points
    assert (colours == 0x8C8C8C).sum() > 1000  # the margin band


def _trace_like_the_page(data: Dict[str, Any], row: int, col: int) -> List[np.ndarray]:
    """The page's ``traceTree`` in Python, statement by statement: per level [P, 3] (x, y,
    weight) in original-image pixels."""
    layers = [dict(layer, values=_decoded(layer)) for layer in data["layers"]]
    sx, sy = data["scale_to_original"]
    rows, cols, parent_weights = [float(row)], [float(col)], [1.0]
    levels = []
    for index, layer in enumerate(layers):
        kh, kw = layer["kernel"]
        points = kh * kw
        frame = layer["input_frame"]
        following = layers[index + 1] if index + 1 < len(layers) else None
        found, next_rows, next_cols = [], [], []
        for n, (r, c) in enumerate(zip(rows, cols)):
            v = _read_field(layer, r, c)
            for a in range(kh):
                for b in range(kw):
                    k = a * kw + b
                    y = r * layer["stride"][0] - layer["padding"][0] + a * layer["dilation"][0]
                    y += v[k]
                    x = c * layer["stride"][1] - layer["padding"][1] + b * layer["dilation"][1]
                    x += v[points + k]
                    image_x = frame["offset_x"] + frame["stride_x"] * x
                    image_y = frame["offset_y"] + frame["stride_y"] * y
                    weight = parent_weights[n] * (v[2 * points + k] if layer["modulated"] else 1)
                    found.append((image_x * sx, image_y * sy, weight))
                    if following is not None:
                        out = following["output_frame"]
                        next_cols.append((image_x - out["offset_x"]) / out["stride_x"])
                        next_rows.append((image_y - out["offset_y"]) / out["stride_y"])
        levels.append(np.array(found))
        rows, cols = next_rows, next_cols
        parent_weights = [w for _, _, w in found]
    return levels


def _decoded(layer: Dict[str, Any]) -> np.ndarray:
    values = np.frombuffer(base64.b64decode(layer["field"]), dtype="<f4")
    return values.reshape(layer["channels"], *layer["output_hw"]).astype(np.float64)


def _read_field(layer: Dict[str, Any], row: float, col: float) -> np.ndarray:
    """The page's ``readField``: bilinear, zero unless -1 < row < H and -1 < col < W."""
    height, width = layer["output_hw"]
    out = np.zeros(layer["channels"])
    if not (-1 < row < height and -1 < col < width):
        return out
    top, left = math.floor(row), math.floor(col)
    fy, fx = row - top, col - left
    for dy, dx, weight in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                           (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):  # fmt: skip
        y, x = top + dy, left + dx
        if 0 <= y < height and 0 <= x < width:
            out += layer["values"][:, y, x] * weight
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_the_pages_formula_on_its_data_is_trace_sampling_trees(
    kind: str, image_path: Path, tmp_path: Path
) -> None:
    loaded = _loaded(kind)
    result = explore([image_path], model=loaded, out=tmp_path / "explore", progress=False)
    data = _page_data(result.pages[0].page)
    assert [layer["name"] for layer in data["layers"]] == list(reversed(_layers(kind)))
    image = load_image(image_path)
    model_input = to_model_input(image, loaded.preprocess, None)
    records = probe(loaded.model, model_input.tensor).convs
    followed = [records[name] for name in reversed(_layers(kind))]
    height, width = data["layers"][0]["output_hw"]
    units = [(r, c) for r in range(0, height, 5) for c in range(0, width, 7)]
    units += [(height - 1, width - 1), (0, width - 1)]
    trees = trace_sampling_trees(
        followed, torch.tensor(units), scale_to_original=model_input.scale_to_original
    )
    for u, (row, col) in enumerate(units):
        for level, points in enumerate(_trace_like_the_page(data, row, col)):
            np.testing.assert_allclose(points[:, 0], trees.xs[level][u].numpy(), atol=1e-9)
            np.testing.assert_allclose(points[:, 1], trees.ys[level][u].numpy(), atol=1e-9)
            np.testing.assert_allclose(points[:, 2], trees.weights[level][u].numpy(), atol=1e-9)


def test_bundled_model_page_is_small_and_names_model_checkpoint_and_layers(
    tmp_path: Path,
) -> None:
    from dcn_inspect.io.datasets import bundled_images

    image = Path(bundled_images()[0])
    result = explore([image], out=tmp_path / "explore", progress=False)
    page = result.pages[0]
    assert page.size_bytes == page.page.stat().st_size < 15e6
    text = page.page.read_text(encoding="utf-8")
    summary = json.loads(result.summary.read_text())
    assert summary["command"] == "explore"
    sha = summary["checkpoint_sha256"]
    assert sha and f'<code id="sha256">{sha}</code>' in text
    assert '<code id="model">dcn-sample</code>' in text
    assert all(name in text for name in result.layers) and len(result.layers) == 3
    assert summary["images"][0]["page_bytes"] == page.size_bytes
    assert summary["images"][0]["outputs"] == [page.page.name]
    described = summary["columns"]["<stem>_explore.html#points"]
    assert [c["name"] for c in described] == ["level", "x", "y", "weight"]
    _assert_makes_no_requests(page.page)


def _register_tiny() -> None:
    if TINY_ARCH not in registry.ARCHITECTURES:
        build = registry.register(
            TINY_ARCH, "tiny functional net for the explore tests", preprocess=Preprocess(resize=0)
        )
        build(lambda: ThreeFunctional().eval())


def test_cli_writes_the_page_and_reports_it(image_path: Path, tmp_path: Path) -> None:
    _register_tiny()
    from dcn_inspect.cli import app

    out = tmp_path / "out"
    args = ["explore", str(image_path), "--model", TINY_ARCH, "--levels", "2", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "followed layers (top first): c.conv, b.conv" in result.output
    assert "16x24 units" in result.output and "scene_explore.html" in result.output
    assert len(_page_data(out / "scene_explore.html")["layers"]) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parameters"]["levels"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.jpg"], "missing.jpg"),
        (["{image}", "--levels", "0"], "--levels 0: must be at least 1"),
        (["{image}", "--levels", "2", "--layers", "a.conv"], "--layers and --levels"),
    ],
)
def test_cli_usage_errors_name_the_flag(
    args: List[str], message: str, image_path: Path, tmp_path: Path
) -> None:
    import subprocess as sp
    import sys

    argv = [a.format(image=image_path) for a in args]
    code = (
        "import sys\n"
        f"sys.argv = ['dcn-inspect', 'explore', *{argv!r}, '--out', {str(tmp_path / 'o')!r}]\n"
        "from dcn_inspect.cli import main\nmain()\n"
    )
    done = sp.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert message in done.stderr, done.stderr


#: Appended to a copy of the page (the CSP allows inline scripts): drives the page as a user
#: would (arrow keys, a level toggle, hover, leave, click) and logs the fragment and the unit
#: shown after each step into ``<pre id="log">``. The page script's top-level constants
#: (``canvas``, ``BAND``, ``VIEW_SCALE``) are visible to a later script.
DRIVER = """<script>
const steps = [];
const note = (what) => steps.push([what, location.hash,
  document.getElementById("unit").textContent,
  document.querySelectorAll("#points tbody tr").length]);
function mouseAt(x, y) {
  const box = canvas.getBoundingClientRect();
  return { bubbles: true,
    clientX: box.left + ((x + BAND) * VIEW_SCALE * box.width) / canvas.width,
    clientY: box.top + ((y + BAND) * VIEW_SCALE * box.height) / canvas.height };
}
note("open");
document.dispatchEvent(new KeyboardEvent("keydown", { key: "ArrowRight" }));
note("right");
document.dispatchEvent(new KeyboardEvent("keydown", { key: "ArrowDown" }));
note("down");
document.getElementById("level-2").click();
note("level 2 off");
canvas.dispatchEvent(new MouseEvent("mousemove", mouseAt(40, 25)));
note("hover");
canvas.dispatchEvent(new MouseEvent("mouseleave", {}));
note("leave");
canvas.dispatchEvent(new MouseEvent("click", mouseAt(40, 25)));
note("click");
let copied = null;  // what the copy button puts on the clipboard
Object.defineProperty(navigator, "clipboard", {
  value: { writeText: (text) => { copied = text; return Promise.resolve(); } },
});
document.getElementById("copy").click();
const log = document.createElement("pre");
log.id = "log";
log.textContent = JSON.stringify(steps);
const csv = document.createElement("pre");
csv.id = "csv";
csv.textContent = copied;
document.body.append(log, csv);
</script>
"""


@needs_browser
def test_arrow_keys_toggles_hover_and_click_update_the_unit_and_the_fragment(
    image_path: Path, tmp_path: Path
) -> None:
    from dcn_inspect.analysis.unit_selection import nearest_unit
    from dcn_inspect.core.geometry import FrameMap

    result = explore([image_path], model=_loaded("module"), out=tmp_path / "out", progress=False)
    page = result.pages[0].page
    driven = tmp_path / "driven.html"
    driven.write_text(page.read_text(encoding="utf-8").replace("</body>", DRIVER + "</body>"))
    done = _chromium(driven, "#unit=10,7", tmp_path / "profile", "--dump-dom")
    steps = json.loads(html.unescape(re.search(r'<pre id="log">(.*?)</pre>', done.stdout).group(1)))
    top = json.loads(result.summary.read_text())["layers"][0]["geometry"]
    frame = FrameMap(**top["output_frame"])  # the tiny model's input is the original image
    start = nearest_unit(frame, tuple(top["output_hw"]), 10, 7, "")
    moved = frame.to_image(start.col + 1, start.row + 1)
    hovered = nearest_unit(frame, tuple(top["output_hw"]), 40, 25, "")

    def unit(x: float, y: float) -> str:
        return f"#unit={x:g},{y:g}"

    fragments = [fragment for _, fragment, _, _ in steps]
    assert fragments == [
        "#unit=10,7",  # as opened
        unit(start.x + frame.stride_x, start.y) + "&levels=1,2,3",
        unit(*moved) + "&levels=1,2,3",
        unit(*moved) + "&levels=1,3",
        unit(*moved) + "&levels=1,3",  # hovering shows a unit, keeps the selection
        unit(*moved) + "&levels=1,3",
        unit(hovered.x, hovered.y) + "&levels=1,3",
    ]
    shown = [label.split("  ")[0] for _, _, label, _ in steps]
    assert shown[4] == f"(x, y) = ({hovered.x:g}, {hovered.y:g})"
    assert shown[5] == f"(x, y) = ({moved[0]:g}, {moved[1]:g})"  # back to the kept unit
    assert {rows for _, _, _, rows in steps} == {9 + 81 + 729}  # every level listed, whatever drawn
    text = re.search(r'<pre id="csv">(.*?)</pre>', done.stdout, re.S).group(1)
    copied = pd.read_csv(io.StringIO(html.unescape(text)))
    assert list(copied.columns) == ["level", "x", "y", "weight"]
    np.testing.assert_allclose(copied.to_numpy(), _points_in_dom(done.stdout), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# Offset groups, dense offset maps, categories (issue #25)


class FourGroups(torch.nn.Module):
    """Stride-2 stem, then a DCNv2 and a DCNv1 layer with four offset groups each (random
    offset branches, so every group deforms differently)."""

    def __init__(self) -> None:
        super().__init__()
        from dcn_inspect.ops import DeformConv2dPack, ModulatedDeformConv2dPack

        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dcn1 = ModulatedDeformConv2dPack(8, 8, 3, padding=1, offset_groups=4)
        self.dcn2 = DeformConv2dPack(8, 8, 3, padding=2, dilation=2, offset_groups=4)
        with torch.no_grad():
            for layer in (self.dcn1, self.dcn2):
                layer.conv_offset.weight.normal_(0.0, 0.3)
                layer.conv_offset.bias.normal_(0.0, 0.5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.dcn2(torch.relu(self.dcn1(torch.relu(self.stem(images)))))


def _four_groups() -> LoadedModel:
    return LoadedModel(
        FourGroups().eval(), "four-groups", None, {}, Preprocess(resize=0), "user-file"
    )


def _decoded_png(uri: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :]))).convert("RGB"))


@needs_browser
def test_group_choice_traces_like_sample_points_group(image_path: Path, tmp_path: Path) -> None:
    loaded = _four_groups()
    result = explore([image_path], model=loaded, out=tmp_path / "explore", progress=False)
    page = result.pages[0].page
    data = _page_data(page)
    assert data["groups"] == ["0", "1", "2", "3", "mean"] and data["group_note"] is None
    summary = json.loads(result.summary.read_text())["images"][0]
    assert summary["offset_group_choices"] == data["groups"]
    _assert_makes_no_requests(page)
    x, y = 30.0, 13.0
    for group in ("mean", "2"):
        points = sample_points([image_path], model=loaded, at=[f"{x:g},{y:g}"], group=group,
                               out=tmp_path / f"sp{group}", progress=False)  # fmt: skip
        expected = pd.read_csv(points.images[0].csv)[["level", "x", "y", "weight"]].to_numpy()
        done = _chromium(page, f"#unit={x:g},{y:g}&group={group}", tmp_path / "profile",
                         "--dump-dom")  # fmt: skip
        shown = _points_in_dom(done.stdout)
        assert shown.shape == expected.shape == (9 + 81, 4)
        np.testing.assert_allclose(shown, expected, atol=1e-3, rtol=0)
        selected = re.search(r'<select id="group">.*?</select>', done.stdout, re.S).group(0)
        assert f'<option value="{group}">' in selected
    group0 = _points_in_dom(
        _chromium(page, f"#unit={x:g},{y:g}", tmp_path / "p0", "--dump-dom").stdout
    )
    assert np.abs(group0[:, 1:3] - shown[:, 1:3]).max() > 0.01  # the groups differ


def test_group_fields_over_the_limit_keep_group_0_and_the_mean(image_path: Path) -> None:
    from dcn_inspect.report.explore_layers import group_fields

    loaded = _four_groups()
    model_input = to_model_input(load_image(image_path), loaded.preprocess, None)
    records = list(probe(loaded.model, model_input.tensor).convs.values())
    choices, extra, note = group_fields(records, limit=1000)
    assert choices == ["0", "mean"] and note and "only group 0 and the mean" in note
    assert all(set(fields) == {"mean"} for fields in extra)


def test_offset_maps_are_the_offsets_flow_colours(image_path: Path, tmp_path: Path) -> None:
    from dcn_inspect.analysis.offsets import layer_offset_maps
    from dcn_inspect.report.offsets import flow_colours, flow_scale

    loaded = _four_groups()
    result = explore([image_path], model=loaded, out=tmp_path / "explore", progress=False)
    data = _page_data(result.pages[0].page)
    model_input = to_model_input(load_image(image_path), loaded.preprocess, None)
    records = probe(loaded.model, model_input.tensor).convs
    for layer, shown in zip(data["layers"], data["offset_maps"]):
        assert set(shown["maps"]) == set(data["groups"])
        for group in ("0", "3", "mean"):
            maps = layer_offset_maps(records[layer["name"]], model_input.scale_to_original,
                                     "mean" if group == "mean" else int(group))  # fmt: skip
            expected = flow_colours(maps.mean.dx, maps.mean.dy, flow_scale(maps.mean)) * 255
            pixels = _decoded_png(shown["maps"][group])
            assert pixels.shape == (*layer["output_hw"], 3)
            np.testing.assert_allclose(pixels, expected, atol=0.5 + 1e-9)
        assert shown["extent"] == pytest.approx(list(maps.extent))


@needs_browser
def test_offset_map_is_drawn_under_the_trees(image_path: Path, tmp_path: Path) -> None:
    result = explore([image_path], model=_four_groups(), out=tmp_path / "explore", progress=False)
    shots = []
    for fragment in ("#unit=24,16&levels=1", "#unit=24,16&levels=1&map=2"):
        shot = tmp_path / f"shot{len(shots)}.png"
        _chromium(result.pages[0].page, fragment, tmp_path / "profile", f"--screenshot={shot}",
                  "--window-size=1200,900", "--hide-scrollbars")  # fmt: skip
        shots.append(np.asarray(Image.open(shot).convert("RGB")).astype(np.int64))
    assert np.abs(shots[0] - shots[1]).sum(axis=-1).astype(bool).sum() > 5000


@needs_browser
def test_category_of_a_bundled_images_unit_is_sample_points(tmp_path: Path) -> None:
    from dcn_inspect.analysis.unit_selection import bundled_boxes
    from dcn_inspect.io.datasets import bundled_images
    from dcn_inspect.report.explore_layers import category_text

    image = Path(bundled_images()[0])
    coords = np.asarray(bundled_boxes(image)[0], dtype=np.float64).reshape(-1, 4)
    areas = (coords[:, 2] - coords[:, 0]) * (coords[:, 3] - coords[:, 1])
    box = coords[int(np.argmax(areas))]  # the largest: its centre's unit lies inside it
    x, y = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
    result = explore([image], out=tmp_path / "explore", progress=False)
    points = sample_points([image], at=[f"{x:g},{y:g}"], out=tmp_path / "sp", progress=False)
    category = points.images[0].categories[0]
    assert category is not None and category.name != "background"
    done = _chromium(result.pages[0].page, f"#unit={x:g},{y:g}", tmp_path / "profile", "--dump-dom")
    shown = html.unescape(re.search(r'<span id="category">(.*?)</span>', done.stdout).group(1))
    assert shown == category_text(category)
    assert shown.startswith(f"{category.name}: box {category.box}")
    title = points.images[0].figure  # the panel title's category line is the same text
    assert title.exists()
    summary = json.loads(result.summary.read_text())
    assert summary["images"][0]["boxes"] == "the bundled annotations"
    _assert_makes_no_requests(result.pages[0].page)


def test_cli_boxes_give_every_unit_its_category(image_path: Path, tmp_path: Path) -> None:
    from dcn_inspect.analysis.unit_selection import Unit, unit_category
    from dcn_inspect.cli import app
    from dcn_inspect.core.geometry import FrameMap

    _register_tiny()
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("x1,y1,x2,y2,class\n4,4,40,28,big\n20,10,30,20,cat\n")
    out = tmp_path / "out"
    args = ["explore", str(image_path), "--model", TINY_ARCH, "--boxes", str(boxes),
            "--thresholds", "coco", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = _page_data(out / "scene_explore.html")
    categories = data["categories"]
    assert [b["text"] for b in categories["boxes"]] == [
        "small: box 0 big [4, 4, 40, 28]",  # 36 x 24 px² < 32² (coco)
        "small: box 1 cat [20, 10, 30, 20]",
    ]
    assert -1 in categories["units"] and {0, 1} <= set(categories["units"])
    top = data["layers"][0]
    frame = FrameMap(**top["output_frame"])
    height, width = top["output_hw"]
    coords = np.array([[4, 4, 40, 28], [20, 10, 30, 20]], dtype=np.float64)
    for row in range(height):
        for col in range(width):
            x, y = frame.to_image(col, row)
            category = unit_category(
                Unit(row, col, x, y, ""), (coords, ["big", "cat"]), (32**2, 96**2)
            )
            index = categories["units"][row * width + col]
            assert index == (-1 if category.box is None else category.box)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parameters"]["thresholds"] == [32**2, 96**2]
    assert summary["images"][0]["boxes"].endswith("boxes.csv")
