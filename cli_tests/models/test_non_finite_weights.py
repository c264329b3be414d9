"""The NaN/Inf check of loaded weights
(:func:`dcn_inspect.models.loaded_model.warn_non_finite_weights`) settles finite tensors with one
sum and falls back to the element-wise check otherwise."""

from __future__ import annotations

import pytest
import torch

from dcn_inspect.models.loaded_model import _all_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_a_single_non_finite_element_is_found(bad: float, dtype: torch.dtype) -> None:
    tensor = torch.randn(7, 5, dtype=torch.float64).to(dtype)
    tensor[3, 2] = bad
    assert not _all_finite(tensor)


def test_finite_values_whose_sum_overflows_are_finite() -> None:
    tensor = torch.full((4,), 3e38, dtype=torch.float32)
    assert not bool(torch.isfinite(tensor.sum()))  # the sum overflows ...
    assert _all_finite(tensor)  # ... the element-wise fallback answers


def test_finite_and_empty_tensors_are_finite() -> None:
    assert _all_finite(torch.randn(3, 3)) and _all_finite(torch.zeros(0))
