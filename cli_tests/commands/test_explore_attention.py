"""``dcn-inspect explore --attention``: the encoder-token page, checked in a real browser.

Headless Chromium opens the page at ``#token=X,Y&layer=NAME``; the points it lists must be the
rows ``dcn-inspect attention --queries encoder --at X,Y`` writes for that layer in
``<stem>_attention.csv`` (bundled ``dcn-attn-sample``, at the image's own size and resized).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from dcn_inspect.commands.attention import attention
from dcn_inspect.commands.explore import explore
from dcn_inspect.io.datasets import bundled_images
from dcn_inspect.report.explore import CONTENT_SECURITY_POLICY

CHROMIUM = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None
)
needs_browser = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (`apt-get install chromium`, or `make browser`): the explorer "
    "page's browser tests need one",
)
MODEL = "dcn-attn-sample"
ENCODER = ["encoder.0.self_attn", "encoder.1.self_attn"]
#: Two tokens (original-image pixels), each checked in both encoder layers.
AT = [(100.0, 60.0), (3.0, 250.0)]
COLUMNS = ["layer", "head", "feature_level", "point", "x", "y", "weight"]


def _image(name: str) -> Path:
    return next(Path(p) for p in bundled_images() if Path(p).name == name)


def _chromium(page: Path, fragment: str, profile: Path, *extra: str) -> str:
    """Headless Chromium on ``page#fragment``; no console line (a blocked request, a script
    error) allowed. Returns stdout (the DOM with ``--dump-dom``)."""
    args = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
            f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--enable-logging=stderr",
            *extra, page.as_uri() + fragment]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ":CONSOLE" not in done.stderr, done.stderr[-2000:]
    return done.stdout


def _table_in_dom(dom: str) -> pd.DataFrame:
    table = re.search(r'<table id="points">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert table is not None
    rows = [[html.unescape(v) for v in re.findall(r"<td>(.*?)</td>", r)]
            for r in re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S)]  # fmt: skip
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.astype({c: float for c in COLUMNS[4:]}).astype({c: int for c in COLUMNS[1:4]})


def _assert_makes_no_requests(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    meta = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', text)
    assert meta is not None and meta.group(1) == CONTENT_SECURITY_POLICY
    assert not re.search(r"""(src|href|action|poster)\s*=\s*["']?\s*(https?:|//)""", text, re.I)
    assert not re.search(r"<link\b|@import|url\(|<iframe\b|<object\b|<embed\b", text, re.I)
    assert not re.search(r"\bfetch\(|XMLHttpRequest|WebSocket|EventSource|\bimport\(", text)
    sources = re.findall(r"""\bsrc\s*=\s*["']([^"']*)""", text)
    assert sources and all(s.startswith("data:image/") for s in sources)


@pytest.fixture()
def scene() -> Path:
    return _image("scene_00.jpg")


@needs_browser
@pytest.mark.parametrize("resize", [None, 200])  # 200: the model sees 200x200, pages speak 256
def test_page_lists_the_points_attention_writes_for_that_token(
    resize: Optional[int], scene: Path, tmp_path: Path
) -> None:
    result = explore(
        [scene], attention=True, resize=resize, out=tmp_path / "explore", progress=False
    )
    page = result.pages[0]
    assert result.layers == ENCODER and page.kind == "attention"
    assert page.top_map_hw == ([32, 32] if resize is None else [25, 25])
    _assert_makes_no_requests(page.page)
    at = [f"{x:g},{y:g}" for x, y in AT]
    written = attention([scene], queries="encoder", at=at, levels=1, resize=resize,
                        out=tmp_path / "attention", progress=False)  # fmt: skip
    table = pd.read_csv(written.images[0].csv)
    centres = {q["query"]: q["token_centre"] for q in
               json.loads(written.summary.read_text())["images"][0]["queries"]["list"]}  # fmt: skip
    for query, (x, y) in zip(written.images[0].queries, AT):
        for layer in ENCODER:
            dom = _chromium(page.page, f"#token={x:g},{y:g}&layer={layer}", tmp_path / "p",
                            "--dump-dom")  # fmt: skip
            shown = _table_in_dom(dom)
            expected = table[(table["query"] == query) & (table["layer"] == layer)]
            assert len(shown) == len(expected) == 4 * 3 * 4
            for column in COLUMNS[:4]:
                assert shown[column].tolist() == expected[column].tolist(), column
            np.testing.assert_allclose(shown[["x", "y"]], expected[["x", "y"]], atol=1e-3, rtol=0)
            np.testing.assert_allclose(shown["weight"], expected["weight"], atol=1e-5, rtol=0)
            label = re.search(r'<span id="token">(.*?)</span>', dom).group(1)
            cx, cy = centres[query]
            assert f"(x, y) = ({cx:g}, {cy:g})" in label and f"(query {query})" in label


