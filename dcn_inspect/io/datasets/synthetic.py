"""Synthetic shape scenes: the demo data and the training task of the sample network.

Every scene is a cluttered, textured background with a few shapes (disc, square, triangle,
cross, star) at widely varied scales, from ~12 px to nearly the whole image, so that objects
fall in all three area categories of the paper's analysis (small < 96^2, medium 96^2..224^2,
large >= 224^2 pixels of box area, COCO). Shape fills are drawn from the same texture
distribution as the background and clutter and are independent of the class; every shape
(and half the clutter) gets a class-agnostic border. Which shape a pixel belongs to can only
be told from the outline, so recognising an interior pixel needs context proportional to the
object's size: that is what makes learned offsets worth having. Texture patterns and border
widths scale with the region's size (as the parts of real objects look bigger on bigger
objects), so local features carry a cue to the object's scale but none to its class.

Coordinates are COCO continuous pixels: pixel (r, c) covers [c, c+1) x [r, r+1). A shape is
rasterised by testing pixel centres against its polygon, and its box is the exact extent of
the drawn pixels (x1 = first column, x2 = last column + 1), so boxes match the image exactly.
Later (smaller) shapes occlude earlier ones; boxes and polygons are amodal, the label map is
what is visible.

Everything is drawn from one ``numpy.random.Generator``: the same seed gives the same
scenes, pixel for pixel.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.path import Path as PolygonPath
from PIL import Image

#: Shape classes; label 0 is background, class k has label k + 1 and COCO category id k + 1.
CLASSES: Tuple[str, ...] = ("disc", "square", "triangle", "cross", "star")

#: COCO area thresholds (box area in pixels) of the small / medium / large split.
SMALL_MAX_AREA = 96.0**2
LARGE_MIN_AREA = 224.0**2


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn. Sizes are box sides in pixels."""

    height: int = 256
    width: int = 256
    p_large: float = 0.4  # probability of one large shape in a scene
    large_side: Tuple[int, int] = (230, 252)
    medium_count: Tuple[int, int] = (0, 2)  # inclusive range of medium shapes
    medium_side: Tuple[int, int] = (100, 215)
    small_count: Tuple[int, int] = (2, 6)
    small_side: Tuple[int, int] = (12, 90)
    aspect: Tuple[float, float] = (0.8, 1.25)  # width / height of a shape's box
    clutter: Tuple[int, int] = (2, 6)  # irregular background blobs and bars (not objects)
    min_contrast: float = 60.0  # RGB distance between a shape's fill and the background under it
    max_occlusion: float = 0.3  # a new shape may hide at most this fraction of an earlier one

    @staticmethod
    def for_size(size: int) -> "SceneConfig":
        """Square scenes of ``size`` pixels with every shape size scaled from the 256-pixel
        defaults."""
        base = SceneConfig()
        if size == base.width:
            return base
        scale = size / base.width

        def scaled(pair: Tuple[int, int]) -> Tuple[int, int]:
            return max(4, int(round(pair[0] * scale))), max(5, int(round(pair[1] * scale)))

        large = scaled(base.large_side)
        return replace(
            base,
            height=size,
            width=size,
            large_side=(min(large[0], size - 2), min(large[1], size - 1)),
            medium_side=scaled(base.medium_side),
            small_side=scaled(base.small_side),
        )


@dataclass
class SceneObject:
    """One shape: class, amodal polygon, exact pixel box [x1, y1, x2, y2] and mask area."""

    label: int  # 1..len(CLASSES)
    polygon: np.ndarray  # [V, 2] (x, y), continuous image coordinates
    box: Tuple[float, float, float, float]
    area: float  # pixels of the (amodal) shape mask

    @property
    def name(self) -> str:
        return CLASSES[self.label - 1]

    @property
    def box_area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclass
class Scene:
    image: np.ndarray  # [H, W, 3] uint8
    labels: np.ndarray  # [H, W] int64, 0 = background, k = visible class k
    instances: np.ndarray  # [H, W] int64, index into ``objects`` of the visible shape, -1 = none
    objects: List[SceneObject] = field(default_factory=list)


def area_category(
    box_area: float, small_max: float = SMALL_MAX_AREA, large_min: float = LARGE_MIN_AREA
) -> str:
    """COCO-style size category of a box area (pixels): "small", "medium" or "large"."""
    if box_area < small_max:
        return "small"
    if box_area >= large_min:
        return "large"
    return "medium"


