"""Rasters as every layer reads them: opening, the CRS of a file, pixel size in metres, UTM zones,
the resampling rule, RGB on a target grid, and NaN-aware averaging onto a coarser grid.

Invariant: a single-raster prediction, a state-scale cell, a training chip, the catalog and
``canopy evaluate`` get these answers from this module alone, so the same image read onto the same
grid gives the same pixels whoever asks (a test reads one real ortho as chips, as cells and as one
raster and compares them pixel for pixel). It holds because nothing else in ``canopy`` or
``data_catalog`` opens a ``WarpedVRT`` on imagery, chooses its resampling or converts degrees to
metres: they call :func:`read_rgb` (through :class:`LatticeReader` for windows of a lattice),
:func:`resampling_for` and :func:`pixel_size_m`. Torch-free, like the rest of ``data_catalog``.

Rules, each stated once:

* **CRS of a file** (:func:`resolve_crs`): the file's own CRS wins; an override only fills in files
  without one, and an override that contradicts the file gets one warning (a tag written by the
  producer is better evidence than a flag typed for a batch of files).
* **Pixel size in metres** (:func:`pixel_size_m`): projected CRSs scale their axis unit to metres
  (US survey feet are 0.3048006 m); geographic CRSs convert degrees with the local radii of
  curvature of the CRS's own ellipsoid (:func:`metres_per_degree`) at the raster's centre.
* **UTM zone** (:func:`utm_zone`, :func:`utm_epsg`): zone ``n`` spans longitudes
  [−180 + 6(n−1), −180 + 6n) and the equator belongs to the north; no Norway/Svalbard exceptions
  (WGS 84 / UTM EPSG codes 326zz/327zz are defined on the regular bands).
* **Resampling** (:func:`resampling_for`): *average* when the input pixels are finer than the
  output's (each output pixel is the mean of the input pixels it covers, as a coarser sensor would
  integrate them), *nearest* when the two grids coincide exactly (a copy), *bilinear* otherwise
  (no blocky nearest-neighbour artefacts when upsampling for the ViT).
* **Warping** (:func:`read_rgb`): ``WarpedVRT`` with a tolerance of 1e-6 px. GDAL's default
  approximate transformer (error ≤ 0.125 px) makes a warped pixel depend on the window it was read
  in, which would let cell and chip borders leak into the output. (rasterio 1.4 fails on
  ``tolerance=0``, GDAL's "exact" setting, with a NULL transformer; 1e-6 px is exact for any
  practical purpose.) Averaging by a non-integer ratio still depends on the window by ±1 DN, so
  windows of a lattice (chips, cells) are cut from fixed blocks (:class:`LatticeReader`).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import CRSError, RasterioIOError
from rasterio.vrt import WarpedVRT

from data_catalog.errors import RasterError

#: Relative pixel-size tolerance under which two grids have "the same" pixel size.
GSD_TOLERANCE = 1e-6
#: Two grids whose origins are a whole number of pixels apart within this many pixels coincide.
LATTICE_TOLERANCE_PX = 1e-6
#: Warper error threshold in pixels (see the module docstring).
WARP_TOLERANCE_PX = 1e-6


# --------------------------------------------------------------------------------- opening


def open_raster(path, role: str | None = None) -> rasterio.DatasetReader:
    """``rasterio.open(path)`` whose failures are one-line :class:`RasterError` naming the file.

    ``role`` (e.g. ``"reference"``) is put in front of the path so a message says which of
    several inputs failed.
    """
    label = f"{role} {path}" if role else f"{path}"
    text = str(path)
    if "://" not in text and not text.startswith("/vsi") and not Path(text).exists():
        raise RasterError(f"{label}: cannot open as a raster (file does not exist)")
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        raise RasterError(f"{label}: cannot open as a raster "
                          f"({_first_line(exc) or 'not a readable raster'})") from None


class ThreadHandles:
    """Open datasets kept per thread, at most ``max_open`` each, the least recently used closed
    first: rasterio datasets are not safe across threads, and GDAL keeps a dataset's fetched
    and decoded blocks with its handle, so a reader that reopens per request or per cell pays
    the open and the reads again (the tile server; remote scenes read cell after cell)."""

    def __init__(self, max_open: int):
        self.max_open = max_open
        self._local = threading.local()

    def _cache(self) -> OrderedDict:
        cache = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = OrderedDict()
        return cache

    def get(self, key, open_fn):
        """This thread's dataset for ``key``, opened with ``open_fn()`` the first time."""
        cache = self._cache()
        ds = cache.get(key)
        if ds is not None:
            cache.move_to_end(key)
            return ds
        ds = cache[key] = open_fn()
        while len(cache) > self.max_open:
            cache.popitem(last=False)[1].close()
        return ds

    def drop(self, key) -> None:
        """Close and forget this thread's dataset for ``key``, if it has one."""
        ds = self._cache().pop(key, None)
        if ds is not None:
            ds.close()


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


