"""Defaults shared by the library and the command line.

Plain constants with no imports, so the CLI can show them in ``--help`` without loading torch.
"""

from __future__ import annotations

#: The model every command uses when none is given (the bundled demo network).
DEFAULT_MODEL = "dcn-sample"

#: Refuse images larger than this many pixels (width * height); 0 means no limit.
DEFAULT_MAX_PIXELS = 50_000_000

#: Where commands write when no output directory is given.
DEFAULT_OUT = "dcn-inspect-out"

#: Number of deformable levels sample-points traces when neither layers nor levels are given.
DEFAULT_LEVELS = 3

#: Figure formats every command can write.
FIGURE_FORMATS = ("png", "svg", "pdf")
