"""Errors and warnings a user can act on, in the library's own words.

:class:`InputError` is every problem a user fixes by changing their input (a file, an
argument, a checkpoint, an annotation). The library names the offending *parameter* by its
Python name and never by a command-line flag: ``param`` is the parameter the message is
about (rendered before the message), and a parameter mentioned inside the message is written
in backticks (``"raise the limit with `max_pixels`"``). :meth:`InputError.render` lets a front
end spell those names its own way; the CLI turns ``max_pixels`` into ``--max-pixels``, Python
users read ``str(exc)``: ``"max_pixels 0: ..."``.

Warnings go through :mod:`warnings` with the category :class:`DcnInspectWarning` (see
:func:`warn`), so a script can filter or escalate them and the CLI prints each once.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional

#: A parameter named inside a message: a Python identifier in backticks.
PARAM_REFERENCE = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def _python_name(name: str) -> str:
    return name


def render_message(message: str, name_of: Callable[[str], str] = _python_name) -> str:
    """``message`` with every backticked parameter spelled by ``name_of``."""
    return PARAM_REFERENCE.sub(lambda match: name_of(match.group(1)), message)


#: How parameter names are spelled in text the library writes into its outputs (see
#: :func:`spell_parameters`), innermost last; empty: their Python names.
_OUTPUT_SPELLINGS: List[Callable[[str], str]] = []


@contextlib.contextmanager
def parameter_spelling(name_of: Callable[[str], str]) -> Iterator[None]:
    """Within the block, :func:`spell_parameters` spells parameter names with ``name_of``: a
    front end sets its own words for the run (the CLI: the running command's flags)."""
    _OUTPUT_SPELLINGS.append(name_of)
    try:
        yield
    finally:
        _OUTPUT_SPELLINGS.remove(name_of)


def spell_parameters(text: str) -> str:
    """``text`` with every backticked parameter spelled the front end's way
    (:func:`parameter_spelling`; Python names by default). For text the library writes into its
    outputs (how a unit or an RoI was chosen: ``"`at` 10,10"``), so the library never hard-codes a
    flag and a run from the command line still reads ``"--at 10,10"``."""
    return render_message(text, _OUTPUT_SPELLINGS[-1] if _OUTPUT_SPELLINGS else _python_name)


class InputError(ValueError):
    """A problem with the user's input; the message names the file or parameter and the problem, on
    one line.

    ``param``: the parameter the message is about (``"at"``, ``"resize"``...), rendered first;
    ``details``: structured data a front end may show (e.g. the key table of a checkpoint).
    """

    def __init__(
        self, message: str, *, param: Optional[str] = None, details: Optional[Dict[str, Any]] = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details or {}

    def __reduce__(self) -> Any:  # keep param and details through pickling (worker processes)
        return (_rebuild_input_error, (type(self), self.message, self.param, self.details))

    def render(self, name_of: Callable[[str], str] = _python_name) -> str:
        """The message with parameter names spelled by ``name_of`` (the CLI passes its flag
        names)."""
        text = render_message(self.message, name_of)
        if not self.param:
            return text
        separator = (
            "" if text[:1] in (":", ";", ",") else " "
        )  # "layers: ..." reads better than "layers : ..."
        return f"{name_of(self.param)}{separator}{text}"

    def __str__(self) -> str:
        return self.render()


def _rebuild_input_error(
    cls: type, message: str, param: Optional[str], details: Dict[str, Any]
) -> InputError:
    error = cls.__new__(cls)
    InputError.__init__(error, message, param=param, details=details)
    return error


def refuse_special_file(
    path: Any,
    expected: str,
    error: Callable[[str], InputError] = InputError,
    directory_ok: bool = False,
) -> None:
    """Raise ``error`` when ``path`` is a pipe, socket or device: opening a FIFO blocks until a
    writer comes, and a device may stream forever, so every file a user names is checked before
    it is opened. Missing paths and regular files pass (the reader says what is wrong with them);
    so do directories where the caller also takes one (``directory_ok``, named in the message)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = "a regular file or directory" if directory_ok else "a regular file"
    raise error(f"{path}: not {kind} (a pipe, socket or device), expected {expected}")


class OpsArgumentError(ValueError, RuntimeError):
    """Arguments that the deformable ops cannot take (shapes, dtypes, devices).

    Both a ``ValueError`` and a ``RuntimeError``: torchvision raises ``RuntimeError`` for the
    same problems, so code written against it keeps catching them.
    """


class DcnInspectWarning(UserWarning):
    """Something the user should know that does not stop the run (NaN weights, ignored keys...)."""


def warn(message: str, stacklevel: int = 2) -> None:
    """Issue a :class:`DcnInspectWarning`; parameters in backticks as in :class:`InputError`."""
    warnings.warn(message, DcnInspectWarning, stacklevel=stacklevel + 1)