@needs_browser
def test_default_layer_is_the_last_and_the_screenshot_draws_points(
    scene: Path, tmp_path: Path
) -> None:
    result = explore([scene], attention=True, out=tmp_path / "explore", progress=False)
    page = result.pages[0].page
    dom = _chromium(page, "#token=128,128", tmp_path / "p", "--dump-dom")
    assert set(_table_in_dom(dom)["layer"]) == {ENCODER[-1]}
    shot = tmp_path / "shot.png"
    _chromium(page, "#token=128,128", tmp_path / "p", f"--screenshot={shot}",
              "--window-size=1200,900", "--hide-scrollbars")  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int64)
    assert pixels.std() > 20  # not blank
    colours = pixels[..., 0] * 65536 + pixels[..., 1] * 256 + pixels[..., 2]
    assert (colours == 0x00E000).sum() > 20  # the green token marker
    assert (colours == 0x8C8C8C).sum() > 1000  # the margin band


#: Appended to a copy of the page: arrow keys, the layer select, a decoder query, an arrow key;
#: logs each fragment (and the layer the table lists).
DRIVER = """<script>
const steps = [location.hash];
document.dispatchEvent(new KeyboardEvent("keydown", { key: "ArrowRight" }));
steps.push(location.hash);
document.dispatchEvent(new KeyboardEvent("keydown", { key: "ArrowDown" }));
steps.push(location.hash);
select.value = "encoder.0.self_attn";
select.dispatchEvent(new Event("change"));
steps.push(location.hash, document.querySelector("#points tbody td").textContent);
document.querySelector("#queries button").click();
steps.push(location.hash, document.querySelector("#points tbody td").textContent);
document.dispatchEvent(new KeyboardEvent("keydown", { key: "ArrowLeft" }));
steps.push(location.hash);
const log = document.createElement("pre");
log.id = "log";
log.textContent = JSON.stringify(steps);
document.body.append(log);
</script>
"""


@needs_browser
def test_arrow_keys_layer_select_and_query_list_update_the_fragment(
    scene: Path, tmp_path: Path
) -> None:
    result = explore([scene], attention=True, out=tmp_path / "explore", progress=False)
    page = result.pages[0].page
    driven = tmp_path / "driven.html"
    driven.write_text(page.read_text(encoding="utf-8").replace("</body>", DRIVER + "</body>"))
    dom = _chromium(driven, "#token=100,60", tmp_path / "p", "--dump-dom")
    steps = json.loads(html.unescape(re.search(r'<pre id="log">(.*?)</pre>', dom).group(1)))
    first = json.loads(result.summary.read_text())["images"][0]["decoder_queries"][0]
    # scene_00 at 256 px: the finest level is 32x32, stride 8; (100, 60) -> row 7, col 12
    assert steps == [
        "#token=100,60",
        "#token=104.5,56.5&layer=encoder.1.self_attn",
        "#token=104.5,64.5&layer=encoder.1.self_attn",
        "#token=104.5,64.5&layer=encoder.0.self_attn",
        "encoder.0.self_attn",
        f"#query={first}&layer=decoder.2.cross_attn",  # the top query, in the last layer
        "decoder.2.cross_attn",
        "#token=96.5,64.5&layer=encoder.0.self_attn",  # back to the kept token, one step left
    ]