# ------------------------------------------------------------------------------------- CRS


def parse_crs(value, option: str = "crs") -> CRS:
    """``value`` (EPSG code, WKT, PROJ string or CRS) as a rasterio CRS; ``option`` names where
    it came from in the error."""
    try:
        return CRS.from_user_input(value)
    except (CRSError, ValueError, TypeError):
        raise RasterError(f"{option} {str(value)!r}: not a CRS rasterio understands "
                          "(try EPSG:32617)") from None


def resolve_crs(path, file_crs: CRS | None, override=None, option: str | None = "--crs") -> CRS:
    """The CRS of the raster at ``path``: its own (``file_crs``) if it has one, else ``override``.

    An override that contradicts the file's CRS is ignored with one warning. ``option`` is how
    the caller lets a user give the override (``--crs``, ``chm_crs=``...), for the messages; None
    when it cannot be given.
    """
    if file_crs:  # an empty CRS object is falsy
        if override is not None:
            from data_catalog.schema import crs_to_text  # local: schema pulls in pandas

            given = parse_crs(override, option or "crs")
            if given != file_crs and crs_to_text(given) != crs_to_text(file_crs):
                warnings.warn(f"{path}: has CRS {crs_to_text(file_crs)}; {option or 'crs'} {override} "
                              "applies only to files without one", stacklevel=3)
        return file_crs
    if override is None:
        hint = f"; pass {option} (the CRS its coordinates are in, e.g. EPSG:32617)" if option else ""
        raise RasterError(f"{path}: file has no CRS{hint}")
    return parse_crs(override, option or "crs")


def is_metric(crs) -> bool:
    """A projected CRS whose axis unit is the metre (State Plane in US feet is not)."""
    crs = CRS.from_user_input(crs)
    if crs.is_geographic:
        return False
    try:
        return abs(crs.linear_units_factor[1] - 1.0) < 1e-9
    except Exception:  # no linear unit to read: not metric (callers map it in UTM)
        return False


# ---------------------------------------------------------------------------- pixel sizes


@lru_cache(maxsize=64)
def _ellipsoid(wkt: str) -> tuple[float, float]:
    """(semi-major axis in metres, first eccentricity squared) of a CRS; WGS 84 if it has none."""
    from pyproj import CRS as ProjCRS

    ellipsoid = ProjCRS.from_wkt(wkt).ellipsoid
    if ellipsoid is None:
        return 6_378_137.0, 0.0066943799901413165
    a, b = ellipsoid.semi_major_metre, ellipsoid.semi_minor_metre
    return a, 1.0 - (b * b) / (a * a)


def metres_per_degree(latitude: float, crs="EPSG:4326") -> tuple[float, float]:
    """Metres per degree of longitude and of latitude at ``latitude`` on ``crs``'s ellipsoid.

    The ellipsoid's radii of curvature: along a parallel N·cos φ, along a meridian
    M = a(1 − e²)/(1 − e² sin² φ)^{3/2}, with N = a/√(1 − e² sin² φ), times π/180. Why these: they
    are the exact local scales, so a pixel (micro- to milli-degrees) comes out as long as the
    geodesic across it (pyproj's ``Geod.inv`` agrees to 1e-7, tests/data_catalog/test_raster.py)
    without building a transformer per call. A sphere of 111 320 m per degree is 0.7 % too long
    for a degree of latitude at the equator (110 574 m), and scaling latitude by cos φ as well, as
    one earlier copy did, made the Everglades drone pixels 10 % too short.
    """
    a, e2 = _ellipsoid(CRS.from_user_input(crs).to_wkt())
    phi = math.radians(latitude)
    w = math.sqrt(1.0 - e2 * math.sin(phi) ** 2)
    per_radian_lon = a * math.cos(phi) / w
    per_radian_lat = a * (1.0 - e2) / w ** 3
    return math.radians(per_radian_lon), math.radians(per_radian_lat)


