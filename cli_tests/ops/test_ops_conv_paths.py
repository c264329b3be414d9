"""Every CPU path of the native deformable convolution against the naive loop version.

The dispatcher (csrc/cpu/deform_conv2d_cpu.cpp) picks planar or channels-last sampling and,
for channels-last, BLAS or oneDNN GEMMs by shape; DCN_INSPECT_CONV_PATH forces each here, so
every path is covered whatever the rule picks on this machine: forward against the naive
implementation of test_ops_conv.py, gradients against autograd of the reference, gradcheck in
float64, the layouts the channels-last path special-cases (channel runs cut by offset groups
and conv groups, channels-last inputs, several batch chunks) and what the rule itself does.
"""

from __future__ import annotations

from types import ModuleType
from typing import Iterator

import pytest
import torch
from conftest import native_or_skip
from hypothesis import HealthCheck, given, settings
from test_ops_conv import (
    _budget_bytes,
    column_budget,
    conv_cases,
    make_conv_tensors,
    naive_deform_conv2d,
)

from dcn_inspect.ops import _native, reference

PATHS = ["planar", "cl-blas", "cl-onednn", "tune"]


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    native_or_skip()
    monkeypatch.setenv(_native.CONV_PATH_ENV, request.param)
    yield request.param


def _case(**change: object) -> dict:
    case = dict(
        batch=2,
        channels=16,
        out_channels=8,
        groups=1,
        offset_groups=1,
        kernel=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        height=6,
        width=7,
        offset_scale=1.7,
        use_mask=True,
        use_bias=True,
        non_contiguous=False,
        budget=None,
        seed=5,
    )
    case.update(change)
    return case


# Shapes that exercise the channels-last path's special cases as well as the common ones.
CASES = {
    "plain": _case(),
    "no mask, no bias": _case(use_mask=False, use_bias=False),
    # conv groups of 4 channels cut offset groups of 6: channel runs [0,4) [4,6) [6,8) [8,12)
    "runs cut by both groupings": _case(channels=12, out_channels=6, groups=3, offset_groups=2),
    "offset groups": _case(channels=16, offset_groups=4),
    "strided dilated non-square": _case(
        kernel=(2, 3), stride=(2, 1), padding=(2, 0), dilation=(1, 2), height=7, width=9
    ),
    "channels not a multiple of 16": _case(channels=20, out_channels=5),
    "one chunk per image": _case(batch=3, budget=1),
    "two images per chunk": _case(batch=3, budget="two"),
    "non-contiguous": _case(non_contiguous=True),
    "1x1 input padded": _case(height=1, width=1, padding=(1, 1), offset_scale=0.6),
    "far offsets": _case(offset_scale=6.0),
}


