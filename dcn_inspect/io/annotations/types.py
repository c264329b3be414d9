"""What an annotation file says about its images, and the box repairs made while reading it.

Every box is ``x1, y1, x2, y2`` in continuous pixel coordinates of the ORIGINAL image: (0, 0)
is the top-left corner of the top-left pixel, x right, y down (COCO). Boxes with zero or
negative size are dropped and boxes reaching outside their image are clipped
(:class:`BoxRepairs`); both are counted in :attr:`AnnotatedDataset.issues`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

ImageId = Union[int, str]

#: A box ``(x1, y1, x2, y2)`` in continuous original-image pixels.
Box = Tuple[float, float, float, float]


@dataclass
class ImageAnnotation:
    """The ground truth of one image.

    ``boxes`` is [N, 4] float64 ``x1, y1, x2, y2`` in continuous pixels of the original image
    (already clipped to it); ``ignore[n]`` marks crowd (COCO) / difficult (VOC) boxes.
    ``path`` is the image file when it was found on disk, else ``None``. ``segmentations[n]``
    is box n's COCO ``segmentation`` as written (``None``: no mask) and ``sources[n]`` says
    where box n is in its file (for messages); both are empty lists for formats without masks.
    """

    image_id: ImageId
    file_name: str
    path: Optional[Path]
    width: int
    height: int
    boxes: np.ndarray
    labels: List[str]
    ignore: np.ndarray
    segmentations: List[Any] = field(default_factory=list)
    sources: List[str] = field(default_factory=list)

    def has_mask(self, index: int) -> bool:
        """Whether box ``index`` comes with an object mask."""
        return index < len(self.segmentations) and self.segmentations[index] is not None

    @property
    def areas(self) -> np.ndarray:
        """Box areas in original-image pixels², [N] float64."""
        if len(self.boxes) == 0:
            return np.zeros(0, dtype=np.float64)
        return (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])


@dataclass
class AnnotatedDataset:
    """A parsed dataset: its images in file order and what was repaired while reading it."""

    format: str  # "coco" or "voc"
    root: Path  # the COCO json file or the VOC directory
    categories: List[str]
    images: List[ImageAnnotation]
    issues: List[str] = field(default_factory=list)


class BoxRepairs:
    """Counts boxes dropped (zero/negative size) and clipped (outside the image)."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.dropped = 0
        self.clipped = 0
        self.first_dropped = ""
        self.first_clipped = ""

    def clean(self, box: Sequence[float], width: int, height: int, where: str) -> Optional[Box]:
        """Clip ``box`` to the image; ``None`` if it has no area (before or after clipping)."""
        x1, y1, x2, y2 = (float(v) for v in box)
        if not (x2 > x1 and y2 > y1):
            self._drop(where)
            return None
        cx1, cy1 = min(max(x1, 0.0), float(width)), min(max(y1, 0.0), float(height))
        cx2, cy2 = min(max(x2, 0.0), float(width)), min(max(y2, 0.0), float(height))
        if not (cx2 > cx1 and cy2 > cy1):  # entirely outside the image
            self._drop(where)
            return None
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            self.clipped += 1
            self.first_clipped = self.first_clipped or where
        return cx1, cy1, cx2, cy2

    def _drop(self, where: str) -> None:
        self.dropped += 1
        self.first_dropped = self.first_dropped or where

    def issues(self) -> List[str]:
        """One line per kind of repair made, naming the first box it was made to."""
        out = []
        if self.dropped:
            out.append(
                f"{self.source}: {self.dropped} box(es) with zero or negative size "
                f"(or entirely outside their image) dropped, first at {self.first_dropped}"
            )
        if self.clipped:
            out.append(
                f"{self.source}: {self.clipped} box(es) reaching outside their image clipped, "
                f"first at {self.first_clipped}"
            )
        return out


def pack_boxes(boxes: List[Box], ignore: List[bool]) -> Tuple[np.ndarray, np.ndarray]:
    """``boxes`` as [N, 4] float64 and ``ignore`` as [N] bool (shapes kept when empty)."""
    return (
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(ignore, dtype=bool).reshape(-1),
    )
