"""Issue #24: a command imports what it uses. pandas (~0.25 s) comes in with a table, matplotlib
(~0.3 s) with a figure: ``--help``, ``models`` and a usage error import neither, nor does
importing a command's module (``info``'s included) or the writers' modules."""

from __future__ import annotations

import subprocess
import sys
from typing import List, Sequence

import pytest

HEAVY = ("pandas", "matplotlib")


def _imported_after(code: str, modules: Sequence[str] = HEAVY) -> List[str]:
    """The modules of ``modules`` in ``sys.modules`` after ``code`` ran in a fresh
    interpreter."""
    probe = (
        f"{code}\nimport sys\nprint(sorted(m for m in {tuple(modules)!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return eval(done.stdout.strip().splitlines()[-1])


def _cli(argv: List[str]) -> str:
    """``dcn-inspect ARGV`` (exit 0, or 1 for a usage error)."""
    return (
        f"sys_argv = ['dcn-inspect', *{argv!r}]\n"
        "import sys\nsys.argv = sys_argv\n"
        "from dcn_inspect.cli import main\n"
        "try:\n    main()\n"
        "except SystemExit as exc:\n    assert exc.code in (0, 1, None), exc.code\n"
    )


@pytest.mark.parametrize("argv", [["--help"], ["models"], ["sample-points", "--grid", "0"]])
def test_help_listing_and_usage_errors_import_neither(argv: List[str]) -> None:
    assert _imported_after(_cli(argv)) == []


@pytest.mark.parametrize(
    "module",
    [
        "dcn_inspect.cli",
        "dcn_inspect.commands.sample_points",
        "dcn_inspect.commands.info",
        "dcn_inspect.report",
        "dcn_inspect.report.info",
        "dcn_inspect.io.outputs",
        "dcn_inspect.core.columns",
    ],
)
def test_importing_a_command_or_its_writers_imports_neither(module: str) -> None:
    assert _imported_after(f"import {module}") == []


def test_the_table_brings_pandas_and_the_figure_matplotlib() -> None:
    """The lazy imports are where the work is: the check above is not vacuous."""
    assert _imported_after("from dcn_inspect.report import draw_sampling_figure") == ["matplotlib"]
    assert "pandas" in _imported_after(
        "from dcn_inspect.core.columns import Column, formatted\n"
        "import numpy as np\n"
        "formatted(__import__('pandas').DataFrame({'a': np.zeros(2)}), [Column('a', '')])"
    )


#: A gradient forward of a small deformable model and the backwards of two units, one of them
#: with its offset gradients (the op run again): all that ``receptive-field`` asks of autograd.
_BACKWARDS = """
import torch
from torch import nn
from dcn_inspect.capture.gradients import GradientForward
from dcn_inspect.ops import DeformConv2dPack

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), DeformConv2dPack(4, 4, 3, padding=1)).eval()
forward = GradientForward(model, torch.rand(1, 3, 16, 16))
(layer,) = forward.calls
units = torch.tensor([[3, 4], [8, 8]])
batches = list(forward.backward_units(layer, units, levels=[layer], batch_size=1))
assert len(batches) == 2 and all(b.offset_grads for b in batches)
"""


def test_the_backwards_of_units_do_not_import_sympy() -> None:
    """A tensor ``grad_outputs`` makes torch check its shape through torch.fx's symbolic shapes,
    which imports sympy (0.45 s); the unit backwards take the gradient of a scalar instead."""
    assert _imported_after(_BACKWARDS, ("sympy",)) == []
    # not vacuous: torch's own way imports it
    assert _imported_after(
        "import torch\nx = torch.ones(2, requires_grad=True)\n"
        "torch.autograd.grad(x * 2, x, torch.ones(2))",
        ("sympy",),
    ) == ["sympy"]
