"""Read RGB imagery onto the model's grid: band selection, scaling to uint8, resampling, masks.

Resampling to the model GSD (documented in the README): **average** when the input is finer
than the model GSD (e.g. 0.1 m NEON → 0.6 m: each output pixel is the mean of the 36 input pixels
it covers, as a coarser sensor would integrate them) and **bilinear** when it is coarser (no
blocky nearest-neighbour artefacts for the ViT). An input already on the model GSD in a
projected CRS is read as is, without resampling.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.vrt import WarpedVRT

from canopy.errors import InputError

GSD_TOLERANCE = 1e-6  # relative; pixel sizes within this of the model GSD are "already there"


@dataclass
class ImageOnGrid:
    rgb: np.ndarray  # 3×H×W uint8
    valid: np.ndarray  # H×W bool
    crs: CRS
    transform: Affine
    resampling: str  # 'none', 'average' or 'bilinear'
    source_res: tuple[float, float]


def native_res_m(ds, crs: CRS) -> float:
    """The finest native pixel size in metres (degrees at the scene centre for lon/lat)."""
    res = min(abs(ds.res[0]), abs(ds.res[1]))
    if crs.is_geographic:
        lat = (ds.bounds.bottom + ds.bounds.top) / 2
        return res * 111_320.0 * max(math.cos(math.radians(lat)), 0.01)
    try:
        return res * crs.linear_units_factor[1]
    except Exception:
        return res


def utm_crs_for(lon: float, lat: float) -> CRS:
    zone = int(math.floor((lon + 180.0) / 6.0)) % 60 + 1
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def open_raster(path):
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else "not a readable raster"
        raise InputError(f"cannot read raster '{path}': {msg}") from None


def parse_bands(bands, count: int, path) -> tuple[int, int, int]:
    if bands is None:
        if count < 3:
            raise InputError(
                f"'{path}' has {count} band(s); an RGB image needs 3 (use --bands R,G,B to choose)"
            )
        return (1, 2, 3)
    if isinstance(bands, str):
        try:
            bands = tuple(int(b) for b in bands.split(","))
        except ValueError:
            raise InputError(f"--bands must be three band numbers like 1,2,3, got '{bands}'") from None
    if len(bands) != 3 or any(b < 1 or b > count for b in bands):
        raise InputError(f"--bands {','.join(map(str, bands))}: need three band numbers in 1..{count} for '{path}'")
    return tuple(bands)


def read_rgb_on_grid(
    path,
    gsd: float,
    *,
    bands=None,
    crs=None,
    scale: tuple[float, float] | None = None,
) -> ImageOnGrid:
    """Read a GDAL raster as uint8 RGB on a square ``gsd`` grid in its own (projected) CRS."""
    with open_raster(path) as ds:
        band_idx = parse_bands(bands, ds.count, path)
        src_crs = ds.crs or (CRS.from_user_input(crs) if crs else None)
        if src_crs is None:
            raise InputError(f"'{path}' has no CRS; give one with --crs (e.g. --crs EPSG:32617)")
        if crs and ds.crs and CRS.from_user_input(crs) != ds.crs:
            warnings.warn(f"--crs {crs} overrides the CRS stored in '{path}'")
            src_crs = CRS.from_user_input(crs)
        dtype = ds.dtypes[band_idx[0] - 1]
        if dtype != "uint8" and scale is None:
            raise InputError(
                f"'{path}' holds {dtype} data; give --scale MIN MAX to map it to 0..255 "
                "(e.g. --scale 0 3000 for 12-bit reflectance)"
            )
        res_x, res_y = abs(ds.transform.a), abs(ds.transform.e)
        if ds.transform.b != 0 or ds.transform.d != 0:
            same_grid = False  # rotated rasters always go through the warper
        else:
            same_grid = (is_metric(src_crs)
                         and abs(res_x - gsd) <= GSD_TOLERANCE * gsd
                         and abs(res_y - gsd) <= GSD_TOLERANCE * gsd)
        if same_grid:
            data = ds.read(band_idx)
            valid = ds.dataset_mask() > 0
            dst_crs, transform, method = src_crs, ds.transform, "none"
        else:
            data, valid, dst_crs, transform, method = _warp_to_gsd(ds, src_crs, band_idx, gsd)
    if scale is not None:
        lo, hi = scale
        if hi <= lo:
            raise InputError(f"--scale MIN MAX needs MIN < MAX, got {lo} {hi}")
        data = np.clip((data.astype(np.float64) - lo) / (hi - lo) * 255.0 + 0.5, 0, 255)
    rgb = data.astype(np.uint8)
    if not valid.any():
        raise InputError(f"'{path}' has no valid pixels (all nodata or masked)")
    return ImageOnGrid(rgb, valid, dst_crs, transform, method, (res_x, res_y))


def is_metric(crs: CRS) -> bool:
    """A projected CRS whose axis unit is the metre (State Plane in US feet is not)."""
    if crs.is_geographic:
        return False
    try:
        return abs(crs.linear_units_factor[1] - 1.0) < 1e-9
    except Exception:  # no linear unit to read: treat as not metric, map it in UTM
        return False


def needs_alpha(ds) -> bool:
    """Let the warper add an alpha band only when the source has no mask of its own: a raster
    with nodata or an alpha band (drone orthomosaics are often RGBA) already says what is valid,
    and GDAL refuses a second alpha band."""
    from rasterio.enums import MaskFlags

    if ds.nodata is not None:
        return False
    return all(flags == [MaskFlags.all_valid] for flags in ds.mask_flag_enums)


def _warp_to_gsd(ds, src_crs: CRS, band_idx, gsd: float):
    if not is_metric(src_crs):
        # degrees (or feet) are not the model's metres: map in the UTM zone of the scene centre
        from rasterio.warp import transform_bounds as _tb

        lon0, lat0, lon1, lat1 = _tb(src_crs, "EPSG:4326", *ds.bounds)
        dst_crs = utm_crs_for((lon0 + lon1) / 2, (lat0 + lat1) / 2)
        unit = "geographic coordinates" if src_crs.is_geographic else "non-metre units"
        warnings.warn(f"'{ds.name}' is in {unit}; output is in {dst_crs.to_string()}")
    else:
        dst_crs = src_crs
    from rasterio.warp import transform_bounds

    left, bottom, right, top = (ds.bounds if dst_crs == src_crs else
                                transform_bounds(src_crs, dst_crs, *ds.bounds, densify_pts=21))
    width = max(1, math.ceil((right - left) / gsd - 1e-9))
    height = max(1, math.ceil((top - bottom) / gsd - 1e-9))
    transform = Affine(gsd, 0, left, 0, -gsd, top)
    finer = native_res_m(ds, src_crs) < gsd
    method = "average" if finer else "bilinear"
    # without a mask of its own, an alpha band marks where the source does not reach
    add_alpha = needs_alpha(ds)
    with WarpedVRT(ds, src_crs=src_crs, crs=dst_crs, transform=transform, width=width,
                   height=height, resampling=Resampling[method], add_alpha=add_alpha) as vrt:
        data = vrt.read(band_idx, out_dtype="float32")
        valid = vrt.dataset_mask() > 0
    return data, valid, dst_crs, transform, method