def _call(ops: ModuleType, case: dict, t: dict) -> torch.Tensor:
    return ops.deform_conv2d(
        t["input"],
        t["offset"],
        t["weight"],
        t["bias"],
        case["stride"],
        case["padding"],
        case["dilation"],
        t["mask"],
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_naive(path: str, name: str) -> None:
    native = native_or_skip()
    case = CASES[name]
    tensors = make_conv_tensors(case)
    expected = naive_deform_conv2d(
        tensors["input"],
        tensors["offset"],
        tensors["weight"],
        tensors["bias"],
        case["stride"],
        case["padding"],
        case["dilation"],
        tensors["mask"],
    )
    with column_budget(_budget_bytes(case, tensors)):
        for _ in range(
            5 if path == "tune" else 1
        ):  # tune: the four measured calls and the chosen one
            got = _call(native, case, tensors)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_reference(path: str, name: str) -> None:
    native = native_or_skip()
    case = CASES[name]
    tensors = make_conv_tensors(case)
    names = [n for n, t in tensors.items() if t is not None]
    grads = {}
    for label, ops in (("reference", reference), ("native", native)):
        leaves = {
            n: (t.detach().clone().requires_grad_() if t is not None else None)
            for n, t in tensors.items()
        }
        with column_budget(_budget_bytes(case, tensors) if label == "native" else None):
            out = _call(ops, case, leaves)
            out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        grads[label] = {n: leaves[n].grad for n in names}
    for n in names:
        torch.testing.assert_close(
            grads["native"][n], grads["reference"][n], rtol=1e-9, atol=1e-9, msg=n
        )


@pytest.mark.parametrize(
    "name", ["plain", "runs cut by both groupings", "strided dilated non-square"]
)
def test_gradcheck(path: str, name: str) -> None:
    native = native_or_skip()
    case = dict(CASES[name], batch=1, height=4, width=5)
    tensors = make_conv_tensors(case)
    names = [n for n in ("input", "offset", "weight", "bias", "mask") if tensors[n] is not None]

    def fn(*args: torch.Tensor) -> torch.Tensor:
        t = dict(zip(names, args))
        return _call(native, case, t)

    leaves = [tensors[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5)


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=conv_cases())
def test_random_cases_match_naive(path: str, case: dict) -> None:
    native = native_or_skip()
    tensors = make_conv_tensors(case)
    expected = naive_deform_conv2d(
        tensors["input"],
        tensors["offset"],
        tensors["weight"],
        tensors["bias"],
        case["stride"],
        case["padding"],
        case["dilation"],
        tensors["mask"],
    )
    with column_budget(_budget_bytes(case, tensors)):
        torch.testing.assert_close(_call(native, case, tensors), expected, rtol=1e-10, atol=1e-10)


def test_float32_matches_float64_naive(path: str) -> None:
    """float32 takes the vectorised loops (and oneDNN, on cl-onednn with several threads)."""
    native = native_or_skip()
    case = _case(channels=40, out_channels=24, offset_groups=2, height=9, width=11)
    t64 = make_conv_tensors(case)
    expected = naive_deform_conv2d(
        t64["input"],
        t64["offset"],
        t64["weight"],
        t64["bias"],
        case["stride"],
        case["padding"],
        case["dilation"],
        t64["mask"],
    )
    t32 = {n: t.float() for n, t in t64.items()}
    torch.testing.assert_close(_call(native, case, t32).double(), expected, rtol=2e-5, atol=2e-5)


def test_channels_last_input_gets_channels_last_gradient(path: str) -> None:
    native = native_or_skip()
    case = _case()
    t = make_conv_tensors(case)
    x = t["input"].contiguous(memory_format=torch.channels_last).requires_grad_()
    out = native.deform_conv2d(x, t["offset"], t["weight"], t["bias"], 1, 1, 1, t["mask"])
    out.sum().backward()
    xc = t["input"].clone().requires_grad_()
    reference.deform_conv2d(
        xc, t["offset"], t["weight"], t["bias"], 1, 1, 1, t["mask"]
    ).sum().backward()
    torch.testing.assert_close(x.grad, xc.grad, rtol=1e-10, atol=1e-10)


def test_forced_path_is_reported(path: str) -> None:
    native_or_skip()
    t = make_conv_tensors(_case())
    reported = _native.conv_path(
        t["input"], t["offset"], t["weight"], t["bias"], 1, 1, 1, t["mask"]
    )
    if path == "tune":
        assert reported in ("tune:cl-blas", "tune:cl-onednn")
    else:
        assert reported == path


def test_unknown_path_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    native = native_or_skip()
    monkeypatch.setenv(_native.CONV_PATH_ENV, "gpu-please")
    t = make_conv_tensors(_case())
    with pytest.raises(RuntimeError, match="DCN_INSPECT_CONV_PATH must be"):
        native.deform_conv2d(t["input"], t["offset"], t["weight"], padding=1)


@pytest.mark.parametrize(
    "channels,offset_groups,groups,expected",
    [
        (4, 1, 1, "planar"),
        (16, 4, 1, "planar"),
        (16, 1, 4, "planar"),
        (8, 1, 1, "cl"),
        (64, 8, 2, "cl"),
    ],
)
def test_rule_picks_planar_for_short_channel_runs(
    monkeypatch: pytest.MonkeyPatch, channels: int, offset_groups: int, groups: int, expected: str
) -> None:
    native_or_skip()
    monkeypatch.delenv(_native.CONV_PATH_ENV, raising=False)
    x = torch.zeros(1, channels, 5, 5, dtype=torch.float64)
    w = torch.zeros(groups, channels // groups, 3, 3, dtype=torch.float64)
    offset = torch.zeros(1, 18 * offset_groups, 5, 5, dtype=torch.float64)
    chosen = _native.conv_path(x, offset, w, padding=1)
    # float64 never goes to oneDNN: the channels-last choice is BLAS on every machine.
    assert chosen == ("planar" if expected == "planar" else "cl-blas")


def test_tune_settles_on_one_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    native = native_or_skip()
    monkeypatch.setenv(_native.CONV_PATH_ENV, "tune")
    case = _case(channels=24, height=5, width=5, seed=99)
    t = {n: v.float() for n, v in make_conv_tensors(case).items()}
    seen = []
    for _ in range(6):
        seen.append(
            _native.conv_path(t["input"], t["offset"], t["weight"], t["bias"], 1, 1, 1, t["mask"])
        )
        native.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], 1, 1, 1, t["mask"])
    assert seen[:4] == ["tune:cl-blas", "tune:cl-onednn", "tune:cl-blas", "tune:cl-onednn"]
    assert seen[4] == seen[5] and seen[4] in ("tune:cl-blas", "tune:cl-onednn")


