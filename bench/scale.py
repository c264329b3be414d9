"""Scale: ``dilation-stats`` images per second on a ResNet-50-DCN at 800x1333, with one process
and with ``torchrun`` processes, the time it projects for COCO val2017 (5,000 images), and
``receptive-field`` seconds per unit at the same size (issue #24).

Each figure is a slope between two whole runs of the command (``python -m dcn_inspect``, fresh
processes), so the fixed costs (imports, building the model, the first batch, writing outputs)
drop out of the rate and are reported apart:

- ``dilation-stats DATASET --max-images N`` for N = ``--images`` (default 4 and 12): seconds
  per image = (t(N2) - t(N1)) / (N2 - N1); fixed = t(N1) - N1 * that;
  COCO val2017 = fixed + 5000 * seconds per image. With ``--procs P`` (P > 1) the command runs
  under ``python -m torch.distributed.run --nproc-per-node P`` (images sharded by index; on the
  CPU torchrun gives each process one thread unless OMP_NUM_THREADS is set);
- ``receptive-field IMAGE --at ...`` with U = ``--units`` (default 1 and 3) units, with and
  without the saliency search (``--no-saliency``): seconds per unit likewise.

The dataset is generated: 1333x800 JPEGs, the photo-like images of ``bench/commands.py`` (the
model has untrained weights, which run at the speed of trained ones) with a COCO json of a few boxes
per image, so the model input is 800x1333 (mmdetection's 1333x800 keep-ratio rule, padded to
800x1344). COCO's own images (most 640x480) become 800x1067 inputs: the projection is an upper
bound for them.

    .venv/bin/python bench/scale.py                                  # CPU, 1 and 2 processes
    .venv/bin/python bench/scale.py --device cuda --procs 1 --images 8 40 --units 4 16
    .venv/bin/python bench/scale.py --no-receptive-field --json scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

from commands import write_photo_dataset  # bench/commands.py: the same photo-like images

COCO_VAL2017_IMAGES = 5000
HEIGHT, WIDTH = 800, 1333


def write_dataset(folder: Path, count: int) -> Path:
    """``count`` JPEGs and a COCO json with small, medium and large boxes."""
    return write_photo_dataset(
        folder / "images", count, (WIDTH, HEIGHT), (40, 150, 420), "scale", jitter=True
    )


def run_timed(command: Sequence[str], env: Dict[str, str]) -> float:
    """Seconds of one whole process; a failure stops the benchmark with its output."""
    tick = time.perf_counter()
    done = subprocess.run(list(command), env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - tick
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return seconds


def launcher(procs: int) -> List[str]:
    if procs == 1:
        return [sys.executable, "-m", "dcn_inspect"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={procs}",
        "-m",
        "dcn_inspect",
    ]


def slope(counts: Sequence[int], seconds: Sequence[float]) -> Dict[str, float]:
    per_item = (seconds[1] - seconds[0]) / (counts[1] - counts[0])
    return {"per_item_s": per_item, "fixed_s": seconds[0] - counts[0] * per_item}


def machine() -> str:
    import torch

    cpu = platform.processor() or "cpu"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50-dcn-mmdet")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, nargs=2, default=[4, 12])
    parser.add_argument("--units", type=int, nargs=2, default=[1, 3])
    parser.add_argument("--no-receptive-field", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.images[1] <= args.images[0] or args.units[1] <= args.units[0]:
        parser.error("--images and --units take two increasing counts")
    env = dict(os.environ)
    results: Dict[str, object] = {
        "machine": machine(),
        "model": args.model,
        "device": args.device,
        "input_hw": [HEIGHT, WIDTH],
    }
    print(f"machine: {results['machine']}; model {args.model} (untrained), input 800x1333")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        dataset = write_dataset(root / "data", args.images[1])
        images = root / "data" / "images"
        common = ["--model", args.model, "--device", args.device]
        print(f"\ndilation-stats, whole runs of {args.images[0]} and {args.images[1]} images")
        header = ("processes", "s/image", "images/s", "fixed s", "COCO val2017")
        print("{:>9} {:>8} {:>9} {:>8} {:>13}".format(*header))
        rates = {}
        for procs in args.procs:
            seconds = [
                run_timed(
                    launcher(procs)
                    + ["dilation-stats", str(dataset), "--images", str(images)]
                    + ["--max-images", str(n), "--out", str(root / f"ds_{procs}_{n}")]
                    + common,
                    env,
                )
                for n in args.images
            ]
            fit = slope(args.images, seconds)
            coco = fit["fixed_s"] + COCO_VAL2017_IMAGES * fit["per_item_s"]
            rates[str(procs)] = {**fit, "runs_s": seconds, "coco_val2017_h": coco / 3600}
            print(
                f"{procs:>9} {fit['per_item_s']:>8.2f} {1 / fit['per_item_s']:>9.3f}"
                f" {fit['fixed_s']:>8.1f} {coco / 3600:>11.2f} h"
            )
        results["dilation_stats"] = {"images": args.images, "by_processes": rates}
        if not args.no_receptive_field:
            image = images / "scale_000.jpg"
            at = [f"{80 + 150 * k},{100 + 70 * (k % 8)}" for k in range(args.units[1])]
            print(f"\nreceptive-field, whole runs of {args.units[0]} and {args.units[1]} units")
            print(f"{'search':>12} {'s/unit':>8} {'fixed s':>8}")
            field_rates = {}
            for label, extra in (("no-saliency", ["--no-saliency"]), ("saliency", [])):
                seconds = []
                for n in args.units:
                    spots = [a for p in at[:n] for a in ("--at", p)]
                    seconds.append(
                        run_timed(
                            [sys.executable, "-m", "dcn_inspect", "receptive-field", str(image)]
                            + spots
                            + extra
                            + ["--out", str(root / f"rf_{label}_{n}")]
                            + common,
                            env,
                        )
                    )
                fit = slope(args.units, seconds)
                field_rates[label] = {**fit, "runs_s": seconds}
                print(f"{label:>12} {fit['per_item_s']:>8.2f} {fit['fixed_s']:>8.1f}")
            results["receptive_field"] = {"units": args.units, "by_search": field_rates}
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
