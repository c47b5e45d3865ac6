"""Errors a user can cause. The CLI prints them as one line and exits non-zero.

Every layer raises these (never a bare ValueError for user input), so the CLI needs one handler.
"""


class CanopyError(Exception):
    """Base class: a problem with the user's input, printed as one line."""


class InputError(CanopyError):
    """An input raster, vector or option is unusable."""


class CheckpointError(CanopyError):
    """A checkpoint cannot be loaded into the model it claims to be."""


class OutputError(CanopyError):
    """An output path cannot be written (exists without --overwrite, unwritable folder)."""


class NoDefaultModelError(CanopyError):
    """No trained default model ships with this version."""
