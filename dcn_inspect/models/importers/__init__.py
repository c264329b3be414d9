"""Models dcn-inspect did not write: mmdetection / detectron2 checkpoints and user model files.

:func:`import_checkpoint` (:mod:`.foreign_checkpoint`) turns a foreign checkpoint into one of
the built-in deformable ResNets (:mod:`dcn_inspect.models.resnet`):

* mmdetection (``state_dict``; ``backbone.`` prefix; ``conv2.conv_offset`` or the older
  ``conv2_offset``): the backbone keys already have torchvision's names, so only the prefix
  goes (:mod:`.mmdetection`).
* detectron2 (``model`` dict, from ``.pth`` or a model-zoo ``.pkl`` of numpy arrays):
  ``stem.conv1`` -> ``conv1``/``bn1``, ``resN.i`` -> ``layer{N-1}.i``, ``convK.norm`` ->
  ``bnK``, ``shortcut`` -> ``downsample.0/1``, ``conv2_offset`` -> ``conv2.conv_offset``
  (:mod:`.detectron2`).

The structure (depth, width, ResNeXt groups and width per group, deformable stages, v1/v2,
offset groups) is read from the weights (:mod:`.resnet_structure`). An offset branch whose
channel count fits both v1 and v2 (108 = 2 x 9 x 6 = 3 x 9 x 4) is read as the embedded
config says (``dcn=dict(type=..., deform_groups=...)``); without one, as the reading whose
group count divides the width of every deformable conv (108 on 128..512-wide convs: DCNv2 with
4 groups), and as DCNv2 when both do. Modulated offset branches need no reordering: detectron2
and mmdetection v1 split the branch's output as [first 2N channels: offsets | last N: mask
logits], and mmcv's ``chunk(3)`` + ``cat`` of the first two chunks is the same split, which
:class:`~dcn_inspect.ops.modules.ModulatedDeformConv2dPack` uses. What the weights cannot tell
-- stride placement and input channel order -- follows each library's defaults
(:mod:`.input_convention`; detectron2: stride on the 1x1 conv, BGR input in 0-255 minus the
pixel mean; mmdetection: pytorch style, RGB ImageNet normalisation, caffe style when its
embedded config says so). BGR weights are made RGB by reversing the input channels of
``conv1``, so every model takes the same RGB input.

Layer names are the checkpoint's: mmdetection's without ``backbone.`` (``layer4.0.conv2``),
detectron2's ``res2..res5`` stages (``res5.0.conv2``; the model is built with those stage
names). Preprocessing is the framework's (:class:`~dcn_inspect.models.registry.Preprocess`):
mmdetection: cv2 bilinear keep-ratio resize to 1333x800 with mmcv's rounding, zero padding to
the config's ``size_divisor`` (32 without one); detectron2: ``ResizeShortestEdge`` 800/1333
(Pillow bilinear, its rounding), padding to 32 for FPN models (``backbone.bottom_up.``), none
for C4 and bare backbones (detectron2's ``size_divisibility``).

Keys outside the backbone (necks, heads: every model-zoo file has them) are ignored quietly:
one line in ``summary.json`` (``import.ignored``), the key table logged at INFO on the
``dcn_inspect`` logger (the CLI prints it with ``--verbose``); missing or unexpected backbone
keys are a one-line error whose ``details`` carry the full :class:`KeyReport`
(:mod:`.weight_fitting`).

:func:`load_user_file` (:mod:`.user_file`) loads ``path/to/file.py:function``: a user function
returning an ``nn.Module`` (optionally with ``weights``). The file may define ``PREPROCESS`` (a
dict with ``mean``, ``std``, ``resize``, ``max_size``, ``interpolation``, ``size_rule``,
``size_divisor``) to describe its input preprocessing.

:func:`load_huggingface` (:mod:`.huggingface`) loads ``hf:DIR``, a folder transformers'
``save_pretrained`` wrote, offline, with the preprocessing of its ``preprocessor_config.json``
(DETR-family image processors, mapped exactly; the image at its own size with ImageNet mean/std
without one).
"""

from dcn_inspect.models.importers.detectron2 import D2_STAGES, convert_detectron2
from dcn_inspect.models.importers.foreign_checkpoint import import_checkpoint
from dcn_inspect.models.importers.huggingface import load_huggingface
from dcn_inspect.models.importers.input_convention import (
    CAFFE_MEAN_RGB,
    CAFFE_STD,
    InputConvention,
)
from dcn_inspect.models.importers.mmdetection import convert_mmdetection
from dcn_inspect.models.importers.resnet_structure import infer_resnet_config
from dcn_inspect.models.importers.state_dicts import (
    ConvertedWeights,
    detect_layout,
    extract_state_dict,
)
from dcn_inspect.models.importers.user_file import load_user_file
from dcn_inspect.models.importers.weight_fitting import KeyReport, fit_weights, load_weights

__all__ = [
    "CAFFE_MEAN_RGB",
    "CAFFE_STD",
    "D2_STAGES",
    "ConvertedWeights",
    "InputConvention",
    "KeyReport",
    "convert_detectron2",
    "convert_mmdetection",
    "detect_layout",
    "extract_state_dict",
    "fit_weights",
    "import_checkpoint",
    "infer_resnet_config",
    "load_huggingface",
    "load_user_file",
    "load_weights",
]
