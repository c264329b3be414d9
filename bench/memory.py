"""Peak memory per model-input pixel: the number behind ``DEFAULT_MAX_PIXELS``
(dcn_inspect/core/defaults.py).

For each model, one fresh process per image size reads a PNG of noise, makes the model input
and runs the forward with the offsets captured (what every command does per image:
:func:`dcn_inspect.io.images.read_model_input` + :func:`dcn_inspect.capture.session.probe`), and
reports its peak resident memory (``ru_maxrss``). Bytes per pixel is the slope between the two
largest sizes (the model's weights and the libraries are the intercept).

    .venv/bin/python bench/memory.py                          # dcn-sample and the ResNet-50 DCNs
    .venv/bin/python bench/memory.py --models resnet101-dcn-mmdet --sides 512 1024
    .venv/bin/python bench/memory.py --models decode-16bit decode-rgba --sides 1024 2048 3072

``decode-16bit`` / ``decode-rgba`` measure :func:`dcn_inspect.io.images.load_image` alone (per
image pixel) on the two costliest conversions.

Prints one line per run and per model, then the default ``max_pixels`` that a machine of
``--machine-gib`` (default: defaults.MACHINE_MEMORY_BYTES) holds at the largest slope.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

CHILD = r"""
import json, resource, sys
import numpy as np, torch
from PIL import Image
from dcn_inspect.capture.session import probe
from dcn_inspect.io.images import read_model_input
from dcn_inspect.models.loading import load_model
torch.set_num_threads(1)
model, path, side = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(0)
if model == "decode-16bit":  # the costliest conversion load_image makes (16-bit grey -> 8-bit RGB)
    Image.fromarray(rng.integers(0, 65536, (side, side), dtype=np.uint16)).save(path)
elif model == "decode-rgba":  # alpha composited onto white
    Image.fromarray(rng.integers(0, 256, (side, side, 4), dtype=np.uint8), "RGBA").save(path)
else:
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
del rng
if model.startswith("decode"):
    from dcn_inspect.io.images import load_image
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    image = load_image(path, max_pixels=0)
else:
    loaded = load_model(model)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, model_input = read_model_input(path, loaded.preprocess, resize=0, max_pixels=0)
    result = probe(loaded.model, model_input.tensor)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"pixels": side * side, "before_kib": before, "peak_kib": peak}))
"""


def measure(model: str, side: int, folder: Path) -> Dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(folder / f"noise_{side}.png"), str(side)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from dcn_inspect.core.defaults import MACHINE_MEMORY_BYTES, MEMORY_SHARE_PER_IMAGE

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=["dcn-sample", "resnet50-dcn-paper", "resnet50-dcn-mmdet"]
    )
    parser.add_argument("--sides", nargs="+", type=int, default=[256, 768, 1280])
    parser.add_argument("--machine-gib", type=float, default=MACHINE_MEMORY_BYTES / 2**30)
    args = parser.parse_args()
    slopes: List[float] = []
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            runs = [measure(model, side, Path(folder)) for side in sorted(args.sides)]
            for run in runs:
                print(
                    f"{model:22s} {run['pixels']:>9d} px  peak {run['peak_kib'] / 2**10:8.1f} MiB  "
                    f"(before the image: {run['before_kib'] / 2**10:.1f} MiB)"
                )
            a, b = runs[-2], runs[-1]
            slope = (b["peak_kib"] - a["peak_kib"]) * 1024 / (b["pixels"] - a["pixels"])
            slopes.append(slope)
            print(
                f"{model:22s} {slope:.0f} bytes per "
                f"{'image' if model.startswith('decode') else 'model-input'} pixel"
            )
    worst = max(slopes)
    if all(model.startswith("decode") for model in args.models):
        return
    budget = args.machine_gib * 2**30 * MEMORY_SHARE_PER_IMAGE
    print(
        f"largest: {worst:.0f} B/px; a {args.machine_gib:g} GiB machine, "
        f"{MEMORY_SHARE_PER_IMAGE:g} of it per image, holds {budget / worst / 1e6:.1f} M pixels"
    )


if __name__ == "__main__":
    main()
