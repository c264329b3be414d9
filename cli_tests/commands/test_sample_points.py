"""``dcn-inspect sample-points``: outputs, unit selection, layer selection and errors on a tiny
model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import pandas as pd
import pytest
from conftest import raises_cli
from PIL import Image
from typer.testing import CliRunner

from dcn_inspect.analysis.unit_selection import background_unit, grid_units, nearest_unit
from dcn_inspect.capture.session import probe
from dcn_inspect.commands.sample_points import CSV_COLUMNS, sample_points
from dcn_inspect.core.errors import InputError
from dcn_inspect.core.geometry import FrameMap
from dcn_inspect.io.images import to_model_input
from dcn_inspect.models import registry
from dcn_inspect.models.loaded_model import LoadedModel
from dcn_inspect.models.registry import Preprocess

TREE_POINTS = 9 + 81 + 729

# The same tiny network as a user's model file (for --model file.py:build) and in-process.
MODEL_SOURCE = '''
import torch
from torch import nn
from dcn_inspect.ops import DeformConv2dPack, ModulatedDeformConv2dPack


class TinyDeformable(nn.Module):
    """Stride-2 stem, then three deformable 3x3 layers (the last one modulated)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.dcn_a = DeformConv2dPack(4, 4, 3, padding=1)
        self.dcn_b = DeformConv2dPack(4, 4, 3, padding=2, dilation=2)
        self.dcn_c = ModulatedDeformConv2dPack(4, 4, 3, padding=2, dilation=2)
        for layer in (self.dcn_a, self.dcn_b, self.dcn_c):
            nn.init.normal_(layer.conv_offset.weight, std=0.3)

    def forward(self, x):
        return self.dcn_c(torch.relu(self.dcn_b(torch.relu(self.dcn_a(self.stem(x))))))


def build():
    return TinyDeformable().eval()