def test_largest_bundled_page_stays_small(tmp_path: Path) -> None:
    result = explore(
        [_image("photo_astronaut.jpg")], attention=True, out=tmp_path / "o", progress=False
    )
    page = result.pages[0]
    assert page.top_map_hw == [64, 64]
    assert page.size_bytes == page.page.stat().st_size < 15e6
    summary = json.loads(result.summary.read_text())
    assert summary["parameters"]["attention"] is True
    assert summary["images"][0]["kind"] == "attention"
    assert summary["images"][0]["page_bytes"] == page.size_bytes
    described = summary["columns"]["<stem>_explore.html#points"]
    assert [c["name"] for c in described] == COLUMNS
    _assert_makes_no_requests(page.page)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--attention"], ["encoder attention layers: encoder.0.self_attn, encoder.1.self_attn",
                           "32x32 tokens"]),
        (["--attention", "--layers", "encoder.0.self_attn"], ["layers: encoder.0.self_attn\n"]),
    ],
)  # fmt: skip
def test_cli_attention_option(args: List[str], expected: List[str], tmp_path: Path) -> None:
    from dcn_inspect.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["explore", str(_image("scene_00.jpg")), *args, "--out",
                                      str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert all(text in result.output for text in expected), result.output
    assert (out / "scene_00_explore.html").exists()


def test_attention_errors_name_the_parameter(tmp_path: Path) -> None:
    from dcn_inspect.core.errors import InputError

    cases: List[Tuple[dict, str]] = [
        ({"levels": 2}, "follows deformable conv layers"),
        ({"layers": ["decoder.0.cross_attn"]}, "not an encoder attention layer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            explore([_image("scene_00.jpg")], attention=True, out=tmp_path / "o",
                    progress=False, **kwargs)  # fmt: skip


def test_a_model_with_attention_only_gets_the_token_page_with_the_csv_values(
    tmp_path: Path,
) -> None:
    """No deformable conv: the page explores encoder tokens without being asked; its embedded
    points (decoded here, no browser) are the attention CSV's for every token asked."""
    import base64

    import torch
    from msda_standins import TinyDeformableDETR

    from dcn_inspect.models.loaded_model import LoadedModel
    from dcn_inspect.models.registry import Preprocess

    model = TinyDeformableDETR("official-function", seed=3).eval()
    with torch.no_grad():  # offsets and weights that differ per query and point
        for name, p in model.named_parameters():
            if "sampling_offsets" in name or "attention_weights" in name:
                p.add_(torch.randn_like(p) * 0.5)
    loaded = LoadedModel(model, "tiny-detr", None, {}, Preprocess(resize=0), "user-file")
    path = tmp_path / "scene.png"
    Image.fromarray((np.random.default_rng(0).random((66, 98, 3)) * 255).astype(np.uint8)).save(
        path
    )
    result = explore([path], model=loaded, out=tmp_path / "explore", progress=False)
    assert result.pages[0].kind == "attention" and result.pages[0].top_map_hw == [16, 24]
    text = result.pages[0].page.read_text(encoding="utf-8")
    data = json.loads(re.search(r'id="explore-data">(.*?)</script>', text).group(1))
    at = ["10,7", "90,60", "0,0"]
    written = attention([path], model=loaded, queries="encoder", at=at, levels=1,
                        out=tmp_path / "attention", progress=False)  # fmt: skip
    table = pd.read_csv(written.images[0].csv)
    assert [layer["name"] for layer in data["layers"]] == list(dict.fromkeys(table["layer"]))
    for layer in data["layers"]:
        values = np.frombuffer(base64.b64decode(layer["points"]), dtype="<f4").reshape(
            layer["shape"][0] * layer["shape"][1], -1, 3
        )
        for query in written.images[0].queries:
            expected = table[(table["query"] == query) & (table["layer"] == layer["name"])]
            shown = values[query - layer["token_start"]]
            np.testing.assert_allclose(shown[:, :2], expected[["x", "y"]], atol=1e-3, rtol=0)
            np.testing.assert_allclose(shown[:, 2], expected["weight"], atol=1e-5, rtol=0)


@needs_browser
def test_decoder_queries_list_their_points_as_attention_writes_them(
    scene: Path, tmp_path: Path
) -> None:
    result = explore([scene], attention=True, out=tmp_path / "explore", progress=False)
    page = result.pages[0].page
    listed = json.loads(result.summary.read_text())["images"][0]["decoder_queries"]
    written = attention([scene], queries="decoder", top=2, out=tmp_path / "a", progress=False)
    assert listed[:2] == written.images[0].queries and len(listed) == 10
    table = pd.read_csv(written.images[0].csv)
    for query, layer in zip(listed[:2], ["decoder.0.cross_attn", "decoder.2.cross_attn"]):
        dom = _chromium(page, f"#query={query}&layer={layer}", tmp_path / "p", "--dump-dom")
        shown = _table_in_dom(dom)
        expected = table[(table["query"] == query) & (table["layer"] == layer)]
        assert len(shown) == len(expected) == 4 * 3 * 4
        for column in COLUMNS[:4]:
            assert shown[column].tolist() == expected[column].tolist(), column
        np.testing.assert_allclose(shown[["x", "y"]], expected[["x", "y"]], atol=1e-3, rtol=0)
        np.testing.assert_allclose(shown["weight"], expected["weight"], atol=1e-5, rtol=0)
        label = re.search(r'<span id="token">(.*?)</span>', dom).group(1)
        assert label.startswith(f"{query}: {expected['class_name'].iloc[0]}, score")
