"""The frameworks' resize: how far Pillow's antialiased bilinear is from mmdetection's cv2 resize,
whether dcn-inspect's cv2 port equals OpenCV, and what the port costs (interleaved, one run).

    python bench/resize.py [--repeats 5]

Images: smooth photo-like 2000x1500 and 4032x3024 (plus noise), shrunk with mmdetection's
1333x800 keep-ratio rule. Differences are in normalised input units (ImageNet std).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from dcn_inspect.io.resize import cv2_bilinear, resized_size

STD = np.array([58.395, 57.12, 57.375])


def photo(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [
        127
        + 100 * np.sin(x / (15 + 9 * c)) * np.cos(y / (25 + 4 * c))
        + rng.normal(0, 12, (height, width))
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=2), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    try:
        import cv2
    except ImportError:
        cv2 = None
        print("opencv not installed: no comparison with OpenCV (pip install -e .[opencv])")
    for height, width in ((1500, 2000), (3024, 4032)):
        image = photo(height, width, seed=height)
        target = resized_size((height, width), 800, 1333, "mmdetection")
        ours = cv2_bilinear(image, target).astype(np.float64)
        pil = np.asarray(Image.fromarray(image).resize(target[::-1], Image.BILINEAR), np.float64)
        error = np.abs((pil - ours) / STD)
        line = (
            f"{width}x{height} -> {target[1]}x{target[0]}: |PIL - cv2 port| "
            f"mean {error.mean():.3f}, max {error.max():.2f} normalised units"
        )
        timings = {"port": [], "pil": [], "cv2": []}
        for _ in range(args.repeats):  # interleaved
            for name in timings:
                if name == "cv2" and cv2 is None:
                    continue
                start = time.perf_counter()
                if name == "port":
                    cv2_bilinear(image, target)
                elif name == "pil":
                    Image.fromarray(image).resize(target[::-1], Image.BILINEAR)
                else:
                    cv2.resize(image, target[::-1], interpolation=cv2.INTER_LINEAR)
                timings[name].append(time.perf_counter() - start)
        if cv2 is not None:
            reference = cv2.resize(image, target[::-1], interpolation=cv2.INTER_LINEAR).astype(
                np.float64
            )
            differing = int((reference != ours).sum())
            line += f"; port vs OpenCV {cv2.__version__}: {differing} differing values"
        best = {name: min(values) for name, values in timings.items() if values}
        line += "; best of {}: ".format(args.repeats) + ", ".join(
            f"{name} {1000 * t:.1f} ms" for name, t in best.items()
        )
        print(line)


if __name__ == "__main__":
    main()
