"""Whole-process cost of the commands against the same work written by hand (issue #24: every
command within 1.3x of it).

Model ``--model`` (default ``resnet50-dcn-mmdet``, random weights: building it downloads
nothing), images of 1067x800 (photo-like noise, generated into a temporary folder; the model's
own resize gives an 800x1067 input, padded to 800x1088). Each pair is two whole processes:

- ``sample-points IMG --at 500,400``  vs  import torch, build the model, read and preprocess the
  image, one forward;
- ``dilation-stats DATASET`` (4 images, COCO json)  vs  import, build, 4 forwards;
- ``receptive-field IMG --no-saliency --at ...`` (3 units)  vs  import, build, one forward with
  gradients to the input and 3 backwards (``retain_graph``) from the top deformable layer's
  response at each unit.

The hand-written scripts build the model and preprocess with the public library API
(``dcn_inspect.models.registry``, ``dcn_inspect.io.images.read_model_input``: the model's own
resize, normalisation and padding, so the forwards have the same sizes), never the CLI, and run
under the same environment (same torch thread count) and end as a script does, through Python's
teardown, which the command skips once its outputs are written (``dcn_inspect.cli.run``: 0.4-0.7
s of every torch process on a 2-core CPU; ``--twins-skip-teardown`` ends them that way too).
``--repeats`` rounds, the command and its hand-written twin back to back in each (which runs
first alternates), so a busy machine slows both alike; reported: the medians of the seconds,
the median of the rounds' ratios (the verdict) and each round's ratio.

    .venv/bin/python bench/commands.py                      # all three, --repeats 3
    .venv/bin/python bench/commands.py --only sample-points --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

GOAL = 1.3
WIDTH, HEIGHT = 1067, 800
DATASET_IMAGES = 4
#: The units of sample-points (one) and receptive-field (three), original-image pixels.
SAMPLE_AT = ["500,400"]
FIELD_AT = ["500,400", "200,150", "900,650"]
COMMANDS = ("sample-points", "dilation-stats", "receptive-field")

# The hand-written twins: only the work the analysis needs. argv: model, then images / units.
_PREAMBLE = """
import sys
import torch
from dcn_inspect.io.images import read_model_input
from dcn_inspect.models import registry

arch = registry.get(sys.argv[1])
model = arch.build().eval()
"""

HAND_FORWARD = (
    _PREAMBLE
    + """
with torch.no_grad():
    for path in sys.argv[2:]:
        _, model_input = read_model_input(path, arch.preprocess)
        model(model_input.tensor)
print("threads", torch.get_num_threads())
"""
)

HAND_BACKWARD = (
    _PREAMBLE
    + """
path, units = sys.argv[2], [tuple(float(v) for v in a.split(",")) for a in sys.argv[3:]]
image, model_input = read_model_input(path, arch.preprocess)
# the top (last called) deformable layer holds the units, as in the command
deformable = [m for m in model.modules() if "Deform" in type(m).__name__]
top = {}
deformable[-1].register_forward_hook(lambda module, args, output: top.__setitem__("out", output))
x = model_input.tensor.requires_grad_(True)
model(x)
response = top["out"]
h, w = response.shape[-2:]
sy = model_input.input_hw[0] / h * model_input.original_hw[0] / model_input.resized_hw[0]
sx = model_input.input_hw[1] / w * model_input.original_hw[1] / model_input.resized_hw[1]
for ux, uy in units:
    row = min(max(int(uy / sy), 0), h - 1)
    col = min(max(int(ux / sx), 0), w - 1)
    (grad,) = torch.autograd.grad(response[0, :, row, col].sum(), x, retain_graph=True)
print("threads", torch.get_num_threads())
"""
)


#: ``--twins-skip-teardown``: the twins end as ``dcn_inspect.cli.run`` ends the command.
SKIP_TEARDOWN = """
import os
sys.stdout.flush()
os._exit(0)
"""


def photo_like(seed: int, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """A smooth random colour field with a few shapes and fine noise (JPEG-compressible like a
    photograph, not like white noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(9, 12, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 200)
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        field[inside] = rng.uniform(0, 255, size=3)
    field += rng.normal(0, 8, size=field.shape)
    return Image.fromarray(field.clip(0, 255).astype(np.uint8))


def write_photo_dataset(
    images: Path,
    count: int,
    size: Tuple[int, int],
    sides: Sequence[int],
    stem: str,
    jitter: bool = False,
) -> Path:
    """``count`` photo-like JPEGs of ``size`` (width, height) in ``images`` and a COCO json beside
    them with one box per image and side of ``sides`` (squares; ``jitter``: width and height each
    the side times U(0.8, 1.2)) at random places -> the json's path. ``bench/scale.py`` uses it
    too."""
    images.mkdir(parents=True)
    width, height = size
    rng = np.random.default_rng(0)
    entries, annotations = [], []
    for k in range(count):
        name = f"{stem}_{k:03d}.jpg"
        photo_like(k, width, height).save(images / name, quality=90)
        entries.append({"id": k + 1, "file_name": name, "width": width, "height": height})
        for side in sides:
            w, h = (
                (float(side * rng.uniform(0.8, 1.2)), float(side * rng.uniform(0.8, 1.2)))
                if jitter
                else (float(side), float(side))
            )
            x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": k + 1,
                    "category_id": 1,
                    "bbox": [round(x, 1), round(y, 1), round(w, 1), round(h, 1)],
                    "area": round(w, 1) * round(h, 1),
                    "iscrowd": 0,
                }
            )
    coco = {
        "images": entries,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}],
    }
    dataset = images / "annotations.json"
    dataset.write_text(json.dumps(coco))
    return dataset


