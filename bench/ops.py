"""Benchmark of deformable convolution: native extension vs pure-PyTorch reference vs F.conv2d.

One run, the implementations interleaved within every repeat (so background load hits them
alike), median of ``--repeats`` timings after ``--warmup`` untimed calls, forward and
forward+backward, at the three shapes of issue #2:

  S1  N=1, C 512->512, 38x63, k=3, pad 2, dilation 2  (ResNet-101 res5 at stride 16)
  S2  N=8, C 64->64,   56x56, k=3, pad 1
  S3  N=2, C 256->256, 64x64, k=3, pad 1

Offsets are random (std ``--offset-std`` pixels), so samples are fractional and some fall in
the border band. Also reports the peak-memory increase of one native forward at S1 (maxrss
delta, measured in a fresh subprocess). ``--device cuda`` adds torchvision.ops.deform_conv2d
when it can be imported.

Usage: python bench/ops.py [--device cpu|cuda] [--repeats 5] [--warmup 1] [--only S1,S3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dcn_inspect.ops import _native, reference  # noqa: E402

SCENARIOS = {
    "S1": dict(batch=1, channels=512, out_channels=512, height=38, width=63, padding=2, dilation=2),
    "S2": dict(batch=8, channels=64, out_channels=64, height=56, width=56, padding=1, dilation=1),
    "S3": dict(batch=2, channels=256, out_channels=256, height=64, width=64, padding=1, dilation=1),
}
TARGETS = (
    "native fwd <= 1.3x F.conv2d fwd; native fwd+bwd <= 1.6x F.conv2d fwd+bwd; "
    "native >= 2x faster than reference at S1 and S3"
)


def make_inputs(scenario: dict, device: str, offset_std: float, seed: int = 0) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    s = scenario
    x = torch.randn(s["batch"], s["channels"], s["height"], s["width"], generator=gen)
    w = torch.randn(s["out_channels"], s["channels"], 3, 3, generator=gen) / (3 * s["channels"] ** 0.5)
    b = torch.randn(s["out_channels"], generator=gen)
    # Same output size as the input for these paddings/dilations.
    offset = torch.randn(s["batch"], 18, s["height"], s["width"], generator=gen) * offset_std
    return {n: t.to(device) for n, t in dict(input=x, weight=w, bias=b, offset=offset).items()}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def implementations(device: str) -> Dict[str, Callable[..., torch.Tensor]]:
    impls: Dict[str, Callable[..., torch.Tensor]] = {}
    try:
        native = _native.load()
        impls["native"] = lambda t, s: native.deform_conv2d(
            t["input"], t["offset"], t["weight"], t["bias"], 1, s["padding"], s["dilation"]
        )
    except Exception as exc:  # noqa: BLE001 - reported, the others still run
        print(f"native unavailable: {exc}".splitlines()[0], file=sys.stderr)
    impls["reference"] = lambda t, s: reference.deform_conv2d(
        t["input"], t["offset"], t["weight"], t["bias"], 1, s["padding"], s["dilation"]
    )
    impls["conv2d"] = lambda t, s: F.conv2d(t["input"], t["weight"], t["bias"], 1, s["padding"], s["dilation"])
    if device == "cuda":
        try:
            from torchvision.ops import deform_conv2d as tv_deform_conv2d

            impls["torchvision"] = lambda t, s: tv_deform_conv2d(
                t["input"], t["offset"], t["weight"], t["bias"], 1, s["padding"], s["dilation"]
            )
        except ImportError:
            print("torchvision not importable: skipping it", file=sys.stderr)
    return impls


def time_once(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def bench_scenario(
    name: str, device: str, repeats: int, warmup: int, offset_std: float
) -> Dict[str, Dict[str, float]]:
    scenario = SCENARIOS[name]
    impls = implementations(device)
    tensors = make_inputs(scenario, device, offset_std)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in tensors.items()}

    def forward(impl: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return impl(tensors, scenario)

        return run

    def forward_backward(impl: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            for t in leaves.values():
                t.grad = None
            out = impl(leaves, scenario)
            out.backward(torch.ones_like(out))
            return out

        return run

    jobs = {(impl, "fwd"): forward(fn) for impl, fn in impls.items()}
    jobs.update({(impl, "fwd+bwd"): forward_backward(fn) for impl, fn in impls.items()})
    for job in jobs.values():
        for _ in range(warmup):
            job()
    samples: Dict[tuple, List[float]] = {key: [] for key in jobs}
    for _ in range(repeats):
        for key, job in jobs.items():  # interleaved: every implementation once per repeat
            samples[key].append(time_once(job, device))
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
            return native.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], 1, s["padding"], s["dilation"])
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
    before, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = run(t)
print(json.dumps({"delta_mib": (peak() - before) / 1024, "output_mib": out.numel() * 4 / 2**20}))
"""


def peak_memory(which: str) -> Optional[dict]:
    """Peak-RSS increase (MiB) of one forward at S1 over the RSS before it, in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(REPO), which], capture_output=True, text=True, cwd=REPO
    )
    if done.returncode != 0:
        print(f"memory probe for {which} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--offset-std", type=float, default=1.0, help="offset standard deviation, pixels")
    parser.add_argument("--only", default="S1,S2,S3", help="comma-separated scenarios")
    parser.add_argument("--no-memory", action="store_true", help="skip the S1 peak-memory probe")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be >= 5")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")

    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"cpu_count={os.cpu_count()} load_avg={os.getloadavg()[0]:.2f} repeats={args.repeats} "
          f"warmup={args.warmup} offset_std={args.offset_std}")
    print(f"targets: {TARGETS}")
    header = f"{'scen':<4} {'pass':<8} " + " ".join(f"{n:>12}" for n in ("native", "reference", "conv2d", "torchvision"))
    header += f" {'nat/conv':>9} {'ref/nat':>8}"
    print(header)
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        result = bench_scenario(name, args.device, args.repeats, args.warmup, args.offset_std)
        for kind in ("fwd", "fwd+bwd"):
            row = result[kind]
            cells = " ".join(f"{row[n]:>10.1f}ms" if n in row else f"{'-':>12}"
                             for n in ("native", "reference", "conv2d", "torchvision"))
            nat_conv = row["native"] / row["conv2d"] if "native" in row else float("nan")
            ref_nat = row["reference"] / row["native"] if "native" in row else float("nan")
            print(f"{name:<4} {kind:<8} {cells} {nat_conv:>8.2f}x {ref_nat:>7.2f}x", flush=True)
    if args.device == "cpu" and not args.no_memory:
        for which in ("native", "conv2d"):
            probe = peak_memory(which)
            if probe:
                print(f"S1 forward peak RSS increase, {which}: {probe['delta_mib']:.1f} MiB "
                      f"(output itself {probe['output_mib']:.1f} MiB)")
    print(f"rusage maxrss of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
