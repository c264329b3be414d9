"""``dcn-inspect receptive-field --queries``: the ERF of a query is the brute-force input
gradient of its response, and each point's |dr/dp| is the finite difference of r when that one
sampling location moves.

The model is the tiny random-weight transformers Deformable DETR of ``test_attention`` (nothing
downloaded). The checks are independent of the capture: the ERF is ``sum_c |dr/dX_c| / (255
std_c)`` of a plain forward of a second copy of the model (the bundled 512x512 image enters at
its own size), the finite differences move one location inside transformers' own core module
(wrapped at class level) of a float64 copy; a level's cell is ``stride`` model-input pixels
(strides 8, 16, 32, 64), so ``dr/dx = dr/dloc_x / (stride * W)``.
"""

from __future__ import annotations

import functools
import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import raises_cli
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from test_attention import MODEL_SOURCE, STRIDES  # noqa: E402

from dcn_inspect.commands.receptive_field.query_mode import query_receptive_field  # noqa: E402

DECODER_LAYERS = ["model.decoder.layers.0.encoder_attn", "model.decoder.layers.1.encoder_attn"]
ENCODER_LAYERS = ["model.encoder.layers.0.self_attn", "model.encoder.layers.1.self_attn"]
#: Call order of the attention layers in one forward.
CALLS = ENCODER_LAYERS + DECODER_LAYERS


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny_detr_rf.py"
    path.write_text(MODEL_SOURCE)
    return f"{path}:build"


def _image() -> Path:
    from dcn_inspect.io.datasets import bundled_images

    return Path(bundled_images()[0])


def _loaded(model_file: str, dtype: torch.dtype = torch.float32) -> Tuple[Any, torch.Tensor]:
    """A fresh copy of the model and the image's model input, in ``dtype``."""
    from dcn_inspect.io.images import load_image, to_model_input
    from dcn_inspect.models.loading import load_model

    loaded = load_model(model_file)
    tensor = to_model_input(load_image(_image()), loaded.preprocess).tensor
    return loaded, tensor.to(dtype)


def _decoder_r(output: Any, query: int) -> torch.Tensor:
    logits = output.logits[0, query]
    return logits[int(logits.detach().argmax())]


def _encoder_r(model: Any, token: int) -> Callable[[Any], torch.Tensor]:
    """r of ``token``: the sum of the last encoder attention's output there (read by a hook)."""
    seen: Dict[str, torch.Tensor] = {}
    layer = model.model.encoder.layers[1].self_attn
    layer.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out[0]))
    return lambda output: seen["out"][0, token].sum()


def _brute_force_erf(model: Any, tensor: torch.Tensor, response: Callable) -> np.ndarray:
    x = tensor.clone().requires_grad_(True)
    r = response(model(x))
    (grad,) = torch.autograd.grad(r, [x])
    std = torch.tensor((0.229, 0.224, 0.225), dtype=grad.dtype).view(3, 1, 1)
    return (grad[0] / (255.0 * std)).abs().sum(dim=0).numpy()


def test_erf_of_a_decoder_query_is_the_brute_force_input_gradient(
    model_file: str, tmp_path: Path
) -> None:
    result = query_receptive_field(
        [_image()], model=model_file, query=[3, 7], out=tmp_path, progress=False
    )
    item = result.images[0]
    erf = np.load(item.npz)["erf"]
    loaded, tensor = _loaded(model_file)
    assert tuple(loaded.preprocess.std) == (0.229, 0.224, 0.225)
    for i, query in enumerate([3, 7]):
        expected = _brute_force_erf(loaded.model, tensor, lambda out, q=query: _decoder_r(out, q))
        assert erf[i].shape == expected.shape == (512, 512)
        assert expected.sum() > 0
        np.testing.assert_allclose(erf[i], expected, rtol=1e-3, atol=1e-6 * expected.max())
    summary = json.loads(result.summary.read_text())
    assert "class logit of its top class" in summary["response"]["definition"]
    table = pd.read_csv(item.csv)
    assert set(table["layer"]) == set(DECODER_LAYERS)
    assert "weight_grad_spearman" in table.columns
    rho = summary["correlation"]["mean_spearman"]
    assert -1.0 <= rho <= 1.0


def test_erf_of_an_encoder_token_is_the_brute_force_input_gradient(
    model_file: str, tmp_path: Path
) -> None:
    result = query_receptive_field(
        [_image()], model=model_file, queries="encoder", at=["200,300"], out=tmp_path,
        progress=False,
    )  # fmt: skip
    item = result.images[0]
    (token,) = item.queries
    # the finest level (stride 8, 64 x 64 cells): the cell whose centre 0.5 + 8 j is nearest
    assert token == round((300 - 0.5) / 8) * 64 + round((200 - 0.5) / 8)
    loaded, tensor = _loaded(model_file)
    expected = _brute_force_erf(loaded.model, tensor, _encoder_r(loaded.model, token))
    erf = np.load(item.npz)["erf"][0]
    np.testing.assert_allclose(erf, expected, rtol=1e-3, atol=1e-6 * expected.max())
    summary = json.loads(result.summary.read_text())
    assert summary["response"]["module"] == ENCODER_LAYERS[-1]
    assert set(pd.read_csv(item.csv)["layer"]) == set(ENCODER_LAYERS)


