"""One exception type for every problem a user can fix by changing their input.

The CLI turns :class:`InputError` into a single line on stderr and exit code 1; anything
else is a bug and shows a traceback only with ``--debug``.
"""

from __future__ import annotations


class InputError(Exception):
    """A problem with the user's input (file, argument, checkpoint, annotation).

    The message must name the offending file or argument and the problem, on one line.
    """


class OpsArgumentError(ValueError, RuntimeError):
    """Arguments that the deformable ops cannot take (shapes, dtypes, devices).

    Both a ``ValueError`` and a ``RuntimeError``: torchvision's and mmcv's ops raise
    ``RuntimeError`` for bad shapes, so code written against them keeps catching ours.
    """