# --------------------------------------------------------------------------------------------
# Textures (shared by background, clutter and shape fills)
# --------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a random ``cells`` x ``cells`` grid upsampled bilinearly."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    image = Image.fromarray(grid, mode="F").resize((width, height), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def random_texture(
    rng: np.random.Generator, height: int, width: int, scale: Optional[float] = None
) -> np.ndarray:
    """A random texture [H, W, 3] float32 in [0, 255]: dots, stripes, checks or blotches, with
    grain.

    Pattern sizes are proportional to ``scale`` (default: the region's larger side), as the
    parts of real objects look bigger on bigger objects: a shape's fill tells its size, not
    its class.
    """
    scale = float(max(height, width) if scale is None else scale)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    other = rng.uniform(0, 255, size=3).astype(np.float32)
    kind = rng.integers(0, 4)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 0:  # dots on a square lattice
        period = max(scale * rng.uniform(0.08, 0.18), 3.0)
        radius = period * rng.uniform(0.2, 0.35)
        dy, dx = ys % period - period / 2, xs % period - period / 2
        mix = (dy * dy + dx * dx < radius * radius).astype(np.float32) * rng.uniform(0.4, 0.9)
    elif kind == 1:  # stripes
        angle = rng.uniform(0, math.pi)
        period = max(scale * rng.uniform(0.06, 0.18), 3.0)
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) / period
        mix = (np.sin(2 * math.pi * phase) > 0).astype(np.float32) * rng.uniform(0.3, 0.8)
    elif kind == 2:  # checks
        period = max(scale * rng.uniform(0.06, 0.16), 3.0)
        mix = (((xs // period) + (ys // period)) % 2).astype(np.float32) * rng.uniform(0.3, 0.8)
    else:  # blotches, a few across the region whatever its size
        cells = max(int(round(max(height, width) / scale * rng.uniform(3, 7))), 1)
        mix = _smooth_noise(rng, height, width, cells)
    texture = base[None, None, :] * (1 - mix[..., None]) + other[None, None, :] * mix[..., None]
    grain = rng.normal(0.0, rng.uniform(2, 10), size=(height, width, 1)).astype(np.float32)
    return np.clip(texture + grain, 0, 255)


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def _unit_outline(label: int, rng: np.random.Generator) -> np.ndarray:
    """Outline of a class in a unit frame around the origin, [V, 2]."""
    name = CLASSES[label - 1]
    if name == "disc":
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if name == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    if name == "triangle":
        t = np.array([-math.pi / 2, math.pi / 6, 5 * math.pi / 6])
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if name == "cross":
        arm = rng.uniform(0.28, 0.42)
        a = arm
        return np.array(
            [
                [-a, -1],
                [a, -1],
                [a, -a],
                [1, -a],
                [1, a],
                [a, a],
                [a, 1],
                [-a, 1],
                [-a, a],
                [-1, a],
                [-1, -a],
                [-a, -a],
            ],
            dtype=np.float64,
        )
    if name == "star":
        inner = rng.uniform(0.38, 0.5)
        t = -math.pi / 2 + np.arange(10) * math.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    raise ValueError(f"unknown class label {label}")


def _shape_polygon(
    rng: np.random.Generator, label: int, box_w: float, box_h: float, x0: float, y0: float
) -> np.ndarray:
    """A randomly rotated outline scaled to fill the box [x0, x0+box_w] x [y0, y0+box_h]."""
    outline = _unit_outline(label, rng)
    angle = rng.uniform(0, 2 * math.pi)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    points = outline @ rotation.T
    lo, hi = points.min(axis=0), points.max(axis=0)
    points = (points - lo) / (hi - lo)
    return points * np.array([box_w, box_h]) + np.array([x0, y0])


def rasterize(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """Boolean mask [H, W] of the pixels whose centres lie inside ``polygon``."""
    mask = np.zeros((height, width), dtype=bool)
    x1 = max(int(math.floor(polygon[:, 0].min())), 0)
    x2 = min(int(math.ceil(polygon[:, 0].max())), width)
    y1 = max(int(math.floor(polygon[:, 1].min())), 0)
    y2 = min(int(math.ceil(polygon[:, 1].max())), height)
    if x2 <= x1 or y2 <= y1:
        return mask
    ys, xs = np.mgrid[y1:y2, x1:x2]
    centres = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1)
    inside = PolygonPath(polygon).contains_points(centres)
    mask[y1:y2, x1:x2] = inside.reshape(y2 - y1, x2 - x1)
    return mask


def _box_slices(mask: np.ndarray) -> Optional[Tuple[slice, slice]]:
    """Row and column slices of the mask's bounding box (textures are drawn only there)."""
    box = _mask_box(mask)
    if box is None:
        return None
    x1, y1, x2, y2 = (int(v) for v in box)
    return slice(y1, y2), slice(x1, x2)


def _mask_box(mask: np.ndarray) -> Optional[Tuple[float, float, float, float]]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def _blob_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float) -> np.ndarray:
    """An irregular smooth blob (background clutter that is not any shape class)."""
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    wobble = np.ones_like(t)
    for harmonic in (2, 3, 5):
        wobble += rng.uniform(0.05, 0.25) * np.sin(harmonic * t + rng.uniform(0, 2 * math.pi))
    return np.stack([cx + radius * wobble * np.cos(t), cy + radius * wobble * np.sin(t)], axis=1)


def _bar_polygon(rng: np.random.Generator, cx: float, cy: float, length: float) -> np.ndarray:
    """A thin rotated bar (clutter)."""
    angle = rng.uniform(0, math.pi)
    half_w = rng.uniform(1.5, 5)
    d = np.array([math.cos(angle), math.sin(angle)]) * length / 2
    n = np.array([-math.sin(angle), math.cos(angle)]) * half_w
    c = np.array([cx, cy])
    return np.stack([c - d - n, c + d - n, c + d + n, c - d + n])


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


def _sample_sides(rng: np.random.Generator, config: SceneConfig) -> List[Tuple[float, float]]:
    """Box sizes (w, h) of the scene's shapes, largest first (so smaller shapes are drawn on
    top)."""
    sides: List[float] = []
    if rng.random() < config.p_large:
        sides.append(rng.uniform(*config.large_side))
    for _ in range(int(rng.integers(config.medium_count[0], config.medium_count[1] + 1))):
        sides.append(rng.uniform(*config.medium_side))
    for _ in range(int(rng.integers(config.small_count[0], config.small_count[1] + 1))):
        # log-uniform: as many tiny shapes as 60-90 px ones
        sides.append(
            math.exp(rng.uniform(math.log(config.small_side[0]), math.log(config.small_side[1])))
        )
    sides.sort(reverse=True)
    out = []
    for side in sides:
        aspect = math.exp(rng.uniform(math.log(config.aspect[0]), math.log(config.aspect[1])))
        w, h = side * math.sqrt(aspect), side / math.sqrt(aspect)
        # shapes stay inside the image
        w = min(w, config.width - 1.0)
        h = min(h, config.height - 1.0)
        out.append((w, h))
    return out


def generate_scene(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> Scene:
    """Draw one scene; all randomness comes from ``rng``."""
    height, width = config.height, config.width
    # The background's pattern size is random, independent of the shapes'.
    canvas = random_texture(
        rng, height, width, scale=math.exp(rng.uniform(math.log(16), math.log(256)))
    )
    # Background clutter: blobs and bars with their own textures, labelled background.
    for _ in range(int(rng.integers(config.clutter[0], config.clutter[1] + 1))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        if rng.random() < 0.6:
            polygon = _blob_polygon(rng, cx, cy, rng.uniform(8, 60))
        else:
            polygon = _bar_polygon(rng, cx, cy, rng.uniform(20, 160))
        mask = rasterize(polygon, height, width)
        region = _box_slices(mask)
        if region is not None:
            sub = mask[region]
            canvas[region][sub] = random_texture(rng, *sub.shape)[sub]
            if rng.random() < 0.5:
                _draw_outline(rng, canvas[region], sub)

    labels = np.zeros((height, width), dtype=np.int64)
    instances = np.full((height, width), -1, dtype=np.int64)
    visible = np.zeros((0, height, width), dtype=bool)
    objects: List[SceneObject] = []
    for box_w, box_h in _sample_sides(rng, config):
        for _attempt in range(20):
            label = int(rng.integers(1, len(CLASSES) + 1))
            x0 = rng.uniform(0, width - box_w)
            y0 = rng.uniform(0, height - box_h)
            polygon = _shape_polygon(rng, label, box_w, box_h, x0, y0)
            mask = rasterize(polygon, height, width)
            if mask.sum() < 16:
                continue
            if visible.shape[0]:
                hidden = (visible & mask[None]).sum(axis=(1, 2))
                remaining = visible.sum(axis=(1, 2))
                if np.any(hidden > config.max_occlusion * np.maximum(remaining, 1)):
                    continue
            region = _box_slices(mask)
            assert region is not None
            sub = mask[region]
            fill = _contrasting_texture(rng, canvas[region], sub, config.min_contrast)
            canvas[region][sub] = fill[sub]
            _draw_outline(rng, canvas[region], sub)
            visible = np.concatenate([visible & ~mask[None], mask[None]], axis=0)
            labels[mask] = label
            instances[mask] = len(objects)
            box = _mask_box(mask)
            assert box is not None
            objects.append(
                SceneObject(label=label, polygon=polygon, box=box, area=float(mask.sum()))
            )
            break
    return Scene(
        image=np.round(canvas).astype(np.uint8), labels=labels, instances=instances, objects=objects
    )


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a (2*radius+1)^2 square (separable; outside the crop counts as empty)."""
    padded = np.pad(mask, radius, constant_values=False)
    rows = padded[:, 0 : padded.shape[1] - 2 * radius].copy()
    for shift in range(1, 2 * radius + 1):
        rows &= padded[:, shift : shift + padded.shape[1] - 2 * radius]
    out = rows[0 : rows.shape[0] - 2 * radius].copy()
    for shift in range(1, 2 * radius + 1):
        out &= rows[shift : shift + rows.shape[0] - 2 * radius]
    return out


def _draw_outline(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray) -> None:
    """Paint a border inside ``mask`` (a region crop), its width proportional to the region's size.

    Class-agnostic (shapes and clutter get the same kind), so it marks where a region ends,
    not what it is.
    """
    width = max(1, int(round(0.02 * max(mask.shape))))
    ring = mask & ~_erode(mask, width)
    level = rng.uniform(0, 50) if rng.random() < 0.5 else rng.uniform(205, 255)
    canvas[ring] = level + rng.normal(0, 8, size=(int(ring.sum()), 3)).astype(np.float32)


def _contrasting_texture(
    rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, min_contrast: float
) -> np.ndarray:
    """A fill texture whose mean colour differs from the canvas under ``mask`` (else the shape
    is invisible)."""
    under = canvas[mask].mean(axis=0)
    texture = random_texture(rng, *mask.shape)
    for _ in range(10):
        if np.linalg.norm(texture[mask].mean(axis=0) - under) >= min_contrast:
            break
        texture = random_texture(rng, *mask.shape)
    return texture


def scenes(seed: int, n: int, config: SceneConfig = SceneConfig()) -> Iterator[Scene]:
    """``n`` scenes from ``seed``; scene k depends only on (seed, k), so prefixes agree."""
    for index in range(n):
        yield generate_scene(np.random.default_rng([seed, index]), config)


# --------------------------------------------------------------------------------------------
# Writers: COCO json and Pascal VOC xml
# --------------------------------------------------------------------------------------------


#: Image file formats of :func:`write_dataset`: PNG is exact, JPEG (quality 90) ~5x smaller.
IMAGE_FORMATS = {
    "png": ("PNG", ".png", {"optimize": True}),
    "jpg": ("JPEG", ".jpg", {"quality": 90}),
}


def save_image(path: Path, image: np.ndarray, image_format: str = "png") -> None:
    """Write an RGB uint8 image atomically (deterministic bytes for the same pixels)."""
    from dcn_inspect.core.files import atomic_path

    pil_format, _suffix, options = IMAGE_FORMATS[image_format]
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format=pil_format, **options)


def coco_entries(
    image_id: int, file_name: str, scene: Scene, first_annotation_id: int
) -> Tuple[dict, List[dict]]:
    """The COCO ``images`` entry of one scene and its ``annotations`` (ids from
    ``first_annotation_id``): boxes [x, y, w, h], mask area, iscrowd 0, polygon segmentation."""
    height, width = scene.labels.shape
    image = {"id": image_id, "file_name": file_name, "width": width, "height": height}
    annotations = []
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        annotations.append(
            {
                "id": first_annotation_id + len(annotations),
                "image_id": image_id,
                "category_id": obj.label,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": obj.area,
                "iscrowd": 0,
                "segmentation": [[round(float(v), 2) for v in obj.polygon.ravel()]],
            }
        )
    return image, annotations


def coco_document(images: List[dict], annotations: List[dict]) -> dict:
    """COCO instances json around ``images`` and ``annotations`` entries (see
    :func:`coco_entries`)."""
    categories = [
        {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)
    ]
    return {
        "info": {"description": "dcn-inspect synthetic shape scenes", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def coco_dict(file_names: Sequence[str], all_scenes: Sequence[Scene]) -> dict:
    """COCO instances json of scenes held in memory (``write_dataset`` streams instead)."""
    images: List[dict] = []
    annotations: List[dict] = []
    for image_id, (file_name, scene) in enumerate(zip(file_names, all_scenes), start=1):
        image, entries = coco_entries(image_id, file_name, scene, len(annotations) + 1)
        images.append(image)
        annotations.extend(entries)
    return coco_document(images, annotations)


class CocoSpool:
    """Writes a COCO json (:func:`coco_document`) whose entries arrive one scene at a time.

    The ``images`` and ``annotations`` entries go to two temporary files as they come and are
    joined into the document at the end, so memory does not grow with the number of scenes.
    The file is byte-identical to ``json.dumps(coco_document(images, annotations), indent=1)``.
    """

    _ITEM = "  "  # indentation of a list item inside the document (indent=1, depth 2)

    def __init__(self) -> None:
        import tempfile

        self._parts = {
            key: tempfile.TemporaryFile("w+", encoding="utf-8") for key in ("images", "annotations")
        }
        self._counts = {key: 0 for key in self._parts}

    def add(self, key: str, entry: dict) -> None:
        handle = self._parts[key]
        if self._counts[key]:
            handle.write(",\n")
        handle.write(
            "\n".join(self._ITEM + line for line in json.dumps(entry, indent=1).splitlines())
        )
        self._counts[key] += 1

    def count(self, key: str) -> int:
        return self._counts[key]

    def write(self, path: Path) -> None:
        from dcn_inspect.core.files import atomic_path

        marker = {key: f"@@{key}@@" for key in self._parts}
        skeleton = (
            json.dumps(coco_document([marker["images"]], [marker["annotations"]]), indent=1) + "\n"
        )
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
            rest = skeleton
            for key in ("images", "annotations"):
                placeholder = f"[\n{self._ITEM}{json.dumps(marker[key])}\n ]"
                before, rest = rest.split(placeholder, 1)
                out.write(before)
                if not self._counts[key]:
                    out.write("[]")
                    continue
                out.write("[\n")
                handle = self._parts[key]
                handle.seek(0)
                while chunk := handle.read(1 << 20):
                    out.write(chunk)
                out.write("\n ]")
            out.write(rest)

    def close(self) -> None:
        for handle in self._parts.values():
            handle.close()


def voc_xml(file_name: str, scene: Scene) -> str:
    """Pascal VOC annotation; corners 1-based inclusive (xmin = x1 + 1, xmax = x2)."""
    height, width = scene.labels.shape
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = file_name
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for obj in scene.objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = obj.name
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = "0"
        ET.SubElement(node, "difficult").text = "0"
        bndbox = ET.SubElement(node, "bndbox")
        x1, y1, x2, y2 = obj.box
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bndbox, tag).text = str(int(round(value)))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def write_dataset(
    out: Path,
    n: int,
    seed: int,
    fmt: str = "coco",
    config: SceneConfig = SceneConfig(),
    progress: Optional[Callable[[int], None]] = None,
    image_format: str = "png",
) -> Path:
    """Generate ``n`` scenes into ``out``; returns the annotation file (COCO) or the VOC root.

    COCO: ``out/annotations.json`` + ``out/images/scene_XXXXX.png``. VOC: ``out/Annotations``,
    ``out/JPEGImages``, ``out/ImageSets/Main/all.txt``. Images are ``image_format`` ("png" or
    "jpg").

    """
    from dcn_inspect.io.outputs import write_text

    if fmt not in ("coco", "voc"):
        raise ValueError(f"unknown format {fmt!r}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {image_format!r}")
    suffix = IMAGE_FORMATS[image_format][1]
    out = Path(out)
    image_dir = out / ("images" if fmt == "coco" else "JPEGImages")
    image_dir.mkdir(parents=True, exist_ok=True)
    # Streamed: each scene's image and annotations go to disk as soon as it is drawn (COCO
    # entries through a spool file), so memory stays flat in n.
    spool = CocoSpool() if fmt == "coco" else None
    try:
        for index, scene in enumerate(scenes(seed, n, config)):
            name = f"scene_{index:05d}{suffix}"
            save_image(image_dir / name, scene.image, image_format)
            if spool is not None:
                image, entries = coco_entries(
                    index + 1, name, scene, spool.count("annotations") + 1
                )
                spool.add("images", image)
                for entry in entries:
                    spool.add("annotations", entry)
            else:
                (out / "Annotations").mkdir(exist_ok=True)
                write_text(out / "Annotations" / f"scene_{index:05d}.xml", voc_xml(name, scene))
            if progress is not None:
                progress(index + 1)
        if spool is not None:
            spool.write(out / "annotations.json")
    finally:
        if spool is not None:
            spool.close()
    if fmt == "coco":
        return out / "annotations.json"
    sets = out / "ImageSets" / "Main"
    sets.mkdir(parents=True, exist_ok=True)
    write_text(sets / "all.txt", "".join(f"scene_{index:05d}\n" for index in range(n)))
    return out