def write_inputs(folder: Path) -> Tuple[Path, Path]:
    """(one image, a COCO json of DATASET_IMAGES images with one small, medium and large box
    each) under ``folder``."""
    dataset = write_photo_dataset(
        folder / "images", DATASET_IMAGES, (WIDTH, HEIGHT), (24, 80, 300), "photo"
    )
    return dataset.parent / "photo_000.jpg", dataset


def cli() -> List[str]:
    """The console script beside this interpreter, else ``python -m dcn_inspect``."""
    script = Path(sys.executable).parent / "dcn-inspect"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dcn_inspect"]


def pairs(
    model: str, image: Path, dataset: Path, scripts: Dict[str, Path]
) -> Dict[str, Tuple[List[str], List[str]]]:
    """Command name -> (the command's argv less ``--out``, the hand-written twin's argv)."""
    at = [a for xy in SAMPLE_AT for a in ("--at", xy)]
    field_at = [a for xy in FIELD_AT for a in ("--at", xy)]
    images = sorted(str(p) for p in dataset.parent.glob("*.jpg"))
    python = sys.executable
    return {
        "sample-points": (
            [*cli(), "sample-points", str(image), "--model", model, *at],
            [python, str(scripts["forward"]), model, str(image)],
        ),
        "dilation-stats": (
            [*cli(), "dilation-stats", str(dataset), "--model", model],
            [python, str(scripts["forward"]), model, *images],
        ),
        "receptive-field": (
            [*cli(), "receptive-field", str(image), "--model", model, "--no-saliency", *field_at],
            [python, str(scripts["backward"]), model, str(image), *FIELD_AT],
        ),
    }


def timed(argv: Sequence[str]) -> float:
    tick = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - tick
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(argv)}\n{done.stderr[-2000:]}")
    return seconds


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line),
            model,
        )
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores, torch {metadata.version('torch')}"


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50-dcn-mmdet")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=COMMANDS, action="append")
    parser.add_argument(
        "--twins-skip-teardown",
        action="store_true",
        help="end the hand-written scripts as the command ends (os._exit once done): what the "
        "command's own work costs, its faster exit left out",
    )
    args = parser.parse_args(list(argv) or None)
    chosen = args.only or list(COMMANDS)
    root = Path(tempfile.mkdtemp(prefix="dcn-bench-commands-"))
    try:
        image, dataset = write_inputs(root / "data")
        scripts = {"forward": root / "hand_forward.py", "backward": root / "hand_backward.py"}
        ending = SKIP_TEARDOWN if args.twins_skip_teardown else ""
        scripts["forward"].write_text(HAND_FORWARD + ending)
        scripts["backward"].write_text(HAND_BACKWARD + ending)
        runs = pairs(args.model, image, dataset, scripts)
        times: Dict[str, List[Tuple[float, float]]] = {name: [] for name in chosen}
        for round_ in range(args.repeats):
            for name in chosen:
                command, hand = runs[name]
                out = root / f"out-{name}-{round_}"
                if round_ % 2 == 0:
                    seconds = timed([*command, "--out", str(out)]), timed(hand)
                else:
                    hand_seconds = timed(hand)
                    seconds = timed([*command, "--out", str(out)]), hand_seconds
                times[name].append(seconds)
                print(
                    f"round {round_ + 1}: {name:16s} command {seconds[0]:6.2f} s, "
                    f"by hand {seconds[1]:6.2f} s, ratio {seconds[0] / seconds[1]:.2f}",
                    flush=True,
                )
        report(times, args.model, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(times: Dict[str, List[Tuple[float, float]]], model: str, repeats: int) -> None:
    print(
        f"\n{model}, {WIDTH}x{HEIGHT} images, whole processes, median of {repeats} interleaved "
        f"rounds\nmachine: {machine()}"
    )
    header = (
        f"{'command':16s} {'seconds':>8s} {'by hand':>8s} {'ratio':>6s} {'goal':>5s}  result  "
        "per-round ratios"
    )
    print(header)
    print("-" * len(header))
    for name, pairs_ in times.items():
        command = statistics.median(c for c, _ in pairs_)
        hand = statistics.median(h for _, h in pairs_)
        # the median of the rounds' ratios: each round's pair ran back to back, under one load
        ratio = statistics.median(c / h for c, h in pairs_)
        rounds = " ".join(f"{c / h:.2f}" for c, h in pairs_)
        verdict = "PASS" if ratio <= GOAL else "FAIL"
        print(
            f"{name:16s} {command:8.2f} {hand:8.2f} {ratio:6.2f} {GOAL:5.1f}  {verdict:6s}  "
            + rounds
        )


if __name__ == "__main__":
    main()
