"""How the command line spells the library's parameter names: each Python parameter name
becomes the running command's flag or argument, read from its click parameters (``fmt`` ->
``--format``, ``rois_file`` -> ``--rois``, ``images`` -> ``IMAGES...``).

Used for error messages (:mod:`dcn_inspect.cli.render`) and for the text a run writes into its
outputs (:func:`dcn_inspect.core.errors.spell_parameters`, set for the run by the app's
callback). No torch and nothing of ours above ``cli`` here: ``--help`` stays fast.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable

#: Spelling of parameters a command does not have itself (hints that mention other options).
FALLBACK_FLAGS = {
    "fmt": "--format",
    "class_choice": "--class",
    "rois": "--roi",
    "rois_file": "--rois",
    "round_positions": "--round",
    "images_dir": "--images",
}


def flag_names_of(params: Iterable[Any]) -> Dict[str, str]:
    """Python parameter name -> how the command line spells it, for click ``params``."""
    names: Dict[str, str] = {}
    for param in params:
        if not param.name:
            continue
        opts = [o for o in getattr(param, "opts", []) if o.startswith("--")]
        if opts:
            names[param.name] = opts[0]
        else:  # an argument
            names[param.name] = (param.metavar or param.name).upper()
    return names


def spelling_of(names: Dict[str, str]) -> Callable[[str], str]:
    """A function spelling a Python parameter name with ``names`` (else a fallback flag)."""

    def spell(name: str) -> str:
        if name in names:
            return names[name]
        return FALLBACK_FLAGS.get(name, "--" + name.replace("_", "-"))

    return spell


def lazy_spelling(read_params: Callable[[], Iterable[Any]]) -> Callable[[str], str]:
    """:func:`spelling_of` the params ``read_params()`` returns, read on first use only."""
    cached: Dict[str, Callable[[str], str]] = {}

    def spell(name: str) -> str:
        if "spell" not in cached:
            cached["spell"] = spelling_of(flag_names_of(read_params()))
        return cached["spell"](name)

    return spell
