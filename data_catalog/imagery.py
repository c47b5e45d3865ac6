"""Describe any GDAL raster for the catalog: grid, CRS, ground sample distance, bands, acquisition date.

Only metadata is read here (no pixels), so describing a 10 GB mosaic costs one file open.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import rasterio
from affine import Affine
from rasterio.crs import CRS
from shapely.geometry import Polygon

from data_catalog.errors import CatalogError
from data_catalog.raster import open_raster, pixel_size_m, resolve_crs
from data_catalog.schema import crs_to_text

#: Relative difference between pixel width and height above which pixels count as non-square.
#: 1e-3 ignores float noise in geotransforms but catches the 0.5 % of the NEON SJER tile.
NON_SQUARE_TOLERANCE = 1e-3


class NonSquarePixelWarning(UserWarning):
    """Pixel width and height differ: resampling to a square target grid will stretch the image."""


@dataclass(frozen=True)
class AcquisitionTime:
    """When the pixels were captured: one instant (start == end) or a range of flight dates."""

    start: datetime
    end: datetime


@dataclass(frozen=True)
class RasterDescription:
    """What the catalog needs to know about one raster, with its geometry made explicit."""

    path: str
    crs: CRS
    crs_from_override: bool
    transform: Affine
    width: int
    height: int
    count: int
    dtypes: tuple[str, ...]
    nodata: float | None
    band_info: tuple[dict[str, Any], ...]
    acquisition: AcquisitionTime | None
    driver: str

    @property
    def res_x(self) -> float:
        """Pixel size along the raster's columns, in CRS units (also right for rotated grids)."""
        return math.hypot(self.transform.a, self.transform.d)

    @property
    def res_y(self) -> float:
        return math.hypot(self.transform.b, self.transform.e)

    @property
    def native_polygon(self) -> Polygon:
        """The raster's outline in its own CRS, from the four corners (exact for rotated grids)."""
        corners = [(0, 0), (self.width, 0), (self.width, self.height), (0, self.height)]
        return Polygon([self.transform @ corner for corner in corners])

    @property
    def crs_text(self) -> str | None:
        return crs_to_text(self.crs)


def describe_raster(path: str, crs: str | None = None) -> RasterDescription:
    """Open ``path`` with GDAL and describe it; ``crs`` is used only when the file has none
    (:func:`data_catalog.raster.resolve_crs`).

    Raises CatalogError when the file cannot be opened, has no geotransform, or has no CRS and
    no ``crs`` was given.
    """
    with open_raster(path) as ds:
        if ds.transform.is_identity:
            how = "has only ground control points; warp it first" if ds.gcps[0] else "is not georeferenced"
            raise CatalogError(f"{path}: raster has no geotransform ({how})")
        return RasterDescription(
            path=path,
            crs=resolve_crs(path, ds.crs, crs),
            crs_from_override=not ds.crs,
            transform=ds.transform,
            width=ds.width,
            height=ds.height,
            count=ds.count,
            dtypes=tuple(ds.dtypes),
            nodata=ds.nodata,
            band_info=tuple(_band_info(ds)),
            acquisition=acquisition_time(ds.tags()),
            driver=ds.driver,
        )


def describe_imagery(path: str, crs: str | None = None) -> RasterDescription:
    """Describe an image for the catalog and warn when its pixels are not square."""
    description = describe_raster(path, crs)
    warn_if_non_square(description)
    return description


def warn_if_non_square(description: RasterDescription) -> None:
    res_x, res_y = description.res_x, description.res_y
    if abs(res_x - res_y) > NON_SQUARE_TOLERANCE * max(res_x, res_y):
        message = (
            f"{description.path}: non-square pixels {res_x:.6g} x {res_y:.6g} "
            f"({description.crs_text}); resampling to a square grid will stretch it"
        )
        warnings.warn(message, NonSquarePixelWarning, stacklevel=3)


def ground_sample_distance_m(description: RasterDescription) -> float | None:
    """Geometric-mean pixel side in metres (:func:`data_catalog.raster.pixel_size_m`), or None
    when the CRS has neither degrees nor a linear unit."""
    size = pixel_size_m(description.transform, description.crs, description.width, description.height)
    return math.sqrt(size[0] * size[1]) if size is not None else None


def _band_info(ds: rasterio.DatasetReader) -> list[dict[str, Any]]:
    bands = []
    for index in range(ds.count):
        bands.append(
            {
                "index": index + 1,
                "name": ds.descriptions[index],
                "dtype": ds.dtypes[index],
                "colorinterp": ds.colorinterp[index].name,
                "unit": ds.units[index] or None,
                "scale": ds.scales[index],
                "offset": ds.offsets[index],
                # JSON has no NaN: keep nodata as text (see schema.nodata_to_text).
                "nodata": None if ds.nodatavals[index] is None else repr(float(ds.nodatavals[index])),
            }
        )
    return bands


# --- acquisition dates ------------------------------------------------------------------------

#: Tags that name the acquisition explicitly, checked before the generic TIFF DateTime.
_ACQUISITION_TAG_HINTS = ("ACQUI", "DATE_ACQUIRED", "CAPTURE", "DATETIMEORIGINAL", "IMAGE_DATE", "FLIGHT_DATE")
#: TIFFTAG_DATETIME is the file's creation time by the TIFF spec, but many producers (NEON:
#: "Flown on 2018091513, 2018100513") write the flight dates there; it is the last resort.
_FALLBACK_TAGS = ("DATETIME", "TIFFTAG_DATETIME")

_DATE_RE = re.compile(
    r"(?<!\d)(?P<y>(?:19|20)\d{2})[-:/]?(?P<m>\d{2})[-:/]?(?P<d>\d{2})"
    r"(?:[T _]?(?P<H>\d{2})(?::?(?P<M>\d{2})(?::?(?P<S>\d{2}))?)?)?(?!\d)"
)


def acquisition_time(tags: dict[str, str]) -> AcquisitionTime | None:
    """Acquisition date(s) from GDAL metadata tags, or None when no tag holds a valid date.

    Times without a zone are taken as UTC (TIFF tags carry none). Several dates in one tag
    (multi-day flights) become a range.
    """
    upper = {key.upper(): value for key, value in tags.items()}
    explicit = [key for key in upper if any(hint in key for hint in _ACQUISITION_TAG_HINTS)]
    for key in [*sorted(explicit), *_FALLBACK_TAGS]:
        if key in upper:
            moments = parse_datetimes(upper[key])
            if moments:
                return AcquisitionTime(min(moments), max(moments))
    return None


def parse_datetimes(text: str) -> list[datetime]:
    """Every plausible date in ``text``: ISO, TIFF ``YYYY:MM:DD HH:MM:SS`` or compact ``YYYYMMDD[HH]``."""
    moments = []
    for match in _DATE_RE.finditer(text):
        parts = {key: int(value) for key, value in match.groupdict().items() if value is not None}
        try:
            moments.append(
                datetime(
                    parts["y"], parts["m"], parts["d"], parts.get("H", 0), parts.get("M", 0), parts.get("S", 0),
                    tzinfo=timezone.utc,
                )
            )
        except ValueError:  # e.g. month 13: digits that only looked like a date
            continue
    return moments
