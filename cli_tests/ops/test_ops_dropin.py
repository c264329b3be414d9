"""Code written for torchvision's and mmcv's deformable ops runs unchanged on ours.

torchvision-style non-contiguous (permuted) operands, mmcv constructor keywords and defaults,
mmcv's modulated deformable RoI pooling, adaptive ``sampling_ratio <= 0``, TorchScript, and
shape errors that are RuntimeErrors, on both backends.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import native_or_skip
from test_ops_conv import naive_deform_conv2d

from dcn_inspect.core.errors import OpsArgumentError
from dcn_inspect.ops import (
    DeformConv2d,
    DeformConv2dPack,
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformConv2dPack,
    ModulatedDeformRoIPoolPack,
    _backend,
)


def _discontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values, last two dimensions' strides swapped (torchvision's tests do this)."""
    out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


def _conv_tensors(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    return dict(
        input=torch.randn(3, 6, 5, 4, generator=gen, dtype=f64),
        offset=2 * torch.randn(3, 36, 5, 4, generator=gen, dtype=f64),  # two offset groups
        weight=torch.randn(2, 6, 3, 3, generator=gen, dtype=f64),
        bias=torch.randn(2, generator=gen, dtype=f64),
        mask=torch.rand(3, 18, 5, 4, generator=gen, dtype=f64),
    )


@pytest.mark.parametrize("which", ["mask", "offset", "input", "weight", "all"])
def test_non_contiguous_operands(ops: ModuleType, which: str) -> None:
    """torchvision's 3x(6->2)x5x4 test shape, one operand (or all) with permuted strides."""
    t = _conv_tensors()
    expected = naive_deform_conv2d(
        t["input"], t["offset"], t["weight"], t["bias"], (1, 1), (1, 1), (1, 1), t["mask"]
    )
    names = ["input", "offset", "weight", "mask"] if which == "all" else [which]
    leaves = {
        n: (_discontiguous(v) if n in names else v).detach().requires_grad_() for n, v in t.items()
    }
    out = ops.deform_conv2d(
        leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], 1, 1, 1, leaves["mask"]
    )
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    out.sum().backward()
    plain = {n: v.detach().clone().requires_grad_() for n, v in t.items()}
    ops.deform_conv2d(
        plain["input"], plain["offset"], plain["weight"], plain["bias"], 1, 1, 1, plain["mask"]
    ).sum().backward()
    for n in t:
        torch.testing.assert_close(leaves[n].grad, plain[n].grad, rtol=1e-10, atol=1e-10, msg=n)


