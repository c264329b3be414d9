"""Defaults shared by the library and the command line.

Plain constants with no imports, so the CLI can show them in ``--help`` without loading torch.
"""

from __future__ import annotations

#: The model every command uses when none is given (the bundled demo network).
DEFAULT_MODEL = "dcn-sample"
#: The model of `attention` when none is given: the bundled deformable-attention detector.
DEFAULT_ATTENTION_MODEL = "dcn-attn-sample"

#: The machine the defaults are sized for: 24 GiB of memory.
MACHINE_MEMORY_BYTES = 24 * 2**30

#: The share of that memory one image may take: the rest is for a second image of a batch,
#: the images the decoding workers prepare ahead, the libraries and the rest of the system.
MEMORY_SHARE_PER_IMAGE = 0.25

#: Peak memory per model-input pixel through the heaviest built-in model, rounded up
#: (``bench/memory.py``: resnet50-dcn-mmdet 246, resnet50-dcn-paper 235, dcn-sample 88 B/px;
#: decoding costs at most 32 B per image pixel, 16-bit PNG: the model input rules).
BYTES_PER_PIXEL = 250

#: Refuse images, and model inputs after resizing, larger than this many pixels (width * height);
#: 0 means no limit. What one image may cost: 24 GiB / 4 / 250 B per pixel, rounded down to a
#: million (25 M pixels, e.g. 5000 x 5000, ~6 GiB at the peak of the forward).
DEFAULT_MAX_PIXELS = (
    int(MACHINE_MEMORY_BYTES * MEMORY_SHARE_PER_IMAGE / BYTES_PER_PIXEL) // 1_000_000 * 1_000_000
)

#: Longest side, in pixels, a model's preprocessing may resize to (``resize``, ``max_size``):
#: larger than any detector's test scale (mmdetection 800/1333, R-FCN 600/1000) by far.
MAX_RESIZE_SIDE = 16_384

#: Where commands write when no output directory is given.
DEFAULT_OUT = "dcn-inspect-out"

#: Number of deformable levels sample-points traces when neither layers nor levels are given.
DEFAULT_LEVELS = 3

#: Figure formats every command can write.
FIGURE_FORMATS = ("png", "svg", "pdf")
