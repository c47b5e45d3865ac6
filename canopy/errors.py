"""Errors a user can cause. The CLI prints them as one line and exits non-zero; the server
answers them with a 4xx.

Every layer raises these (never a bare ValueError for user input). The packages below ``canopy``
have roots of their own (``data_catalog.errors.CatalogError``, ``ssl_backbone.errors.BackboneError``)
because they cannot import this module; :data:`USER_ERRORS` is the one tuple of all three roots
that the CLI and the server catch. ``CheckpointError`` is the backbone layer's class, re-exported:
a bad weights file is the same problem whichever layer finds it.
"""

from __future__ import annotations

from data_catalog.errors import CatalogError
from ssl_backbone.errors import BackboneError, CheckpointError, ConfigError


class CanopyError(Exception):
    """Base class: a problem with the user's input, printed as one line."""


class InputError(CanopyError):
    """An input raster, vector or option is unusable."""


class OptionError(InputError):
    """A setting has an impossible value. ``field`` is its name in the options type (e.g.
    ``stride``); the CLI shows it as the flag (``--stride``), an API as the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


class OutputError(CanopyError):
    """An output path cannot be written (it exists, its folder is unwritable or full)."""


class OutputExistsError(OutputError):
    """The output is there already and ``overwrite`` was not asked for. The message says what
    is there; the CLI adds how to replace it (``--overwrite``), an API its own field name."""


class NoDefaultModelError(CanopyError):
    """No trained default model ships with this version."""


#: The roots of every error a user can cause, in all three packages.
USER_ERRORS = (CanopyError, CatalogError, BackboneError)

__all__ = ["USER_ERRORS", "BackboneError", "CanopyError", "CatalogError", "CheckpointError",
           "ConfigError", "InputError", "NoDefaultModelError", "OptionError", "OutputError",
           "OutputExistsError"]
