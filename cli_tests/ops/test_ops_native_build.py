"""The native extension loader: build details, and a second process loads from the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcn_inspect.ops import _native

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def details() -> dict:
    try:
        _native.load()
    except Exception as exc:  # noqa: BLE001 - any build failure is a skip reason
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        pytest.skip(f"native ops unavailable: {reason}")
    return _native.build_details()


def test_build_details(details: dict) -> None:
    assert details["backend"] == "native"
    assert details["with_cuda"] == _native._with_cuda()
    assert "csrc/ops.cpp" in details["sources"]
    assert any(s.startswith("csrc/cpu/") for s in details["sources"])
    assert any(s.startswith("csrc/autograd/") for s in details["sources"])
    assert details["cached"] == (details["build_seconds"] is None)
    assert (Path(details["build_dir"]) / _native.BUILD_INFO).is_file()


def test_second_process_loads_from_cache(details: dict) -> None:
    code = (
        "import json, torch\n"
        "from dcn_inspect.ops import _native\n"
        "_native.load()\n"
        "x = torch.randn(1, 2, 5, 5)\n"
        "y = _native.deform_conv2d(\n"
        "    x, torch.zeros(1, 18, 5, 5), torch.randn(3, 2, 3, 3), padding=1\n"
        ")\n"
        "print(json.dumps(dict(_native.build_details(), shape=list(y.shape))))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cached"] is True and result["build_seconds"] is None
    assert result["build_dir"] == details["build_dir"]
    assert result["shape"] == [1, 3, 5, 5]
    assert _native.STATUS_LINE not in done.stderr  # nothing was compiled


def test_fingerprint_follows_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "ops.cpp").write_text("// a\n")
    (tmp_path / "checks.h").write_text("// h\n")
    (tmp_path / "cpu" / "k.cpp").write_text("// k\n")
    monkeypatch.setattr(_native, "SOURCE_ROOT", tmp_path)
    sources = _native._sources(with_cuda=False)
    first = _native._fingerprint(sources, False)
    assert _native._fingerprint(sources, True) != first
    (tmp_path / "checks.h").write_text("// changed\n")
    assert _native._fingerprint(sources, False) != first


def test_build_progress_names_files_and_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold build reports which files compile and the elapsed seconds (from the object files
    ninja writes), and says something at least every PROGRESS_HEARTBEAT seconds."""
    import io
    import time

    monkeypatch.setenv("MAX_JOBS", "2")
    monkeypatch.setattr(_native, "PROGRESS_HEARTBEAT", 0.3)
    sources = [
        _native.SOURCE_ROOT / "ops.cpp",
        _native.SOURCE_ROOT / "cpu" / "scratch.cpp",
        _native.SOURCE_ROOT / "autograd" / "deform_conv2d_autograd.cpp",
    ]
    stream = io.StringIO()
    with _native._BuildProgress(tmp_path, sources, with_cuda=False, stream=stream):
        time.sleep(0.7)  # nothing finished yet: heartbeat lines
        (tmp_path / "ops.o").write_bytes(b"")
        time.sleep(0.5)
        (tmp_path / "scratch.o").write_bytes(b"")
        (tmp_path / "deform_conv2d_autograd.o").write_bytes(b"")
        time.sleep(0.5)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith(_native.STATUS_LINE) and "3 files, 2 at a time" in lines[0]
    assert "DCN_INSPECT_OPS=reference" in lines[0]
    assert lines[1] == "dcn-inspect: compiling ops.cpp, cpu/scratch.cpp"
    assert any(
        line.startswith("dcn-inspect: still compiling ops.cpp, cpu/scratch.cpp (") for line in lines
    )
    assert any(
        line.startswith("dcn-inspect: [1/3] ops.cpp compiled (")
        and line.endswith("; compiling cpu/scratch.cpp, autograd/deform_conv2d_autograd.cpp")
        for line in lines
    )
    assert any(
        line.startswith("dcn-inspect: [3/3] ") and line.endswith("; linking") for line in lines
    )
    assert lines[-1].startswith("dcn-inspect: native ops built in ") and lines[-1].endswith(" s")


def test_cuda_objects_are_named_like_cpp_extension() -> None:
    cu = _native.SOURCE_ROOT / "cuda" / "deform_conv2d_kernel.cu"
    assert _native._object_name(cu, with_cuda=True) == "deform_conv2d_kernel.cuda.o"
    assert (
        _native._object_name(_native.SOURCE_ROOT / "cpu" / "deform_conv2d_kernel.cpp", True)
        == "deform_conv2d_kernel.o"
    )