'''

TINY_ARCH = "test-tiny-sample-points"


def _tiny_namespace() -> Dict[str, Any]:
    namespace: Dict[str, Any] = {}
    exec(compile(MODEL_SOURCE, "tiny_model.py", "exec"), namespace)
    return namespace


def _register_tiny() -> None:
    if TINY_ARCH not in registry.ARCHITECTURES:
        registry.register(
            TINY_ARCH,
            "tiny deformable net for the sample-points tests",
            preprocess=Preprocess(resize=0),
        )(_tiny_namespace()["build"])


def _loaded() -> LoadedModel:
    model = _tiny_namespace()["build"]()
    return LoadedModel(model, "tiny", None, {}, Preprocess(resize=0), "user-file")


@pytest.fixture()
def image_path(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    pixels = (rng.random((32, 48, 3)) * 255).astype(np.uint8)
    path = tmp_path / "scene.png"
    Image.fromarray(pixels).save(path)
    return path


def _read_points(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)  # a plain CSV: no arguments needed


def test_cli_writes_every_output(image_path: Path, tmp_path: Path) -> None:
    _register_tiny()
    from dcn_inspect.cli import app

    out = tmp_path / "out"
    offsets = tmp_path / "offsets.npz"
    args = ["sample-points", str(image_path), "--model", TINY_ARCH, "--at", "3,3", "--at", "24,16",
            "--grid", "8", "--gif", "--save-offsets", str(offsets), "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "dcn_c, dcn_b, dcn_a" in result.output
    table = _read_points(out / "scene_points.csv")
    assert list(table.columns) == CSV_COLUMNS
    units = sorted(set(table["unit"]))
    # 2 --at units + a 2x3 grid (rows 4, 12 and cols 4, 12, 20 of the 16x24 map) = 8 units.
    assert units == list(range(8))
    assert len(table) == 8 * TREE_POINTS
    assert (out / "scene_points.csv").read_text().startswith(",".join(CSV_COLUMNS) + "\n")
    level_counts = table.groupby("level").size().to_dict()
    assert level_counts == {1: 8 * 9, 2: 8 * 81, 3: 8 * 729}
    assert table.loc[table["level"] == 1, "parent"].isna().all()  # empty at level 1
    deep = table[table["level"] == 3]
    assert (deep["parent"] == deep["point"] // 9).all()
    assert set(table["layer"]) == {"dcn_c", "dcn_b", "dcn_a"}
    assert set(table["inside"]) <= {0, 1}
    assert table["weight"].between(0, 1).all() and (table["weight"] < 1).any()  # dcn_c is modulated
    # The unit nearest to (3, 3): map cell centres are at 2j + 0.5 -> cell (1, 1) at (2.5, 2.5).
    first = table[table["unit"] == 0].iloc[0]
    assert (first["unit_x"], first["unit_y"]) == (2.5, 2.5)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"] == "sample-points"
    assert summary["model"]["name"] == TINY_ARCH
    assert "checkpoint_sha256" in summary and "versions" in summary
    assert [layer["name"] for layer in summary["layers"]] == ["dcn_c", "dcn_b", "dcn_a"]
    assert all(layer["geometry"]["method"] == "hooks" for layer in summary["layers"])
    image_summary = summary["images"][0]
    assert [u["source"] for u in image_summary["units"][:2]] == ["--at 3,3", "--at 24,16"]
    assert image_summary["points"] == 8 * TREE_POINTS
    assert summary["parameters"]["grid"] == 8

    with Image.open(out / "scene_sampling.png") as figure:
        assert figure.size[0] > 200
    with Image.open(out / "scene_sampling.gif") as animation:
        assert animation.n_frames == 8
    with np.load(offsets, allow_pickle=False) as npz:
        assert npz["scene/dcn_a/offset"].shape == (1, 18, 16, 24)
        assert npz["scene/dcn_c/mask"].shape == (1, 9, 16, 24)
        assert "scene/dcn_b/mask" not in npz.files
        geometry = json.loads(str(npz["scene/dcn_b/geometry"]))
    assert geometry["dilation"] == [2, 2] and geometry["input_frame"] == {
        "stride_x": 2.0,
        "stride_y": 2.0,
        "offset_x": 0.5,
        "offset_y": 0.5,
    }
    # The layer's own input map size, as summary.json states it; the model input apart.
    traced = {layer["name"]: layer["geometry"] for layer in summary["layers"]}
    assert geometry["input_hw"] == traced["dcn_b"]["input_hw"] == [16, 24]
    assert geometry["output_hw"] == traced["dcn_b"]["output_hw"]
    assert geometry["model_input_hw"] == image_summary["input_hw"] == [32, 48]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_user_model_file_from_the_command_line(image_path: Path, tmp_path: Path) -> None:
    pytest.importorskip(
        "dcn_inspect.models.importers",
        reason="--model file.py:function needs dcn_inspect.models.importers",
    )
    model_file = tmp_path / "tiny_model.py"
    model_file.write_text(MODEL_SOURCE)
    out = tmp_path / "out"
    exe = Path(sys.executable).with_name("dcn-inspect")
    env = {**os.environ, "DCN_INSPECT_OPS": os.environ.get("DCN_INSPECT_OPS", "reference")}
    completed = subprocess.run(
        [str(exe), "sample-points", str(image_path), "--model", f"{model_file}:build",
         "--at", "20,12", "--format", "svg", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    table = _read_points(out / "scene_points.csv")
    assert list(table.columns) == CSV_COLUMNS and len(table) == TREE_POINTS
    assert (out / "scene_sampling.svg").is_file() and (out / "summary.json").is_file()
    failed = subprocess.run(
        [str(exe), "sample-points", str(image_path), "--model", f"{model_file}:build",
         "--layers", "dcn_b,nope", "--out", str(tmp_path / "bad")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert failed.returncode == 1
    assert failed.stderr.strip() == (
        "dcn-inspect: error: --layers: unknown deformable layer(s) nope; valid: dcn_a, dcn_b, dcn_c"
    )
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_help_shows_an_example() -> None:
    from dcn_inspect.cli import app

    result = CliRunner().invoke(app, ["sample-points", "--help"])
    assert result.exit_code == 0
    assert "Example: dcn-inspect sample-points" in result.output


def test_same_inputs_same_csv_bytes(image_path: Path, tmp_path: Path) -> None:
    loaded = _loaded()
    first = sample_points(
        [image_path], model=loaded, at=["10,7"], out=tmp_path / "a", progress=False
    )
    second = sample_points(
        [image_path],
        model=loaded,
        at=["10,7"],
        out=tmp_path / "b",
        progress=False,
        fmt="pdf",
        color_by_level=True,
    )
    assert first.images[0].csv.read_bytes() == second.images[0].csv.read_bytes()
    assert first.layers == ["dcn_c", "dcn_b", "dcn_a"]
    assert second.images[0].figure.name == "scene_sampling.pdf"
    assert second.images[0].figure.read_bytes().startswith(b"%PDF")


def _brute_force_tracer() -> Callable[..., Any]:
    """The plain-recursion tracer of ``cli_tests/analysis/test_sampling_trees.py`` (scalar
    bilinear reads of PAPER.md §1 with the op's border rule, the layers' own geometry)."""
    path = Path(__file__).resolve().parents[1] / "analysis" / "test_sampling_trees.py"
    spec = importlib.util.spec_from_file_location("_sampling_trees_oracle", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module._brute_force


def test_csv_rows_match_a_brute_force_tracer(image_path: Path, tmp_path: Path) -> None:
    loaded = _loaded()
    result = sample_points(
        [image_path], model=loaded, at=["3,3", "40,30"], group="mean", out=tmp_path, progress=False
    )
    table = _read_points(result.images[0].csv)
    # The oracle's own forward: the same image and model, records top (last called) first.
    model_input = to_model_input(
        np.asarray(Image.open(image_path).convert("RGB")), loaded.preprocess
    )
    convs = probe(loaded.model, model_input.tensor).convs
    records = [convs[name] for name in ("dcn_c", "dcn_b", "dcn_a")]
    brute_force = _brute_force_tracer()
    # Stride-2 stem: unit (row, col) sits at image (2 col + 0.5, 2 row + 0.5); the nearest units
    # to (3, 3) and (40, 30) are (1, 1) and (15, 20).
    for unit, cell in enumerate([(1, 1), (15, 20)]):
        expected = brute_force(records, cell, "mean", False)
        for level in (1, 2, 3):
            rows = table[(table["unit"] == unit) & (table["level"] == level)]
            want = np.array([p[:3] for p in expected[level - 1]])
            assert len(rows) == len(want) == 9**level
            np.testing.assert_allclose(rows["x"].to_numpy(), want[:, 0], rtol=0, atol=1e-4)
            np.testing.assert_allclose(rows["y"].to_numpy(), want[:, 1], rtol=0, atol=1e-4)
            np.testing.assert_allclose(rows["weight"].to_numpy(), want[:, 2], rtol=1e-5, atol=1e-6)
            assert rows["inside"].tolist() == [int(p[3]) for p in expected[level - 1]]
    # The corner unit's level-1 samples (dilation 2 around cell (1, 1)) fall outside the map.
    corner = table[(table["unit"] == 0) & (table["level"] == 1)]
    assert 0 < corner["inside"].sum() < 9


def test_resize_maps_at_to_the_nearest_unit_in_original_pixels(
    image_path: Path, tmp_path: Path
) -> None:
    # --resize 16: model input 16x24 (scale 2), map 8x12 with cells at 4j + 1 original pixels.
    result = sample_points(
        [image_path],
        model=_loaded(),
        at=["30,13"],
        resize=16,
        levels=1,
        out=tmp_path,
        progress=False,
    )
    unit = result.images[0].units[0]
    assert (unit.row, unit.col) == (3, 7)
    assert (unit.x, unit.y) == (29.0, 13.0)
    table = result.images[0].table
    assert len(table) == 9 and set(table["layer"]) == {"dcn_c"}
    assert result.images[0].trees.unit_xy[0].tolist() == [29.0, 13.0]
    assert (table["unit_x"] == 29.0).all() and (table["unit_y"] == 13.0).all()


def test_layer_and_level_selection(image_path: Path, tmp_path: Path) -> None:
    loaded = _loaded()
    two = sample_points(
        [image_path], model=loaded, layers=["dcn_a", "dcn_c"], out=tmp_path / "a", progress=False
    )
    assert two.layers == ["dcn_c", "dcn_a"]
    assert len(two.images[0].table) == 9 + 81
    one = sample_points([image_path], model=loaded, levels=2, out=tmp_path / "b", progress=False)
    assert one.layers == ["dcn_c", "dcn_b"]
    with raises_cli(
        r"--layers: unknown deformable layer\(s\) conv9; valid: dcn_a, dcn_b, dcn_c",
        "sample-points",
    ):
        sample_points(
            [image_path], model=loaded, layers=["conv9"], out=tmp_path / "c", progress=False
        )
    with raises_cli("--levels 4: the model has 3 deformable conv layer", "sample-points"):
        sample_points([image_path], model=loaded, levels=4, out=tmp_path / "d", progress=False)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").glob("*.csv"))


def test_input_errors_are_one_line(image_path: Path, tmp_path: Path) -> None:
    loaded = _loaded()
    cases = [
        (dict(at=["60,5"]), "--at 60,5: outside scene.png"),
        (dict(at=["5"]), "--at '5': expected X,Y"),
        (dict(grid=0), "--grid 0"),
        (dict(group="x"), "--group 'x'"),
        (dict(fmt="jpg"), "--format 'jpg'"),
        (dict(boxes=tmp_path / "missing.csv"), "--boxes .*missing.csv: file not found"),
        (dict(save_offsets=tmp_path / "offsets.bin"), "--save-offsets .*must end in .npz"),
    ]
    for kwargs, message in cases:
        with raises_cli(message, "sample-points"):
            try:
                sample_points(
                    [image_path], model=loaded, out=tmp_path / "out", progress=False, **kwargs
                )  # type: ignore[arg-type]
            except InputError as exc:
                assert "\n" not in str(exc)
                raise


def test_boxes_give_background_then_boxes_by_area(image_path: Path, tmp_path: Path) -> None:
    boxes_csv = tmp_path / "boxes.csv"
    boxes_csv.write_text("x1,y1,x2,y2,class\n4,4,44,28,big\n30,18,38,26,small\n")
    result = sample_points(
        [image_path], model=_loaded(), boxes=boxes_csv, out=tmp_path / "out", progress=False
    )
    units = result.images[0].units
    assert [u.source for u in units] == [
        "background",
        "box 1 small (8x8 px)",
        "box 0 big (40x24 px)",
    ]
    # Box centres (34, 22) and (24, 16) -> nearest cells of the x = 2j + 0.5 frame.
    assert [(u.row, u.col) for u in units[1:]] == [(11, 17), (8, 12)]
    assert len(result.images[0].table) == 3 * TREE_POINTS

    coco = _coco_for(tmp_path, "scene.png", [30, 18, 8, 8])
    from_coco = sample_points(
        [image_path], model=_loaded(), boxes=coco, out=tmp_path / "coco", progress=False
    )
    assert [(u.row, u.col) for u in from_coco.images[0].units][1:] == [(11, 17)]


def _square_on_image(
    frame: FrameMap, map_w: int, image_hw: tuple, reach: float
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A stand-in tree: the square of half-side ``reach`` around the unit's centre, uniformly
    filled; its fraction on the image by hand (the overlap on each axis, multiplied)."""

    def fraction(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        xs, ys = frame.to_image(cols.astype(float), rows.astype(float))
        on_x = np.clip(np.minimum(xs + reach, image_hw[1]) - np.maximum(xs - reach, 0), 0, None)
        on_y = np.clip(np.minimum(ys + reach, image_hw[0]) - np.maximum(ys - reach, 0), 0, None)
        return on_x * on_y / (2 * reach) ** 2

    return fraction


def test_background_unit_has_the_most_tree_on_the_image_then_is_farthest_from_every_box() -> None:
    frame = FrameMap(1.0, 1.0, 0.5, 0.5)  # map cell (r, c) centred on image pixel (c + .5, r + .5)
    # 10x20 image, box on the left 8 columns, trees of half-side 3: whole trees for centres
    # 3 <= x <= 17, 3 <= y <= 7; x = 16.5 is the farthest from the box (8.5 px); rows 3..6 tie,
    # the most central rows 4 and 5 (0.5 px from the middle, 5) tie again: the first, row 4.
    unit = background_unit(
        frame, (10, 20), np.array([[0.0, 0.0, 8.0, 10.0]]), _square_on_image(frame, 20, (10, 20), 3)
    )
    assert (unit.row, unit.col, unit.source, unit.tree_on_image) == (4, 16, "background", 1.0)
    # Scene_04's case: 20x20 image, background only in the top strip y < 4, trees of half-side 6.
    # No background tree is 95 % on the image: the most is (3.5 + 6) / 12 on the row y = 3.5
    # for 6 <= x <= 14; all 0.5 px from the box, so the most central, x = 9.5 (before 10.5).
    # The corner unit (0.5, 0.5) would have (6.5 / 12)^2 = 29 % of its tree on the image.
    tree = _square_on_image(frame, 20, (20, 20), 6)
    unit = background_unit(frame, (20, 20), np.array([[0.0, 4.0, 20.0, 20.0]]), tree)
    assert (unit.x, unit.y) == (9.5, 3.5)
    assert unit.tree_on_image == pytest.approx(9.5 / 12)
    assert unit.as_dict()["tree_on_image"] == pytest.approx(9.5 / 12)
    assert "no background unit has 95% of its sampling tree on the image" in unit.detail
    # Every unit lies in a box: the most central of those with their whole tree on the image.
    unit = background_unit(
        frame,
        (10, 10),
        np.array([[0.0, 0.0, 10.0, 10.0]]),
        _square_on_image(frame, 10, (10, 10), 3),
    )
    assert (unit.x, unit.y, unit.tree_on_image) == (4.5, 4.5, 1.0)


def _on_image_fraction(deepest: pd.DataFrame, width: float, height: float) -> pd.Series:
    on = deepest["x"].between(0, width) & deepest["y"].between(0, height)
    return on.groupby(deepest["unit"]).mean()


def test_background_unit_has_the_most_of_its_traced_tree_on_the_image(
    image_path: Path, tmp_path: Path
) -> None:
    # Like scene_04: boxes cover all of the 48x32 image but its top strip y < 6. Every unit's
    # traced tree (--grid 1) rated by brute force from the CSV: the background unit must have
    # 95 % of its deepest points on the image, or the most any background unit has; of those,
    # the farthest from the box (6 - y); summary.json gives its fraction.
    boxes_csv = tmp_path / "boxes.csv"
    boxes_csv.write_text("x1,y1,x2,y2\n0,6,48,32\n")
    chosen = sample_points(
        [image_path], model=_loaded(), boxes=boxes_csv, out=tmp_path / "boxes", progress=False
    )
    every = sample_points(
        [image_path], model=_loaded(), grid=1, out=tmp_path / "every", progress=False
    )
    table = every.images[0].table
    deepest = table[table["level"] == 3]
    fraction = _on_image_fraction(deepest, 48, 32)
    centres = table.groupby("unit")[["unit_x", "unit_y"]].first()
    background = centres[centres["unit_y"] < 6].assign(fraction=fraction)
    eligible = background[background["fraction"] >= min(0.95, background["fraction"].max())]
    farthest = eligible[eligible["unit_y"] == eligible["unit_y"].min()]
    unit = chosen.images[0].units[0]
    assert unit.source == "background"
    match = farthest[(farthest["unit_x"] == unit.x) & (farthest["unit_y"] == unit.y)]
    assert len(match) == 1, (unit, farthest)
    own = chosen.images[0].table
    own_fraction = _on_image_fraction(own[own["level"] == 3], 48, 32)[0]
    assert own_fraction == pytest.approx(float(match["fraction"].iloc[0]))
    corner = background.loc[(background["unit_x"] - 0.5).abs().add(background["unit_y"]).idxmin()]
    assert own_fraction > corner["fraction"]  # not the corner unit
    summary = json.loads(chosen.summary.read_text())
    assert summary["images"][0]["units"][0]["tree_on_image"] == pytest.approx(own_fraction)


def test_at_on_a_bundled_image_takes_the_category_from_its_bundled_annotations(
    image_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dcn_inspect.io.datasets as datasets

    annotations = _coco_for(tmp_path, "scene.png", [4, 4, 40, 24])  # 960 px^2: small ("paper")
    monkeypatch.setattr(datasets, "bundled_images", lambda: [image_path])
    monkeypatch.setattr(datasets, "bundled_images_annotations", lambda: annotations)
    result = sample_points(
        None, model=_loaded(), levels=1, at=["24,16", "46,30"], out=tmp_path / "out", progress=False
    )
    item = result.images[0]
    # The annotations name the units' categories; they add no units of their own.
    assert [u.source for u in item.units] == ["at 24,16", "at 46,30"]
    assert [c.name if c else None for c in item.categories] == ["small", "background"]
    assert item.categories[0].label == "thing"
    assert item.categories[0].coords == (4.0, 4.0, 44.0, 28.0)


def test_save_offsets_creates_its_folder_like_out(image_path: Path, tmp_path: Path) -> None:
    target = tmp_path / "new" / "deeper" / "offsets.npz"
    result = sample_points(
        [image_path], model=_loaded(), levels=1, save_offsets=target, out=tmp_path / "out",
        progress=False,
    )  # fmt: skip
    assert result.offsets == target
    with np.load(target, allow_pickle=False) as npz:
        assert npz["scene/dcn_a/offset"].shape == (1, 18, 16, 24)
    # A file where a folder should be: one line, before anything is written.
    (tmp_path / "file.txt").write_text("x")
    message = r"--save-offsets .*file.txt/offsets.npz: .*file.txt exists and is not a directory"
    with raises_cli(message, "sample-points"):
        sample_points(
            [image_path], model=_loaded(), save_offsets=tmp_path / "file.txt" / "offsets.npz",
            out=tmp_path / "out2", progress=False,
        )  # fmt: skip
    assert not (tmp_path / "out2").exists()


def test_default_unit_is_the_image_centre(image_path: Path, tmp_path: Path) -> None:
    result = sample_points([image_path], model=_loaded(), levels=1, out=tmp_path, progress=False)
    unit = result.images[0].units[0]
    assert unit.source == "image centre"
    assert (unit.x, unit.y) == (24.5, 16.5)


def _coco_for(tmp_path: Path, file_name: str, bbox: list) -> Path:
    coco = tmp_path / f"{file_name}.json"
    coco.write_text(json.dumps({
        "images": [{"id": 1, "file_name": file_name, "width": 48, "height": 32}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": bbox,
                         "area": bbox[2] * bbox[3], "iscrowd": 0}],
    }))  # fmt: skip
    return coco


def test_boxes_file_without_the_image_fails_before_writing(
    image_path: Path, tmp_path: Path
) -> None:
    other = _coco_for(tmp_path, "other.png", [1, 1, 5, 5])
    with raises_cli(
        r"--boxes .*other.png.json: no annotation for image scene.png", "sample-points"
    ):
        sample_points(
            [image_path], model=_loaded(), boxes=other, out=tmp_path / "out", progress=False
        )
    assert not (tmp_path / "out").exists()


def test_bundled_images_default_to_their_annotations(
    image_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dcn_inspect.io.datasets as datasets

    annotations = _coco_for(tmp_path, "scene.png", [4, 4, 40, 24])
    monkeypatch.setattr(datasets, "bundled_images", lambda: [image_path])
    monkeypatch.setattr(datasets, "bundled_images_annotations", lambda: annotations)
    result = sample_points(None, model=_loaded(), levels=1, out=tmp_path / "out", progress=False)
    units = result.images[0].units
    assert [u.source for u in units] == ["background", "box 0 thing (40x24 px)"]
    assert "the bundled annotations" in units[1].detail
    # An image that is not bundled falls back to the image centre.
    other = tmp_path / "copy.png"
    other.write_bytes(image_path.read_bytes())
    plain = sample_points([other], model=_loaded(), levels=1, out=tmp_path / "out2", progress=False)
    assert [u.source for u in plain.images[0].units] == ["image centre"]


def test_nearest_unit_clamps_and_grid_starts_at_half_a_step() -> None:
    frame = FrameMap(16.0, 16.0, 7.5, 7.5)  # stride-16 cells centred at 16j + 7.5
    assert (
        nearest_unit(frame, (4, 6), 40.0, 23.0, "x").row,
        nearest_unit(frame, (4, 6), 40.0, 23.0, "x").col,
    ) == (1, 2)
    corner = nearest_unit(
        frame, (4, 6), 96.0, 64.0, "x"
    )  # bottom-right image corner of a 64x96 image
    assert (corner.row, corner.col, corner.x, corner.y) == (3, 5, 87.5, 55.5)
    assert [(u.row, u.col) for u in grid_units(frame, (4, 6), 3)] == [(1, 1), (1, 4)]
