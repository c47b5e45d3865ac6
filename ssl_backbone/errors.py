"""Errors a user can cause in the backbone layer: one line, naming the file or the field.

``ssl_backbone`` sits below ``canopy`` and cannot import its errors, so it has its own root,
:class:`BackboneError`. ``canopy.errors.USER_ERRORS`` lists it with the other packages' roots;
the CLI and the server catch exactly that tuple.
"""

from __future__ import annotations


class BackboneError(Exception):
    """Base class: a problem with the user's input to the backbone layer."""


class CheckpointError(BackboneError):
    """A weights file cannot be loaded into the model it claims to be."""


class ConfigError(BackboneError, ValueError):
    """A configuration value or key is wrong; ``field`` names it (dotted for nested configs).

    A ``ValueError`` too, so callers that validated configs by catching ValueError still do.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
