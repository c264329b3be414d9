"""``hf:DIR``: a HuggingFace ``save_pretrained`` folder, loaded offline, its preprocessing mapped.

One tiny Deformable DETR (ResNet backbone of width 16..128, d_model 64, one encoder and two
decoder layers: transformers 5 cannot build one decoder layer, its box-head weight tying needs
two) is saved once with a ``DeformableDetrImageProcessor``; the processor is transformers' PIL
backend (``...Pil``: the default backend needs torchvision, which the tests do not install),
the backend whose pixels dcn-inspect reproduces.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from dcn_inspect.core.errors import InputError  # noqa: E402
from dcn_inspect.io.images import to_model_input  # noqa: E402
from dcn_inspect.io.resize import resized_size  # noqa: E402
from dcn_inspect.models.checkpoint import sha256_file  # noqa: E402
from dcn_inspect.models.importers.huggingface import preprocess_from_processor  # noqa: E402
from dcn_inspect.models.loading import load_model  # noqa: E402
from dcn_inspect.models.registry import Preprocess  # noqa: E402


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    """(folder, the model as built) of a tiny Deformable DETR and its image processor."""
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=transformers.ResNetConfig(
            embedding_size=16,
            hidden_sizes=[16, 32, 64, 128],
            depths=[1, 1, 1, 1],
            out_features=["stage2", "stage3", "stage4"],
        ),
        d_model=64,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=10,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.DeformableDetrForObjectDetection(config).eval()
    folder = tmp_path_factory.mktemp("hf") / "tiny-deformable-detr"
    model.save_pretrained(folder)
    processor = transformers.DeformableDetrImageProcessorPil(
        size={"shortest_edge": 64, "longest_edge": 96}
    )
    processor.save_pretrained(folder)
    return folder, model


def test_loaded_model_gives_the_saved_models_outputs(saved) -> None:
    folder, original = saved
    loaded = load_model(f"hf:{folder}")
    pixels = torch.randn(1, 3, 64, 89, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = loaded.model(pixels), original(pixels)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.pred_boxes, theirs.pred_boxes, rtol=0, atol=1e-6)
    assert not loaded.model.training
    summary = loaded.summary()
    assert (summary["source"], summary["arch"]) == ("huggingface", "deformable_detr")
    assert summary["config"] == {
        "dir": str(folder),
        "architectures": ["DeformableDetrForObjectDetection"],
        "model_type": "deformable_detr",
    }
    assert loaded.checkpoint == folder / "model.safetensors"
    assert loaded.checkpoint_sha256 == sha256_file(folder / "model.safetensors")
    assert "DeformableDetrImageProcessor" in summary["import"]["preprocess"]


@pytest.mark.parametrize("hw", [(50, 70), (70, 50), (40, 200)])
def test_model_input_is_the_processors_pixel_values(saved, hw) -> None:
    folder, _ = saved
    loaded = load_model(f"hf:{folder}")
    assert loaded.preprocess == Preprocess(resize=64, max_size=96, size_rule="transformers")
    image = _image(*hw)
    processor = transformers.DeformableDetrImageProcessorPil.from_pretrained(folder)
    expected = processor(images=image, return_tensors="pt")
    prepared = to_model_input(image, loaded.preprocess)
    assert prepared.tensor.shape == expected["pixel_values"].shape
    torch.testing.assert_close(prepared.tensor, expected["pixel_values"], rtol=0, atol=1e-5)
    assert bool((expected["pixel_mask"] == 1).all())  # one image: no padding
    assert prepared.scale_to_original == (
        hw[1] / prepared.input_hw[1],
        hw[0] / prepared.input_hw[0],
    )


def test_transformers_size_rule_is_get_size_with_aspect_ratio() -> None:
    from transformers.image_transforms import get_size_with_aspect_ratio

    rng = np.random.default_rng(2)
    for _ in range(500):
        hw = (int(rng.integers(1, 3000)), int(rng.integers(1, 3000)))
        short, long = sorted(int(v) for v in rng.integers(1, 1500, size=2))
        expected = get_size_with_aspect_ratio(hw, short, long)
        if min(expected) >= 1:  # transformers makes a 0-pixel side; dcn-inspect keeps 1
            assert resized_size(hw, short, long, "transformers") == expected, (hw, short, long)


def test_rt_detr_stretches_to_its_fixed_size_without_normalising() -> None:
    processor = transformers.RTDetrImageProcessorPil(size={"height": 48, "width": 40})
    preprocess = preprocess_from_processor(processor)
    assert preprocess.fixed_size == (48, 40)
    assert (preprocess.mean, preprocess.std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    image = _image(50, 70, seed=3)
    expected = processor(images=image, return_tensors="pt")["pixel_values"]
    prepared = to_model_input(image, preprocess)
    torch.testing.assert_close(prepared.tensor, expected, rtol=0, atol=1e-5)
    assert prepared.scale_to_original == (70 / 40, 50 / 48)


def test_without_rescaling_mean_and_std_move_to_the_0_255_scale() -> None:
    processor = transformers.DeformableDetrImageProcessorPil(
        size={"shortest_edge": 32, "longest_edge": 64},
        do_rescale=False,
        image_mean=[100.0, 110.0, 120.0],
        image_std=[50.0, 60.0, 70.0],
    )
    preprocess = preprocess_from_processor(processor)
    image = _image(40, 30, seed=4)
    expected = processor(images=image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(
        to_model_input(image, preprocess).tensor, expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"resample": 3}, "resample"),
        ({"size": {"max_height": 64, "max_width": 64}}, "max_height"),
        ({"pad_size": {"height": 128, "width": 128}}, "pad_size"),
    ],
)
def test_settings_that_cannot_be_reproduced_are_refused(kwargs, words) -> None:
    processor = transformers.DeformableDetrImageProcessorPil(**kwargs)
    with pytest.raises(ValueError, match=words):
        preprocess_from_processor(processor)


def test_an_unsupported_processor_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="ViTImageProcessor is not supported"):
        preprocess_from_processor(transformers.ViTImageProcessorPil())


def test_without_a_processor_config_the_image_keeps_its_size_and_the_summary_says_so(
    saved, tmp_path
) -> None:
    folder, _ = saved
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, bare / name)
    loaded = load_model(f"hf:{bare}")
    assert loaded.preprocess == Preprocess()
    assert "no preprocessor_config.json" in loaded.summary()["import"]["preprocess"]


def _error(spec: str, **kwargs) -> InputError:
    with pytest.raises(InputError) as caught:
        load_model(spec, **kwargs)
    assert "\n" not in str(caught.value)
    assert "--" not in str(caught.value)  # parameters, never flags
    return caught.value


def test_loading_errors_are_one_line_naming_the_problem(saved, tmp_path) -> None:
    folder, _ = saved
    missing = _error(f"hf:{tmp_path / 'nowhere'}")
    assert missing.param == "model" and "not found" in str(missing)
    assert "no config.json" in str(_error(f"hf:{tmp_path}"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json", encoding="utf-8")
    assert "cannot load config.json" in str(_error(f"hf:{bad}"))
    (bad / "config.json").write_text('{"model_type": "no-such-model"}', encoding="utf-8")
    assert "cannot load config.json" in str(_error(f"hf:{bad}"))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(folder / "config.json", no_weights / "config.json")
    assert "no weights" in str(_error(f"hf:{no_weights}"))
    assert _error(f"hf:{folder}", weights=Path("w.pth")).param == "weights"


def test_without_transformers_the_error_says_how_to_install_it(saved, monkeypatch) -> None:
    folder, _ = saved
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    error = _error(f"hf:{folder}")
    assert 'pip install -e ".[transformers]"' in str(error)
