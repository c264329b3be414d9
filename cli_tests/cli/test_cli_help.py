"""``--help`` of every command: metavars a user can read (never Python type names), defaults
shown, an example, and the same option spelled the same way in every command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import typer.main

from dcn_inspect.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)


def _help(args: List[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as done:
        app(args, standalone_mode=True, prog_name="dcn-inspect")
    assert done.value.code == 0
    return capsys.readouterr().out


def _options(command: str) -> Dict[str, object]:
    """Flag -> parameter of ``command`` (every spelling a parameter accepts)."""
    group = typer.main.get_command(app)
    return {
        opt: param
        for param in group.commands[command].params
        for opt in getattr(param, "opts", [])
        if opt.startswith("--")
    }


def _primary(param: object) -> str:
    """The spelling the help and the error messages use (the first)."""
    return [opt for opt in getattr(param, "opts", []) if opt.startswith("--")][0]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_no_python_type_names_and_has_an_example(command, monkeypatch, capsys) -> None:
    text = _help(([command] if command else []) + ["--help"], monkeypatch, capsys)
    assert not re.search(r"<(bool|str|int|float|path|list\[[^\]]*\]|int range|Path)>", text), text
    assert "…" not in text
    if command is not None:
        assert "Example" in text, command
    for opt, param in _options(command).items() if command else []:
        default = getattr(param, "default", None)
        if default not in (None, False, ()) and not getattr(param, "is_flag", False):
            # Every value option with a default says it: [default: ...] (folded lines rejoined).
            line = " ".join(text.split())
            assert f"[default: {default}]" in line, (command, opt)


def test_the_same_option_is_spelled_the_same_in_every_command() -> None:
    spelled: Dict[str, set] = {}
    for command in COMMANDS:
        for param in set(_options(command).values()):
            spelled.setdefault(param.name, set()).add(_primary(param))  # type: ignore[attr-defined]
    # One Python name, one flag (the library's parameter names are the CLI's).
    assert {name: flags for name, flags in spelled.items() if len(flags) > 1} == {}
    layers = [command for command in COMMANDS if "--layers" in _options(command)]
    boxes = [command for command in COMMANDS if "--boxes" in _options(command)]
    assert {"sample-points", "dilation-stats"} <= set(layers) and {"sample-points", "bins"} <= set(
        boxes
    )
    for flag, commands in (("--layers", layers), ("--boxes", boxes)):
        params = [_options(command)[flag] for command in commands]
        assert len({p.metavar for p in params}) == 1  # type: ignore[attr-defined]
    assert all(_options(command)["--layers"].multiple for command in layers)  # type: ignore[attr-defined]  # repeatable (and comma lists)
    assert "--model" in _options("info")
    # A dataset's image folder is --images wherever a command reads datasets.
    assert all(
        "--images" in _options(command) for command in ("dilation-stats", "bins", "receptive-field")
    )


def test_commands_are_listed_in_a_fixed_order_with_one_line_help() -> None:
    """The command list follows ``COMMAND_ORDER`` (not the order command modules are imported
    in) and each command's help is its docstring with the source's line breaks removed."""
    import typer.main

    from dcn_inspect.cli import app
    from dcn_inspect.cli.app import COMMAND_ORDER, one_line_paragraphs

    group = typer.main.get_command(app)
    assert group.list_commands(None) == list(COMMAND_ORDER)  # type: ignore[attr-defined]
    for name in COMMAND_ORDER:
        help_text = group.commands[name].help  # type: ignore[attr-defined]
        assert help_text and "\n" not in help_text.split("\n\n")[0], name
    assert one_line_paragraphs("A b\n    c.\n\n    D\n    e.") == "A b c.\n\nD e."


# ---------------------------------------------------------------- fast usage errors (issue #21)


def _usage_image(tmp_path) -> str:
    from PIL import Image

    path = tmp_path / "small.png"
    Image.new("RGB", (128, 96), (120, 60, 30)).save(path)
    return str(path)


#: (command line after the image, what the library function is called with): plain usage
#: mistakes every command reports before torch and the model are loaded.
USAGE_MISTAKES = [
    (["sample-points", "{img}", "--grid", "0"], "sample_points", dict(grid=0)),
    (["sample-points", "{missing}"], "sample_points", dict()),
    (["sample-points", "{img}", "--at", "300,-5"], "sample_points", dict(at=["300,-5"])),
    (["sample-points", "{img}", "--at", "1,1", "--at", "300,20"], "sample_points",
     dict(at=["1,1", "300,20"])),
    (["receptive-field", "{img}", "--at", "12"], "receptive_field", dict(at=["12"])),
    (["receptive-field", "{img}", "--at", "130,5"], "receptive_field", dict(at=["130,5"])),
    (["offsets", "{img}", "--kernel-point", "x"], "offsets", dict(kernel_point=["x"])),
    (["offsets", "{missing}"], "offsets", dict()),
    (["offsets", "{img}", "--group", "two"], "offsets", dict(group="two")),
    (["bins", "{img}", "--format", "gif"], "bins", dict(fmt="gif")),
    (["sample-points", "{img}", "--resize", "-2"], "sample_points", dict(resize=-2)),
]  # fmt: skip


def _library_line(function: str, images: List[str], out: str, kwargs: dict, command: str) -> str:
    """The line the CLI prints for the error the library function raises with these options."""
    import importlib

    from conftest import cli_message

    from dcn_inspect.core.errors import InputError

    module = importlib.import_module(f"dcn_inspect.commands.{function}")
    with pytest.raises(InputError) as info:
        getattr(module, function)(images, out=out, progress=False, **kwargs)
    return cli_message(info.value, command)


@pytest.mark.parametrize("argv, function, kwargs", USAGE_MISTAKES)
def test_usage_mistakes_are_reported_before_torch_with_the_library_s_words(
    tmp_path, argv: List[str], function: str, kwargs: dict
) -> None:
    import json
    import subprocess
    import sys

    img, missing = _usage_image(tmp_path), str(tmp_path / "missing.jpg")
    argv = [word.format(img=img, missing=missing) for word in argv]
    out = tmp_path / "out"
    code = (
        "import json, sys\n"
        f"sys.argv = ['dcn-inspect', *{argv + ['--out', str(out)]!r}]\n"
        "from dcn_inspect.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print(json.dumps([code, sorted(m for m in ('torch', 'pandas') if m in sys.modules)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    exit_code, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert exit_code == 1 and heavy == [], done.stderr
    (line,) = done.stderr.strip().splitlines()
    images = [w for w in argv[1:2]]
    expected = _library_line(function, images, str(tmp_path / "lib"), kwargs, argv[0])
    assert line == f"dcn-inspect: error: {expected}"
    assert not out.exists()


# -------------------------------------------------------------------------- doctor (issue #21)


def test_doctor_names_the_backend_once_and_how_the_ops_were_built() -> None:
    from typer.testing import CliRunner

    done = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "120"})
    assert done.exit_code == 0, done.output
    assert done.output.count("ops backend") == 1 and "None" not in done.output

    from dcn_inspect.cli.doctor import ops_rows

    # The build row, from the native build's details (compiled now, or cached with its time).
    assert ops_rows({"backend": "native", "cached": True, "build_seconds": None,
                     "compile_seconds": 82.24, "with_cuda": False}) == [
        ("build", "cached (compiled earlier in 82.2 s)"), ("with_cuda", "False")]  # fmt: skip
    assert ops_rows({"cached": False, "build_seconds": 3.0, "compile_seconds": 3.0}) == [
        ("build", "compiled now in 3.0 s")
    ]
    assert ops_rows({}) == []  # the reference backend: no build


def test_demo_data_refuses_an_empty_out_instead_of_writing_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``demo-data "$UNSET"``: OUT is an empty string, which a Path would read as ``.``."""
    monkeypatch.chdir(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "dcn_inspect", "demo-data", "", "--n", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "dcn-inspect: error: OUT '': an empty path (an unset shell variable?); "
        "name the output directory"
    ]
    assert list(tmp_path.iterdir()) == []
