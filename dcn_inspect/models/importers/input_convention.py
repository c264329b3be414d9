"""How a foreign checkpoint's weights expect their input, said in our terms (RGB in [0, 1]).

Every model dcn-inspect loads takes the same input: RGB, values in [0, 1], normalised by the
model's :class:`~dcn_inspect.models.registry.Preprocess` mean and std. A framework that
trained on BGR 0-255 input minus a pixel mean (detectron2, mmdetection's caffe style) is
expressed as mean / 255 and std / 255 in RGB order, and its ``conv1`` input channels are
reversed (``bgr``) so the RGB image needs no reordering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

from dcn_inspect.models.registry import Preprocess

#: detectron2's default PIXEL_MEAN (BGR order, 0-255) with PIXEL_STD 1, expressed for our RGB
#: [0, 1] input: the same per-colour means, divided by 255, and std 1/255.
CAFFE_MEAN_RGB = (123.675 / 255.0, 116.28 / 255.0, 103.53 / 255.0)
CAFFE_STD = (1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0)


@dataclass
class InputConvention:
    """What a framework's checkpoint expects that its weights cannot say."""

    bgr: bool  # trained on BGR input: conv1's input channels get reversed
    mean: Tuple[float, ...]  # RGB, [0, 1] units
    std: Tuple[float, ...]
    preprocess: Preprocess  # the framework's resize and padding with that mean and std
    size_divisor_source: str  # where the padding divisor came from (for summary.json)
    layer_names: str  # whose layer names the model keeps (for summary.json)
    structure: Dict[str, Any]  # build options the weights cannot tell (stride placement...)