def pixel_size_m(transform: Affine, crs, width: int, height: int) -> tuple[float, float] | None:
    """(width, height) of a pixel in metres, or None when the CRS has neither degrees nor a unit.

    Projected CRSs: the pixel in CRS units times the unit's size in metres (a projection's own
    scale error, ≤ 0.04 % in UTM, is not removed). Geographic CRSs: degrees converted with
    :func:`metres_per_degree` at the raster's centre (``width``×``height`` pixels).
    """
    crs = CRS.from_user_input(crs)
    a, b, d, e = transform.a, transform.b, transform.d, transform.e
    if crs.is_geographic:
        lat = d * width / 2.0 + e * height / 2.0 + transform.f  # the centre, written out: affine 2
        # has no `t @ (x, y)` and affine 3 deprecates `t * (x, y)`
        per_lon, per_lat = metres_per_degree(max(-90.0, min(90.0, lat)), crs)
        # A column step moves (a, d) degrees of (lon, lat); a row step (b, e).
        return math.hypot(a * per_lon, d * per_lat), math.hypot(b * per_lon, e * per_lat)
    try:
        factor = crs.linear_units_factor[1]
    except Exception:  # no linear unit (e.g. an engineering CRS without one)
        return None
    return math.hypot(a, d) * factor, math.hypot(b, e) * factor


def finest_pixel_m(ds, crs=None) -> float:
    """The smaller side of ``ds``'s pixel in metres (in CRS units when the CRS has no unit)."""
    size = pixel_size_m(ds.transform, crs or ds.crs, ds.width, ds.height)
    return float(min(size) if size is not None else min(abs(ds.res[0]), abs(ds.res[1])))


# ------------------------------------------------------------------------------------ UTM


def utm_zone(lon: float) -> int:
    """UTM zone number 1..60 of a longitude (zone n spans [−180 + 6(n−1), −180 + 6n); 180 is −180)."""
    return int(math.floor((lon + 180.0) / 6.0)) % 60 + 1


def utm_zone_band(zone: int) -> tuple[float, float]:
    """(west, east) longitudes of UTM zone ``zone`` (the inverse of :func:`utm_zone`)."""
    west = -180.0 + 6.0 * (zone - 1)
    return west, west + 6.0


