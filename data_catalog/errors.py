"""Errors a user can cause in the catalog layer: one line, naming the file or parameter.

The ``canopy`` CLI catches :class:`CatalogError` and exits non-zero with its message.
"""


class CatalogError(Exception):
    """A problem with catalog input (wrong kind of file, missing CRS, newer schema...)."""


class RasterError(CatalogError):
    """A raster cannot be used: unreadable, no CRS, wrong bands or data type (names the file)."""
