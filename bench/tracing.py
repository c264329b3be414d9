"""Speed of the sampling-tree tracer and of one ``dcn-inspect sample-points`` run.

Goals (issue #5): all units of a 38x63 map traced through three 3x3 levels (2394 units x 819
points, 1.74 M points at the deepest level) in under 1 s on CPU; one ``sample-points`` run
with the sample weights under 3 s wall once the native ops are built.

    .venv/bin/python bench/tracing.py              # tracer only
    .venv/bin/python bench/tracing.py --cli        # also time the command on a bundled image
    .venv/bin/python bench/tracing.py --cli --image photo.jpg
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch

from dcn_inspect.analysis.sample_points import trace_sampling_trees
from dcn_inspect.capture.records import DeformConvRecord
from dcn_inspect.core.geometry import FrameMap, LayerGeometry


def stage5_records(height: int, width: int, levels: int, seed: int = 0) -> List[DeformConvRecord]:
    """Records shaped like the paper's res5: 3x3, dilation 2, pad 2, stride-16 frame, random
    offsets."""
    generator = torch.Generator().manual_seed(seed)
    frame = FrameMap(16.0, 16.0, 7.5, 7.5)
    geometry = LayerGeometry(
        (3, 3), (1, 1), (2, 2), (2, 2), (height, width), (height, width), frame, "hooks"
    )
    return [
        DeformConvRecord(
            name=f"layer4.{i}.conv2",
            module_type="DeformConv2dPack",
            offset=torch.randn(1, 18, height, width, generator=generator) * 3.0,
            mask=None,
            groups=1,
            offset_groups=1,
            geometry=geometry,
        )
        for i in reversed(range(levels))
    ]


def bench_tracer(height: int, width: int, levels: int, repeats: int) -> None:
    records = stage5_records(height, width, levels)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    units = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        trees = trace_sampling_trees(records, units)
        best = min(best, time.perf_counter() - started)
    total = sum(x.numel() for x in trees.xs)
    print(
        f"tracer: {units.shape[0]} units of a {height}x{width} map, {levels} levels, "
        f"{trees.xs[-1].numel():,} deepest points ({total:,} in all): "
        f"best of {repeats} {best:.3f} s "
        f"on {torch.get_num_threads()} CPU thread(s)"
    )


def bench_cli(repeats: int, image: Optional[Path], weights: Optional[Path]) -> None:
    """Wall time of the whole command (process start, model load, forward, tracing, all outputs)."""
    from dcn_inspect.io.datasets import bundled_images

    if image is None:
        images = bundled_images()
        if not images:
            print("cli: skipped (no bundled images installed; give --image)")
            return
        image = images[0]
    exe = Path(sys.executable).with_name("dcn-inspect")
    command = [str(exe), "sample-points", str(image)] + (
        ["--weights", str(weights)] if weights else []
    )
    out = Path(tempfile.mkdtemp(prefix="bench-sample-points-"))
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            done = subprocess.run(command + ["--out", str(out)], capture_output=True, text=True)
            elapsed = time.perf_counter() - started
            if done.returncode != 0:
                print(f"cli: failed: {done.stderr.strip()}")
                return
            print(f"cli: {' '.join(command[1:])}: {elapsed:.2f} s wall (process start included)")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=38)
    parser.add_argument("--width", type=int, default=63)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads for the tracer (0: torch's default)",
    )
    parser.add_argument(
        "--cli", action="store_true", help="also time one sample-points run with the sample weights"
    )
    parser.add_argument(
        "--image",
        type=Path,
        default=None,
        help="image for --cli (default: the first bundled image)",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="weights for --cli (default: the bundled sample weights)",
    )
    args = parser.parse_args()
    if args.threads > 0:
        # On a machine shared with other jobs, 1 thread avoids OpenMP barrier waits and is
        # often faster than 2 (measured: 0.15 s vs 1.5 s at load average 5 on 2 cores).
        torch.set_num_threads(args.threads)
    bench_tracer(args.height, args.width, args.levels, args.repeats)
    if args.cli:
        bench_cli(args.repeats, args.image, args.weights)


if __name__ == "__main__":
    main()
