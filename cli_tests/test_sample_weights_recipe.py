"""Training and evaluation recipe of the sample weights (``sample_weights/recipe.py``, the head
fine-tune ``head_finetune.py``), on tiny settings (issue #4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcn_inspect.models import registry
from dcn_inspect.models.checkpoint import read_checkpoint_file
from dcn_inspect.models.loading import load_model

SAMPLE_WEIGHTS = Path(__file__).resolve().parents[1] / "sample_weights"
sys.path.insert(0, str(SAMPLE_WEIGHTS))  # the recipe lives beside the weights, outside the package

from recipe import (  # noqa: E402
    TrainConfig,
    box_iou,
    evaluate,
    evaluation_scenes,
    learning_rate,
    train,
    train_and_save,
    training_batch,
)

TINY = dict(
    steps=2, batch_size=2, image_size=96, fg_rois_per_image=2, bg_rois_per_image=2, warmup_steps=1
)


def test_training_batches_are_a_function_of_seed_and_step() -> None:
    config = TrainConfig(**TINY)
    a, b = training_batch(config, 3), training_batch(config, 3)
    c = training_batch(config, 4)
    assert torch.equal(a.images, b.images) and torch.equal(a.rois, b.rois)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (2, 3, 96, 96) and a.seg_labels.shape == (2, 96, 96)


def test_roi_labels_follow_overlap_with_ground_truth() -> None:
    batch = training_batch(TrainConfig(**TINY), 0)
    for roi, label in zip(batch.rois.numpy(), batch.roi_labels.numpy()):
        scene = batch.scenes[int(roi[0])]
        gt = np.array([o.box for o in scene.objects]).reshape(-1, 4)
        overlaps = box_iou(roi[1:].astype(np.float64), gt)
        if label == 0:
            assert len(gt) == 0 or overlaps.max() < 0.3
        else:
            assert any(o.label == label and iou >= 0.5 for o, iou in zip(scene.objects, overlaps))


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    config = TrainConfig(steps=100, warmup_steps=10, lr=1.0)
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 10) == pytest.approx(1.0)
    assert learning_rate(config, 99) < 0.01


def test_two_steps_change_the_weights_including_the_offset_branches() -> None:
    config = TrainConfig(**TINY)
    torch.manual_seed(config.seed)
    initial = registry.get("dcn-sample").build().state_dict()
    model, log = train(config)
    trained = model.state_dict()
    assert torch.equal(
        initial["layer4.0.conv2.conv_offset.weight"],
        torch.zeros_like(initial["layer4.0.conv2.conv_offset.weight"]),
    )
    assert trained["layer4.2.conv2.conv_offset.weight"].abs().max() > 0
    assert not torch.equal(initial["seg_head.weight"], trained["seg_head.weight"])
    assert not model.training
    again, _ = train(config)
    assert torch.equal(
        again.state_dict()["seg_head.weight"], trained["seg_head.weight"]
    )  # reproducible


def test_untrained_deformable_net_has_effective_dilation_exactly_two() -> None:
    torch.manual_seed(0)
    model = registry.get("dcn-sample").build()
    metrics = evaluate(model, evaluation_scenes(5, 2, image_size=96), seed=5, batch_size=2)
    assert 0.0 <= metrics["seg_miou"] <= 1.0 and metrics["roi_count"] > 0
    table = metrics["effective_dilation"]["layer4.2.conv2"]
    counted = [row for row in table.values() if row["units"] > 0]
    assert counted and all(row["mean"] == pytest.approx(2.0, abs=1e-4) for row in counted)
    assert sum(row["units"] for row in table.values()) <= 2 * 12 * 12


def test_dilated_baseline_has_no_dilation_table() -> None:
    model = registry.get("dcn-sample-dilated").build()
    metrics = evaluate(model, evaluation_scenes(5, 1, image_size=96), seed=5)
    assert "effective_dilation" not in metrics


def test_train_and_save_writes_a_loadable_checkpoint_and_strict_json(tmp_path: Path) -> None:
    config = TrainConfig(**{**TINY, "steps": 1})
    result = train_and_save(
        config, tmp_path / "w.pt", eval_seed=9, eval_images=2, show_progress=False
    )
    payload = read_checkpoint_file(result.weights)
    assert payload["arch"] == "dcn-sample" and payload["meta"]["train_config"]["steps"] == 1
    report = json.loads(
        (tmp_path / "w.metrics.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"non-JSON {c}"),
    )
    assert report["sha256"] and report["eval"]["images"] == 2
    loaded = load_model("dcn-sample", weights=result.weights)
    assert loaded.checkpoint_sha256 == report["sha256"]
    with pytest.raises(ValueError):
        train_and_save(
            TrainConfig(**TINY, seed=3), tmp_path / "x.pt", eval_seed=3, show_progress=False
        )


def test_train_script_writes_weights_and_rejects_a_reused_seed(tmp_path: Path) -> None:
    script = [sys.executable, str(SAMPLE_WEIGHTS / "train.py")]
    done = subprocess.run(
        script
        + [
            "--arch",
            "dcn-sample-dilated",
            "--steps",
            "1",
            "--eval-images",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert read_checkpoint_file(tmp_path / "dcn_sample_dilated.pt")["arch"] == "dcn-sample-dilated"
    assert (tmp_path / "dcn_sample_dilated.metrics.json").exists()
    refused = subprocess.run(
        script + ["--seed", "5", "--eval-seed", "5", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert (
        refused.returncode == 2
        and "--eval-seed" in refused.stderr
        and "Traceback" not in refused.stderr
    )


def test_dilation_bootstrap_separates_shifted_categories_only() -> None:
    from recipe import dilation_bootstrap

    rng = np.random.default_rng(0)
    # [image][small, medium, large, background]: medium = small + 1, large = medium
    values = [
        [
            rng.normal(3, 0.5, 20),
            rng.normal(4, 0.5, 30),
            rng.normal(4, 0.5, 30),
            rng.normal(3, 0.5, 40),
        ]
        for _ in range(40)
    ]
    images = [
        (k, np.array([v.sum() for v in image]), np.array([v.size for v in image]))
        for k, image in enumerate(values)
    ]
    ci = dilation_bootstrap(images, resamples=500)
    assert 0.8 < ci["medium-small"][0] < ci["medium-small"][1] < 1.2
    assert ci["large-medium"][0] < 0 < ci["large-medium"][1]
    assert ci == dilation_bootstrap(images, resamples=500)  # fixed seed: reproducible


def test_head_finetune_changes_only_the_rfcn_offset_branch_and_bounds_the_offsets(
    tmp_path: Path,
) -> None:
    from head_finetune import HeadFinetuneConfig, finetune_and_save, finetune_head_offsets

    from dcn_inspect.capture.session import probe

    torch.manual_seed(0)
    model = registry.get("dcn-sample").build().eval()
    with torch.no_grad():
        model.rfcn_offset.bias.fill_(5.0)  # unbounded, every normalised offset would be ~5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = HeadFinetuneConfig(steps=2, batch_size=2, image_size=96, offset_bound=2.0, threads=0)
    log = finetune_head_offsets(model, config)
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["rfcn_offset.bias", "rfcn_offset.weight"] and log["history"][-1]["step"] == 2
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    rois = torch.tensor([[0.0, 4.0, 4.0, 60.0, 70.0]])
    record = next(
        iter(probe(model, torch.randn(1, 3, 96, 96), rois=rois).capture.roi_pools.values())
    )
    assert 1.5 < record.offset.abs().max() < 2.0  # 2 tanh(~5 / 2): near the bound, never past it
    # The shipped procedure: base weights -> fine-tuned file; a fine-tuned base is refused.
    base = train_and_save(
        TrainConfig(**{**TINY, "steps": 1}),
        tmp_path / "dcn_sample.pt",
        eval_seed=9,
        eval_images=2,
        show_progress=False,
    )
    report = finetune_and_save(
        config,
        base.weights,
        tmp_path / "dcn_sample.pt",
        eval_seed=9,
        eval_images=2,
        show_progress=False,
    )
    assert report["head_finetune"]["base_sha256"] == base.metrics["sha256"] != report["sha256"]
    assert (
        set(report["eval"]["foreground"]) >= {"all"}
        and report["eval"]["roi_offset_magnitude"]["max"] < 2.0
    )
    loaded = load_model("dcn-sample", weights=tmp_path / "dcn_sample.pt")
    assert loaded.config["offset_bound"] == 2.0 and loaded.model.offset_bound == 2.0
    with pytest.raises(ValueError, match="already fine-tuned"):
        finetune_and_save(
            config,
            tmp_path / "dcn_sample.pt",
            tmp_path / "again.pt",
            eval_seed=9,
            eval_images=2,
            show_progress=False,
        )