def utm_zone_epsg(zone: int, south: bool) -> int:
    """EPSG code of WGS 84 / UTM zone ``zone`` north (326zz) or south (327zz)."""
    return (32700 if south else 32600) + zone


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS 84 / UTM zone holding a lon/lat point (the equator is north)."""
    return utm_zone_epsg(utm_zone(lon), lat < 0)


def utm_crs_for_bounds(bounds, crs) -> CRS:
    """The UTM zone (as a CRS) of the centre of ``bounds`` given in ``crs``: where rasters in
    degrees or feet are mapped in metres."""
    from rasterio.warp import transform_bounds

    lon0, lat0, lon1, lat1 = transform_bounds(crs, "EPSG:4326", *bounds)
    return CRS.from_epsg(utm_epsg((lon0 + lon1) / 2, (lat0 + lat1) / 2))


# ----------------------------------------------------------------------------- resampling


def resampling_for(src_res_m: float, dst_res_m: float, coincide: bool) -> Resampling:
    """The resampling rule (module docstring): nearest when the grids coincide, average when the
    input is finer than the output by more than :data:`GSD_TOLERANCE`, bilinear otherwise."""
    if coincide:
        return Resampling.nearest
    if src_res_m < dst_res_m * (1.0 - GSD_TOLERANCE):
        return Resampling.average
    return Resampling.bilinear


def grids_coincide(src_transform: Affine, src_crs, dst_transform: Affine, dst_crs) -> bool:
    """Every output pixel is exactly one input pixel: same CRS, north-up, the same pixel size
    within :data:`GSD_TOLERANCE`, origins a whole number of pixels apart."""
    if src_crs is None or dst_crs is None or CRS.from_user_input(src_crs) != CRS.from_user_input(dst_crs):
        return False
    s, d = src_transform, dst_transform
    if s.b or s.d or d.b or d.d or (s.a > 0) != (d.a > 0) or (s.e > 0) != (d.e > 0):
        return False
    if (abs(abs(s.a) - abs(d.a)) > GSD_TOLERANCE * abs(d.a)
            or abs(abs(s.e) - abs(d.e)) > GSD_TOLERANCE * abs(d.e)):
        return False
    col = (d.c - s.c) / s.a
    row = (d.f - s.f) / s.e
    return abs(col - round(col)) < LATTICE_TOLERANCE_PX and abs(row - round(row)) < LATTICE_TOLERANCE_PX


def resampling_onto(ds, dst_crs, dst_transform: Affine, dst_shape: tuple[int, int],
                    src_crs=None) -> Resampling:
    """How :func:`read_rgb` brings ``ds`` (in ``src_crs``, default its own) onto a grid."""
    src_crs = src_crs or ds.crs
    dst_size = pixel_size_m(dst_transform, dst_crs, dst_shape[1], dst_shape[0])
    dst_res = min(dst_size) if dst_size is not None else min(abs(dst_transform.a), abs(dst_transform.e))
    coincide = grids_coincide(ds.transform, src_crs, dst_transform, dst_crs)
    return resampling_for(finest_pixel_m(ds, src_crs), dst_res, coincide)


# ------------------------------------------------------------------------------------ RGB


def rgb_bands(ds, path=None, bands=None, count: int | None = None) -> tuple[int, ...]:
    """The band numbers (1-based) to read as red, green, blue — and near-infrared, for a model
    that takes ``count`` = 4 bands.

    ``bands`` (``"3,2,1"`` or numbers) when given: ``count`` of them (3 or 4 when ``count`` is
    None). Else the bands tagged red, green and blue when the file says so, else 1, 2, 3; for 4
    bands the near-infrared one is the first band left over (band 4 of an RGBN file).
    """
    path = path or ds.name
    if bands is None:
        n = count or 3
        if ds.count < n:
            raise RasterError(f"{path}: has {ds.count} band(s); "
                              + ("RGB imagery needs 3 (choose them with bands, e.g. 1,2,3)"
                                 if n == 3 else f"this model reads {n} (R,G,B,NIR)"))
        interp = [ci.name for ci in ds.colorinterp]
        if all(c in interp for c in ("red", "green", "blue")):
            rgb = tuple(interp.index(c) + 1 for c in ("red", "green", "blue"))
        else:
            rgb = (1, 2, 3)
        rest = [b for b in range(1, ds.count + 1) if b not in rgb]
        return _not_alpha(ds, path, rgb + tuple(rest[:n - 3]))
    if isinstance(bands, str):
        try:
            bands = tuple(int(b) for b in bands.split(","))
        except ValueError:
            raise RasterError(f"bands must be band numbers like 1,2,3 (or 1,2,3,4 with "
                              f"near-infrared), got '{bands}'") from None
    allowed = (count,) if count else (3, 4)
    if len(bands) not in allowed or any(b < 1 or b > ds.count for b in bands):
        words = {3: "three", 4: "four"}
        asked = (len(bands),) if len(bands) in allowed else allowed
        raise RasterError(f"bands {','.join(map(str, bands))}: need "
                          f"{' or '.join(words[n] for n in asked)} band numbers in "
                          f"1..{ds.count} for '{path}'")
    return _not_alpha(ds, path, tuple(int(b) for b in bands))


def _not_alpha(ds, path, bands: tuple[int, ...]) -> tuple[int, ...]:
    """Refuse a band tagged alpha as model input: GDAL reads it as the file's mask (pixels where
    it is 0 become nodata), so a near-infrared band mis-tagged alpha — what a 4-band uint8
    GeoTIFF gets by default — would mask the scene instead of feeding the model."""
    for b in bands:
        if ds.colorinterp[b - 1].name == "alpha":
            raise RasterError(f"{path}: band {b} is tagged alpha (a mask), not imagery; if it is "
                              f"near-infrared, retag it: gdal_edit.py -colorinterp_{b} undefined")
    return bands


def check_rgb_dtype(ds, bands, path=None, scale=None) -> None:
    """RGB must be uint8 unless ``scale`` (MIN, MAX) maps it linearly to 0..255."""
    dtype = ds.dtypes[bands[0] - 1]
    if scale is not None:
        lo, hi = scale
        if not hi > lo:
            raise RasterError(f"scale MIN MAX needs MIN < MAX, got {lo} {hi}")
        if all(ds.dtypes[b - 1] == "uint8" for b in bands):
            # 0..3000 on bytes would squeeze every colour into a tenth of the range
            raise RasterError(f"{path or ds.name}: holds uint8 data, already 0..255; drop --scale "
                              "(it maps other data types to 0..255)")
        if np.issubdtype(np.dtype(dtype), np.integer):
            info = np.iinfo(np.dtype(dtype))
            if hi > info.max or lo < info.min:
                raise RasterError(f"{path or ds.name}: --scale {lo:g} {hi:g} reaches outside what "
                                  f"{dtype} data can hold ({info.min}..{info.max})")
        return
    if any(ds.dtypes[b - 1] != "uint8" for b in bands):
        raise RasterError(f"{path or ds.name}: holds {dtype} data; RGB must be uint8, or mapped to "
                          "0..255 with --scale MIN MAX (e.g. --scale 0 3000 for 12-bit reflectance)")


def check_complete(ds, path=None) -> None:
    """Refuse a GeoTIFF whose last pixel block lies past the end of the file (a copy cut short):
    GDAL opens such a file and fails only when a read reaches the missing part, hours into a
    run. Only the header is read (the block table GDAL exposes), not pixels. Other formats pass.
    """
    if ds.driver != "GTiff" or ds.name.startswith("/vsi") or "://" in ds.name:
        # a file read over HTTP has no local size to compare with; its reads are retried and a
        # failed one fails its cell, which the next run retries (canopy.predict.sources)
        return
    import os

    name = path or ds.name
    size = os.path.getsize(ds.name)
    for band in {1, ds.count}:
        bh, bw = ds.block_shapes[band - 1]
        last = f"{(ds.width - 1) // bw}_{(ds.height - 1) // bh}"
        offset = ds.get_tag_item(f"BLOCK_OFFSET_{last}", "TIFF", bidx=band)
        length = ds.get_tag_item(f"BLOCK_SIZE_{last}", "TIFF", bidx=band)
        if offset is None or length is None:
            continue
        end = int(offset) + int(length)
        if int(offset) == 0 or end > size:
            raise RasterError(f"{name}: truncated or damaged (its last pixel block ends at byte "
                              f"{end:,} but the file has {size:,} bytes)")


def needs_alpha(ds) -> bool:
    """Let the warper add an alpha band only when the source has no mask of its own: a raster
    with nodata or an alpha band (drone orthomosaics are often RGBA) already says what is valid,
    and GDAL refuses a second alpha band."""
    if ds.nodata is not None:
        return False
    return all(flags == [MaskFlags.all_valid] for flags in ds.mask_flag_enums)


def read_rgb(ds, crs, transform: Affine, shape: tuple[int, int], *, src_crs=None, bands=None,
             scale: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """``ds``'s RGB (or the bands ``bands`` names: RGB + NIR) on the grid (``crs``,
    ``transform``, ``shape``): (C×H×W uint8, H×W valid, method).

    ``src_crs`` stands in for a file without a CRS. ``bands`` as :func:`rgb_bands`. ``scale``
    (MIN, MAX) maps MIN..MAX linearly onto 0..255 (clipped, rounded); without it the bands must
    be uint8. ``valid`` is False where the source has no data (its nodata, alpha or mask, or
    outside the file), and those pixels are 0 in every band. ``method`` is the resampling used,
    or ``'none'`` when the grid is the file's own and the pixels were read without the warper.
    """
    src_crs = src_crs or ds.crs
    band_idx = rgb_bands(ds, None, bands)
    check_rgb_dtype(ds, band_idx, None, scale)
    h, w = shape
    if (tuple(shape) == (ds.height, ds.width) and transform.almost_equals(ds.transform)
            and CRS.from_user_input(crs) == CRS.from_user_input(src_crs)):
        try:
            data, valid, method = ds.read(band_idx), ds.dataset_mask() > 0, "none"
        except RasterioIOError as exc:
            raise RasterError(f"{ds.name}: read failed ({_first_line(exc)})") from None
    else:
        resampling = resampling_onto(ds, crs, transform, shape, src_crs)
        try:
            with WarpedVRT(ds, src_crs=src_crs, crs=crs, transform=transform, width=w, height=h,
                           resampling=resampling, tolerance=WARP_TOLERANCE_PX,
                           add_alpha=needs_alpha(ds)) as vrt:
                data = vrt.read(band_idx)
                valid = vrt.dataset_mask() > 0
        except RasterioIOError as exc:  # GDAL's own words say "Read failed" and nothing of which
            raise RasterError(f"{ds.name}: read failed ({_first_line(exc)})") from None
        method = resampling.name
    if scale is not None:
        lo, hi = scale
        data = np.clip((data.astype(np.float64) - lo) / (hi - lo) * 255.0 + 0.5, 0, 255)
    rgb = data.astype(np.uint8, copy=False)
    rgb[:, ~valid] = 0  # a file's nodata value (NEON's 255) is not a colour: no data reads as 0
    return rgb, valid, method


#: Side, in pixels, of the blocks of the global lattice that :class:`LatticeReader` warps.
READ_BLOCK_PX = 512


def lattice_pieces(transform: Affine, shape: tuple[int, int], gsd: float,
                   block_px: int = READ_BLOCK_PX, anchor: tuple[float, float] = (0.0, 0.0)
                   ) -> list[tuple[tuple[int, int], tuple, tuple]]:
    """The blocks of the ``gsd`` lattice (anchored at ``anchor`` (x, y), by default the CRS
    origin) that a window on it overlaps: ``((block row, block col), (window rows, window
    cols), (block rows, block cols))`` each."""
    h, w = shape
    col0 = int(round((transform.c - anchor[0]) / gsd))
    row0 = int(round((anchor[1] - transform.f) / gsd))
    B = block_px
    pieces = []
    for br in range(row0 // B, (row0 + h - 1) // B + 1):
        for bc in range(col0 // B, (col0 + w - 1) // B + 1):
            r0, c0 = br * B - row0, bc * B - col0  # block origin in window pixels
            rs, cs = slice(max(r0, 0), min(r0 + B, h)), slice(max(c0, 0), min(c0 + B, w))
            pieces.append(((br, bc), (rs, cs),
                           (slice(rs.start - r0, rs.stop - r0), slice(cs.start - c0, cs.stop - c0))))
    return pieces


class LatticeReader:
    """One raster's RGB on the pixel lattice of ``crs`` at ``gsd`` metres anchored at the CRS
    origin (pixel (row, col) spans easting [col, col+1)·gsd and northing (−row−1, −row]·gsd),
    warped in fixed :data:`READ_BLOCK_PX` blocks from which windows are cut.

    Why blocks: GDAL's warper can give a pixel different values depending on the window it is
    asked for (its average kernel weighs partial source pixels per request: ±1 DN in ~12 % of
    the pixels of 48-px windows of the Kootenay ortho at 0.5 → 0.6 m). Warping always the same
    blocks gives a pixel the same value whichever window asks for it: a training chip and every
    prediction cell covering it. ``max_blocks`` warped blocks are kept for windows that follow.
    """

    def __init__(self, ds, crs, gsd: float, *, src_crs=None, bands=None, max_blocks: int = 0,
                 anchor: tuple[float, float] = (0.0, 0.0), scale=None):
        self.ds, self.crs, self.gsd = ds, CRS.from_user_input(crs), gsd
        self.src_crs, self.bands, self.max_blocks = src_crs, bands, max_blocks
        # a one-raster map's lattice starts at the raster's corner, a state run's at the origin
        self.anchor, self.scale = anchor, scale
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def block(self, br: int, bc: int) -> tuple[np.ndarray, np.ndarray]:
        """(3×B×B uint8, B×B valid) of block (br, bc)."""
        key = (br, bc)
        if key in self._cache:
            return self._cache[key]
        B = READ_BLOCK_PX
        x0, y0 = self.anchor
        transform = Affine(self.gsd, 0, x0 + bc * B * self.gsd, 0, -self.gsd,
                           y0 - br * B * self.gsd)
        rgb, valid, _ = read_rgb(self.ds, self.crs, transform, (B, B), src_crs=self.src_crs,
                                 bands=self.bands, scale=self.scale)
        if self.max_blocks > 0:
            if len(self._cache) >= self.max_blocks:
                self._cache.pop(next(iter(self._cache)))  # the oldest: windows move on
            self._cache[key] = (rgb, valid)
        return rgb, valid

    def read(self, transform: Affine, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """A window of the lattice (``transform`` on it, ``shape`` rows × cols)."""
        n = len(self.bands) if self.bands is not None and not isinstance(self.bands, str) else 3
        rgb = np.zeros((n, *shape), np.uint8)
        valid = np.zeros(shape, bool)
        for (br, bc), (rs, cs), (brs, bcs) in lattice_pieces(transform, shape, self.gsd,
                                                             anchor=self.anchor):
            data, ok = self.block(br, bc)
            rgb[:, rs, cs] = data[:, brs, bcs]
            valid[rs, cs] = ok[brs, bcs]
        return rgb, valid


@dataclass
class ImageOnGrid:
    """One raster's RGB on a square grid at a given GSD in a metric CRS."""

    rgb: np.ndarray  # 3×H×W uint8
    valid: np.ndarray  # H×W bool
    crs: CRS
    transform: Affine
    resampling: str  # 'none', 'nearest', 'average' or 'bilinear'
    source_res: tuple[float, float]  # the file's pixel size in its own CRS units


