"""Image reading: every mode becomes RGB uint8, EXIF orientation is honoured, bad files fail in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcn_inspect.errors import InputError
from dcn_inspect.images import load_image, resized_size, to_model_input
from dcn_inspect.models.registry import Preprocess

from conftest import raises_cli


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
