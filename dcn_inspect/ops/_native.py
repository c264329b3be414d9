"""Build, cache and load the native C++/CUDA deformable ops, and wrap them like ``reference``.

The extension is compiled at first use with ``torch.utils.cpp_extension`` (ninja) from the
sources under ``csrc/``; CUDA kernels (``csrc/cuda/*.cu``) join the build when PyTorch has
CUDA, a GPU is visible and nvcc is found. The build directory is keyed by a hash of the
sources, the torch version and the CUDA flag (``~/.cache/dcn_inspect/ops-<hash>``, or
``DCN_INSPECT_BUILD_DIR``), so later processes load the cached library without touching the
compiler. Concurrent first uses serialise on a file lock in the build directory.

The wrappers below take the same arguments, defaults and checks as
:mod:`dcn_inspect.ops.reference` and call ``torch.ops.dcn_inspect.*``; the C++ autograd
kernels provide the gradients.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch

from dcn_inspect.ops._validate import (
    IntPair,
    check_deform_conv2d,
    check_deform_psroi_pool,
    check_deform_roi_pool,
)

BUILD_DIR_ENV = "DCN_INSPECT_BUILD_DIR"
#: Environment variable read by the kernels: bytes of im2col buffer per batch chunk.
COLUMN_BUDGET_ENV = "DCN_INSPECT_COLUMN_BUDGET"
SOURCE_ROOT = Path(__file__).resolve().parents[2] / "csrc"
BUILD_INFO = "build_info.json"
#: First line a cold build prints on stderr (the progress lines follow it).
STATUS_LINE = "dcn-inspect: building native ops"
#: Seconds between "still compiling" lines while no file finishes.
PROGRESS_HEARTBEAT = 15.0

_lock = threading.Lock()
_details: Optional[Dict[str, Any]] = None
_failure: Optional[BaseException] = None


def _with_cuda() -> bool:
    """Whether this build should include the CUDA kernels."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def _sources(with_cuda: bool) -> List[Path]:
    patterns = ["*.cpp", "cpu/*.cpp", "autograd/*.cpp"] + (["cuda/*.cu"] if with_cuda else [])
    files: List[Path] = []
    for pattern in patterns:
        files.extend(sorted(SOURCE_ROOT.glob(pattern)))
    return files


def _host_cflags() -> List[str]:
    """Compiler flags for the host code: optimised for this machine's CPU on x86-64 (the
    bilinear gathers vectorise with AVX2/AVX-512); the CPU's feature flags are part of the
    fingerprint, so a build is only ever loaded on a CPU like the one it was made for."""
    flags = [
        "-O3",
        "-fopenmp",
        "-fno-trapping-math",
    ]  # as PyTorch's own CPU build; lets comparisons vectorise
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-march=native")
    return flags


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _fingerprint(sources: List[Path], with_cuda: bool) -> str:
    """Hash of everything that changes the compiled library."""
    digest = hashlib.sha256()
    # Only the headers this build can include: CUDA headers change nothing in a CPU build.
    header_patterns = ["*.h", "cpu/*.h", "autograd/*.h"] + (
        ["cuda/*.h", "cuda/*.cuh"] if with_cuda else []
    )
    headers = sorted(p for pattern in header_patterns for p in SOURCE_ROOT.glob(pattern))
    for path in sources + headers:
        digest.update(str(path.relative_to(SOURCE_ROOT)).encode())
        digest.update(path.read_bytes())
    digest.update(f"torch={torch.__version__};cuda={with_cuda};py={sys.version_info[:2]}".encode())
    digest.update(f"cflags={_host_cflags()};cpu={platform.machine()};{_cpu_features()}".encode())
    return digest.hexdigest()[:16]


