"""``receptive-field`` on every kind of deformable call the capture records: op-level calls (a
user's module computing its own offsets and calling the functional op, twice in one module,
inside ``nn.Sequential``, other libraries' entry points) and DCNv3 / DCNv4 layers (channels-last
and token layouts).

Oracles: each functional model's module-level twin (the path tested against closed forms in
``test_receptive_field.py``); finite differences of the response with respect to ONE sampling
location, moved where the op receives it (a nudge added to the offset right before the op
call, or to the output of a DCNv3/DCNv4 layer's own offset branch); direct autograd of the
layer's own output at the unit's cell; hand-worked theoretical receptive fields.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import pytest
import torch
from deformable_twins import (
    InSequential,
    ThreeFunctional,
    TwiceInOneModule,
    TwiceModuleLevel,
    module_twin,
    sequential_twin,
)
from internimage_like import DCNv3_pytorch, FlashInternImageStage, InternImageStage
from PIL import Image
from torch import nn

from dcn_inspect.analysis.receptive_field import receptive_fields
from dcn_inspect.capture.extent import Extent, grid_reach
from dcn_inspect.capture.gradients import GradientForward
from dcn_inspect.capture.selection import select_layers
from dcn_inspect.ops import deform_conv2d

STD = (0.229, 0.224, 0.225)


def _followed(forward: GradientForward, count: Optional[int] = None) -> list:
    """The deformable records, top (last called) first."""
    return list(reversed(select_layers(forward.deformable_records(), None, count)))


# ---------------------------------------------------------------------------------------------
# Op-level calls: the same receptive fields as the module-level twin

TWINS = {
    "offset and modulator convs": (
        ThreeFunctional,
        lambda m: module_twin(m, ["a.conv", "b.conv", "c.conv"]),
        ["a.conv", "b.conv", "c.conv"],
    ),
    "two op calls in one module": (TwiceInOneModule, TwiceModuleLevel, ["body", "body#2"]),
    "inside nn.Sequential": (InSequential, sequential_twin, ["features.2", "features.4"]),
}


@pytest.mark.parametrize("case", list(TWINS))
def test_op_level_model_has_the_receptive_fields_of_its_module_level_twin(case: str) -> None:
    build, twin_of, names = TWINS[case]
    functional = build().eval()
    twin = twin_of(functional).eval()
    image = torch.rand(1, 3, 36, 40)
    units = torch.tensor([[9, 10], [2, 17], [16, 1]])
    results = {}
    for label, model in (("functional", functional), ("module", twin)):
        forward = GradientForward(model, image)
        records = _followed(forward)
        assert [r.name for r in records] == list(reversed(names))
        assert all((r.op is not None) == (label == "functional") for r in records)
        results[label] = receptive_fields(
            forward, records, units, (36, 40), STD, saliency_step=2, batch_size=2
        )
    got, expected = results["functional"], results["module"]
    assert (
        got.notes == [] and got.point_gradients is not None and expected.point_gradients is not None
    )
    torch.testing.assert_close(got.responses, expected.responses)
    torch.testing.assert_close(got.erf, expected.erf)
    assert float(got.erf.sum()) > 0
    for level in range(len(names)):
        torch.testing.assert_close(
            got.point_gradients.grad_x[level], expected.point_gradients.grad_x[level]
        )
        torch.testing.assert_close(
            got.point_gradients.grad_y[level], expected.point_gradients.grad_y[level]
        )
        assert float(got.point_gradients.weights[level].max()) > 0
    assert got.theoretical is not None
    torch.testing.assert_close(got.theoretical, expected.theoretical)
    assert [r.box for r in got.saliency] == [r.box for r in expected.saliency]


class _TwiceBody(nn.Module):
    """Calls the op twice with offsets and masks from its own branches; ``nudges[k]`` (when set)
    is added to call k's offset right before the call: it moves that call's sampling locations."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(11)
        self.offset_conv = nn.Conv2d(4, 18, 3, padding=1)
        self.mask_conv = nn.Conv2d(4, 9, 3, padding=1)
        with torch.no_grad():
            for conv in (self.offset_conv, self.mask_conv):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.5)
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3, generator=gen) * 0.3)
        self.nudges: List[Optional[torch.Tensor]] = [None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(2):
            offset, mask = self.offset_conv(x), torch.sigmoid(self.mask_conv(x))
            if self.nudges[k] is not None:
                offset = offset + self.nudges[k]
            x = deform_conv2d(x, offset, self.weight, None, 1, 1, 1, mask)
            if k == 0:
                x = torch.tanh(x)
        return x


class _NudgedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = _TwiceBody()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(torch.tanh(self.stem(images)))


def _finite_difference(
    model: nn.Module,
    image: torch.Tensor,
    unit: Tuple[int, int],
    call: int,
    channel: int,
    cell: Tuple[int, int],
    eps: float = 1e-6,
) -> float:
    """d r / d (offset channel ``channel`` of op call ``call`` at ``cell``), r = sum over channels
    of the top call's output at ``unit``."""
    body = model.body
    values = []
    for sign in (1.0, -1.0):
        nudge = torch.zeros(1, 18, image.shape[-2], image.shape[-1], dtype=image.dtype)
        nudge[0, channel, cell[0], cell[1]] = sign * eps
        body.nudges[call] = nudge
        with torch.no_grad():
            values.append(float(model(image)[0, :, unit[0], unit[1]].sum()))
        body.nudges[call] = None
    return (values[0] - values[1]) / (2 * eps)


def test_op_level_offset_gradients_are_the_derivatives_at_the_offsets_each_call_received() -> None:
    """Two calls of the op in one module (records ``body``, ``body#2``): the offset gradient field
    of each call, at single cells, equals the finite difference of moving that call's location
    there."""
    model = _NudgedTwice().eval().double()
    image = torch.rand(1, 3, 12, 14, dtype=torch.float64)
    forward = GradientForward(model, image)
    assert [r.name for r in _followed(forward)] == ["body#2", "body"]
    unit = (6, 7)
    (batch,) = list(
        forward.backward_units("body#2", torch.tensor([unit]), levels=["body#2", "body"])
    )
    for call, name in ((1, "body#2"), (0, "body")):
        field = batch.offset_grads[name][0, 0]  # [K, 2, H, W]
        flat = field.abs().permute(2, 3, 0, 1).reshape(12, 14, 18)
        strongest = torch.topk(flat.flatten(), 3).indices.tolist()
        cells = [(i // (14 * 18), (i // 18) % 14, i % 18) for i in strongest] + [
            (0, 0, 5)
        ]  # three that matter, one far away
        for row, col, channel in cells:
            numeric = _finite_difference(model, image, unit, call, channel, (row, col))
            got = float(field[channel // 2, channel % 2, row, col])
            assert got == pytest.approx(numeric, rel=1e-5, abs=1e-8), (name, row, col, channel)
        assert float(field.abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------
# Other libraries' entry points (stand-ins with their signatures): every call followed


def _library_stand_ins(
    monkeypatch: pytest.MonkeyPatch,
    nudges: Dict[str, Optional[torch.Tensor]],
    no_grad: bool = False,
) -> None:
    """torchvision.ops / mmcv.ops stand-ins computing with dcn-inspect's op; ``nudges[name]`` is
    added to the offset the op uses; ``no_grad``: mmcv's op passes no gradient (an inference-only
    build)."""

    def used(name: str, offset: torch.Tensor) -> torch.Tensor:
        return offset if nudges.get(name) is None else offset + nudges[name]

    def tv_deform_conv2d(
        input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), mask=None
    ):
        return deform_conv2d(
            input, used("tv", offset), weight, bias, stride, padding, dilation, mask
        )

    def mmcv_modulated(
        input,
        offset,
        mask,
        weight,
        bias,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deform_groups=1,
    ):
        if no_grad:
            with torch.no_grad():
                return deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
        return deform_conv2d(
            input, used("mmcv", offset), weight, bias, stride, padding, dilation, mask
        )

    packages = {}
    for name in (
        "torchvision",
        "torchvision.ops",
        "torchvision.ops.deform_conv",
        "mmcv",
        "mmcv.ops",
        "mmcv.ops.modulated_deform_conv",
    ):
        packages[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, packages[name])
    packages["torchvision"].ops = packages["torchvision.ops"]
    packages["mmcv"].ops = packages["mmcv.ops"]
    packages["torchvision.ops.deform_conv"].deform_conv2d = packages[
        "torchvision.ops"
    ].deform_conv2d = tv_deform_conv2d
    packages["mmcv.ops.modulated_deform_conv"].modulated_deform_conv2d = packages[
        "mmcv.ops"
    ].modulated_deform_conv2d = mmcv_modulated


LIBRARY_MODEL = """
import torch
from torch import nn
from torchvision.ops import deform_conv2d
from mmcv.ops import modulated_deform_conv2d


class Research(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.offset_conv = nn.Conv2d(4, 18, 3, padding=1)
        self.modulator_conv = nn.Conv2d(4, 9, 3, padding=1)
        nn.init.normal_(self.offset_conv.weight, std=0.3)
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.3)

    def forward(self, images):
        x = torch.tanh(self.stem(images))
        offset, mask = self.offset_conv(x), torch.sigmoid(self.modulator_conv(x))
        x = torch.tanh(deform_conv2d(x, offset, self.weight, mask=mask, padding=(1, 1)))
        offset, mask = self.offset_conv(x), torch.sigmoid(self.modulator_conv(x))
        return modulated_deform_conv2d(x, offset, mask, self.weight, None, 1, 1, 1, 1, 1)


def build():
    return Research().eval()
"""


def test_library_entry_points_offset_gradients_are_the_derivatives_at_their_offsets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision's signature (mask by keyword) and mmcv's (mask third): each re-run puts the leaf
    offset in the right argument."""
    from dcn_inspect.models.loading import load_model

    nudges: Dict[str, Optional[torch.Tensor]] = {}
    _library_stand_ins(monkeypatch, nudges)
    source = tmp_path / "research.py"
    source.write_text(LIBRARY_MODEL)
    model = load_model(f"{source}:build").model.double()
    image = torch.rand(1, 3, 10, 11, dtype=torch.float64)
    forward = GradientForward(model, image)
    records = _followed(forward)
    assert [(r.name, r.op) for r in records] == [
        ("Research#2", "mmcv.ops.modulated_deform_conv2d"),
        ("Research", "torchvision.ops.deform_conv2d"),
    ]
    unit = (5, 4)
    (batch,) = list(
        forward.backward_units(
            "Research#2", torch.tensor([unit]), levels=["Research#2", "Research"]
        )
    )
    eps = 1e-6
    for key, name, cell, channel in (
        ("mmcv", "Research#2", unit, 7),
        ("tv", "Research", (4, 5), 10),
        ("tv", "Research", (6, 3), 3),
    ):
        values = []
        for sign in (1.0, -1.0):
            nudge = torch.zeros(1, 18, 10, 11, dtype=torch.float64)
            nudge[0, channel, cell[0], cell[1]] = sign * eps
            nudges[key] = nudge
            with torch.no_grad():
                values.append(float(model(image)[0, :, unit[0], unit[1]].sum()))
            nudges[key] = None
        numeric = (values[0] - values[1]) / (2 * eps)
        got = float(batch.offset_grads[name][0, 0, channel // 2, channel % 2, cell[0], cell[1]])
        assert got == pytest.approx(numeric, rel=1e-5, abs=1e-9) and abs(numeric) > 1e-4, (
            name,
            cell,
            channel,
        )


def test_an_op_that_passes_no_gradient_is_one_line_not_a_wrong_picture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import raises_cli

    from dcn_inspect.models.loading import load_model

    _library_stand_ins(monkeypatch, {}, no_grad=True)
    source = tmp_path / "research.py"
    source.write_text(LIBRARY_MODEL)
    model = load_model(f"{source}:build").model
    with raises_cli(
        r"^the model's layer Research#2: its mmcv\.ops\.modulated_deform_conv2d passes no "
        r"gradient back to its input",
        "receptive-field",
    ):
        GradientForward(model, torch.rand(1, 3, 10, 11))


# ---------------------------------------------------------------------------------------------
# DCNv3 / DCNv4: the layer's own output at the cell, the layer's own offsets


def _stage(
    family: str, offset_scale: float = 1.0, stretch=((0.5, -0.25), (0.75, 0.5), (0.25, -0.5))
) -> nn.Module:
    if family == "DCNv3":
        return InternImageStage(stretch=stretch, offset_scale=offset_scale).eval()
    stage = FlashInternImageStage(stretch=stretch).eval()
    for layer in (stage.layers[0], stage.layers[1], stage.top):
        layer.dcn.offset_scale = offset_scale
    return stage


def _layer_output_at(
    stage: nn.Module, image: torch.Tensor, cell: Tuple[int, int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The top layer's own output (channels-last or tokens) summed over channels at ``cell``, and
    d it / d image."""
    seen = {}
    handle = stage.top.dcn.register_forward_hook(lambda mod, args, out: seen.update(out=out))
    leaf = image.clone().requires_grad_(True)
    try:
        stage(leaf)
    finally:
        handle.remove()
    out = seen["out"]
    if out.dim() == 4:  # DCNv3: [N, H, W, C]
        response = out[0, cell[0], cell[1]].sum()
    else:  # DCNv4: tokens [N, H*W, C]; the top map is 8x8 here
        response = out[0, cell[0] * 8 + cell[1]].sum()
    (grad,) = torch.autograd.grad(response, leaf)
    return response.detach(), grad[0]


@pytest.mark.parametrize("family", ["DCNv3", "DCNv4"])
def test_internimage_response_and_erf_are_the_layers_own_output_at_the_units_cell(
    family: str,
) -> None:
    stage = _stage(family)
    image = torch.rand(1, 3, 32, 32)
    forward = GradientForward(stage, image)
    records = _followed(forward, 2)
    assert [r.name for r in records] == ["top.dcn", "layers.1.dcn"] and records[
        0
    ].converted_from == family
    units = torch.tensor([[3, 4], [0, 7], [6, 1]])
    fields = receptive_fields(
        forward, records, units, (32, 32), STD, saliency_error=None, batch_size=2
    )
    assert fields.notes == [] and fields.point_gradients is not None
    for u, (i, j) in enumerate(units.tolist()):
        response, grad = _layer_output_at(stage, image, (i, j))
        assert float(fields.responses[u]) == pytest.approx(float(response), rel=1e-5, abs=1e-6)
        expected = (grad.abs() / (255 * torch.tensor(STD).view(3, 1, 1))).sum(dim=0)
        torch.testing.assert_close(fields.erf[u], expected, rtol=1e-4, atol=1e-9)
    assert all(float(w.max()) > 0 for w in fields.point_gradients.weights)


def _native_nudge(
    stage: nn.Module,
    layer: nn.Module,
    family: str,
    cell: Tuple[int, int],
    channel: int,
    value: float,
):
    """Adds ``value`` to native channel ``channel`` of the layer's offset branch output at
    ``cell``."""
    branch = layer.offset if family == "DCNv3" else layer.offset_mask

    def hook(mod: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        if out.dim() == 4:
            out[0, cell[0], cell[1], channel] += value
        else:  # tokens of a square map
            out[0, cell[0] * int(round(out.shape[1] ** 0.5)) + cell[1], channel] += value
        return out

    return branch.register_forward_hook(hook)


@pytest.mark.parametrize(
    "family,offset_scale", [("DCNv3", 1.0), ("DCNv3", 2.0), ("DCNv4", 1.0), ("DCNv4", 0.5)]
)
def test_internimage_offset_gradients_are_the_derivatives_at_the_layers_own_offsets(
    family: str, offset_scale: float
) -> None:
    """Moving one native offset (x first, column-major kernel points, scaled by ``offset_scale``) by
    eps changes r by ``offset_scale * eps * dr/d(standard offset)`` of that point."""
    stage = _stage(family, offset_scale).double()
    image = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    forward = GradientForward(stage, image)
    unit = (3, 4)
    (batch,) = list(
        forward.backward_units("top.dcn", torch.tensor([unit]), levels=["top.dcn", "layers.1.dcn"])
    )
    points = 9
    eps = (
        1e-4  # bilinear sampling is linear in the location inside a cell: only round-off limits eps
    )
    lower = (
        batch.offset_grads["layers.1.dcn"][0].abs().sum(dim=(0, 1, 2))
    )  # [H, W]: how much each cell's locations matter
    strongest = [divmod(int(k), lower.shape[1]) for k in torch.topk(lower.flatten(), 2).indices]
    checks = [("top.dcn", stage.top.dcn, unit)] + [
        ("layers.1.dcn", stage.layers[1].dcn, cell) for cell in strongest
    ]
    for name, layer, cell in checks:
        field = batch.offset_grads[name][0, :, :, :, cell[0], cell[1]]  # [G, K, (dy, dx)]
        location = (
            forward.calls[name].record.offset[0, :, cell[0], cell[1]].reshape(2, points, 2)
        )  # standard offsets
        fraction = location - location.floor()
        # Moved axes whose location is fractional (bilinear sampling has a kink at whole cells),
        # strongest first.
        candidates = [
            (float(field[g, q, t].abs()), g, q, t)
            for g in range(2)
            for q in range(points)
            for t in range(2)
            if 0.05 < float(fraction[g, q, t]) < 0.95
        ]
        chosen = sorted(candidates, reverse=True)[:3]
        assert len(chosen) == 3 and chosen[0][0] > 1e-4
        for _, group, standard_point, standard_axis in chosen:
            a, b = divmod(
                standard_point, 3
            )  # standard points are row-major, native ones column-major
            point, axis = b * 3 + a, 1 - standard_axis  # native (x, y) <-> standard (dy, dx)
            native = (
                2 * (group * points + point) + axis
                if family == "DCNv3"
                else group * 3 * points + 2 * point + axis
            )
            values = []
            for sign in (1.0, -1.0):
                handle = _native_nudge(stage, layer, family, cell, native, sign * eps)
                try:
                    with torch.no_grad():
                        values.append(float(_top_output(stage, image, unit)))
                finally:
                    handle.remove()
            numeric = (values[0] - values[1]) / (2 * eps)
            got = offset_scale * float(field[group, standard_point, standard_axis])
            assert got == pytest.approx(numeric, rel=1e-6, abs=1e-10), (
                name,
                cell,
                group,
                point,
                axis,
            )
    assert float(batch.offset_grads["layers.1.dcn"].abs().max()) > 1e-3


def _top_output(stage: nn.Module, image: torch.Tensor, cell: Tuple[int, int]) -> torch.Tensor:
    """The top layer's own output summed over channels at ``cell`` (its 8x8 map channels-last or
    as tokens)."""
    seen = {}
    handle = stage.top.dcn.register_forward_hook(lambda mod, args, out: seen.update(out=out))
    try:
        stage(image)
    finally:
        handle.remove()
    out = seen["out"]
    return out[0, cell[0], cell[1]].sum() if out.dim() == 4 else out[0, cell[0] * 8 + cell[1]].sum()


@pytest.mark.parametrize(
    "kernel,dilation,offset_scale,remove_center",
    [((3, 3), (1, 1), 1.0, False), ((3, 3), (2, 2), 2.0, True), ((3, 5), (1, 2), 0.5, False)],
)
def test_from_standard_layout_inverts_the_capture_conversion(
    kernel, dilation, offset_scale, remove_center
) -> None:
    from dcn_inspect.capture.internimage_layers import from_standard_layout, to_standard_layout

    points = kernel[0] * kernel[1] - int(remove_center)
    native = torch.randn(2, 4, 5, 3 * points * 2, dtype=torch.float64)
    standard, _ = to_standard_layout(native, None, kernel, dilation, 3, offset_scale, remove_center)
    torch.testing.assert_close(
        from_standard_layout(standard, kernel, dilation, 3, offset_scale, remove_center), native
    )


def test_grid_reach_of_scaled_and_unscaled_grids() -> None:
    assert (
        grid_reach(3, 1) == (1.0, 1.0)
        and grid_reach(3, 2) == (2.0, 2.0)
        and grid_reach(2, 1) == (0.5, 0.5)
        and grid_reach(1, 3) == (0.0, 0.0)
    )
    assert grid_reach(3, 1, 2.0) == (2.0, 2.0) and grid_reach(3, 2, 2.0) == (4.0, 4.0)
    assert grid_reach(3, 1, 0.5) == (1.0, 1.0)  # taps at -0.5 and +0.5 read the neighbouring cells
    assert grid_reach(5, 1, 0.5) == (1.0, 1.0)


@pytest.mark.parametrize(
    "family,offset_scale,reach", [("DCNv3", 1.0, 15.5), ("DCNv3", 2.0, 27.5), ("DCNv4", 1.0, 15.5)]
)
def test_internimage_theoretical_field_is_hand_computed_and_bounds_the_erf(
    family: str, offset_scale: float, reach: float
) -> None:
    """Stem 3x3 s2 (1.5 px each side, stride 2); two 3x3 layers (+1 cell each, x offset_scale);
    3x3 s2 downsampling conv (+2 px, stride 4); top 3x3 dilation 2 (+2 cells x offset_scale of 4
    px). Scale 1: 1.5 + 2 + 2 + 2 + 8 = 15.5; scale 2: 1.5 + 4 + 4 + 2 + 16 = 27.5. With zero
    offsets the ERF lies inside that box and reaches each of its sides (up to the ~1e-7 bilinear
    weights that grid_sample's normalised coordinates leave on the cells next to a whole-cell
    position)."""
    zero = ((0.0, 0.0), (0.0, 0.0), (0.0, 0.0))
    stage = _stage(family, offset_scale, stretch=zero)
    forward = GradientForward(stage, torch.rand(1, 3, 64, 64))
    records = _followed(forward, 3)
    assert forward.calls["top.dcn"].extent == Extent(reach, reach, reach, reach)
    assert records[0].grid_scale == offset_scale
    units = torch.tensor([[8, 8], [7, 9]])
    fields = receptive_fields(forward, records, units, (64, 64), STD, saliency_error=None)
    for u, (i, j) in enumerate(units.tolist()):
        x, y = 0.5 + 4 * j, 0.5 + 4 * i
        expected = [x - reach, y - reach, x + reach, y + reach]
        assert fields.theoretical[u].tolist() == expected
        erf = fields.erf[u].numpy()
        rows, cols = np.nonzero(
            erf > 1e-5 * erf.max()
        )  # grid_sample's float normalisation leaves ~1e-7 weights on neighbours
        assert [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1] == expected


# ---------------------------------------------------------------------------------------------
# The saliency search finds the region the unit reads, at the op's / the layer's output


class _BoxThenOp(nn.Module):
    """A 5x7 box filter, then the functional op (1x1, whole-cell constant offset (+4, -6)): r of
    unit (i, j) is the box sum around (i + 4, j - 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.box = nn.Conv2d(3, 1, (5, 7), padding=(2, 3), bias=False)
        nn.init.constant_(self.box.weight, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        boxed = self.box(x)
        offset = (
            torch.tensor([4.0, -6.0]).view(1, 2, 1, 1).expand(x.shape[0], 2, x.shape[2], x.shape[3])
        )
        return deform_conv2d(boxed, offset, torch.ones(1, 1, 1, 1), None, 1, 0, 1)


class _BoxThenDCNv3(nn.Module):
    """The same with a 1x1 DCNv3 (one channel, identity projections, offset x = -6, y = +4) on the
    channels-last map."""

    def __init__(self) -> None:
        super().__init__()
        self.box = nn.Conv2d(3, 1, (5, 7), padding=(2, 3), bias=False)
        self.dcn = DCNv3_pytorch(1, kernel_size=1, pad=0, group=1)
        with torch.no_grad():
            self.box.weight.fill_(1.0)
            for linear in (self.dcn.input_proj, self.dcn.output_proj):
                linear.weight.fill_(1.0)
                linear.bias.zero_()
            self.dcn.offset.weight.zero_()
            self.dcn.offset.bias.copy_(torch.tensor([-6.0, 4.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dcn(self.box(x).permute(0, 2, 3, 1))


@pytest.mark.parametrize("build,layer", [(_BoxThenOp, "_BoxThenOp"), (_BoxThenDCNv3, "dcn")])
def test_saliency_search_finds_the_box_the_op_or_layer_reads(build, layer: str) -> None:
    model = build().eval()
    forward = GradientForward(model, torch.full((1, 3, 30, 40), 0.8))
    records = _followed(forward, 1)
    assert records[0].name == layer
    fields = receptive_fields(
        forward, records, torch.tensor([[10, 20], [3, 30]]), (30, 40), STD, saliency_step=1
    )
    # Unit (i, j) reads rows i+4-2..i+4+2 and columns j-6-3..j-6+3 (as test_receptive_field's
    # BoxResponse); the region also holds the unit's own pixel (j, i).
    assert [r.box for r in fields.saliency] == [(11, 10, 21, 17), (21, 3, 31, 10)]
    assert all(
        r.relative_error < 1e-5 for r in fields.saliency
    )  # DCNv3's grid_sample: ~1e-7 weights next to whole-cell positions
    erf = fields.erf[0].numpy()
    assert {(int(r), int(c)) for r, c in zip(*np.nonzero(erf > 1e-5 * erf.max()))} == {
        (r, c) for r in range(12, 17) for c in range(11, 18)
    }


# ---------------------------------------------------------------------------------------------
# The command on a user's op-level model file and on a DCNv3 model

OP_LEVEL_FILE = '''
import torch
from torch import nn
from dcn_inspect.ops import deform_conv2d


class Block(nn.Module):
    """Its own offset and modulator convs, the functional op called twice."""

    def __init__(self):
        super().__init__()
        self.offset_conv = nn.Conv2d(4, 18, 3, padding=1)
        self.modulator_conv = nn.Conv2d(4, 9, 3, padding=1)
        nn.init.normal_(self.offset_conv.weight, std=0.2)
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.3)

    def forward(self, x):
        for _ in range(2):
            x = torch.relu(
                deform_conv2d(
                    x, self.offset_conv(x), self.weight, None, 1, 1, 1,
                    torch.sigmoid(self.modulator_conv(x)),
                )
            )
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.block = Block()

    def forward(self, images):
        return self.block(torch.relu(self.stem(images)))


def build():
    return Net().eval()
'''

DCNV3_FILE = """
from internimage_like import InternImageStage


def build():
    return InternImageStage().eval()
"""


@pytest.mark.parametrize(
    "source,layers",
    [
        (OP_LEVEL_FILE, ["block#2", "block"]),
        (DCNV3_FILE, ["top.dcn", "layers.1.dcn", "layers.0.dcn"]),
    ],
    ids=["op-level", "dcnv3"],
)
def test_cli_receptive_field_on_op_level_and_dcnv3_models(
    source: str, layers: List[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from test_receptive_field import _main

    model = tmp_path / "user_model.py"
    model.write_text(source)
    image = tmp_path / "scene.png"
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(
        image
    )
    out = tmp_path / "out"
    code, stdout, stderr = _main(
        [
            "receptive-field",
            str(image),
            "--model",
            f"{model}:build",
            "--at",
            "24,20",
            "--at",
            "9,30",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layers"] == layers
    assert [entry["name"] for entry in summary["images"][0]["layers"]] == layers
    assert summary["images"][0]["point_gradients"] is True
    assert not [
        note for note in summary.get("notes", []) if "re-running" in note or "theoretical" in note
    ]
    table = pd.read_csv(out / "scene_receptive_field.csv", keep_default_na=False)
    assert list(table["layer"]) == [layers[0]] * 2
    assert (
        (table["erf_mass"] > 0).all()
        and (table["saliency_area"] > 0).all()
        and (table["rf_x2"] > table["rf_x1"]).all()
    )
    arrays = np.load(out / "scene_erf.npz")
    assert arrays["model/erf"].shape == (2, 40, 48)
    for level in range(1, len(layers) + 1):
        assert (arrays[f"model/level{level}/grad_weight"] > 0).any()
    assert (out / "scene_receptive_field.png").stat().st_size > 10_000
    # sample-points --grad-weight follows the same calls: the same |dr/dp| per point.
    code, _, stderr = _main(
        [
            "sample-points",
            str(image),
            "--model",
            f"{model}:build",
            "--at",
            "24,20",
            "--at",
            "9,30",
            "--grad-weight",
            "--out",
            str(tmp_path / "sp"),
        ],
        capsys,
    )
    assert code == 0, stderr
    points = pd.read_csv(tmp_path / "sp" / "scene_points.csv", keep_default_na=False)
    for level in range(1, len(layers) + 1):
        got = points[points["level"] == level]["grad_weight"].to_numpy().reshape(2, -1)
        np.testing.assert_allclose(
            got, arrays[f"model/level{level}/grad_weight"], rtol=1e-4, atol=1e-9
        )
