"""Canopy height model rasters as given: validate them for the catalog and read them with NaN nodata.

Real CHMs mark "no data" in at least four ways (all in ../shared/data): −9999 (NEON), NaN
declared as nodata, NaN cells under a −9999 declaration (NEON ABBY), and float lows such as
−3.4e38 (float32) or −1.7e308 (float64). ``read_chm`` turns every one of them into NaN so that
callers never see a sentinel.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window, from_bounds

from data_catalog.errors import CatalogError
from data_catalog.imagery import RasterDescription, describe_raster, warn_if_non_square
from data_catalog.raster import open_raster, resolve_crs

#: Any height below this is a sentinel, declared or not: no canopy is 1 km below its ground.
#: Catches undeclared −9999 and the float lows whose declared value differs from the stored one.
IMPOSSIBLE_HEIGHT_M = -1000.0


class ChmArray(NamedTuple):
    """A CHM window: heights in metres (float32, NaN = no data) with the grid that places them."""

    array: np.ndarray
    transform: Affine
    crs: CRS


def describe_chm(path: str, crs: str | None = None) -> RasterDescription:
    """Describe a CHM raster, refusing files that cannot be one (RGB, several bands, non-numeric)."""
    description = describe_raster(path, crs)
    if description.count >= 3 and all(dtype == "uint8" for dtype in description.dtypes):
        raise CatalogError(
            f"{path}: has {description.count} uint8 bands, which is RGB imagery, not a canopy height model "
            "(add it with kind 'imagery')"
        )
    if description.count != 1:
        raise CatalogError(f"{path}: a canopy height model has 1 band, this raster has {description.count}")
    if not np.issubdtype(np.dtype(description.dtypes[0]), np.number) or description.dtypes[0].startswith("complex"):
        raise CatalogError(f"{path}: band type {description.dtypes[0]} cannot hold heights")
    warn_if_non_square(description)
    return description


def read_chm(
    path: str,
    crs: str | CRS | None = None,
    window: Window | None = None,
    bounds: tuple[float, float, float, float] | None = None,
) -> ChmArray:
    """Read band 1 of a CHM as float32 metres with every nodata variant set to NaN.

    ``crs`` is used when the file has none (a catalog row's ``crs`` column fits). ``bounds`` are
    in the CHM's own CRS; parts of the window outside the raster come back as NaN. Band scale and
    offset (e.g. uint16 decimetres) are applied, so values are always metres.
    """
    if window is not None and bounds is not None:
        raise CatalogError("read_chm: pass window or bounds, not both")
    with open_raster(path) as ds:
        chm_crs = resolve_crs(path, ds.crs, crs, option="crs")
        if bounds is not None:
            window = from_bounds(*bounds, transform=ds.transform).round_offsets().round_lengths()
        if window is None:
            window = Window(0, 0, ds.width, ds.height)
        # masked + boundless: cells outside the raster and GDAL-masked cells arrive masked.
        raw = ds.read(1, window=window, boundless=True, masked=True)
        heights = heights_with_nan(raw, ds.nodata, ds.scales[0], ds.offsets[0])
        return ChmArray(heights, ds.window_transform(window), chm_crs)


def heights_with_nan(
    raw: np.ndarray | np.ma.MaskedArray, nodata: float | None, scale: float = 1.0, offset: float = 0.0
) -> np.ndarray:
    """Scale raw values to float32 metres and set every kind of nodata to NaN.

    The mask is computed in the source dtype *before* the cast: −1.7e308 overflows float32 to
    −inf and would otherwise no longer equal its declared nodata.
    """
    data = np.ma.getdata(raw)
    invalid = np.ma.getmaskarray(raw).copy()
    if nodata is not None and not np.isnan(nodata):
        invalid |= data == np.asarray(nodata).astype(data.dtype)
    if np.issubdtype(data.dtype, np.floating):
        invalid |= ~np.isfinite(data)
        invalid |= data < IMPOSSIBLE_HEIGHT_M
    heights = np.where(invalid, 0, data).astype(np.float64) * (scale or 1.0) + (offset or 0.0)
    heights = heights.astype(np.float32)
    heights[invalid] = np.nan
    return heights
