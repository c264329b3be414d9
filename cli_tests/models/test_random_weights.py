"""A registered architecture run without weights has random offsets: the run says so, once, in
the warning, in ``summary.json`` and in the figures' titles (issue #21)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from dcn_inspect.core.errors import DcnInspectWarning
from dcn_inspect.models import registry
from dcn_inspect.models.loading import load_model

#: Runs the command line on ``dcn-sample`` with its bundled weights taken away.
WITHOUT_BUNDLED_WEIGHTS = """
import dataclasses, sys
from dcn_inspect.models import registry, loading  # noqa: F401 - registers the architectures
arch = registry.ARCHITECTURES["dcn-sample"]
registry.ARCHITECTURES["dcn-sample"] = dataclasses.replace(arch, bundled_weights=None)
sys.argv = ["dcn-inspect", *sys.argv[1:]]
from dcn_inspect.cli import main
main()
"""


@pytest.fixture
def no_bundled_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    arch = registry.get("dcn-sample")
    monkeypatch.setitem(
        registry.ARCHITECTURES, "dcn-sample", dataclasses.replace(arch, bundled_weights=None)
    )


def test_a_registered_architecture_without_weights_warns_and_notes_it_in_its_summary(
    no_bundled_weights: None,
) -> None:
    with pytest.warns(DcnInspectWarning) as caught:
        loaded = load_model("dcn-sample")
    assert loaded.random_weights
    (message,) = [str(w.message) for w in caught if w.category is DcnInspectWarning]
    assert message.startswith("dcn-sample: random weights") and "`weights`" in message
    summary = loaded.summary()
    assert summary["random_weights"] is True and "untrained" in summary["note"]
    assert loaded.titled("scene.png") == "scene.png (random weights)"


def test_random_weights_are_the_same_on_every_run_and_leave_the_random_state_alone(
    no_bundled_weights: None,
) -> None:
    """Same inputs, same bytes: the initialisation is seeded (``summary.json`` names the seed),
    and loading does not move the caller's random stream."""
    import torch

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with pytest.warns(DcnInspectWarning):
        first = load_model("dcn-sample")
    assert torch.equal(torch.rand(3), expected_next)
    with pytest.warns(DcnInspectWarning):
        second = load_model("dcn-sample")
    one, two = first.model.state_dict(), second.model.state_dict()
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert first.summary()["random_weights_seed"] == 0


def test_trained_weights_give_no_warning_and_no_note() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DcnInspectWarning)
        loaded = load_model("dcn-sample")  # its bundled weights
    assert not loaded.random_weights
    assert "random_weights" not in loaded.summary() and "note" not in loaded.summary()
    assert loaded.titled("scene.png") == "scene.png"


def test_the_command_line_warns_once_and_the_summary_says_so(tmp_path: Path) -> None:
    image = tmp_path / "scene.png"
    Image.new("RGB", (96, 64), (90, 140, 200)).save(image)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_BUNDLED_WEIGHTS, "sample-points", str(image),
         "--at", "40,30", "--at", "60,20", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if line.startswith("dcn-inspect: warning")]
    assert warned == [
        "dcn-inspect: warning: dcn-sample: random weights: no weights given and none bundled, "
        "the offsets are untrained (give --weights for a trained model)"
    ]
    model = json.loads((out / "summary.json").read_text())["model"]
    assert model["random_weights"] is True and "untrained" in model["note"]
