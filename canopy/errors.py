"""Errors a user can cause. The CLI prints them as one line and exits non-zero; the server
answers them with a 4xx.

Every layer raises these (never a bare ValueError for user input). The packages below ``canopy``
have roots of their own (``data_catalog.errors.CatalogError``, ``ssl_backbone.errors.BackboneError``)
because they cannot import this module; :data:`USER_ERRORS` is the one tuple of all three roots
that the CLI and the server catch. ``CheckpointError`` is the backbone layer's class, re-exported:
a bad weights file is the same problem whichever layer finds it.
"""

from __future__ import annotations

import re

from data_catalog.errors import CatalogError
from ssl_backbone.errors import BackboneError, CheckpointError, ConfigError


class CanopyError(Exception):
    """Base class: a problem with the user's input, printed as one line."""


class InputError(CanopyError):
    """An input raster, vector or option is unusable."""


class OptionError(InputError):
    """A setting has an impossible value. ``field`` is its name in the options type (e.g.
    ``stride``). The message names settings as ``{name}`` placeholders (``"{steps} must be ≥
    1"``; a message without its own field's placeholder is read as following it), so each front
    end shows the names its users type: :meth:`render` with the CLI's flags (``--steps``), the
    plain field names in ``str()`` and in an API."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.template = message if "{" + field + "}" in message else "{" + field + "} " + message
        super().__init__(self.render(lambda name: name))

    def render(self, name_of) -> str:
        """The message with every ``{name}`` replaced by ``name_of(name)``."""
        return _PLACEHOLDER.sub(lambda m: name_of(m.group(1)), self.template)


class TrainingDivergedError(OptionError):
    """Training stopped because its loss became NaN or infinite (a learning rate too high, a
    broken label); the message names the settings to change."""

    def __init__(self, message: str):
        super().__init__("lr", message)


class ModelOutputError(CanopyError):
    """The model gave heights that cannot be right (NaN or infinite where the input is valid)."""


class RunInterrupted(CanopyError):
    """The user stopped a resumable run (Ctrl-C); the message says what was kept. ``remedy``
    names the setting that continues it (None: the same call again), which the CLI shows as its
    flag. (Not a KeyboardInterrupt: click would swallow that into its bare "Aborted!".)"""

    def __init__(self, message: str, remedy: str | None = None):
        super().__init__(message)
        self.remedy = remedy


class OutputError(CanopyError):
    """An output path cannot be written (it exists, its folder is unwritable or full)."""


class OutputExistsError(OutputError):
    """The output is there already. The message says what is there; ``remedy`` names the
    setting that would go on anyway (``overwrite``, or ``resume`` for a training run), which
    the CLI shows as its flag and an API as its field."""

    def __init__(self, message: str, remedy: str = "overwrite"):
        super().__init__(message)
        self.remedy = remedy


class NoDefaultModelError(CanopyError):
    """No trained default model ships with this version."""


_PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]*)\}")

#: The roots of every error a user can cause, in all three packages.
USER_ERRORS = (CanopyError, CatalogError, BackboneError)

__all__ = ["USER_ERRORS", "BackboneError", "CanopyError", "CatalogError", "CheckpointError",
           "ConfigError", "InputError", "NoDefaultModelError", "OptionError", "OutputError",
           "ModelOutputError", "OutputExistsError", "RunInterrupted", "TrainingDivergedError"]
