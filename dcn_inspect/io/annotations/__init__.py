"""Ground-truth boxes from COCO json files, Pascal VOC directories and small box CSVs.

Every box is returned as ``x1, y1, x2, y2`` in continuous pixel coordinates of the ORIGINAL
image: (0, 0) is the top-left corner of the top-left pixel, x right, y down (COCO).

- COCO (:mod:`.coco`): ``bbox = [x, y, w, h]`` is already continuous, so the box is
  ``(x, y, x + w, y + h)``.
- VOC (:mod:`.voc`): ``xmin..xmax`` are 1-based inclusive pixel indices, so pixel ``xmin``
  starts at continuous ``xmin - 1`` and pixel ``xmax`` ends at continuous ``xmax``: the box is
  ``(xmin - 1, ymin - 1, xmax, ymax)``.
- Box CSVs (:mod:`.box_csv`): ``x1,y1,x2,y2[,class]`` as they are.

Image file names are looked up inside the dataset's directory (:mod:`.paths`): a name that
points outside it (absolute, or through ``..``) is only followed with ``allow_outside_paths``;
without it the image is looked for by its bare name inside, and an error names the entry when
it is not there.

Boxes that commands must not score (COCO ``iscrowd`` or a non-zero ``ignore`` field, VOC
``difficult``) are kept with ``ignore = True``. A COCO box keeps its ``segmentation`` as
written (polygons, uncompressed or compressed RLE); :func:`object_mask` /
:func:`decode_segmentation` (:mod:`.masks`) turn it into a boolean mask of the original image,
checked then (a malformed mask is an error naming its annotation only for the commands that
read masks). Boxes with zero or negative size are dropped and boxes reaching outside their
image are clipped; both are counted in :attr:`AnnotatedDataset.issues` (:mod:`.types`).
Malformed files (missing fields, wrong types, unknown or duplicate ids) raise
:class:`~dcn_inspect.core.errors.InputError` naming the file and the entry. Which format a path
is, and one image's entry, are :mod:`.dataset`'s.
"""

from dcn_inspect.io.annotations.box_csv import read_box_csv
from dcn_inspect.io.annotations.coco import load_coco
from dcn_inspect.io.annotations.dataset import (
    annotation_for_image,
    count_labels,
    default_dataset_path,
    detect_format,
    load_dataset,
)
from dcn_inspect.io.annotations.masks import decode_segmentation, object_mask, rasterize_polygons
from dcn_inspect.io.annotations.paths import leaves_directory
from dcn_inspect.io.annotations.types import AnnotatedDataset, ImageAnnotation, ImageId
from dcn_inspect.io.annotations.voc import VOC_IMAGE_SUFFIXES, load_voc, parse_voc_xml

__all__ = [
    "VOC_IMAGE_SUFFIXES",
    "AnnotatedDataset",
    "ImageAnnotation",
    "ImageId",
    "annotation_for_image",
    "count_labels",
    "decode_segmentation",
    "default_dataset_path",
    "detect_format",
    "leaves_directory",
    "load_coco",
    "load_dataset",
    "load_voc",
    "object_mask",
    "parse_voc_xml",
    "rasterize_polygons",
    "read_box_csv",
]