def _offset_grad(native: ModuleType, t: dict, threads: int) -> torch.Tensor:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        offset = t["offset"].detach().clone().requires_grad_()
        native.deform_conv2d(
            t["input"], offset, t["weight"], None, 1, 1, 1, t["mask"]
        ).square().sum().backward()
        return offset.grad
    finally:
        torch.set_num_threads(previous)


def test_channels_last_backward_is_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    """No atomics: the same thread count gives bit-identical gradients, run after run."""
    native = native_or_skip()
    monkeypatch.setenv(_native.CONV_PATH_ENV, "cl-blas")
    t = {
        n: v.float()
        for n, v in make_conv_tensors(_case(channels=64, batch=1, height=12, width=12)).items()
    }
    for threads in (1, 2, 3):
        first = _offset_grad(native, t, threads)
        assert all(torch.equal(first, _offset_grad(native, t, threads)) for _ in range(3))
        scale = float(first.abs().max())
        torch.testing.assert_close(first, _offset_grad(native, t, 1), rtol=0, atol=1e-5 * scale)


def test_scratch_is_bounded_and_released(monkeypatch: pytest.MonkeyPatch) -> None:
    native = native_or_skip()
    t = make_conv_tensors(_case(channels=32))
    monkeypatch.setenv(_native.CONV_PATH_ENV, "cl-blas")
    native.deform_conv2d(t["input"], t["offset"], t["weight"], padding=1)
    held = _native.scratch_bytes()
    # columns alone: 2 images x 42 positions x 9 x 32 channels x 8 bytes
    assert held >= 2 * 42 * 9 * 32 * 8
    assert held <= torch.ops.dcn_inspect._scratch_limit_bytes()
    assert _native.release_scratch() == held
    assert _native.scratch_bytes() == 0
    monkeypatch.setenv("DCN_INSPECT_SCRATCH_MIB", "0")
    native.deform_conv2d(t["input"], t["offset"], t["weight"], padding=1)
    assert _native.scratch_bytes() == 0
    details = _native.build_details()
    assert details["cpu_scratch_held"] == "0.0 MiB" and details["cpu_scratch_limit"].startswith(
        "0 MiB"
    )


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@pytest.mark.parametrize(
    "out_channels,batch,expected_forward",
    [(64, 4, "cl-onednn"), (128, 4, "cl-blas"), (64, 1, "cl-blas")],
)
def test_rule_for_float32_engines(
    monkeypatch: pytest.MonkeyPatch, out_channels: int, batch: int, expected_forward: str
) -> None:
    """Intel: oneDNN for forwards with <= 64 outputs per group over >= 4096 positions, MKL
    otherwise and for every backward; other CPUs: oneDNN for every forward it can take, BLAS
    for every backward (issue #24; fixed, never timed, so reruns are bit-identical)."""
    native_or_skip()
    if not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch without oneDNN")
    monkeypatch.delenv(_native.CONV_PATH_ENV, raising=False)
    x = torch.zeros(batch, 32, 32, 32)
    w = torch.zeros(out_channels, 32, 3, 3)
    offset = torch.zeros(batch, 18, 32, 32)
    forward = _native.conv_path(x, offset, w, padding=1)
    backward = _native.conv_path(x, offset, w, padding=1, backward=True)
    if _cpu_vendor() == "GenuineIntel":
        assert (forward, backward) == (expected_forward, "cl-blas")
    else:
        assert (forward, backward) == ("cl-onednn", "cl-blas")
