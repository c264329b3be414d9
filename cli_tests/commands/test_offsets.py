"""``dcn-inspect offsets``: dense offset maps, checked on models whose offsets are known in closed
form.

The constant-offset model's offset branch has zero weights and a bias per kernel point: every
unit moves kernel point (a, b) by ``ALPHA * ((a-1), (b-1)) * dilation + SHIFT`` input cells, so
its sampling grid is the regular grid scaled by ``1 + ALPHA`` and translated by ``SHIFT``:
the mean offset is SHIFT everywhere and the effective dilation is ``(1 + ALPHA) * dilation``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
from conftest import raises_cli
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from PIL import Image
from typer.testing import CliRunner

from dcn_inspect.commands import offsets as offsets_module
from dcn_inspect.commands.offsets import offsets
from dcn_inspect.commands.sample_points import sample_points
from dcn_inspect.models.loaded_model import LoadedModel
from dcn_inspect.models.registry import Preprocess

MODEL_SOURCE = '''
import torch
from torch import nn
from dcn_inspect.ops import DeformConv2dPack

ALPHA = 0.5  # kernel points spread (1 + ALPHA) times as far apart
SHIFT = (1.0, -0.75)  # (dy, dx) every kernel point is translated by, input cells


def constant_bias(alpha, shift, dilation=2):
    bias = []
    for a in range(3):
        for b in range(3):
            bias += [alpha * (a - 1) * dilation + shift[0], alpha * (b - 1) * dilation + shift[1]]
    return bias


class ConstantOffsets(nn.Module):
    """Stride-2 stem, then one deformable 3x3 conv (dilation 2) whose offsets are constants."""

    def __init__(self, groups=((ALPHA, SHIFT),)):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.dcn = DeformConv2dPack(4, 4, 3, padding=2, dilation=2, offset_groups=len(groups))
        with torch.no_grad():
            self.dcn.conv_offset.weight.zero_()
            self.dcn.conv_offset.bias.copy_(torch.tensor([v for alpha, shift in groups for v in constant_bias(alpha, shift)]))

    def forward(self, x):
        return self.dcn(self.stem(x))


def build():
    return ConstantOffsets().eval()


def build_two_groups():
    return ConstantOffsets(((ALPHA, SHIFT), (0.0, (-2.0, 0.5)))).eval()
'''  # noqa: E501 - the source is written to a model file as is

ALPHA, SHIFT_Y, SHIFT_X = 0.5, 1.0, -0.75
RESIZE = 32  # the 40x60 image becomes a 32x48 model input: original / model-input scale 1.25
CELL_PX = 2 * 1.25  # one cell of the deformable layer's stride-2 input, in original-image pixels


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    root = tmp_path_factory.mktemp("offsets")
    model_file = root / "constant_offsets.py"
    model_file.write_text(MODEL_SOURCE)
    namespace: Dict[str, Any] = {}
    exec(compile(MODEL_SOURCE, str(model_file), "exec"), namespace)
    image = root / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(
        image
    )
    return {"root": root, "model_file": model_file, "namespace": namespace, "image": image}


def _loaded(ws: Dict[str, Any], builder: str = "build") -> LoadedModel:
    return LoadedModel(
        ws["namespace"][builder](), builder, None, {}, Preprocess(resize=0), "user-file"
    )


def _catch_figures(monkeypatch: pytest.MonkeyPatch) -> List[Figure]:
    caught: List[Figure] = []
    original = offsets_module.write_figure

    def keep(path: Path, figure: Figure, **kwargs: Any) -> None:
        caught.append(figure)
        original(path, figure, **kwargs)

    monkeypatch.setattr(offsets_module, "write_figure", keep)
    return caught


def test_constant_offsets_give_a_uniform_flow_colour_and_the_analytic_dilation(
    workspace: Dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = _catch_figures(monkeypatch)
    result = offsets(
        [workspace["image"]],
        model=_loaded(workspace),
        kernel_point=["0,0"],
        resize=RESIZE,
        out=tmp_path,
        progress=False,
    )
    maps = result.images[0].maps[0]
    assert maps.layer == "dcn" and maps.dilation.shape == (16, 24)
    # Mean offset = the translation, in original-image pixels, at every unit.
    assert np.allclose(maps.mean.dx, SHIFT_X * CELL_PX) and np.allclose(
        maps.mean.dy, SHIFT_Y * CELL_PX
    )
    assert np.allclose(maps.mean.magnitude, math.hypot(SHIFT_X, SHIFT_Y) * CELL_PX)
    # Kernel point (0, 0): -ALPHA * dilation + SHIFT cells in each direction.
    (corner,) = maps.points
    assert np.allclose(corner.dx, (-ALPHA * 2 + SHIFT_X) * CELL_PX) and np.allclose(
        corner.dy, (-ALPHA * 2 + SHIFT_Y) * CELL_PX
    )
    # A grid scaled by 1 + ALPHA: every adjacent pair (1 + ALPHA) * dilation cells apart.
    assert maps.undeformed_dilation == pytest.approx(2 * CELL_PX)
    assert np.allclose(maps.dilation, (1 + ALPHA) * 2 * CELL_PX)
    # Units cover their cells: output frame x = 0.625 + 2.5 j (stem stride 2, pad 1; dcn keeps it),
    # +- 1.25.
    assert maps.extent == pytest.approx((-0.625, 59.375, -0.625, 39.375))

    # The drawn flow image: one colour, hue = direction of (dx, dy) (x right, y down), saturated.
    flow_ax = figures[0].axes[0]
    assert "direction" in flow_ax.get_title()
    flow = np.asarray(flow_ax.get_images()[1].get_array())
    colours = np.unique(flow.reshape(-1, flow.shape[-1]), axis=0)
    assert len(colours) == 1
    hue = (math.atan2(SHIFT_Y, SHIFT_X) % (2 * math.pi)) / (2 * math.pi)
    assert colours[0][:3] == pytest.approx(hsv_to_rgb([hue, 1.0, 1.0]))
    # Same view in every map panel (the image's), colour bars for magnitude and dilation.
    map_axes = [ax for ax in figures[0].axes if ax.get_title() and "flow key" not in ax.get_title()]
    assert {(ax.get_xlim(), ax.get_ylim()) for ax in map_axes} == {((0.0, 60.0), (40.0, 0.0))}
    labels = {ax.get_ylabel() for ax in figures[0].axes}
    assert {"|offset| (image px)", "effective dilation (image px)", "dy (px, down)"} <= labels

    summary = json.loads(result.summary.read_text())
    layer = summary["images"][0]["layers"][0]
    assert layer["effective_dilation_px"]["mean"] == pytest.approx(7.5)
    assert layer["effective_dilation_px"]["undeformed"] == pytest.approx(5.0)
    assert summary["command"] == "offsets" and summary["parameters"]["kernel_point"] == [[0, 0]]


def test_offset_groups_one_or_their_mean(workspace: Dict[str, Any], tmp_path: Path) -> None:
    loaded = _loaded(workspace, "build_two_groups")
    first = (
        offsets(
            [workspace["image"]],
            model=loaded,
            group=1,
            resize=RESIZE,
            out=tmp_path / "g1",
            progress=False,
        )
        .images[0]
        .maps[0]
    )
    assert np.allclose(first.mean.dx, 0.5 * CELL_PX) and np.allclose(
        first.dilation, 2 * CELL_PX
    )  # group 1: translation only
    mean = (
        offsets(
            [workspace["image"]],
            model=loaded,
            group="mean",
            resize=RESIZE,
            out=tmp_path / "gm",
            progress=False,
        )
        .images[0]
        .maps[0]
    )
    assert np.allclose(mean.mean.dy, (SHIFT_Y - 2.0) / 2 * CELL_PX)
    assert np.allclose(
        mean.dilation, ((1 + ALPHA) * 2 + 2) / 2 * CELL_PX
    )  # the mean of the groups' dilations
    with raises_cli(r"--group 2: layer dcn has 2 offset groups", "offsets"):
        offsets([workspace["image"]], model=loaded, group=2, out=tmp_path / "bad", progress=False)


def test_a_1x1_deformable_layer_has_offsets_but_no_dilation(
    workspace: Dict[str, Any], tmp_path: Path
) -> None:
    import torch

    from dcn_inspect.ops import DeformConv2dPack

    layer = DeformConv2dPack(3, 2, 1)
    with torch.no_grad():
        layer.conv_offset.bias.copy_(torch.tensor([0.5, -1.0]))  # dy, dx of the single kernel point
    loaded = LoadedModel(
        torch.nn.Sequential(layer).eval(), "one-by-one", None, {}, Preprocess(resize=0), "user-file"
    )
    result = offsets([workspace["image"]], model=loaded, out=tmp_path, progress=False)
    maps = result.images[0].maps[0]
    assert np.allclose(maps.mean.dx, -1.0) and np.allclose(
        maps.mean.dy, 0.5
    )  # stride-1 input: cells are pixels
    assert np.isnan(maps.dilation).all()
    assert (
        json.loads(result.summary.read_text())["images"][0]["layers"][0]["effective_dilation_px"]
        is None
    )
    assert result.images[0].figure.is_file()


def test_npz_has_the_save_offsets_layout(workspace: Dict[str, Any], tmp_path: Path) -> None:
    loaded = _loaded(workspace)
    result = offsets(
        [workspace["image"]], model=loaded, resize=RESIZE, out=tmp_path / "maps", progress=False
    )
    reference = tmp_path / "traced.npz"
    sample_points(
        [workspace["image"]],
        model=loaded,
        levels=1,
        resize=RESIZE,
        save_offsets=reference,
        out=tmp_path / "sp",
        progress=False,
    )
    with np.load(result.npz) as ours, np.load(reference) as theirs:
        assert (
            sorted(ours.files) == sorted(theirs.files) == ["scene/dcn/geometry", "scene/dcn/offset"]
        )
        for key in ours.files:
            assert np.array_equal(ours[key], theirs[key])


def test_cli_writes_png_npz_and_summary_and_rejects_a_bad_kernel_point(
    workspace: Dict[str, Any], tmp_path: Path
) -> None:
    exe = Path(sys.executable).with_name("dcn-inspect")
    env = {**os.environ, "DCN_INSPECT_OPS": os.environ.get("DCN_INSPECT_OPS", "reference")}
    model = f"{workspace['model_file']}:build"
    out = tmp_path / ("out_" + "long" * 20)  # printed paths longer than the 80 columns of a pipe
    done = subprocess.run(
        [str(exe), "offsets", str(workspace["image"]), "--model", model, "--kernel-point", "1,1",
         "--resize", "32", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"summary: {out / 'summary.json'}" in done.stdout.splitlines()  # one line, not folded
    assert sorted(p.name for p in out.iterdir()) == [
        "offsets.npz",
        "scene_offsets.png",
        "summary.json",
    ]
    with Image.open(out / "scene_offsets.png") as figure:
        assert figure.size[0] > 600
    bad = subprocess.run(
        [str(exe), "offsets", str(workspace["image"]), "--model", model, "--kernel-point", "3,0",
         "--out", str(tmp_path / "bad")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        "dcn-inspect: error: --kernel-point 3,0: layer dcn has a 3x3 kernel "
        "(rows 0..2, columns 0..2)"
    )
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    with raises_cli(r"--kernel-point 'x': expected A,B", "offsets"):
        offsets(
            [workspace["image"]],
            model=_loaded(workspace),
            kernel_point=["x"],
            out=tmp_path / "bad2",
            progress=False,
        )
    assert not (tmp_path / "bad2").exists()


def test_help_shows_an_example() -> None:
    from dcn_inspect.cli import app

    result = CliRunner().invoke(app, ["offsets", "--help"])
    assert result.exit_code == 0
    assert "Example: dcn-inspect offsets" in result.output and "--kernel-point" in result.output


# ------------------------------------------------------------------------------------ issue #21


def _dilation_bar_ticks(undeformed: float, low: float, high: float):
    """(ticks inside the bar, their labels) of the dilation colour bar drawn for a layer whose
    units' effective dilation spans [low, high] around the undeformed value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from dcn_inspect.analysis.offsets import LayerOffsetMaps, OffsetField
    from dcn_inspect.report.offsets import draw_offsets_figure

    dilation = np.linspace(low, high, 12 * 16).reshape(12, 16)
    zero = np.zeros((12, 16))
    maps = LayerOffsetMaps(
        "layer4.2.conv2", (3, 3), (2, 2), 1, 0, (0.0, 64.0, 0.0, 48.0), (2.0, 2.0),
        OffsetField(None, zero + 1.0, zero), dilation=dilation, undeformed_dilation=undeformed,
    )  # fmt: skip
    figure = draw_offsets_figure(np.zeros((48, 64, 3), dtype=np.uint8), [maps])
    FigureCanvasAgg(figure).draw()
    (bar,) = [ax for ax in figure.axes if ax.get_ylabel() == "effective dilation (image px)"]
    bottom, top = sorted(bar.get_ylim())
    shown = [
        (float(tick), label.get_text())
        for tick, label in zip(bar.get_yticks(), bar.get_yticklabels())
        if bottom - 1e-9 <= tick <= top + 1e-9
    ]
    return [t for t, _ in shown], [text for _, text in shown]