def grid_at_gsd(ds, src_crs, gsd: float) -> tuple[CRS, Affine, int, int]:
    """(crs, transform, height, width) of a square ``gsd``-metre grid covering ``ds``.

    A raster already at ``gsd`` in a metric CRS (north-up) keeps its own grid. Otherwise the
    grid starts at the raster's upper-left corner in its own CRS when that is metric, or in the
    UTM zone of the raster's centre when it is in degrees or feet (with a warning).
    """
    from rasterio.warp import transform_bounds

    t = ds.transform
    if t.is_identity and not ds.gcps[0]:
        raise RasterError(f"{ds.name}: has no georeferencing (no geotransform), so no place on the "
                          "ground; a CRS alone cannot place it (georeference it first)")
    metric = is_metric(src_crs)
    if (metric and t.b == 0 and t.d == 0 and abs(abs(t.a) - gsd) <= GSD_TOLERANCE * gsd
            and abs(abs(t.e) - gsd) <= GSD_TOLERANCE * gsd):
        return src_crs, t, ds.height, ds.width
    if metric:
        dst_crs = src_crs
        left, bottom, right, top = ds.bounds
    else:
        check_bounds_fit(ds.name, ds.bounds, src_crs)
        dst_crs = utm_crs_for_bounds(ds.bounds, src_crs)
        unit = "geographic coordinates" if src_crs.is_geographic else "non-metre units"
        warnings.warn(f"'{ds.name}' is in {unit}; output is in {dst_crs.to_string()}", stacklevel=3)
        left, bottom, right, top = transform_bounds(src_crs, dst_crs, *ds.bounds, densify_pts=21)
    # whole pixels inside the raster: the output never reaches past the input's extent (a
    # partial pixel at the right or bottom edge is left out, as GIS users expect of a "same
    # extent" product)
    width = max(1, math.floor((right - left) / gsd + 1e-9))
    height = max(1, math.floor((top - bottom) / gsd + 1e-9))
    return dst_crs, Affine(gsd, 0, left, 0, -gsd, top), height, width