def test_channels_last_module_input(ops: ModuleType) -> None:
    t = _conv_tensors(1)
    expected = ops.deform_conv2d(
        t["input"], t["offset"], t["weight"], t["bias"], 1, 1, 1, t["mask"]
    )
    got = ops.deform_conv2d(
        t["input"].contiguous(memory_format=torch.channels_last),
        t["offset"],
        t["weight"],
        t["bias"],
        1,
        1,
        1,
        t["mask"],
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# --- mmcv constructor keywords and defaults -------------------------------------------------


@pytest.mark.parametrize("keyword", ["offset_groups", "deform_groups", "deformable_groups"])
@pytest.mark.parametrize("cls,per_point", [(DeformConv2dPack, 2), (ModulatedDeformConv2dPack, 3)])
def test_offset_group_keywords(cls: type, per_point: int, keyword: str) -> None:
    layer = cls(8, 4, 3, padding=1, **{keyword: 2})
    assert layer.offset_groups == 2 and layer.deform_groups == 2
    assert layer.conv_offset.out_channels == per_point * 2 * 9


def test_positional_order_is_mmcv() -> None:
    """mmcv: (in, out, kernel, stride, padding, dilation, groups, deform_groups, bias)."""
    layer = DeformConv2dPack(8, 4, 3, 1, 1, 1, 2, 4, True)
    assert (layer.groups, layer.offset_groups, layer.bias is not None) == (2, 4, True)


def test_conflicting_offset_group_keywords() -> None:
    with pytest.raises(ValueError, match="conflicting offset group counts"):
        DeformConv2dPack(8, 4, 3, offset_groups=2, deform_groups=4)
    assert DeformConv2dPack(8, 4, 3, offset_groups=2, deformable_groups=2).offset_groups == 2


def test_deform_groups_alias_is_read_only() -> None:
    layer = DeformConv2dPack(8, 4, 3)
    with pytest.raises(AttributeError):
        layer.deform_groups = 2  # type: ignore[misc]


def test_bias_defaults_follow_mmcv() -> None:
    assert DeformConv2dPack(4, 4, 3).bias is None  # mmcv DCN
    assert ModulatedDeformConv2dPack(4, 4, 3).bias is not None  # mmcv DCNv2 / ModulatedDeformConv2d
    assert "bias" in ModulatedDeformConv2dPack(4, 4, 3).state_dict()
    assert ModulatedDeformConv2dPack(4, 4, 3, bias=False).bias is None
    assert DeformConv2d(4, 4, 3).bias is not None  # torchvision


def test_im2col_step_changes_nothing(ops: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "DCN_INSPECT_OPS", "native" if ops.__name__.endswith("_native") else "reference"
    )
    _backend.reset()
    try:
        torch.manual_seed(0)
        a = ModulatedDeformConv2dPack(4, 6, 3, padding=1, im2col_step=1).double()
        b = ModulatedDeformConv2dPack(4, 6, 3, padding=1, im2col_step=64).double()
        b.load_state_dict(a.state_dict())
        torch.nn.init.normal_(a.conv_offset.weight, std=0.3)
        b.conv_offset.weight.data.copy_(a.conv_offset.weight)
        x = torch.randn(5, 4, 7, 6, dtype=torch.float64)
        assert a.im2col_step == 1 and b.im2col_step == 64
        assert torch.equal(a(x), b(x))
    finally:
        _backend.reset()


# --- RoI pooling: adaptive sampling ratio and mmcv's mdpool ---------------------------------


def _roi_inputs() -> dict:
    gen = torch.Generator().manual_seed(3)
    return dict(
        input=torch.randn(2, 4, 12, 10, generator=gen, dtype=torch.float64),
        rois=torch.tensor([[0, 1.0, 2.0, 8.5, 9.0], [1, 0.0, 0.0, 9.0, 11.0]], dtype=torch.float64),
        offset=0.3 * torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64),
    )


@pytest.mark.parametrize("ratio", [-1, -5])
def test_negative_sampling_ratio_is_adaptive(ops: ModuleType, ratio: int) -> None:
    d = _roi_inputs()
    adaptive = ops.deform_roi_pool(d["input"], d["rois"], d["offset"], 3, 1.0, 0, 0.1)
    fixed = ops.deform_roi_pool(d["input"], d["rois"], d["offset"], 3, 1.0, 2, 0.1)
    got = ops.deform_roi_pool(d["input"], d["rois"], d["offset"], 3, 1.0, ratio, 0.1)
    torch.testing.assert_close(got, adaptive, rtol=0, atol=0)
    assert not torch.allclose(got, fixed)  # the rois are large enough for adaptive to differ from 2


