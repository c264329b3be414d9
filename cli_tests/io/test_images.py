"""Image reading: every mode becomes RGB uint8, EXIF orientation is honoured, bad files fail in
one line."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import raises_cli
from PIL import Image

from dcn_inspect.core.errors import InputError
from dcn_inspect.io.images import ImageError, load_image, resized_size, to_model_input
from dcn_inspect.models.registry import Preprocess


def _gradient(width: int = 12, height: int = 8) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None, None]
    return np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_modes_become_rgb_uint8(tmp_path: Path, mode: str) -> None:
    rgb = Image.fromarray(_gradient())
    if mode == "I;16":
        image = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    else:
        image = rgb.convert(mode)
    path = tmp_path / f"img.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    image.save(path)
    array = load_image(path)
    assert array.dtype == np.uint8 and array.shape == (8, 12, 3)
    if mode in ("L", "I;16", "LA"):
        assert np.array_equal(array[..., 0], array[..., 1])
        # 16-bit values are scaled to 8 bits, not clipped: the brightest pixel stays bright.
        assert array.max() >= 250


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.fromarray(_gradient(12, 8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    assert load_image(path).shape == (12, 8, 3)


def test_pixel_limit_refuses_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    with raises_cli(r"60000 pixels, above the limit of 1000 \(raise it with --max-pixels\)"):
        load_image(path, max_pixels=1000)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "image file is empty"),
        (b"this is text, not an image", "not an image"),
    ],
)
def test_bad_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_image(path)


def test_truncated_png(tmp_path: Path) -> None:
    path = tmp_path / "whole.png"
    Image.fromarray(_gradient(64, 64)).save(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.png: image is corrupt or truncated"):
        load_image(cut)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope.png: image not found"):
        load_image(tmp_path / "nope.png")


def test_resize_shorter_side_and_scale_back() -> None:
    assert resized_size((300, 400), 150) == (150, 200)
    assert resized_size((300, 400), 0) == (300, 400)
    assert resized_size((300, 1200), 300, max_size=600) == (150, 600)
    prepared = to_model_input(_gradient(40, 30), Preprocess(resize=15))
    assert prepared.input_hw == (15, 20) and prepared.original_hw == (30, 40)
    assert prepared.scale_to_original == (2.0, 2.0)
    assert tuple(prepared.tensor.shape) == (1, 3, 15, 20)


def test_normalisation_uses_mean_and_std() -> None:
    image = np.full((4, 4, 3), 255, dtype=np.uint8)
    prepared = to_model_input(image, Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0)))
    assert np.allclose(prepared.tensor[0, :, 0, 0].numpy(), [2.0, 1.0, 0.5])


# ------------------------------------------------------------------------------ framework resizing


def test_cv2_bilinear_matches_a_hand_computed_case() -> None:
    """2x2 -> 3x4. Columns (clamped at the borders): source x = (d + 0.5) / 2 - 0.5 = -0.25, 0.25,
    0.75, 1.25 -> p0, 3/4 p0 + 1/4 p1, 1/4 p0 + 3/4 p1, p1. Rows: y = (d + 0.5) * 2/3 - 0.5 =
    -1/6, 1/2, 7/6 -> row 0, the mean of both rows, row 1. Halves round up (67.5 -> 68)."""
    from dcn_inspect.io.resize import cv2_bilinear

    image = np.array([[[0], [200]], [[100], [40]]], dtype=np.uint8).repeat(3, axis=2)
    expected = np.array([[0, 50, 150, 200], [50, 68, 103, 120], [100, 85, 55, 40]])
    out = cv2_bilinear(image, (3, 4))
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 2], expected)


@pytest.mark.parametrize(
    "size,target",
    [
        ((1500, 2000), (800, 1067)),
        ((333, 517), (97, 151)),
        ((48, 64), (800, 1067)),
        ((7, 5), (3, 11)),
    ],
)
def test_cv2_bilinear_is_bilinear_without_antialiasing_to_within_its_rounding(size, target) -> None:
    """Independent oracle: float bilinear with half-pixel centres and no antialiasing (torch's
    ``interpolate``); cv2's 11-bit weights and rounding stay below one grey level from it. PIL's
    antialiased filter, for comparison, is far from it when shrinking."""
    import torch
    import torch.nn.functional as F

    from dcn_inspect.io.resize import cv2_bilinear

    image = np.random.default_rng(size[0]).integers(0, 256, (*size, 3), dtype=np.uint8)
    ours = cv2_bilinear(image, target).astype(np.float64)
    source = torch.from_numpy(image).permute(2, 0, 1)[None].double()
    exact = (
        F.interpolate(source, size=target, mode="bilinear", align_corners=False, antialias=False)[0]
        .permute(1, 2, 0)
        .numpy()
    )
    assert np.abs(ours - exact).max() < 1.0
    if target[0] < size[0]:
        pil = np.asarray(
            Image.fromarray(image).resize(target[::-1], Image.BILINEAR), dtype=np.float64
        )
        assert np.abs(pil - exact).mean() > 5 * np.abs(ours - exact).mean()


@pytest.mark.parametrize(
    "size,target",
    [
        ((1500, 2000), (800, 1067)),
        ((3024, 4032), (800, 1067)),
        ((480, 640), (800, 1067)),
        ((333, 517), (97, 151)),
        ((64, 96), (800, 1200)),
        ((5, 7), (3, 4)),
        ((100, 100), (50, 50)),
    ],
)
def test_cv2_bilinear_equals_opencv(size, target) -> None:
    cv2 = pytest.importorskip(
        "cv2", reason="opencv not installed (pip install -e .[opencv] to run this check)"
    )
    from dcn_inspect.io.resize import cv2_bilinear

    image = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
    expected = cv2.resize(image, (target[1], target[0]), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(cv2_bilinear(image, target), expected)


def test_size_rules_of_each_framework() -> None:
    # mmdetection (mmcv rescale_size): factor min(1333 / long, 800 / short),
    # int(side * factor + 0.5).
    assert resized_size((1500, 2000), 800, 1333, "mmdetection") == (800, 1067)
    assert resized_size((3024, 4032), 800, 1333, "mmdetection") == (800, 1067)
    assert resized_size((400, 2000), 800, 1333, "mmdetection") == (267, 1333)  # long side capped
    assert resized_size((2, 5), 1, 0, "mmdetection") == (1, 3)  # 2.5 rounds up ...
    assert resized_size((2, 5), 1, 0, "round") == (1, 2)  # ... where Python's round goes to even
    # detectron2 (ResizeShortestEdge): short side exactly 800, long side scaled, both capped
    # together.
    assert resized_size((1500, 2000), 800, 1333, "detectron2") == (800, 1067)
    assert resized_size((400, 2000), 800, 1333, "detectron2") == (267, 1333)
    assert resized_size((600, 600), 800, 1333, "detectron2") == (800, 800)
    assert resized_size((1500, 2000), 0, 1333, "detectron2") == (1500, 2000)
    # transformers (DETR-family get_size_with_aspect_ratio): short side exact, long side
    # TRUNCATED where every other rule rounds it.
    assert resized_size((1500, 2000), 800, 1333, "transformers") == (800, 1066)
    assert resized_size((50, 70), 64, 96, "transformers") == (64, 89)
    assert resized_size((50, 70), 64, 96, "round") == (64, 90)
    assert resized_size((400, 2000), 800, 1333, "transformers") == (267, 1333)  # capped
    assert resized_size((800, 1000), 800, 1333, "transformers") == (800, 1000)  # kept as is


def test_fixed_size_stretches_the_image_and_scales_each_axis_on_its_own() -> None:
    image = np.random.default_rng(5).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    pre = Preprocess(fixed_size=(40, 20))
    prepared = to_model_input(image, pre)
    assert prepared.input_hw == prepared.content_hw == (40, 20)
    assert prepared.scale_to_original == (45 / 20, 30 / 40)
    assert to_model_input(image, pre, resize=15).input_hw == (15, 22)  # `resize` overrides it
    assert "fixed_size" not in Preprocess().as_dict()  # left out of every other model's record
    assert Preprocess.from_dict(pre.as_dict()) == pre
    with pytest.raises(ValueError, match="fixed_size"):
        Preprocess.from_dict({"fixed_size": [40, 0]})


def test_padding_is_zero_at_the_bottom_right_and_keeps_the_scale() -> None:
    image = np.random.default_rng(4).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    pre = Preprocess(
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        resize=20,
        size_rule="mmdetection",
        interpolation="cv2-bilinear",
        size_divisor=16,
    )
    prepared = to_model_input(image, pre)
    assert (
        prepared.resized_hw == (20, 30)
        and prepared.input_hw == (32, 32)
        and prepared.original_hw == (30, 45)
    )
    assert prepared.scale_to_original == (1.5, 1.5)  # original / resized, not original / padded
    tensor = prepared.tensor[0].numpy()
    assert (tensor[:, 20:, :] == 0).all() and (tensor[:, :, 30:] == 0).all()
    from dcn_inspect.io.resize import cv2_bilinear

    inside = (cv2_bilinear(image, (20, 30)).astype(np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(tensor[:, :20, :30], inside.transpose(2, 0, 1), atol=1e-6)
    # --resize 0 keeps the image's size and still pads to the divisor.
    assert to_model_input(image, pre, resize=0).input_hw == (32, 48)


def test_units_in_the_padding_count_in_no_category(tmp_path: Path) -> None:
    """A 48x40 image padded to 64x64 (size divisor 32) under a stride-2 layer: a 32x32 map whose
    units at x = 2j + 0.5 lie on the image for 24 columns and 20 rows; the other 544 units are
    padding and count nowhere. The scale stays original / resized (1 here): one cell = 2 px."""
    import json

    import torch
    from torch import nn

    from dcn_inspect.commands.dilation_stats import dilation_stats
    from dcn_inspect.models.loaded_model import LoadedModel
    from dcn_inspect.ops import DeformConv2dPack

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.dcn = DeformConv2dPack(4, 4, 3, padding=1)  # zero offsets: dilation 1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dcn(self.stem(x))

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
        tmp_path / "a.png"
    )
    coco = tmp_path / "annotations.json"
    coco.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 48, "height": 40}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [4, 4, 10, 10], "category_id": 1, "iscrowd": 0}
        ],
    }))  # fmt: skip
    pre = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize=0, size_divisor=32)
    loaded = LoadedModel(Net().eval(), "net", None, {}, pre, "user-file")
    result = dilation_stats(
        coco,
        model=loaded,
        out=tmp_path / "out",
        units="pixels",
        thresholds="50,300",
        workers=0,
        progress=False,
        figure=False,
    )
    assert result.summary["layers"][0]["geometry"]["input_hw"] == [32, 32]
    assert int(result.table["count"].sum()) == 24 * 20
    assert result.summary["units_not_counted"]["dcn"]["centre_outside_image"] == 32 * 32 - 24 * 20
    np.testing.assert_allclose(result.table.loc[result.table["count"] > 0, "mean"], 2.0)


def test_model_input_after_resizing_is_bounded_from_the_header(tmp_path: Path) -> None:
    """A 1x40000 PNG (a few hundred bytes) resized to a shorter side of 600 would be
    600x24000000."""
    from dcn_inspect.io.images import check_image, check_model_input_size
    from dcn_inspect.models.registry import Preprocess

    path = tmp_path / "thin.png"
    Image.fromarray(np.zeros((1, 40000, 3), np.uint8)).save(path)
    assert path.stat().st_size < 1000
    with pytest.raises(
        ImageError,
        match=r"thin\.png: the 40000x1 image becomes a 24000000x600 = 14400000000 pixel model "
        r"input \(shorter side resized to 600\), above the limit of 1000000",
    ) as info:
        load_image(path, 1_000_000, Preprocess(resize=600))
    assert info.value.kind == "image too large"
    assert check_image(path, 1_000_000, Preprocess(resize=0)) == (1, 40000)  # the image alone fits
    # the max_size rule is part of the size: the longer side capped at 1000 gives 1x1000
    assert check_model_input_size(
        "x", (1, 40000), Preprocess(resize=600, max_size=1000), None, 10_000
    ) == ((1, 1000), (1, 1000))
    # padding to the size divisor is model input too
    with pytest.raises(
        ImageError,
        match=r"becomes a 1024x32 = 32768 pixel model input \(shorter side resized to 600, "
        r"longer side capped at 1000, padded to a multiple of 32\)",
    ):
        check_model_input_size(
            "x", (1, 40000), Preprocess(resize=600, max_size=1000, size_divisor=32), None, 32767
        )
    with pytest.raises(
        ImageError,
        match=r"becomes a 1000x1 = 1000 pixel model input \(shorter side resized to 600, "
        r"longer side capped at 1000\), above the limit of 999",
    ):
        check_model_input_size("x", (1, 40000), Preprocess(resize=600, max_size=1000), None, 999)
    # resize given explicitly replaces the model's rule (no max_size)
    with pytest.raises(
        ImageError,
        match=r"becomes a 80000x2 = 160000 pixel model input \(shorter side resized to 2\)",
    ):
        check_model_input_size("x", (1, 40000), Preprocess(resize=600, max_size=1000), 2, 159_999)


def test_to_model_input_refuses_before_allocating() -> None:
    from dcn_inspect.io.images import to_model_input
    from dcn_inspect.models.registry import Preprocess

    with pytest.raises(
        ImageError, match=r"image: the 48x40 image becomes a 9600x8000 = 76800000 pixel model input"
    ):
        to_model_input(np.zeros((40, 48, 3), np.uint8), Preprocess(), resize=8000)


@pytest.mark.parametrize("value", [-1, 2.5, True, "100"])
def test_max_pixels_must_be_a_count_or_zero(tmp_path: Path, value: object) -> None:
    from dcn_inspect.core.errors import InputError

    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with pytest.raises(
        InputError, match="must be a number of pixels >= 1, or 0 for no limit"
    ) as info:
        load_image(path, value)  # type: ignore[arg-type]
    assert info.value.param == "max_pixels" and not isinstance(info.value, ImageError)


def test_symlink_loop_is_named(tmp_path: Path) -> None:
    loop = tmp_path / "loop.png"
    os.symlink("loop.png", loop)
    with pytest.raises(ImageError, match=r"loop\.png: symlink loop"):
        load_image(loop)


# ------------------------------------------------------------------ bit depths, alpha, EXIF


def _save_16bit(path: Path, values: np.ndarray) -> Path:
    image = Image.fromarray(values.astype(np.uint16))
    assert image.mode.startswith("I;16")
    image.save(path)
    return path


@pytest.mark.parametrize("suffix", ["png", "tiff"])
def test_16bit_values_scale_by_1_over_257_whatever_the_image_maximum(
    tmp_path: Path, suffix: str
) -> None:
    """65535 -> 255 by one fixed rule (value / 257, rounded): two images that differ by one step
    in one pixel read the same everywhere else, a dark one stays dark."""
    dark = np.array([[0, 128, 255], [100, 200, 255]], dtype=np.int64)
    brighter = dark.copy()
    brighter[1, 2] = 256  # one step more in one pixel
    full = np.array([[0, 257, 32768], [65535, 65278, 12850]], dtype=np.int64)
    for name, values in (("dark", dark), ("brighter", brighter), ("full", full)):
        array = load_image(_save_16bit(tmp_path / f"{name}.{suffix}", values))
        expected = np.floor(values / 257.0 + 0.5).astype(np.uint8)  # hand rule: round(v / 257)
        assert array.dtype == np.uint8
        for channel in range(3):
            np.testing.assert_array_equal(array[..., channel], expected, err_msg=name)
    # by hand: 128 / 257 = 0.498 -> 0; 200 / 257 = 0.778 -> 1; 255 / 257 = 0.992 -> 1
    dark_read = load_image(tmp_path / f"dark.{suffix}")[..., 0]
    np.testing.assert_array_equal(dark_read, [[0, 0, 1], [0, 1, 1]])
    brighter_read = load_image(tmp_path / f"brighter.{suffix}")[..., 0]
    assert int(np.abs(brighter_read.astype(int) - dark_read).max()) == 0


def test_float_tiff_in_0_to_1_scales_by_255_and_other_ranges_are_refused(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.25, 0.5], [0.75, 1.0, 0.1]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "unit.tiff")
    array = load_image(tmp_path / "unit.tiff")
    np.testing.assert_array_equal(array[..., 0], [[0, 64, 128], [191, 255, 26]])  # round(255 v)
    assert np.array_equal(array[..., 0], array[..., 2])
    Image.fromarray(values * 4000).save(tmp_path / "hdr.tiff")
    with pytest.raises(
        ImageError, match=r"hdr\.tiff: 32-bit float image with values from 0 to 4000"
    ):
        load_image(tmp_path / "hdr.tiff")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_colour_under_transparency_is_kept_like_pillow_convert_rgb(
    tmp_path: Path, mode: str
) -> None:
    """cv2.imread and Pillow's convert("RGB") keep the colour of transparent pixels (no blending
    onto white); so do we. The left half is fully transparent, the right half half."""
    colour = {"RGBA": (200, 30, 10), "LA": (120, 120, 120), "P": (200, 30, 10)}[mode]
    path = tmp_path / "alpha.png"
    if mode == "P":  # a palette whose index 0 is transparent
        image = Image.new("P", (6, 4), 0)
        image.putpalette([*colour, 0, 0, 0])
        image.save(path, transparency=0)
    else:
        pixels = np.zeros((4, 6, 4), dtype=np.uint8)
        pixels[..., :3] = colour
        pixels[:, 3:, 3] = 128
        image = Image.fromarray(pixels, "RGBA").convert(mode)
        image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode and (mode != "P" or reopened.info["transparency"] == 0)
    array = load_image(path)
    assert (array == np.array(colour, dtype=np.uint8)).all(), array[0, 0]


def test_corrupt_exif_is_one_dcn_inspect_warning_and_the_image_still_reads(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    from dcn_inspect.core.errors import DcnInspectWarning

    image = Image.fromarray(_gradient(12, 8))
    exif = image.getexif()
    exif[0x0112] = 6
    exif[0x010E] = "x" * 100  # an ImageDescription stored past the IFD
    path = tmp_path / "corrupt_exif.jpg"
    image.save(path, exif=exif.tobytes()[:-60])  # the description's bytes cut off
    assert load_image(path).shape == (12, 8, 3)  # the orientation tag is still honoured
    warned = [(w.category, str(w.message)) for w in recwarn.list]
    assert [category for category, _ in warned] == [DcnInspectWarning], warned
    assert warned[0][1].startswith(f"{path}: corrupt EXIF block"), warned