def check_bounds_fit(name, bounds, crs) -> None:
    """Refuse coordinates that cannot be in ``crs`` (UTM metres read as degrees): the
    reprojection would give NaN far from any error message."""
    from rasterio.warp import transform_bounds

    crs = CRS.from_user_input(crs)
    left, bottom, right, top = bounds
    bad = crs.is_geographic and (min(left, right) < -180 - 1e-6 or max(left, right) > 360
                                 or min(bottom, top) < -90 - 1e-6 or max(bottom, top) > 90 + 1e-6)
    if not bad:
        try:
            bad = not np.isfinite(transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)).all()
        except Exception:  # PROJ raises for points outside the projection's domain
            bad = True
    if bad:
        from data_catalog.schema import crs_to_text

        raise RasterError(f"{name}: its coordinates ({left:.6g}, {bottom:.6g}, {right:.6g}, "
                          f"{top:.6g}) do not fit {crs_to_text(crs)}; is that CRS (--crs) right?")


def output_grid(path, gsd: float, crs=None) -> tuple[CRS, Affine, int, int]:
    """The grid :func:`read_rgb_on_grid` will read ``path`` onto, from its metadata alone (to
    size an output before any pixel is read); a file cut short is refused here."""
    with open_raster(path) as ds:
        check_complete(ds, path)
        return grid_at_gsd(ds, resolve_crs(path, ds.crs, crs), gsd)