def test_modulated_roi_pool_pack_layout_matches_mmcv() -> None:
    layer = ModulatedDeformRoIPoolPack((3, 3), 4, deform_fc_channels=16)
    assert sorted(layer.state_dict()) == sorted(
        [f"offset_fc.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
        + [f"mask_fc.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    )
    assert isinstance(layer.mask_fc[3], torch.nn.Sigmoid)
    assert (
        torch.count_nonzero(layer.mask_fc[2].weight) == 0
        and torch.count_nonzero(layer.offset_fc[4].weight) == 0
    )


def test_modulated_roi_pool_pack_scales_deformed_pooling_by_mask(
    ops: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "DCN_INSPECT_OPS", "native" if ops.__name__.endswith("_native") else "reference"
    )
    _backend.reset()
    try:
        d = _roi_inputs()
        layer = ModulatedDeformRoIPoolPack(
            (3, 3), 4, deform_fc_channels=16, sampling_ratio=2
        ).double()
        plain = ops.deform_roi_pool(d["input"], d["rois"], None, 3, 1.0, 2, 0.1)
        # Fresh: zero offsets and every mask 0.5.
        torch.testing.assert_close(layer(d["input"], d["rois"]), 0.5 * plain)
        # Mask logits set per bin, offsets set through the last layer's bias.
        with torch.no_grad():
            layer.mask_fc[2].bias.copy_(torch.linspace(-2, 2, 9, dtype=torch.float64))
            layer.offset_fc[4].bias.copy_(d["offset"][0].flatten())
        offsets = d["offset"][0].expand(2, 2, 3, 3)
        expected = ops.deform_roi_pool(d["input"], d["rois"], offsets, 3, 1.0, 2, 0.1)
        expected = expected * torch.sigmoid(torch.linspace(-2, 2, 9, dtype=torch.float64)).view(
            1, 1, 3, 3
        )
        out = layer(d["input"], d["rois"])
        torch.testing.assert_close(out, expected)
        out.sum().backward()
        assert (
            layer.mask_fc[2].bias.grad is not None
            and torch.count_nonzero(layer.mask_fc[2].bias.grad) > 0
        )
        assert torch.count_nonzero(layer.offset_fc[4].bias.grad) > 0
    finally:
        _backend.reset()


def test_roi_pool_packs_accept_adaptive_minus_one() -> None:
    d = _roi_inputs()
    for cls in (DeformRoIPoolPack, ModulatedDeformRoIPoolPack):
        layer = cls((3, 3), 4, deform_fc_channels=8, sampling_ratio=-1).double()
        assert layer(d["input"], d["rois"]).shape == (2, 4, 3, 3)
    assert DeformRoIPool(3, sampling_ratio=-1)(d["input"], d["rois"]).shape == (2, 4, 3, 3)


# --- TorchScript ------------------------------------------------------------------------------


@pytest.fixture(params=["reference", "native"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "native":
        native_or_skip()
    monkeypatch.setenv("DCN_INSPECT_OPS", request.param)
    _backend.reset()
    yield request.param
    _backend.reset()


def _modules() -> dict:
    torch.manual_seed(0)
    modules = {
        "DeformConv2d": DeformConv2d(6, 4, 3, padding=1, groups=2),
        "DeformConv2dPack": DeformConv2dPack(6, 4, 3, padding=1, deform_groups=2),
        "ModulatedDeformConv2dPack": ModulatedDeformConv2dPack(6, 4, 3, padding=2, dilation=2),
    }
    for m in modules.values():
        if hasattr(m, "conv_offset"):
            torch.nn.init.normal_(m.conv_offset.weight, std=0.5)
    return modules


@pytest.mark.parametrize("name", ["DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2dPack"])
def test_modules_script(backend: str, name: str) -> None:
    module = _modules()[name]
    scripted = torch.jit.script(module)
    x = torch.randn(2, 6, 7, 8)
    if name == "DeformConv2d":
        offset, mask = 2 * torch.randn(2, 36, 7, 8), torch.rand(2, 18, 7, 8)  # two offset groups
        torch.testing.assert_close(scripted(x, offset, mask), module(x, offset, mask))
        torch.testing.assert_close(scripted(x, offset), module(x, offset))
    else:
        torch.testing.assert_close(scripted(x), module(x))
    # The scripted code calls the native op exactly when the native backend was active.
    assert ("dcn_inspect.deform_conv2d" in scripted._deform_scripted.code) == (backend == "native")


_LOAD_IN_FRESH_PROCESS = """
import sys
import torch
if sys.argv[1] == "native":
    from dcn_inspect.ops import _native
    _native.load()  # registers torch.ops.dcn_inspect, which the scripted code calls
loaded = torch.jit.load(sys.argv[2])
x, expected = torch.load(sys.argv[3])
torch.testing.assert_close(loaded(x), expected)
print("loaded and matched")
"""


def test_scripted_module_saves_and_loads_in_a_fresh_process(backend: str, tmp_path: Path) -> None:
    """A saved scripted module loads in a new interpreter and computes what the eager one does.

    The reference module's file needs nothing from this package; the native one needs only the
    extension loaded first (its ops are registered by the library, not saved in the file)."""
    module = _modules()["ModulatedDeformConv2dPack"]
    torch.jit.save(torch.jit.script(module), str(tmp_path / "module.pt"))
    x = torch.randn(1, 6, 5, 5)
    torch.save((x, module(x).detach()), tmp_path / "expected.pt")
    run = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, backend]
        + [str(tmp_path / "module.pt"), str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and "loaded and matched" in run.stdout, run.stderr[-3000:]


def test_scripted_module_trains(backend: str) -> None:
    module = _modules()["DeformConv2dPack"]
    scripted = torch.jit.script(module)
    scripted(torch.randn(2, 6, 5, 5)).square().sum().backward()
    assert module.weight.grad is not None and module.conv_offset.weight.grad is not None


def test_observers_still_see_offsets_in_eager_mode() -> None:
    layer = DeformConv2dPack(4, 4, 3, padding=1)
    seen = []
    layer._offset_observers.append(lambda mod, input, offset, mask: seen.append(offset.shape))
    torch.jit.script(layer)  # scripting leaves the eager module's observers alone
    layer(torch.randn(1, 4, 5, 5))
    assert seen == [torch.Size([1, 18, 5, 5])]


# --- errors -----------------------------------------------------------------------------------


def test_shape_errors_are_runtime_and_value_errors(ops: ModuleType) -> None:
    assert issubclass(OpsArgumentError, RuntimeError) and issubclass(OpsArgumentError, ValueError)
    t = _conv_tensors()
    for exc in (RuntimeError, ValueError):
        with pytest.raises(exc, match="offset has shape"):
            ops.deform_conv2d(t["input"], t["offset"][:, :, :4], t["weight"], None, 1, 1, 1)


# --- non-contiguous pooling operands ----------------------------------------------------------


def test_pools_take_non_contiguous_operands(ops: ModuleType) -> None:
    """Permuted input, RoIs and offsets pool exactly like their contiguous copies."""
    gen = torch.Generator().manual_seed(3)
    f64 = torch.float64
    rois = torch.tensor([[0, 1.0, 2.0, 20.0, 18.0], [1, 4.0, 0.0, 12.0, 30.0]], dtype=f64)
    input = torch.randn(2, 2 * 9, 8, 10, generator=gen, dtype=f64)
    offset = 0.5 * torch.randn(2, 2, 3, 3, generator=gen, dtype=f64)
    trans = 0.5 * torch.randn(2, 2 * 2, 3, 3, generator=gen, dtype=f64)
    roi_args = (3, 0.5, 2, 0.1)
    expected = ops.deform_roi_pool(input, rois, offset, *roi_args)
    got = ops.deform_roi_pool(
        _discontiguous(input), rois.t().contiguous().t(), _discontiguous(offset), *roi_args
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    ps_args = (0.5, 2, 3, 3, 3, 2, 0.1)
    expected = ops.deform_psroi_pool(input, rois, trans, *ps_args)
    got = ops.deform_psroi_pool(
        _discontiguous(input), rois.t().contiguous().t(), _discontiguous(trans), *ps_args
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


# --- the package's own calls ------------------------------------------------------------------


def test_package_calls_the_ops_by_offset_groups_not_the_mmcv_aliases() -> None:
    """``offset_groups`` is the package's word (issue #11); ``deform_groups`` /
    ``deformable_groups`` are accepted from users only. ops/modules.py, which defines the
    aliases, is the exception."""

    package = Path(__file__).resolve().parents[2] / "dcn_inspect"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path == package / "ops" / "modules.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                offenders += [
                    f"{path.relative_to(package)}:{node.lineno} {k.arg}="
                    for k in node.keywords
                    if k.arg in ("deform_groups", "deformable_groups")
                ]
    assert offenders == []