def _moved_response(
    model: Any,
    tensor: torch.Tensor,
    response: Callable,
    call: int,
    index: Tuple[int, ...],
    step: float,
    monkeypatch: pytest.MonkeyPatch,
) -> float:
    """r with the sampling location ``index`` [query, head, level, point, coord] of attention
    call ``call`` moved by ``step`` (normalised units), inside transformers' core module."""
    from transformers.models.deformable_detr import modeling_deformable_detr as detr

    original = detr.MultiScaleDeformableAttention.forward
    signature = inspect.signature(original)
    count = [0]

    @functools.wraps(original)
    def moved(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        if count[0] == call:
            locations = bound.arguments["sampling_locations"].clone()
            locations[(0, *index)] += step
            bound.arguments["sampling_locations"] = locations
        count[0] += 1
        return original(*bound.args, **bound.kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(detr.MultiScaleDeformableAttention, "forward", moved)
        with torch.no_grad():
            return float(response(model(tensor)))


def _shapes(model: Any, tensor: torch.Tensor) -> List[Tuple[int, int]]:
    height, width = tensor.shape[-2:]
    return [(-(-height // s), -(-width // s)) for s in STRIDES]


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_point_gradients_equal_finite_differences(
    model_file: str, tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    options: Dict[str, Any] = {"query": [5]} if kind == "decoder" else {"at": ["260,180"]}
    result = query_receptive_field(
        [_image()], model=model_file, queries=kind, out=tmp_path, progress=False, **options
    )
    item = result.images[0]
    (query,) = item.queries
    table = pd.read_csv(item.csv)
    loaded, tensor = _loaded(model_file, torch.float64)
    model = loaded.model.double()
    response = (lambda out: _decoder_r(out, query)) if kind == "decoder" else None
    if response is None:
        response = _encoder_r(model, query)
    shapes = _shapes(model, tensor)
    checked = 0
    for layer in DECODER_LAYERS if kind == "decoder" else ENCODER_LAYERS:
        rows = table[table["layer"] == layer]
        top = rows.loc[rows["grad_weight"].idxmax()]
        for coord, column in ((0, "grad_x"), (1, "grad_y")):
            level = int(top["feature_level"])
            index = (query, int(top["head"]), level, int(top["point"]), coord)
            step = 1e-6
            up = _moved_response(model, tensor, response, CALLS.index(layer), index, step,
                                 monkeypatch)  # fmt: skip
            down = _moved_response(model, tensor, response, CALLS.index(layer), index, -step,
                                   monkeypatch)  # fmt: skip
            per_location = (up - down) / (2 * step)
            cells = shapes[level][1 - coord]  # W for x, H for y
            expected = per_location / (STRIDES[level] * cells)
            got = float(top[column])
            scale = max(abs(float(top["grad_x"])), abs(float(top["grad_y"])))
            assert abs(got - expected) <= 2e-3 * scale + 1e-7, (layer, column, got, expected)
            checked += 1
    assert checked == 4


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """The real entry point (its one-line error on stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "dcn_inspect", "receptive-field", str(_image()), *argv],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_conv_model_with_queries_gets_one_line_and_nothing_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with raises_cli(r"--model dcn-sample: .*no multi-scale deformable attention.*--queries"):
        query_receptive_field([_image()], model="dcn-sample", out=out, progress=False)
    assert not out.exists() or not any(out.iterdir())
    done = _cli("--queries", "decoder", "--out", str(out))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "dcn-sample" in lines[0] and "--queries" in lines[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--top", "2"], "--top needs --queries"),
        (["--queries", "decoder", "--grid", "3"], "--grid is not read with --queries"),
        (["--queries", "decoder", "--at", "10,10"], "--at: picks encoder tokens"),
        (["--queries", "sideways"], "must be decoder or encoder"),
    ],
)
def test_options_of_the_other_mode_are_refused(
    model_file: str, tmp_path: Path, argv: List[str], pattern: str
) -> None:
    out = tmp_path / "out"
    done = _cli("--model", model_file, *argv, "--out", str(out))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and pattern in lines[0], done.stderr
    assert not out.exists() or not any(out.iterdir())


def test_the_command_line_writes_csv_npz_figure_and_summary(
    model_file: str, tmp_path: Path
) -> None:
    from dcn_inspect.cli import app

    out = tmp_path / "cli"
    done = CliRunner().invoke(
        app,
        ["receptive-field", str(_image()), "--model", model_file, "--queries", "decoder",
         "--top", "2", "--out", str(out)],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    stem = _image().stem
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            f"{stem}_query_erf.npz",
            f"{stem}_query_receptive_field.csv",
            f"{stem}_query_receptive_field.png",
            "summary.json",
        ]
    )
    assert "spearman" in done.output
    summary: Optional[Dict[str, Any]] = json.loads((out / "summary.json").read_text())
    assert summary is not None and len(summary["images"][0]["queries"]["list"]) == 2