def read_rgb_on_grid(path, gsd: float, *, bands=None, crs=None,
                     scale: tuple[float, float] | None = None) -> ImageOnGrid:
    """Read a raster as uint8 RGB on a square ``gsd`` grid (:func:`grid_at_gsd`, :func:`read_rgb`).

    ``crs`` is for a file without a CRS (:func:`resolve_crs`).
    """
    with open_raster(path) as ds:
        src_crs = resolve_crs(path, ds.crs, crs)
        band_idx = rgb_bands(ds, path, bands)
        check_rgb_dtype(ds, band_idx, path, scale)
        dst_crs, transform, height, width = grid_at_gsd(ds, src_crs, gsd)
        rgb, valid, method = read_rgb(ds, dst_crs, transform, (height, width), src_crs=src_crs,
                                      bands=band_idx, scale=scale)
        source_res = (abs(ds.transform.a), abs(ds.transform.e))
    if not valid.any():
        raise RasterError(f"'{path}' has no valid pixels (all nodata or masked)")
    return ImageOnGrid(rgb, valid, dst_crs, transform, method, source_res)


# ------------------------------------------------------------------------- float rasters


def warp_average(src: np.ndarray, src_transform, src_crs, dst_shape: tuple[int, int],
                 dst_transform, dst_crs, min_valid_fraction: float = 0.5) -> np.ndarray:
    """Average ``src`` (float, NaN = nodata) onto a coarser or equal destination grid.

    Nodata is left out of each average; a destination cell is NaN unless valid source pixels
    cover at least ``min_valid_fraction`` of it (that cover is itself warped with AVERAGE), so a
    coarse cell is never the mean of one stray pixel.
    """
    from rasterio.warp import reproject

    dst = np.full(dst_shape, np.nan, np.float32)
    reproject(src.astype(np.float32, copy=False), dst, src_transform=src_transform,
              src_crs=src_crs, src_nodata=np.nan, dst_transform=dst_transform, dst_crs=dst_crs,
              dst_nodata=np.nan, resampling=Resampling.average)
    cover = np.zeros(dst_shape, np.float32)
    reproject(np.isfinite(src).astype(np.float32), cover, src_transform=src_transform,
              src_crs=src_crs, dst_transform=dst_transform, dst_crs=dst_crs,
              resampling=Resampling.average)
    dst[cover < min_valid_fraction - 1e-6] = np.nan
    return dst


