"""Rebuild the bundled demo data: ``python -m dcn_inspect.data.rebuild``.

* ``demo/``: 20 generated scenes (seed :data:`DEMO_SEED`, JPEG) with ``annotations.json``,
  the default DATASET of every command;
* ``images/``: 4 generated scenes (seed :data:`IMAGES_SEED`) and the three photographs
  copied from scikit-image's data folder (see ``images/LICENSES.md``), with one COCO
  ``annotations.json`` for all of them (hand-made boxes for the photographs).

The photographs themselves are not regenerated (they were downscaled to <= 512 px with
Pillow's LANCZOS filter and saved as JPEG quality 90). Neither seed is used for training
(seed 0) or evaluation (seed 1000) of the sample weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

from PIL import Image

from dcn_inspect.io.datasets.synthetic import coco_dict, save_image, scenes, write_dataset
from dcn_inspect.io.outputs import write_text

HERE = Path(__file__).resolve().parent
DEMO_SEED = 2017
DEMO_IMAGES = 20
IMAGES_SEED = 7
#: Scenes of seed 7 bundled as images: one without a large shape, three with one.
IMAGES_PICKED = (0, 1, 4, 9)

#: Hand-made boxes (x1, y1, x2, y2, COCO continuous pixels of the bundled, downscaled files).
PHOTO_BOXES: Dict[str, List[Tuple[str, Tuple[float, float, float, float]]]] = {
    "photo_astronaut.jpg": [
        ("person", (15, 15, 365, 512)),
        ("head", (150, 15, 300, 172)),
        ("helmet", (275, 345, 512, 512)),
        ("space shuttle", (355, 0, 475, 290)),
        ("flag", (0, 0, 100, 470)),
        ("patch", (133, 345, 210, 425)),
    ],
    "photo_chelsea.jpg": [
        ("cat", (0, 0, 400, 300)),
        ("eye", (135, 85, 205, 150)),
        ("eye", (295, 105, 345, 165)),
        ("nose", (235, 220, 295, 265)),
    ],
    "photo_coffee.jpg": [
        ("cup", (148, 15, 352, 258)),
        ("saucer", (65, 70, 410, 330)),
        ("spoon", (270, 55, 365, 280)),
    ],
}


def rebuild(root: Path = HERE) -> None:
    write_dataset(root / "demo", DEMO_IMAGES, DEMO_SEED, "coco", image_format="jpg")
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    picked = IMAGES_PICKED
    all_scenes = list(scenes(IMAGES_SEED, max(picked) + 1))
    names, kept = [], []
    for index in picked:
        name = f"scene_{index:02d}.jpg"
        save_image(images_dir / name, all_scenes[index].image, "jpg")
        names.append(name)
        kept.append(all_scenes[index])
    data = coco_dict(names, kept)
    categories = {c["name"]: c["id"] for c in data["categories"]}
    for file_name in sorted(PHOTO_BOXES):
        width, height = Image.open(images_dir / file_name).size
        image_id = len(data["images"]) + 1
        data["images"].append(
            {"id": image_id, "file_name": file_name, "width": width, "height": height}
        )
        for label, (x1, y1, x2, y2) in PHOTO_BOXES[file_name]:
            if label not in categories:
                categories[label] = len(categories) + 1
                data["categories"].append(
                    {"id": categories[label], "name": label, "supercategory": "photo"}
                )
            data["annotations"].append(
                {
                    "id": len(data["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": categories[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float((x2 - x1) * (y2 - y1)),
                    "iscrowd": 0,
                }
            )
    data["info"]["description"] = (
        "dcn-inspect bundled images: generated shape scenes and public-domain/CC0 photographs"
    )
    write_text(images_dir / "annotations.json", json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    rebuild()
    print(f"rebuilt {HERE / 'demo'} and {HERE / 'images'}")