@pytest.mark.parametrize(
    "undeformed, low, high", [(7.5, 7.0, 40.0), (16.0, 3.0, 17.0), (5.0, 4.6, 5.3)]
)
def test_dilation_colour_bar_has_ticks_on_both_halves_and_labels_the_undeformed_value(
    undeformed: float, low: float, high: float
) -> None:
    ticks, labels = _dilation_bar_ticks(undeformed, low, high)
    assert any(low - 1e-9 <= t < undeformed for t in ticks), (ticks, labels)  # narrower half
    assert any(undeformed < t <= high + 1e-9 for t in ticks), (ticks, labels)  # wider half
    at_undeformed = [text for t, text in zip(ticks, labels) if t == pytest.approx(undeformed)]
    assert at_undeformed == [f"{undeformed:.3g} undeformed"], (ticks, labels)
    assert len(set(labels)) == len(labels)  # no two ticks read the same


def test_random_weights_are_named_in_the_offsets_figure_title(
    workspace: Dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = _catch_figures(monkeypatch)
    trained = _loaded(workspace)
    untrained = LoadedModel(trained.model, "tiny", "tiny", {}, Preprocess(resize=0), "registered")
    assert untrained.random_weights and not trained.random_weights
    offsets([workspace["image"]], model=trained, out=tmp_path / "a", progress=False)
    result = offsets([workspace["image"]], model=untrained, out=tmp_path / "b", progress=False)
    titles = [figure.get_suptitle() for figure in figures]
    assert titles == [
        "scene.png: offsets in image pixels",
        "scene.png: offsets in image pixels (random weights)",
    ]
    model = json.loads(result.summary.read_text())["model"]
    assert model["random_weights"] is True and "untrained" in model["note"]


@pytest.mark.parametrize(
    "low, high, expected",
    [
        (32.0, 32.0, ["none narrower", "32 undeformed", "none wider"]),
        (32.0, 75.0, ["none narrower", "32 undeformed", "45", "60", "75"]),
    ],
)
def test_a_half_no_unit_falls_in_says_so_on_the_dilation_bar(low, high, expected) -> None:
    ticks, labels = _dilation_bar_ticks(32.0, low, high)
    assert labels == expected and ticks == sorted(ticks)