def mirror_fill(image: np.ndarray, valid: np.ndarray, reach: int, fill: np.ndarray) -> np.ndarray:
    """``image`` (3×H×W uint8) with every pixel without imagery replaced by its mirror image
    across the nearest pixel with imagery (the edge rule of both prediction paths).

    A missing pixel ``p`` whose nearest valid pixel ``q`` lies within ``reach`` px takes the
    value at ``2q − p`` (or at ``q`` itself when that point is off the image or missing too);
    farther pixels take ``fill``, the normalisation mean. At the straight edge of a raster this
    is numpy's ``reflect`` padding; along any other footprint edge (scene borders in a mosaic,
    nodata holes) it keeps the model's input looking like imagery, where a constant colour made
    tiles that hold it predict low heights for the real pixels they share (the --aoi engine's
    heights fell from 20 m to ~1 m at the footprint edge of a NEON plot, docs/performance.md).

    The result for a pixel depends only on the valid pixels within ``2·reach`` of it, so a
    caller tiling a large area gets the same values in every window that holds that much
    context around the pixels it predicts (``margin`` of :func:`canopy.predict.blend.predict_array`).
    """
    if valid.all():
        return image
    out = image.copy()
    if not valid.any():
        out[:] = fill[:, None, None]
        return out
    from scipy import ndimage

    idx = np.empty((2, *valid.shape), np.int32)
    ndimage.distance_transform_edt(~valid, return_distances=False, return_indices=True,
                                   indices=idx)
    pr, pc = np.nonzero(~valid)
    qr, qc = idx[0][pr, pc].astype(np.int64), idx[1][pr, pc].astype(np.int64)
    near = (qr - pr) ** 2 + (qc - pc) ** 2 <= reach * reach
    mr, mc = 2 * qr - pr, 2 * qc - pc
    ok = (mr >= 0) & (mr < valid.shape[0]) & (mc >= 0) & (mc < valid.shape[1])
    ok[ok] = valid[mr[ok], mc[ok]]
    sr, sc = np.where(ok, mr, qr), np.where(ok, mc, qc)
    out[:, pr[near], pc[near]] = image[:, sr[near], sc[near]]
    out[:, pr[~near], pc[~near]] = fill[:, None]
    return out
