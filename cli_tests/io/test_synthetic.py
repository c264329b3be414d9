"""The synthetic scene generator and its COCO / VOC writers (issue #4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_message
from typer.testing import CliRunner

from dcn_inspect.cli import app
from dcn_inspect.core.errors import InputError
from dcn_inspect.io.annotations import load_dataset
from dcn_inspect.io.datasets import bundled_dataset_path, bundled_images, bundled_images_annotations
from dcn_inspect.io.datasets.synthetic import (
    CLASSES,
    SceneConfig,
    area_category,
    generate_scene,
    rasterize,
    scenes,
    write_dataset,
)


def test_same_seed_same_scene_and_different_seed_different_scene() -> None:
    a = generate_scene(np.random.default_rng([5, 1]))
    b = generate_scene(np.random.default_rng([5, 1]))
    c = generate_scene(np.random.default_rng([5, 2]))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert [o.box for o in a.objects] == [o.box for o in b.objects]
    assert not np.array_equal(a.image, c.image)


def test_boxes_are_the_exact_extent_of_the_drawn_shapes() -> None:
    for scene in scenes(3, 4):
        height, width = scene.labels.shape
        assert scene.objects
        for index, obj in enumerate(scene.objects):
            mask = rasterize(obj.polygon, height, width)
            rows, cols = np.nonzero(mask)
            assert obj.box == (cols.min(), rows.min(), cols.max() + 1.0, rows.max() + 1.0)
            assert obj.area == mask.sum()
            visible = scene.instances == index
            # what is visible of a shape is part of it, carries its class, and is most of it
            assert np.all(mask[visible]) and np.all(scene.labels[visible] == obj.label)
            assert visible.sum() >= 0.5 * mask.sum()
        assert np.all((scene.labels == 0) == (scene.instances == -1))


def test_all_three_size_categories_and_all_classes_occur() -> None:
    objects = [obj for scene in scenes(0, 12) for obj in scene.objects]
    assert {area_category(obj.box_area) for obj in objects} == {"small", "medium", "large"}
    assert {obj.name for obj in objects} == set(CLASSES)


def test_scaled_config_keeps_shapes_inside_small_images() -> None:
    config = SceneConfig.for_size(96)
    for scene in scenes(1, 3, config):
        assert scene.image.shape == (96, 96, 3)
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96


def test_coco_output_parses_and_matches_the_scenes(tmp_path: Path) -> None:
    path = write_dataset(tmp_path / "coco", 3, seed=11)
    expected = list(scenes(11, 3))
    dataset = load_dataset(path)
    assert dataset.format == "coco" and not dataset.issues
    assert dataset.categories == list(CLASSES)
    for image, scene in zip(dataset.images, expected):
        assert image.path is not None and image.path.exists()
        assert np.allclose(image.boxes, [obj.box for obj in scene.objects])
        assert image.labels == [obj.name for obj in scene.objects]
        assert not image.ignore.any()
    raw = json.loads(path.read_text())
    assert all(a["iscrowd"] == 0 and len(a["segmentation"][0]) >= 6 for a in raw["annotations"])


def test_voc_output_parses_with_one_based_corners(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "voc", 2, seed=11, fmt="voc")
    expected = list(scenes(11, 2))
    dataset = load_dataset(root, split="all")
    assert dataset.format == "voc" and not dataset.issues
    for image, scene in zip(dataset.images, expected):
        assert image.path is not None and image.path.suffix == ".png"
        assert np.allclose(image.boxes, [obj.box for obj in scene.objects])
    first = (root / "Annotations" / "scene_00000.xml").read_text()
    x1 = int(expected[0].objects[0].box[0])
    assert f"<xmin>{x1 + 1}</xmin>" in first


def test_demo_data_command_is_reproducible_and_rejects_bad_input(tmp_path: Path) -> None:
    runner = CliRunner()
    for name in ("a", "b"):
        result = runner.invoke(
            app, ["demo-data", str(tmp_path / name), "--n", "2", "--seed", "4", "--size", "96"]
        )
        assert result.exit_code == 0, result.output
    for rel in ("annotations.json", "images/scene_00000.png", "images/scene_00001.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    result = runner.invoke(app, ["demo-data", str(tmp_path / "c"), "--format", "yolo"])
    assert isinstance(result.exception, InputError) and "--format" in cli_message(
        result.exception, "demo-data"
    )


def test_bundled_data_is_present_and_annotated() -> None:
    demo = load_dataset(bundled_dataset_path())
    assert len(demo.images) == 20 and not demo.issues
    assert all(image.path is not None for image in demo.images)
    images = bundled_images()
    assert len(images) >= 5 and any(p.name.startswith("photo_") for p in images)
    annotated = load_dataset(bundled_images_annotations())
    assert {image.file_name for image in annotated.images} == {p.name for p in images}
    total = sum(
        p.stat().st_size for p in Path(bundled_dataset_path()).parents[1].rglob("*") if p.is_file()
    )
    assert total < 3_000_000


@pytest.mark.parametrize("bad", [0, -3])
def test_demo_data_needs_at_least_one_scene(tmp_path: Path, bad: int) -> None:
    result = CliRunner().invoke(app, ["demo-data", str(tmp_path), "--n", str(bad)])
    assert isinstance(result.exception, InputError)
