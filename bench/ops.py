"""Benchmark of deformable convolution: native extension vs pure-PyTorch reference vs F.conv2d.

One process, the implementations interleaved within every repeat (so background load hits them
alike), median of ``--repeats`` timings after ``--warmup`` untimed calls, forward and
forward+backward, at the shapes of issue #15:

  S1      N=1, C 512->512, 38x63, k=3, pad 2, dilation 2  (ResNet-101 res5 at stride 16)
  S1m     S1 with a mask (DCNv2)
  S2      N=8, C 64->64,   56x56, k=3, pad 1
  S3      N=2, C 256->256, 64x64, k=3, pad 1
  small   N=3, C 6->2, 5x4, k=3x2, stride (2,1), pad (1,0), dilation (2,1), 2 groups, 3 offset
          groups, mask: the geometry of torchvision's deform_conv2d tests
  sample  N=1, C 48->48, 32x32, k=3, pad 2, dilation 2, no bias: a layer4 deformable conv of
          the bundled dcn-sample model on one 256x256 image (stride 8)
  sample8 the same on a batch of 8 images

Columns (milliseconds): native, reference, F.conv2d (the regular convolution of the same
shape: the bar), torchvision.ops.deform_conv2d when torchvision's CPU ops import, and "gemm":
the bare GEMMs of the same sizes (forward: [O, K*C/g] x [K*C/g, N*L] per group; backward: the
two of the weight and column gradients) with at::mm, so the gather / scatter overhead of the
native op is what lies between "gemm" and "native". Every shape runs at the default thread
count and at one thread (``--threads``). ``--paths`` adds the native op on each CPU path
(planar, cl-blas, cl-onednn; see csrc/cpu/deform_conv2d_cpu.cpp), the measurement behind the
dispatcher's rule. Offsets are random (std ``--offset-std`` pixels), so samples are
fractional and some fall in the border band. Also reports the peak-memory increase of one
native forward at S1 (maxrss delta, measured in a fresh subprocess).

On a machine whose cores other processes share, ``--threads 1 --clock process`` times CPU
seconds of this process instead of elapsed time, which the other processes barely disturb.

``--rounds R`` runs the whole measurement R times; the last block gives, per shape with a
forward+backward goal (issue #24: native / F.conv2d at most 1.4 at S1, S1m and S3, 2.0 at
S2) and per thread count, the ratio of every round, their maximum and PASS / FAIL of that
maximum: the goal holds in every round or it fails. ``--no-reference`` leaves out the
pure-PyTorch reference (most of the run time at the large shapes); the native / F.conv2d
ratios are measured the same way without it.

Usage: python bench/ops.py [--device cpu|cuda] [--repeats 5] [--warmup 1] [--only S1,S3]
                           [--threads 2,1] [--paths] [--clock wall|process] [--rounds 1]
                           [--no-reference]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dcn_inspect.ops import _native, reference  # noqa: E402

_BASE = dict(kernel=(3, 3), stride=(1, 1), groups=1, offset_groups=1, mask=False, bias=True)
SCENARIOS: Dict[str, dict] = {
    "S1": dict(
        _BASE,
        batch=1,
        channels=512,
        out_channels=512,
        height=38,
        width=63,
        padding=(2, 2),
        dilation=(2, 2),
    ),
    "S1m": dict(
        _BASE,
        batch=1,
        channels=512,
        out_channels=512,
        height=38,
        width=63,
        padding=(2, 2),
        dilation=(2, 2),
        mask=True,
    ),
    "S2": dict(
        _BASE,
        batch=8,
        channels=64,
        out_channels=64,
        height=56,
        width=56,
        padding=(1, 1),
        dilation=(1, 1),
    ),
    "S3": dict(
        _BASE,
        batch=2,
        channels=256,
        out_channels=256,
        height=64,
        width=64,
        padding=(1, 1),
        dilation=(1, 1),
    ),
    "small": dict(
        batch=3,
        channels=6,
        out_channels=2,
        height=5,
        width=4,
        kernel=(3, 2),
        stride=(2, 1),
        padding=(1, 0),
        dilation=(2, 1),
        groups=2,
        offset_groups=3,
        mask=True,
        bias=True,
    ),
    "sample": dict(
        _BASE,
        batch=1,
        channels=48,
        out_channels=48,
        height=32,
        width=32,
        padding=(2, 2),
        dilation=(2, 2),
        bias=False,
    ),
    "sample8": dict(
        _BASE,
        batch=8,
        channels=48,
        out_channels=48,
        height=32,
        width=32,
        padding=(2, 2),
        dilation=(2, 2),
        bias=False,
    ),
}
# Issue #15: native / F.conv2d, (forward, forward+backward); "ref" = native no slower than
# reference.
TARGETS = {
    "S1": (1.25, 1.4),
    "S1m": (1.25, 1.4),
    "S3": (1.25, 1.4),
    "S2": (2.0, 2.0),
    "small": "ref",
    "sample": "ref",
    "sample8": "ref",
}
PATHS = ("planar", "cl-blas", "cl-onednn")


def out_size(s: dict) -> Tuple[int, int]:
    return tuple(  # type: ignore[return-value]
        (size + 2 * p - d * (k - 1) - 1) // st + 1
        for size, p, d, k, st in zip(
            (s["height"], s["width"]), s["padding"], s["dilation"], s["kernel"], s["stride"]
        )
    )


def make_inputs(
    scenario: dict, device: str, offset_std: float, seed: int = 0
) -> Dict[str, Optional[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    s = scenario
    kh, kw = s["kernel"]
    out_h, out_w = out_size(s)
    cin = s["channels"] // s["groups"]
    points = s["offset_groups"] * kh * kw
    x = torch.randn(s["batch"], s["channels"], s["height"], s["width"], generator=gen)
    w = torch.randn(s["out_channels"], cin, kh, kw, generator=gen) / (kh * kw * cin) ** 0.5
    b = torch.randn(s["out_channels"], generator=gen) if s["bias"] else None
    offset = torch.randn(s["batch"], 2 * points, out_h, out_w, generator=gen) * offset_std
    mask = torch.rand(s["batch"], points, out_h, out_w, generator=gen) if s["mask"] else None
    tensors = dict(input=x, weight=w, bias=b, offset=offset, mask=mask)
    return {n: (t.to(device) if t is not None else None) for n, t in tensors.items()}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def torchvision_deform_conv2d(device: str) -> Tuple[Optional[Callable[..., torch.Tensor]], str]:
    """torchvision.ops.deform_conv2d if it imports and runs on ``device``, else (None, why)."""
    try:
        from torchvision.ops import deform_conv2d as tv_deform_conv2d
    except Exception as exc:  # noqa: BLE001 - reported
        return (
            None,
            f"torchvision not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})",
        )
    try:
        x = torch.zeros(1, 1, 3, 3, device=device)
        tv_deform_conv2d(
            x,
            torch.zeros(1, 18, 3, 3, device=device),
            torch.zeros(1, 1, 3, 3, device=device),
            padding=1,
        )
    except Exception as exc:  # noqa: BLE001 - reported
        return (
            None,
            f"torchvision's deform_conv2d does not run on {device} "
            f"({str(exc).splitlines()[0][:80]})",
        )
    return tv_deform_conv2d, "torchvision.ops.deform_conv2d"


def implementations(
    device: str, paths: bool, with_reference: bool = True
) -> Dict[str, Callable[..., torch.Tensor]]:
    def args(t: dict, s: dict) -> tuple:
        return (
            t["input"],
            t["offset"],
            t["weight"],
            t["bias"],
            s["stride"],
            s["padding"],
            s["dilation"],
            t["mask"],
        )

    impls: Dict[str, Callable[..., torch.Tensor]] = {}
    try:
        native = _native.load()
        impls["native"] = lambda t, s: native.deform_conv2d(*args(t, s))
        if paths and device == "cpu":
            for path in PATHS:
                impls[path] = _forced(path, lambda t, s: native.deform_conv2d(*args(t, s)))
    except Exception as exc:  # noqa: BLE001 - reported, the others still run
        print(f"native unavailable: {exc}".splitlines()[0], file=sys.stderr)
    if with_reference:
        impls["reference"] = lambda t, s: reference.deform_conv2d(*args(t, s))
    impls["conv2d"] = lambda t, s: F.conv2d(
        t["input"], t["weight"], t["bias"], s["stride"], s["padding"], s["dilation"], s["groups"]
    )
    tv, _ = torchvision_deform_conv2d(device)
    if tv is not None:
        impls["torchvision"] = lambda t, s: tv(
            t["input"],
            t["offset"],
            t["weight"],
            t["bias"],
            stride=s["stride"],
            padding=s["padding"],
            dilation=s["dilation"],
            mask=t["mask"],
        )
    return impls


def _forced(path: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(t: dict, s: dict) -> torch.Tensor:
        previous = os.environ.get(_native.CONV_PATH_ENV)
        os.environ[_native.CONV_PATH_ENV] = path
        try:
            return fn(t, s)
        finally:
            if previous is None:
                del os.environ[_native.CONV_PATH_ENV]
            else:
                os.environ[_native.CONV_PATH_ENV] = previous

    return run


def gemm_jobs(s: dict, device: str) -> Tuple[Callable[[], object], Callable[[], object]]:
    """The bare GEMMs of the op's size: forward, and forward + the two backward ones."""
    kh, kw = s["kernel"]
    out_h, out_w = out_size(s)
    g = s["groups"]
    rows = kh * kw * s["channels"] // g
    cols = s["batch"] * out_h * out_w
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(g, s["out_channels"] // g, rows, generator=gen).to(device)
    columns = torch.randn(g, rows, cols, generator=gen).to(device)
    grad = torch.randn(g, s["out_channels"] // g, cols, generator=gen).to(device)

    def forward() -> object:
        return torch.bmm(weight, columns)

    def forward_backward() -> object:
        torch.bmm(weight, columns)
        torch.bmm(grad, columns.transpose(1, 2))  # weight gradient
        return torch.bmm(weight.transpose(1, 2), grad)  # column gradient

    return forward, forward_backward


def bench_scenario(
    name: str,
    device: str,
    repeats: int,
    warmup: int,
    offset_std: float,
    paths: bool,
    clock: Callable[[], float] = time.perf_counter,
    with_reference: bool = True,
) -> Dict[str, Dict[str, float]]:
    scenario = SCENARIOS[name]
    impls = implementations(device, paths, with_reference)
    tensors = make_inputs(scenario, device, offset_std)
    leaves = {
        n: (t.detach().clone().requires_grad_() if t is not None else None)
        for n, t in tensors.items()
    }

    def forward(impl: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return impl(tensors, scenario)

        return run

    def forward_backward(impl: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            for t in leaves.values():
                if t is not None:
                    t.grad = None
            out = impl(leaves, scenario)
            out.backward(torch.ones_like(out))
            return out

        return run

    jobs: Dict[Tuple[str, str], Callable[[], object]] = {
        (impl, "fwd"): forward(fn) for impl, fn in impls.items()
    }
    jobs.update({(impl, "fwd+bwd"): forward_backward(fn) for impl, fn in impls.items()})
    jobs[("gemm", "fwd")], jobs[("gemm", "fwd+bwd")] = gemm_jobs(scenario, device)
    # Tiny problems run many calls per timing so a sample is not one timer tick.
    inner: Dict[Tuple[str, str], int] = {}
    for key, job in jobs.items():
        for _ in range(warmup):
            job()
        start = clock()
        job()
        _sync(device)
        inner[key] = max(1, min(1000, int(0.005 / max(clock() - start, 1e-7))))
    samples: Dict[Tuple[str, str], List[float]] = {key: [] for key in jobs}
    for _ in range(repeats):
        for key, job in jobs.items():  # interleaved: every implementation once per repeat
            _sync(device)
            start = clock()
            for _ in range(inner[key]):
                job()
            _sync(device)
            samples[key].append((clock() - start) / inner[key])
    result: Dict[str, Dict[str, float]] = {}
    for (impl, kind), times in samples.items():
        result.setdefault(kind, {})[impl] = statistics.median(times) * 1e3
    return result


MEMORY_PROBE = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
from bench.ops import SCENARIOS, make_inputs
from dcn_inspect.ops import _native
import torch.nn.functional as F
which = sys.argv[2]
native = _native.load()
s = SCENARIOS["S1"]
t = make_inputs(s, "cpu", 1.0)
small = make_inputs(dict(s, batch=1, channels=8, out_channels=8, height=8, width=8), "cpu", 1.0)
def run(t):
    with torch.no_grad():
        if which == "native":
            return native.deform_conv2d(
                t["input"], t["offset"], t["weight"], t["bias"], 1, s["padding"], s["dilation"]
            )
        return F.conv2d(t["input"], t["weight"], t["bias"], 1, s["padding"], s["dilation"])
def status_kib(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
run(small)  # load code paths on a tiny problem first
try:  # Linux: reset the peak-RSS mark so the import's peak does not hide the op's
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before, peak = status_kib("VmRSS"), lambda: status_kib("VmHWM")
except OSError:
    def maxrss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    before, peak = maxrss(), maxrss
out = run(t)
scratch = _native.scratch_bytes() if which == "native" else 0
print(json.dumps({"delta_mib": (peak() - before) / 1024, "output_mib": out.numel() * 4 / 2**20,
                  "scratch_mib": scratch / 2**20}))
"""


def peak_memory(which: str) -> Optional[dict]:
    """Peak-RSS increase (MiB) of one forward at S1 over the RSS before it, in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(REPO), which],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if done.returncode != 0:
        print(
            f"memory probe for {which} failed: {done.stderr.strip().splitlines()[-1:]}",
            file=sys.stderr,
        )
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _verdict(name: str, row_fwd: Dict[str, float], row_bwd: Dict[str, float]) -> str:
    target = TARGETS.get(name)
    if "native" not in row_fwd or target is None:
        return ""
    if target == "ref":
        if "reference" not in row_fwd:
            return "native <= reference: not measured (--no-reference)"
        ok = row_fwd["native"] <= row_fwd["reference"] and row_bwd["native"] <= row_bwd["reference"]
        return f"native <= reference: {'met' if ok else 'MISSED'}"
    fwd, both = row_fwd["native"] / row_fwd["conv2d"], row_bwd["native"] / row_bwd["conv2d"]
    marks = [
        f"fwd {fwd:.2f} <= {target[0]}: {'met' if fwd <= target[0] else 'MISSED'}",
        f"fwd+bwd {both:.2f} <= {target[1]}: {'met' if both <= target[1] else 'MISSED'}",
    ]
    return "; ".join(marks)


def goal_report(ratios: Dict[Tuple[str, int], List[float]]) -> Tuple[List[str], bool]:
    """Lines of the final block: per (shape, threads) with a forward+backward goal, the native /
    F.conv2d ratio of every round, their maximum and PASS / FAIL of it; and whether all pass."""
    lines = [
        "== goals (issue #24): native / F.conv2d forward+backward in every round "
        "(max over rounds) =="
    ]
    all_pass = True
    for (name, threads), values in ratios.items():
        goal = TARGETS[name][1]  # type: ignore[index]
        worst = max(values)
        ok = worst <= goal
        all_pass = all_pass and ok
        rounds = " ".join(f"{v:.2f}" for v in values)
        lines.append(
            f"{name:<5} threads={threads:<3} goal <= {goal:.1f}  rounds: {rounds}  "
            f"max {worst:.2f}  {'PASS' if ok else 'FAIL'}"
        )
    lines.append(f"overall: {'PASS' if all_pass else 'FAIL'}")
    return lines, all_pass


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--offset-std", type=float, default=1.0, help="offset standard deviation, pixels"
    )
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument(
        "--threads",
        default=f"{torch.get_num_threads()},1",
        help="comma-separated thread counts, one table each (default: torch's default, then 1)",
    )
    parser.add_argument(
        "--paths", action="store_true", help="also time the native op on each CPU path"
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="wall: elapsed time; process: this process's CPU time, which ignores the time other "
        "processes hold the cores (one thread only: with several, spin-waits count)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the S1 peak-memory probe")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every table this many times; the goals block reports each round and the max",
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="leave out the pure-PyTorch reference (the slowest column)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be >= 5")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if args.clock == "process" and any(t != 1 for t in threads):
        parser.error("--clock process needs --threads 1")
    clock = time.process_time if args.clock == "process" else time.perf_counter

    _, tv_note = torchvision_deform_conv2d(args.device)
    print(
        f"device={args.device} cpu='{cpu_model()}' torch={torch.__version__} "
        f"cpu_count={os.cpu_count()} "
        f"load_avg={os.getloadavg()[0]:.2f} repeats={args.repeats} warmup={args.warmup} "
        f"offset_std={args.offset_std} clock={args.clock} rounds={args.rounds} "
        f"{_native.CONV_PATH_ENV}={os.environ.get(_native.CONV_PATH_ENV, 'auto')}"
    )
    print(f"torchvision: {tv_note}")
    print(
        "targets (issue #15): native/conv2d fwd <= 1.25x and fwd+bwd <= 1.4x at S1, S1m, S3; "
        "<= 2x both at S2; "
        "native no slower than reference at small, sample, sample8"
    )
    columns = ["native", "reference", "conv2d", "torchvision", "gemm"] + (
        list(PATHS) if args.paths else []
    )
    ratios: Dict[Tuple[str, int], List[float]] = {}
    default_threads = torch.get_num_threads()
    for round_index, count in [(r, c) for r in range(args.rounds) for c in threads]:
        torch.set_num_threads(count)
        label = f"round {round_index + 1}/{args.rounds}, " if args.rounds > 1 else ""
        print(f"\n== {label}threads={count} (ms, medians) ==")
        print(
            f"{'shape':<8} {'pass':<8} "
            + " ".join(f"{n:>10}" for n in columns)
            + f" {'nat/conv':>9} {'gemm/conv':>9} {'ref/nat':>8}"
            + ("  path" if args.device == "cpu" else "")
        )
        for name in names:
            result = bench_scenario(
                name,
                args.device,
                args.repeats,
                args.warmup,
                args.offset_std,
                args.paths,
                clock,
                with_reference=not args.no_reference,
            )
            both = result["fwd+bwd"]
            if isinstance(TARGETS.get(name), tuple) and "native" in both:
                ratios.setdefault((name, count), []).append(both["native"] / both["conv2d"])
            for kind in ("fwd", "fwd+bwd"):
                row = result[kind]
                cells = " ".join(f"{row[n]:>10.3f}" if n in row else f"{'-':>10}" for n in columns)
                nat_conv = row["native"] / row["conv2d"] if "native" in row else float("nan")
                gemm_conv = row["gemm"] / row["conv2d"]
                ref_nat = (  # without the reference: "-", not "nanx"
                    f"{row['reference'] / row['native']:>7.2f}x"
                    if "native" in row and "reference" in row
                    else f"{'-':>8}"
                )
                path = ""
                if args.device == "cpu" and "native" in row:
                    t = make_inputs(SCENARIOS[name], "cpu", args.offset_std)
                    s = SCENARIOS[name]
                    path = "  " + _native.conv_path(
                        t["input"],
                        t["offset"],
                        t["weight"],
                        t["bias"],
                        s["stride"],
                        s["padding"],
                        s["dilation"],
                        t["mask"],
                        backward=kind != "fwd",
                    )
                print(
                    f"{name:<8} {kind:<8} {cells} {nat_conv:>8.2f}x {gemm_conv:>8.2f}x "
                    f"{ref_nat}{path}",
                    flush=True,
                )
            print(f"{'':<8} {'':<8} {_verdict(name, result['fwd'], result['fwd+bwd'])}", flush=True)
    torch.set_num_threads(default_threads)
    print(f"\nload_avg after: {os.getloadavg()[0]:.2f}")
    if args.device == "cpu" and not args.no_memory:
        for which in ("native", "conv2d"):
            probe = peak_memory(which)
            if probe:
                extra = (
                    f", scratch kept {probe['scratch_mib']:.1f} MiB" if which == "native" else ""
                )
                print(
                    f"S1 forward peak RSS increase, {which}: {probe['delta_mib']:.1f} MiB "
                    f"(output itself {probe['output_mib']:.1f} MiB{extra})"
                )
    print(
        "rusage maxrss of this process: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )
    if ratios:
        lines, _ = goal_report(ratios)
        print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
