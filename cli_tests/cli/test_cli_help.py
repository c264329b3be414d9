"""``--help`` of every command: metavars a user can read (never Python type names), defaults
shown, an example, and the same option spelled the same way in every command."""

from __future__ import annotations

import re
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
