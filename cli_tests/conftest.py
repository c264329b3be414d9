"""Fixtures shared by the ops tests: run a test on both backends, skip native only if it cannot
build."""

from __future__ import annotations

import contextlib
import re
from types import ModuleType
from typing import Iterator

import pytest

from dcn_inspect.ops import _native, reference


def native_or_skip() -> ModuleType:
    """The native ops module, or a skip naming why it could not be built."""
    try:
        return _native.load()
    except Exception as exc:  # noqa: BLE001 - any build failure is a skip reason
        pytest.skip(
            "native ops unavailable: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        )


@pytest.fixture(scope="module", params=["reference", "native"])
def ops(request: pytest.FixtureRequest) -> ModuleType:
    """Each test using it runs once on the reference backend and once on the native one."""
    return reference if request.param == "reference" else native_or_skip()


def cli_message(error: BaseException, command: str = "") -> str:
    """The line the CLI prints for a library error (parameter names spelled as ``command``'s
    flags)."""
    from dcn_inspect.cli.render import error_line

    return error_line(error, command or None)  # type: ignore[arg-type]


@contextlib.contextmanager
def raises_cli(pattern: str, command: str = "") -> Iterator[None]:
    """Like ``pytest.raises(InputError, match=pattern)``, matched against the CLI's line for the
    error: the library names parameters, the CLI spells them as flags."""
    from dcn_inspect.core.errors import InputError

    with pytest.raises(InputError) as info:
        yield
    message = cli_message(info.value, command)
    assert re.search(pattern, message), f"{pattern!r} not found in {message!r}"
