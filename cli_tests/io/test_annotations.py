"""COCO / VOC / box-CSV parsing of :mod:`dcn_inspect.io.annotations`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import raises_cli
from PIL import Image

from dcn_inspect.core.errors import InputError
from dcn_inspect.io.annotations import (
    annotation_for_image,
    detect_format,
    load_dataset,
    read_box_csv,
)


def _coco(tmp_path: Path, images=None, annotations=None, categories=None, name="ann.json") -> Path:
    data = {
        "images": images
        if images is not None
        else [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": annotations if annotations is not None else [],
        "categories": categories
        if categories is not None
        else [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _voc(
    tmp_path: Path, objects: str, width: int = 50, height: int = 40, stem: str = "000001"
) -> Path:
    root = tmp_path / "VOC2007"
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height)).save(root / "JPEGImages" / f"{stem}.jpg")
    (root / "Annotations" / f"{stem}.xml").write_text(
        f"<annotation><filename>{stem}.jpg</filename><size><width>{width}</width><height>{height}</height>"
        f"<depth>3</depth></size>{objects}</annotation>"
    )
    return root


def _obj(name: str, xmin, ymin, xmax, ymax, difficult: int = 0) -> str:
    return (
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
        f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


# ---------------------------------------------------------------------------------- COCO


def test_coco_boxes_are_xywh_to_corners_with_crowd_and_labels(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    path = _coco(
        tmp_path,
        images=[
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 7, "file_name": "sub/b.png", "width": 20, "height": 20},
        ],
        annotations=[
            {"id": 10, "image_id": 1, "bbox": [2.5, 3, 10, 4], "category_id": 2},
            {"id": 11, "image_id": 1, "bbox": [0, 0, 5, 5], "category_id": 1, "iscrowd": 1},
            {"id": 12, "image_id": 7, "bbox": [1, 1, 2, 2], "category_id": 1},
        ],
    )
    dataset = load_dataset(path)
    assert dataset.format == "coco" and dataset.categories == ["cat", "dog"]
    first, second = dataset.images
    np.testing.assert_array_equal(first.boxes, [[2.5, 3, 12.5, 7], [0, 0, 5, 5]])
    assert first.boxes.dtype == np.float64
    assert first.labels == ["dog", "cat"]
    np.testing.assert_array_equal(first.ignore, [False, True])
    np.testing.assert_array_equal(first.areas, [40.0, 25.0])
    assert first.path == tmp_path / "a.png" and (first.width, first.height) == (40, 30)
    # Image without a file on disk: kept, path None, counted as an issue.
    assert second.image_id == 7 and second.path is None
    assert any("1 image file(s) not found" in issue for issue in dataset.issues)


def test_coco_images_dir_and_images_without_annotations(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.new("RGB", (40, 30)).save(folder / "a.png")
    path = _coco(tmp_path)
    assert load_dataset(path).images[0].path is None
    dataset = load_dataset(path, images_dir=folder)
    assert dataset.images[0].path == folder / "a.png"
    assert dataset.images[0].boxes.shape == (0, 4) and dataset.images[0].ignore.shape == (0,)
    assert dataset.issues == []


def test_coco_drops_empty_boxes_and_clips_outside_ones(tmp_path):
    path = _coco(
        tmp_path,
        annotations=[
            {"id": 1, "image_id": 1, "bbox": [5, 5, 0, 3], "category_id": 1},  # zero width
            {"id": 2, "image_id": 1, "bbox": [5, 5, 3, -1], "category_id": 1},  # negative height
            {
                "id": 3,
                "image_id": 1,
                "bbox": [-4, 20, 10, 20],
                "category_id": 1,
            },  # crosses left and bottom
            {"id": 4, "image_id": 1, "bbox": [50, 5, 3, 3], "category_id": 1},  # entirely outside
            {"id": 5, "image_id": 1, "bbox": [1, 1, 3, 3], "category_id": 1},
        ],
    )
    dataset = load_dataset(path)
    np.testing.assert_array_equal(dataset.images[0].boxes, [[0, 20, 6, 30], [1, 1, 4, 4]])
    dropped = [issue for issue in dataset.issues if "dropped" in issue]
    clipped = [issue for issue in dataset.issues if "clipped" in issue]
    assert len(dropped) == 1 and "3 box(es)" in dropped[0] and "annotations[0] (id 1)" in dropped[0]
    assert len(clipped) == 1 and "1 box(es)" in clipped[0] and "annotations[2]" in clipped[0]


@pytest.mark.parametrize(
    "images, annotations, message",
    [
        (
            [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}] * 2,
            [],
            "images[1]: duplicate image id 1",
        ),
        (
            [{"file_name": "a.png", "width": 4, "height": 4}],
            [],
            "images[0]: missing or invalid 'id'",
        ),
        (
            [{"id": 1, "width": 4, "height": 4}],
            [],
            "images[0] (id 1): missing or invalid 'file_name'",
        ),
        (
            [{"id": 1, "file_name": "a.png", "width": "4", "height": 4}],
            [],
            "'width' and 'height' must be positive integers",
        ),
        (
            None,
            [{"id": 9, "image_id": 3, "bbox": [0, 0, 1, 1], "category_id": 1}],
            "annotations[0] (id 9): unknown image_id 3",
        ),
        (
            None,
            [{"image_id": 1, "bbox": [0, 0, 1], "category_id": 1}],
            "annotations[0]: 'bbox' must be 4 finite numbers",
        ),
        (
            None,
            [{"image_id": 1, "bbox": [0, 0, "1", 1], "category_id": 1}],
            "annotations[0]: 'bbox' must be 4 finite numbers",
        ),
        (
            None,
            [{"image_id": 1, "bbox": [0, 0, 1, 1]}],
            "annotations[0]: missing or invalid 'category_id'",
        ),
        (
            None,
            [{"image_id": 1, "bbox": [0, 0, 1, 1], "category_id": 5}],
            "annotations[0]: unknown category_id 5",
        ),
        (
            None,
            [{"image_id": 1, "bbox": [0, 0, 1, 1], "category_id": 1, "iscrowd": 2}],
            "'iscrowd' must be 0 or 1",
        ),
        (None, ["nope"], "annotations[0]: expected an object"),
    ],
)
def test_coco_malformed_entries_name_file_and_entry(tmp_path, images, annotations, message):
    path = _coco(tmp_path, images=images, annotations=annotations)
    with pytest.raises(InputError) as info:
        load_dataset(path)
    assert str(path) in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_coco_not_json_and_not_coco(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(InputError, match="not valid JSON"):
        load_dataset(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(InputError, match="expected a COCO json object"):
        load_dataset(bad)
    bad.write_text('{"annotations": []}')
    with pytest.raises(InputError, match="no 'images' list"):
        load_dataset(bad)


def test_missing_images_hint_names_the_parameter_and_the_cli_its_flag(tmp_path):
    """Library text names `images_dir`; every dataset command spells it as its own flag."""
    from dcn_inspect.cli.render import name_spelling
    from dcn_inspect.core.errors import parameter_spelling

    path = _coco(tmp_path, images=[{"id": 1, "file_name": "gone.png", "width": 4, "height": 4}])
    assert load_dataset(path).issues[-1].endswith("first gone.png (set images_dir DIR)")
    for command in ("bins", "dilation-stats", "receptive-field"):
        with parameter_spelling(name_spelling(command)):
            assert load_dataset(path).issues[-1].endswith("first gone.png (set --images DIR)")


def test_coco_missing_size_read_from_image_header(tmp_path):
    Image.new("RGB", (13, 9)).save(tmp_path / "a.png")
    path = _coco(tmp_path, images=[{"id": "x", "file_name": "a.png"}])
    image = load_dataset(path).images[0]
    assert (image.width, image.height, image.image_id) == (13, 9, "x")
    path = _coco(tmp_path, images=[{"id": "x", "file_name": "gone.png"}])
    with pytest.raises(InputError, match="no 'width'/'height'"):
        load_dataset(path)


# ---------------------------------------------------------------------------------- VOC


def test_voc_corners_are_one_based_inclusive_and_difficult_is_ignored(tmp_path):
    root = _voc(
        tmp_path,
        _obj("cat", 1, 1, 10, 20)
        + _obj("dog", 5, 6, 5, 6, difficult=1)
        + _obj("cat", 40, 30, 60, 45),
    )
    dataset = load_dataset(root)
    assert dataset.format == "voc" and dataset.categories == ["cat", "dog"]
    image = dataset.images[0]
    # Pixel 1 (1-based) starts at continuous 0; pixel 10 ends at continuous 10. A one-pixel box
    # is 1x1.
    np.testing.assert_array_equal(image.boxes, [[0, 0, 10, 20], [4, 5, 5, 6], [39, 29, 50, 40]])
    np.testing.assert_array_equal(image.areas, [200, 1, 121])
    np.testing.assert_array_equal(image.ignore, [False, True, False])
    assert image.labels == ["cat", "dog", "cat"]
    assert image.path == root / "JPEGImages" / "000001.jpg" and image.image_id == "000001"
    assert any("1 box(es) reaching outside" in issue for issue in dataset.issues)


def test_voc_splits_devkit_and_errors(tmp_path):
    root = _voc(tmp_path, _obj("cat", 1, 1, 10, 20))
    _voc(tmp_path, _obj("dog", 2, 2, 8, 8), stem="000002")
    (root / "ImageSets" / "Main" / "test.txt").write_text("000002\n\n")
    (root / "ImageSets" / "Main" / "cat_test.txt").write_text("000002 -1\n")
    assert [image.image_id for image in load_dataset(root).images] == ["000001", "000002"]
    assert [image.image_id for image in load_dataset(root, split="test").images] == ["000002"]
    # A VOCdevkit holding one year directory is accepted.
    assert [image.image_id for image in load_dataset(tmp_path, split="test").images] == ["000002"]
    with raises_cli(r"--split val: .*val.txt not found \(available: test\)", "dilation-stats"):
        load_dataset(root, split="val")
    (root / "ImageSets" / "Main" / "val.txt").write_text("000003\n")
    with pytest.raises(InputError, match="have no annotation"):
        load_dataset(root, split="val")
    (root / "Annotations" / "000002.xml").write_text(
        "<annotation><size><width>5</width></size></annotation>"
    )
    with pytest.raises(InputError, match=r"000002.xml: <size>: missing <height>"):
        load_dataset(root)
    (root / "Annotations" / "000002.xml").write_text(
        "<annotation><size><width>5</width><height>5</height></size>"
        + _obj("cat", 1, "a", 3, 3)
        + "</annotation>"
    )
    with pytest.raises(InputError, match=r"000002 <object> #0: <ymin> is not a number"):
        load_dataset(root)


def test_voc_inverted_box_dropped(tmp_path):
    root = _voc(tmp_path, _obj("cat", 10, 10, 5, 20) + _obj("cat", 3, 3, 4, 4))
    dataset = load_dataset(root)
    np.testing.assert_array_equal(dataset.images[0].boxes, [[2, 2, 4, 4]])
    assert any("1 box(es) with zero or negative size" in issue for issue in dataset.issues)


# ------------------------------------------------------------------------- detection, look-up


def test_detect_format(tmp_path):
    with pytest.raises(InputError, match="dataset not found"):
        detect_format(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputError, match="not a dataset"):
        detect_format(tmp_path / "x.txt")
    with pytest.raises(InputError, match="not a dataset"):
        detect_format(tmp_path)
    _coco(tmp_path, name="annotations.json")
    _coco(tmp_path, name="other.json")
    assert detect_format(tmp_path) == ("coco", tmp_path / "annotations.json")
    (tmp_path / "annotations.json").unlink()
    assert detect_format(tmp_path) == ("coco", tmp_path / "other.json")
    _coco(tmp_path, name="third.json")
    with pytest.raises(InputError, match="several .json files"):
        detect_format(tmp_path)
    with pytest.raises(InputError, match="only Pascal VOC datasets have splits"):
        load_dataset(tmp_path / "other.json", split="test")


def test_annotation_for_image_coco_voc_and_xml(tmp_path):
    path = _coco(
        tmp_path,
        images=[
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "d/b.png", "width": 8, "height": 8},
        ],
        annotations=[{"image_id": 2, "bbox": [1, 2, 3, 4], "category_id": 1}],
    )
    found = annotation_for_image(path, tmp_path / "elsewhere" / "b.png")
    assert found is not None and found.image_id == 2
    np.testing.assert_array_equal(found.boxes, [[1, 2, 4, 6]])
    assert annotation_for_image(path, tmp_path / "c.png") is None
    root = _voc(tmp_path / "v", _obj("cat", 1, 1, 10, 20))
    image_path = root / "JPEGImages" / "000001.jpg"
    for source in (root, root / "Annotations" / "000001.xml"):
        found = annotation_for_image(source, image_path)
        assert found is not None and found.path == image_path
        np.testing.assert_array_equal(found.boxes, [[0, 0, 10, 20]])
    assert annotation_for_image(root, root / "JPEGImages" / "999.jpg") is None


def test_read_box_csv(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("# units: pixels\nx1,y1,x2,y2,class\n1,2,3,4,cat\n0.5,0.5,9,9,\n")
    boxes, labels = read_box_csv(path)
    np.testing.assert_array_equal(boxes, [[1, 2, 3, 4], [0.5, 0.5, 9, 9]])
    assert labels == ["cat", None]
    path.write_text("x1,y1,x2,y2\n")
    boxes, labels = read_box_csv(path)
    assert boxes.shape == (0, 4) and labels == []
    path.write_text("x1,y1,x2\n1,2,3\n")
    with pytest.raises(InputError, match="missing y2"):
        read_box_csv(path)
    path.write_text("x1,y1,x2,y2\n1,2,3,4\n5,5,4,9\n")
    with pytest.raises(InputError, match="line 3: box has zero or negative size"):
        read_box_csv(path)
    path.write_text("x1,y1,x2,y2\n1,b,3,4\n")
    with pytest.raises(InputError, match="line 2: x1,y1,x2,y2 must be numbers"):
        read_box_csv(path)


# ----------------------------------------------------------------- paths outside the dataset


def test_file_names_outside_the_dataset_need_allow_outside_paths(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (40, 30)).save(outside / "far.png")
    inside = tmp_path / "data"
    inside.mkdir()
    for name in (str(outside / "far.png"), "../elsewhere/far.png"):
        path = _coco(inside, images=[{"id": 1, "file_name": name, "width": 40, "height": 30}])
        with raises_cli(
            r"ann\.json: images\[0\] \(id 1\): file_name .* points outside the dataset directory "
            r".*--allow-outside-paths",
            "dilation-stats",
        ):
            load_dataset(path)
        assert (
            load_dataset(path, allow_outside_paths=True).images[0].path.resolve()
            == (outside / "far.png").resolve()
        )
    # a stale absolute path whose file is inside, by its bare name, is read from inside
    Image.new("RGB", (40, 30)).save(inside / "far.png")
    path = _coco(
        inside, images=[{"id": 1, "file_name": "/nowhere/far.png", "width": 40, "height": 30}]
    )
    assert load_dataset(path).images[0].path == inside / "far.png"


def test_voc_split_names_leaving_annotations_and_binary_split_files(tmp_path):
    root = _voc(tmp_path, _obj("cat", 1, 1, 10, 10))
    (root / "ImageSets" / "Main" / "sneaky.txt").write_text("../../../etc/passwd\n")
    with raises_cli(
        r"--split .*sneaky\.txt: '\.\./\.\./\.\./etc/passwd' points outside .*Annotations; "
        r"pass --allow-outside-paths",
        "dilation-stats",
    ):
        load_dataset(root, split="sneaky")
    (root / "ImageSets" / "Main" / "binary.txt").write_bytes(
        b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    )
    with raises_cli(r"--split .*binary\.txt: not a text file of image names", "dilation-stats"):
        load_dataset(root, split="binary")


@pytest.mark.parametrize(
    "text,message",
    [
        ("[" * 100_000 + "]" * 100_000, r"JSON nested too deeply"),
        (
            '{"images": [{"id": ' + "1" * 5000 + ', "file_name": "a.png"}]}',
            r"not valid JSON \(.*digits",
        ),
        (
            '{"images": [{"id": 1, "file_name": "a.png", "width": '
            + "9" * 400
            + ', "height": 30}]}',
            r"images\[0\] \(id 1\): 'width' and 'height' must be positive integers",
        ),
    ],
    ids=["nested", "5000-digit-int", "400-digit-width"],
)
def test_hostile_json_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "ann.json"
    path.write_text(text)
    with pytest.raises(InputError, match=r"ann\.json: " + message):
        load_dataset(path)


def test_box_csv_with_a_field_beyond_the_csv_limit(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text('x1,y1,x2,y2\n"' + "1" * 200_000 + '",1,2,2\n')
    with pytest.raises(InputError, match=r"boxes\.csv: not a readable CSV"):
        read_box_csv(path)


# ------------------------------------------------- boxes read in the image's frame, or refused


def _exif_rotated(path: Path, width: int, height: int, orientation: int = 6) -> Path:
    """A JPEG stored as ``width`` x ``height`` pixels, displayed rotated (EXIF ``orientation``)."""
    image = Image.new("RGB", (width, height))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes())
    return path


def test_annotation_of_another_image_size_is_refused_naming_both_sizes(tmp_path):
    Image.new("RGB", (128, 96)).save(tmp_path / "a.png")
    box = [{"image_id": 1, "bbox": [10, 10, 20, 20], "category_id": 1}]
    larger = _coco(
        tmp_path,
        images=[{"id": 1, "file_name": "a.png", "width": 256, "height": 192}],
        annotations=box,
    )
    with raises_cli(r"a\.png: image is 128x96 but its annotation in .*ann\.json says 256x192$"):
        annotation_for_image(larger, tmp_path / "a.png")
    same = _coco(
        tmp_path,
        images=[{"id": 1, "file_name": "a.png", "width": 128, "height": 96}],
        annotations=box,
        name="same.json",
    )
    np.testing.assert_array_equal(
        annotation_for_image(same, tmp_path / "a.png").boxes, [[10, 10, 30, 30]]
    )


def test_annotation_in_the_stored_frame_of_an_exif_rotated_image_names_the_rotation(tmp_path):
    """A phone photo stored 128x96 with orientation 6 is read as displayed, 96x128; an annotation
    made on the stored pixels (128x96) would put every box in the wrong place."""
    _exif_rotated(tmp_path / "phone.jpg", 128, 96)
    stored = _coco(
        tmp_path, images=[{"id": 1, "file_name": "phone.jpg", "width": 128, "height": 96}]
    )
    with raises_cli(
        r"phone\.jpg: image is 96x128 but its annotation in .*ann\.json says 128x96 "
        r"\(width and height swapped: the image carries an EXIF rotation \(orientation 6\) and "
        r"is read as displayed; the annotation is in the stored frame\)"
    ):
        annotation_for_image(stored, tmp_path / "phone.jpg")
    displayed = _coco(
        tmp_path,
        images=[{"id": 1, "file_name": "phone.jpg", "width": 96, "height": 128}],
        name="displayed.json",
    )
    assert annotation_for_image(displayed, tmp_path / "phone.jpg") is not None


def test_voc_annotation_of_another_image_size_is_refused(tmp_path):
    root = _voc(tmp_path, _obj("cat", 1, 1, 10, 20), width=50, height=40)
    Image.new("RGB", (100, 80)).save(root / "JPEGImages" / "000001.jpg")  # a larger version
    with raises_cli(r"000001\.jpg: image is 100x80 but its annotation in .*000001\.xml says 50x40"):
        annotation_for_image(root, root / "JPEGImages" / "000001.jpg")


def test_box_csv_box_entirely_outside_the_image_is_refused_in_one_line(tmp_path):
    Image.new("RGB", (128, 96)).save(tmp_path / "a.png")
    path = tmp_path / "boxes.csv"
    path.write_text("x1,y1,x2,y2\n10,10,20,20\n500,500,600,600\n")
    with raises_cli(
        r"boxes\.csv: line 3: box 500,500,600,600 lies entirely outside a\.png "
        r"\(128x96 pixels\)$"
    ):
        read_box_csv(path, image=tmp_path / "a.png")
    # reaching outside is kept as written (partly on the image); touching the edge from outside
    # is outside
    path.write_text("x1,y1,x2,y2\n120,90,200,200\n")
    np.testing.assert_array_equal(
        read_box_csv(path, image=tmp_path / "a.png")[0], [[120, 90, 200, 200]]
    )
    path.write_text("x1,y1,x2,y2\n128,0,140,10\n")
    with raises_cli(r"line 2: box 128,0,140,10 lies entirely outside a\.png"):
        read_box_csv(path, image=tmp_path / "a.png")


@pytest.mark.parametrize(
    "size", ["", "<size><depth>3</depth></size>", "<size><width>0</width><height>0</height></size>"]
)
def test_voc_without_size_reads_it_from_the_image_like_coco(tmp_path, size):
    root = _voc(tmp_path, _obj("cat", 1, 1, 10, 20), width=50, height=40)
    (root / "Annotations" / "000001.xml").write_text(
        f"<annotation><filename>000001.jpg</filename>{size}{_obj('cat', 1, 1, 10, 20)}</annotation>"
    )
    image = load_dataset(root).images[0]
    assert (image.width, image.height) == (50, 40)  # the JPEG's header
    np.testing.assert_array_equal(image.boxes, [[0, 0, 10, 20]])
    _exif_rotated(root / "JPEGImages" / "000001.jpg", 50, 40)  # read as displayed: 40x50
    image = load_dataset(root).images[0]
    assert (image.width, image.height) == (40, 50)
    (root / "JPEGImages" / "000001.jpg").unlink()
    with pytest.raises(InputError, match=r"000001\.xml: no <size> and image 000001\.jpg not found"):
        load_dataset(root)
