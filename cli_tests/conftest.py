"""Fixtures shared by the ops tests: run a test on both backends, skip native only if it cannot build."""

from __future__ import annotations

from types import ModuleType

import pytest

from dcn_inspect.ops import _native, reference


def native_or_skip() -> ModuleType:
    """The native ops module, or a skip naming why it could not be built."""
    try:
        return _native.load()
    except Exception as exc:  # noqa: BLE001 - any build failure is a skip reason
        pytest.skip(f"native ops unavailable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


@pytest.fixture(scope="module", params=["reference", "native"])
def ops(request: pytest.FixtureRequest) -> ModuleType:
    """Each test using it runs once on the reference backend and once on the native one."""
    return reference if request.param == "reference" else native_or_skip()
