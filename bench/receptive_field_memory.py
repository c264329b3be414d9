"""Peak memory of ``receptive-field`` against the model's own forward+backward (issue 24: at most
1.5x).

For each case (a model and an image), fresh processes report their peak resident memory
(``ru_maxrss`` of the child, :func:`os.wait4`):

(a) the model's own forward+backward, written by hand: import torch, build the model, read the
    image into the model input (:func:`dcn_inspect.io.images.read_model_input`, the model's own
    resize), one forward with ``requires_grad`` on the input and ``torch.autograd.grad`` of the
    sum of the outputs to the input;
(b) ``dcn-inspect receptive-field IMAGE --model M --at X,Y`` (three units), with the saliency
    search (the default) and with ``--no-saliency``.

Prints each peak, its ratio to (a) and PASS/FAIL against the goal (1.5).

    .venv/bin/python bench/receptive_field_memory.py                    # both cases
    .venv/bin/python bench/receptive_field_memory.py --only resnet --no-saliency-only
    .venv/bin/python bench/receptive_field_memory.py --model resnet101-dcn-mmdet --size 1333x800

The ResNet-50-DCN case (random weights) reads a PNG of noise of ``--size`` (default 1067x800,
width x height); the bundled case reads ``dcn_inspect/data/images/scene_04.jpg``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.5

#: (a): the model's own forward+backward on the model input the command makes.
OWN = r"""
import sys
import torch
from dcn_inspect.io.images import read_model_input
from dcn_inspect.models.loading import load_model
loaded = load_model(sys.argv[1])
_, model_input = read_model_input(sys.argv[2], loaded.preprocess)
images = model_input.tensor.clone().requires_grad_(True)
output = loaded.model(images)
if isinstance(output, dict):
    output = list(output.values())
tensors = list(output) if isinstance(output, (list, tuple)) else [output]
total = sum(t.float().sum() for t in tensors if isinstance(t, torch.Tensor))
(grad,) = torch.autograd.grad(total, images)
print("model input", "x".join(str(n) for n in images.shape), "grad", float(grad.abs().sum()))
"""

#: Writes a PNG of noise (its own process, so the measured ones only read it).
NOISE = r"""
import sys
import numpy as np
from PIL import Image
width, height = int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(sys.argv[1])
"""


@dataclass
class Case:
    label: str
    model: str
    image: Path
    at: List[Tuple[int, int]]  # x, y in original-image pixels


def peak_mib(argv: Sequence[str]) -> Tuple[float, float]:
    """(peak resident MiB, seconds) of a fresh process running ``argv``; its output is shown
    only when it fails."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            log.seek(0)
            sys.stdout.write(log.read().decode(errors="replace")[-4000:])
            raise SystemExit(f"failed ({process.returncode}): {' '.join(argv)}")
    return usage.ru_maxrss / 1024, time.perf_counter() - started


def command(case: Case, out: Path, saliency: bool, batch_size: Optional[int]) -> List[str]:
    cli = str(Path(sys.executable).with_name("dcn-inspect"))
    argv = [cli, "receptive-field", str(case.image), "--model", case.model, "--out", str(out)]
    for x, y in case.at:
        argv += ["--at", f"{x},{y}"]
    if not saliency:
        argv.append("--no-saliency")
    if batch_size is not None:
        argv += ["--batch-size", str(batch_size)]
    return argv


def run_case(case: Case, folder: Path, modes: Sequence[bool], batch_size: Optional[int]) -> bool:
    own, own_s = peak_mib([sys.executable, "-c", OWN, case.model, str(case.image)])
    print(f"{case.label}: {case.model} on {case.image.name}, units at {case.at}")
    print(f"  (a) own forward+backward          peak {own:8.1f} MiB  ({own_s:.0f} s)")
    passed = True
    for saliency in modes:
        out = folder / f"{case.label}_{'saliency' if saliency else 'no_saliency'}"
        peak, seconds = peak_mib(command(case, out, saliency, batch_size))
        ratio = peak / own
        verdict = "PASS" if ratio <= GOAL else "FAIL"
        passed = passed and ratio <= GOAL
        name = "receptive-field" + ("" if saliency else " --no-saliency")
        print(
            f"  (b) {name:30s} peak {peak:8.1f} MiB  ({seconds:.0f} s)  "
            f"ratio {ratio:.2f} (goal {GOAL})  {verdict}"
        )
    return passed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet50-dcn-mmdet")
    parser.add_argument("--size", default="1067x800", help="WIDTHxHEIGHT of the noise image")
    parser.add_argument("--only", choices=["resnet", "bundled"])
    parser.add_argument("--no-saliency-only", action="store_true")
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    modes = [False] if args.no_saliency_only else [True, False]
    passed = True
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        noise = folder / f"noise_{width}x{height}.png"
        cases = []
        if args.only in (None, "resnet"):
            subprocess.run(
                [sys.executable, "-c", NOISE, str(noise), str(width), str(height)], check=True
            )
            points = [
                (width // 8, height // 8),
                (width // 2, height // 2),
                (width - 40, height - 40),
            ]
            cases.append(Case("resnet", args.model, noise, points))
        if args.only in (None, "bundled"):
            image = ROOT / "dcn_inspect" / "data" / "images" / "scene_04.jpg"
            cases.append(Case("bundled", "dcn-sample", image, [(8, 8), (64, 232), (128, 128)]))
        for case in cases:
            passed = run_case(case, folder, modes, args.batch_size) and passed
    print("PASS" if passed else "FAIL")


if __name__ == "__main__":
    main()
