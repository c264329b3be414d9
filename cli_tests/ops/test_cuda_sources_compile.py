"""The CUDA kernels compile: csrc/tools/compile_cuda_objects.sh builds every csrc/cuda/*.cu.

This needs nvcc but no GPU and works with a CPU build of torch (whose headers include the
c10/cuda and ATen CUDA headers); it is skipped, with the reason, where nvcc is not installed.
About 30 s of nvcc per .cu file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "csrc" / "tools" / "compile_cuda_objects.sh"
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _nvcc() -> str:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return ""


NVCC = _nvcc()


@pytest.mark.skipif(
    not NVCC, reason="nvcc not found (set NVCC or put it on PATH) - CUDA sources not compiled"
)
def test_cuda_sources_compile(tmp_path: Path) -> None:
    assert CUDA_SOURCES, "no csrc/cuda/*.cu files"
    env = dict(os.environ, PYTHON=sys.executable, NVCC=NVCC)
    result = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-20000:]}"
    assert result.returncode == 0, report
    objects = sorted(tmp_path.glob("*.o"))
    assert [o.stem for o in objects] == [s.stem for s in CUDA_SOURCES], report
    assert all(o.stat().st_size > 0 for o in objects), report
    ok_lines = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert len(ok_lines) == len(CUDA_SOURCES), report