def _build_dir(fingerprint: str) -> Path:
    override = os.environ.get(BUILD_DIR_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", "") or Path.home() / ".cache")
    return cache / "dcn_inspect" / f"ops-{fingerprint}"


def _object_name(source: Path, with_cuda: bool) -> str:
    """The object file torch.utils.cpp_extension's ninja build writes for a source."""
    return source.stem + (".cuda.o" if with_cuda and source.suffix == ".cu" else ".o")


class _BuildProgress:
    """Reports a cold build on stderr: which files are compiling, what finished, elapsed seconds.

    ninja (under torch.utils.cpp_extension) prints nothing until it is done, so a thread
    watches the build directory instead: an object file appears when its source has compiled,
    and ninja starts the sources in order, ``jobs`` at a time, so the first unfinished ones are
    the ones compiling.
    """

    def __init__(
        self, build_dir: Path, sources: List[Path], with_cuda: bool, stream: Any = None
    ) -> None:
        self.build_dir = build_dir
        self.names = [str(p.relative_to(SOURCE_ROOT)) for p in sources]
        self.objects = [_object_name(p, with_cuda) for p in sources]
        self.jobs = _build_jobs()
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="dcn-inspect-build-progress", daemon=True
        )

    def _say(self, message: str) -> None:
        print(f"dcn-inspect: {message}", file=self.stream, flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _compiling(self, done: set) -> List[str]:
        pending = [n for n, o in zip(self.names, self.objects) if o not in done]
        return pending[: self.jobs]

    def _run(self) -> None:
        done: set = set()
        last_report = self.elapsed()
        while not self._stop.wait(0.25):
            finished = [o for o in self.objects if o not in done and (self.build_dir / o).is_file()]
            for obj in finished:
                done.add(obj)
                name = self.names[self.objects.index(obj)]
                compiling = self._compiling(done)
                tail = f"; compiling {', '.join(compiling)}" if compiling else "; linking"
                self._say(
                    f"[{len(done)}/{len(self.objects)}] {name} compiled "
                    f"({self.elapsed():.0f} s){tail}"
                )
                last_report = self.elapsed()
            if self.elapsed() - last_report >= PROGRESS_HEARTBEAT:
                compiling = self._compiling(done)
                what = f"compiling {', '.join(compiling)}" if compiling else "linking"
                self._say(f"still {what} ({self.elapsed():.0f} s)")
                last_report = self.elapsed()

    def __enter__(self) -> "_BuildProgress":
        self._say(
            f"{STATUS_LINE[len('dcn-inspect: ') :]} (first use): {len(self.objects)} files, "
            f"{self.jobs} at a time, into {self.build_dir.parent}; "
            "DCN_INSPECT_OPS=reference skips this"
        )
        self._say(f"compiling {', '.join(self._compiling(set()))}")
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is None:
            self._say(f"native ops built in {self.elapsed():.0f} s")
        else:
            self._say(f"native ops build failed after {self.elapsed():.0f} s")


def _build_jobs() -> int:
    """Parallel compile jobs: MAX_JOBS when set (torch.utils.cpp_extension passes it to ninja),
    else ninja's own default (2 on one CPU, 3 on two, CPUs + 2 above)."""
    try:
        return max(1, int(os.environ.get("MAX_JOBS", "")))
    except ValueError:
        pass
    cpus = os.cpu_count() or 1
    return 2 if cpus <= 1 else 3 if cpus == 2 else cpus + 2


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock between processes building into the same directory."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on cpp_extension's own baton
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_info(build_dir: Path, fingerprint: str) -> Optional[Dict[str, Any]]:
    """The record of a finished build for this fingerprint, if its library is still there."""
    try:
        info = json.loads((build_dir / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None
    if info.get("fingerprint") != fingerprint or not Path(info.get("library", "")).is_file():
        return None
    return info


def _compile(
    build_dir: Path, fingerprint: str, sources: List[Path], with_cuda: bool
) -> Dict[str, Any]:
    """Compile into a fresh attempt directory and record the result in ``build_info.json``.

    Called with the build-directory lock held. Each attempt gets its own directory: a builder
    that was killed can leave a half-written library, a stale ``torch.utils.cpp_extension``
    baton (which would block every later build) or an orphaned ninja still writing, and none
    of that may leak into this attempt; the leftovers are removed first.
    """
    from torch.utils import cpp_extension

    for stale in build_dir.glob("attempt-*"):
        shutil.rmtree(stale, ignore_errors=True)
    attempt = build_dir / f"attempt-{os.getpid()}-{int(time.time())}"
    attempt.mkdir()
    start = time.perf_counter()
    # at::parallel_for is header code: without -fopenmp the kernels would run on one thread.
    flags = _host_cflags() + (["-DWITH_CUDA"] if with_cuda else [])
    with _BuildProgress(attempt, sources, with_cuda):
        library = cpp_extension.load(
            name=f"dcn_inspect_ops_{fingerprint}",
            sources=[str(p) for p in sources],
            extra_cflags=flags,
            extra_cuda_cflags=["-O3", "-DWITH_CUDA"] if with_cuda else None,
            extra_ldflags=["-fopenmp"],
            build_directory=str(attempt),
            with_cuda=with_cuda,
            is_python_module=False,  # loads the library into this process (torch.ops.load_library)
            verbose=False,
        )
    info = {
        "fingerprint": fingerprint,
        "library": str(library),
        "build_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "with_cuda": with_cuda,
        "sources": [str(p.relative_to(SOURCE_ROOT.parent)) for p in sources],
    }
    final = build_dir / "library"
    shutil.rmtree(final, ignore_errors=True)
    attempt.rename(final)  # the loaded mapping survives the rename; later processes use `final`
    info["library"] = str(final / Path(str(library)).name)
    scratch = build_dir / f"{BUILD_INFO}.{os.getpid()}"
    scratch.write_text(json.dumps(info, indent=1))
    os.replace(scratch, build_dir / BUILD_INFO)
    return info


def load() -> Any:
    """Build (first use) or load the extension; returns this module, whose functions wrap it.

    A failure is remembered: later calls in the same process raise it again at once instead
    of recompiling.
    """
    global _details, _failure
    with _lock:
        if _details is not None:
            return sys.modules[__name__]
        if _failure is not None:
            raise _failure
        try:
            _details = _load_or_build()
        except Exception as exc:
            _failure = exc
            raise
        return sys.modules[__name__]


def is_loaded() -> bool:
    """Whether the extension is loaded in this process (builds nothing)."""
    return _details is not None


def _load_or_build() -> Dict[str, Any]:
    if not (SOURCE_ROOT / "ops.cpp").is_file():
        raise RuntimeError(f"native op sources not found under {SOURCE_ROOT}")
    with_cuda = _with_cuda()
    sources = _sources(with_cuda)
    fingerprint = _fingerprint(sources, with_cuda)
    build_dir = _build_dir(fingerprint)
    build_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(build_dir / ".lock"):
        info = _read_info(build_dir, fingerprint)
        cached = info is not None
        if info is None:
            info = _compile(build_dir, fingerprint, sources, with_cuda)
        else:
            torch.ops.load_library(info["library"])
    return {
        "backend": "native",
        "build_dir": str(build_dir),
        "build_seconds": None if cached else info["build_seconds"],
        "cached": cached,
        "compile_seconds": info.get("build_seconds"),  # what compiling took, now or when cached
        "with_cuda": with_cuda,
        "sources": list(info["sources"]),
    }


def build_details() -> Dict[str, Any]:
    """How the loaded extension was obtained, and the CPU scratch pool (for
    ``dcn-inspect doctor``)."""

    load()
    assert _details is not None
    details = dict(_details)
    details["cpu_scratch_held"] = f"{scratch_bytes() / 2**20:.1f} MiB"
    details["cpu_scratch_limit"] = (
        f"{torch.ops.dcn_inspect._scratch_limit_bytes() / 2**20:.0f} MiB (DCN_INSPECT_SCRATCH_MIB)"
    )
    return details


def scratch_bytes() -> int:
    """Bytes of idle scratch memory the CPU kernels keep for their next call (bounded by
    ``DCN_INSPECT_SCRATCH_MIB``, default 256 MiB)."""
    load()
    return int(torch.ops.dcn_inspect._scratch_bytes())


def release_scratch() -> int:
    """Free the CPU kernels' idle scratch memory; returns the bytes released."""
    load()
    return int(torch.ops.dcn_inspect._release_scratch())


#: Environment variable forcing the CPU deformable-convolution path (see ``conv_path``).
CONV_PATH_ENV = "DCN_INSPECT_CONV_PATH"


def conv_path(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Optional[torch.Tensor] = None,
    backward: bool = False,
) -> str:
    """Which CPU path :func:`deform_conv2d` takes for these arguments: ``planar``, ``cl-blas``
    or ``cl-onednn`` (csrc/cpu/deform_conv2d_cpu.h; ``DCN_INSPECT_CONV_PATH`` forces one)."""
    args = check_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    load()
    empty = input.new_empty(0)
    return str(
        torch.ops.dcn_inspect._deform_conv2d_cpu_path(
            input.cpu(),
            weight.cpu(),
            offset.cpu(),
            (mask if mask is not None else empty).cpu(),
            (bias if bias is not None else empty).cpu(),
            args.stride[0],
            args.stride[1],
            args.padding[0],
            args.padding[1],
            args.dilation[0],
            args.dilation[1],
            args.groups,
            args.offset_groups,
            mask is not None,
            backward,
        )
    )


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Deformable convolution v1 / modulated v2; semantics of ``reference.deform_conv2d``."""
    args = check_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    load()
    empty = input.new_empty(0)
    return torch.ops.dcn_inspect.deform_conv2d(
        input,
        weight,
        offset,
        mask if mask is not None else empty,
        bias if bias is not None else empty,
        args.stride[0],
        args.stride[1],
        args.padding[0],
        args.padding[1],
        args.dilation[0],
        args.dilation[1],
        args.groups,
        args.offset_groups,
        mask is not None,
    )


def deform_roi_pool(
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: Optional[torch.Tensor] = None,
    output_size: IntPair = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> torch.Tensor:
    """Deformable RoI pooling (mmcv semantics); see ``reference.deform_roi_pool``."""
    pooled_h, pooled_w = check_deform_roi_pool(
        input, rois, offset, output_size, spatial_scale, sampling_ratio
    )
    load()
    return torch.ops.dcn_inspect.deform_roi_pool(
        input,
        rois,
        offset if offset is not None else input.new_empty(0),
        pooled_h,
        pooled_w,
        float(spatial_scale),
        max(int(sampling_ratio), 0),  # <= 0: adaptive
        float(gamma),
    )


def deform_psroi_pool(
    input: torch.Tensor,
    rois: torch.Tensor,
    trans: Optional[torch.Tensor] = None,
    spatial_scale: float = 1.0 / 16,
    output_dim: int = 1,
    group_size: int = 3,
    pooled_size: int = 3,
    part_size: Optional[int] = None,
    sample_per_part: int = 4,
    trans_std: float = 0.1,
) -> torch.Tensor:
    """Deformable PS RoI pooling (MSRA semantics); see ``reference.deform_psroi_pool``."""
    part = pooled_size if part_size is None else part_size
    check_deform_psroi_pool(
        input,
        rois,
        trans,
        spatial_scale,
        output_dim,
        group_size,
        pooled_size,
        part,
        sample_per_part,
    )
    load()
    output, _count = torch.ops.dcn_inspect.deform_psroi_pool(
        input,
        rois,
        trans if trans is not None else input.new_empty(0),
        float(spatial_scale),
        output_dim,
        group_size,
        pooled_size,
        part,
        sample_per_part,
        float(trans_std),
    )
    return output


__all__ = [
    "load",
    "build_details",
    "conv_path",
    "scratch_bytes",
    "release_scratch",
    "deform_conv2d",
    "deform_roi_pool",
    "deform_psroi_pool",
]
