"""``capture.gradients.vector_jacobian``: torch.autograd.grad with a tensor ``grad_outputs``,
bit for bit, taken through a scalar (no sympy import, see ``cli_tests/test_imports.py``)."""

from __future__ import annotations

import pytest
import torch

from dcn_inspect.capture.gradients import vector_jacobian


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_same_bits_as_autograd_with_grad_outputs(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 11, dtype=dtype, requires_grad=True)
    weight = torch.randn(5, 3, 3, 3, dtype=dtype, requires_grad=True)
    y = torch.nn.functional.conv2d(torch.tanh(x), weight, padding=1).relu()
    v = torch.randn_like(y)
    v[0, :, 4, 5] = 0.0  # zeros and a one-hot-like part, as the unit selections have
    expected = torch.autograd.grad(y, [x, weight], v, retain_graph=True)
    got = vector_jacobian(y, [x, weight], v, retain_graph=True)
    for a, b in zip(got, expected):
        assert a is not None and torch.equal(a, b)


def test_unused_inputs_and_a_wrong_shape() -> None:
    x = torch.ones(3, requires_grad=True)
    unused = torch.ones(2, requires_grad=True)
    grads = vector_jacobian(x * 2, [x, unused], torch.ones(3), allow_unused=True)
    assert torch.equal(grads[0], torch.full((3,), 2.0)) and grads[1] is None
    with pytest.raises(ValueError, match=r"shape \(2,\) for an output of shape \(3,\)"):
        vector_jacobian(x * 2, [x], torch.ones(2))
