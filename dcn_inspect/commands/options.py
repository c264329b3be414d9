"""The option groups every command shares, defined once: one dataclass per group.

A command's Python function keeps its keyword arguments (the CLI passes its flags by name), and
packs them into these groups first thing; everything after that (checks, the run's set-up, the
per-image loop, ``summary.json``'s parameters) takes a group, never the loose values again.

- :class:`ModelChoice`: which model and weights (``model``, ``weights``);
- :class:`ImageInput`: how images become model inputs (``resize``, ``max_pixels``, ``device``)
  and what happens to one that cannot be used (``strict``);
- :class:`OutputOptions`: where and how results are written (``out``, ``fmt``, ``progress``);
- :class:`UnitOptions`: which layers and units are followed (``layers``, ``levels``, ``at``,
  ``grid``, ``boxes``, ``round_positions``, ``group``);
- :class:`DatasetOptions`: a dataset and its subset (``dataset``, ``images_dir``, ``split``,
  ``max_images``, ``thresholds``, ``allow_outside_paths``).

The groups hold values as given; :meth:`ImageInput.checked` and :meth:`OutputOptions.checked`
return them checked (an :class:`~dcn_inspect.core.errors.InputError` naming the parameter),
so each check is written once (:func:`check_figure_format`, ``check_resize``: in
:mod:`dcn_inspect.core.checks`, torch-free, where the command line finds them before it loads
torch).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

from dcn_inspect.core.checks import check_figure_format, check_resize
from dcn_inspect.core.defaults import DEFAULT_MAX_PIXELS, DEFAULT_OUT

if TYPE_CHECKING:
    from dcn_inspect.models.loaded_model import LoadedModel

__all__ = [
    "DatasetOptions",
    "ImageInput",
    "ModelChoice",
    "OutputOptions",
    "UnitOptions",
    "check_figure_format",
]


@dataclass(frozen=True)
class ModelChoice:
    """The model to load: a registered name, a checkpoint, ``file.py:function`` or a loaded model
    (``None``: the bundled ``dcn-sample``), and its weights."""

    model: Union[str, "LoadedModel", None] = None
    weights: Optional[Path] = None


@dataclass(frozen=True)
class ImageInput:
    """How each image becomes the model's input, and the policy for images that cannot be used."""

    resize: Optional[int] = None  # shorter side of the model input; 0: own size; None: the model's
    max_pixels: int = DEFAULT_MAX_PIXELS  # refuse larger images / model inputs; 0: no limit
    device: str = "cpu"
    strict: bool = False  # stop at the first unusable image instead of skipping it

    def checked(self) -> "ImageInput":
        """These options, checked (``resize`` >= 0)."""
        check_resize(self.resize)
        return self


@dataclass(frozen=True)
class OutputOptions:
    """Where a run writes, the figure format and whether a progress bar is shown."""

    out: Path = Path(DEFAULT_OUT)
    fmt: str = "png"
    progress: bool = True

    def checked(self) -> "OutputOptions":
        """These options with ``fmt`` checked and normalised (png, svg or pdf)."""
        return replace(self, fmt=check_figure_format(self.fmt))


@dataclass(frozen=True)
class UnitOptions:
    """Which deformable layers are followed and which units of the top one are analysed."""

    layers: Optional[Sequence[str]] = None  # layer names (any order), else the last ``levels``
    levels: Optional[int] = None  # how many deformable layers to follow
    at: Sequence[Union[str, Tuple[float, float]]] = ()  # (x, y) in original-image pixels
    grid: Optional[int] = None  # every grid-th unit
    boxes: Optional[Path] = None  # a unit at each box centre, plus one background unit
    round_positions: bool = False  # the official demo's rounding to the nearest cell
    group: Union[int, str] = 0  # offset group G, or "mean"


@dataclass(frozen=True)
class DatasetOptions:
    """A dataset (COCO json or VOC directory; ``None``: the bundled demo) and its subset."""

    dataset: Optional[Path] = None
    images_dir: Optional[Path] = None  # where the images are, when not beside the annotations
    split: Optional[str] = None  # VOC ImageSets/Main/<split>.txt
    max_images: Optional[int] = None
    thresholds: str = "paper"  # small / medium / large area split
    allow_outside_paths: bool = False  # image paths may leave the dataset's folders
