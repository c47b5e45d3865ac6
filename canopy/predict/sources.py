"""Imagery for state-scale runs: an index of scenes, and their mosaic on one output window.

``--imagery`` may be a folder (searched recursively), one raster or VRT, or a catalog GeoParquet
written by ``canopy catalog``. Scenes may be in different CRSs; each is warped into the output
cell's grid. Where scenes overlap, the newest acquisition wins, then the finest resolution, then
the path (so the choice never depends on the order files were listed).

Reads go through ``WarpedVRT`` with a tolerance of 1e-6 px: GDAL's default approximate
transformer (error ≤ 0.125 px) makes a warped pixel depend on the window it was read in, which
would let cell borders leak into the output. (rasterio 1.4 fails on ``tolerance=0``, GDAL's
"exact" setting, with a NULL transformer; 1e-6 px is exact for any practical purpose.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from shapely.geometry import box

from canopy.errors import InputError
from canopy.io.imagery import is_metric, native_res_m, needs_alpha

WARP_TOLERANCE_PX = 1e-6
RASTER_SUFFIXES = {".tif", ".tiff", ".vrt", ".jp2", ".img"}


@dataclass(frozen=True)
class Scene:
    path: str
    crs_wkt: str
    bounds: tuple[float, float, float, float]  # native
    footprint_wkb: bytes  # EPSG:4326
    res: float  # finest native pixel size, metres
    datetime: str | None
    count: int
    dtype: str

    @property
    def footprint(self):
        return shapely.from_wkb(self.footprint_wkb)


def _scene_from_raster(path: str, datetime: str | None = None) -> Scene:
    try:
        ds = rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(f"cannot read imagery '{path}': {str(exc).splitlines()[0]}") from None
    with ds:
        if ds.crs is None:
            raise InputError(f"imagery '{path}' has no CRS")
        if ds.count < 3:
            raise InputError(f"imagery '{path}' has {ds.count} band(s); RGB needs 3")
        if ds.dtypes[0] != "uint8":
            raise InputError(f"imagery '{path}' holds {ds.dtypes[0]} data; state-scale runs need uint8 RGB")
        west, south, east, north = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)
        if datetime is None:
            tags = ds.tags()
            datetime = tags.get("ACQUISITION_DATE") or tags.get("TIFFTAG_DATETIME")
        return Scene(
            path=str(Path(path).resolve()), crs_wkt=ds.crs.to_wkt(), bounds=tuple(ds.bounds),
            footprint_wkb=shapely.to_wkb(box(west, south, east, north)),
            res=float(native_res_m(ds, ds.crs)), datetime=datetime, count=ds.count,
            dtype=ds.dtypes[0],
        )


def index_imagery(spec: str | Path) -> list[Scene]:
    """Scenes from a folder, one raster/VRT, or a catalog GeoParquet (its 'imagery' rows)."""
    path = Path(spec)
    if not path.exists():
        raise InputError(f"--imagery '{spec}' does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in RASTER_SUFFIXES
                       and not p.name.startswith("."))
        scenes = [_scene_from_raster(str(p)) for p in files]
    elif path.suffix.lower() == ".parquet":
        from data_catalog.catalog import Catalog

        frame = Catalog.open(path).query(kinds=["imagery"])
        scenes = [_scene_from_raster(str(row.path), row.datetime if isinstance(row.datetime, str) else None)
                  for row in frame.itertuples()]
    else:
        scenes = [_scene_from_raster(str(path))]
    if not scenes:
        raise InputError(f"--imagery '{spec}' holds no rasters")
    return scenes


def scene_order(scenes: list[Scene]) -> list[Scene]:
    """Newest first, then finest, then by path."""
    return sorted(scenes, key=lambda s: (-(_date_key(s.datetime)), s.res, s.path))


def _date_key(dt: str | None) -> float:
    if not dt:
        return -math.inf
    digits = "".join(ch for ch in dt if ch.isdigit())[:14]
    return float(digits.ljust(14, "0")) if digits else -math.inf


READ_BLOCK_PX = 512


def _resampling(ds, scene: Scene, dst_crs: CRS, gsd: float) -> Resampling:
    """average when the scene is finer than the output, nearest when it already sits on the
    output lattice (a copy), bilinear when it is coarser or off-lattice."""
    if scene.res < gsd * (1 - 1e-6):
        return Resampling.average
    if not is_metric(ds.crs):
        return Resampling.bilinear
    t = ds.transform
    on_lattice = (ds.crs == dst_crs and abs(abs(t.a) - gsd) < 1e-9 * gsd
                  and abs(abs(t.e) - gsd) < 1e-9 * gsd and t.b == 0 and t.d == 0
                  and abs(t.c / gsd - round(t.c / gsd)) < 1e-6
                  and abs(t.f / gsd - round(t.f / gsd)) < 1e-6)
    return Resampling.nearest if on_lattice else Resampling.bilinear


def _warp_block(ds, scene: Scene, dst_crs: CRS, transform: Affine, size: int, gsd: float):
    method = _resampling(ds, scene, dst_crs, gsd)
    with WarpedVRT(ds, crs=dst_crs, transform=transform, width=size, height=size,
                   resampling=method, tolerance=WARP_TOLERANCE_PX,
                   add_alpha=needs_alpha(ds)) as vrt:
        return vrt.read((1, 2, 3)), vrt.dataset_mask() > 0


def read_mosaic(scenes: list[Scene], crs: CRS | str, transform: Affine, shape: tuple[int, int],
                gsd: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Mosaic of ``scenes`` on a window of the zone's pixel lattice (uint8 3×H×W, valid H×W,
    paths actually used).

    GDAL's warper can give a pixel different values depending on the window it is asked for
    (near scene edges, partial source pixels are counted differently). So scenes are always
    warped in fixed 512-pixel blocks of the global lattice and the window is cut from those: the
    same pixel gets the same value whichever cell reads it.
    """
    h, w = shape
    col0 = int(round(transform.c / gsd))
    row0 = int(round(-transform.f / gsd))
    rgb = np.zeros((3, h, w), np.uint8)
    valid = np.zeros((h, w), bool)
    used = []
    dst_crs = CRS.from_user_input(crs)
    B = READ_BLOCK_PX
    blocks = [(br, bc) for br in range(row0 // B, (row0 + h - 1) // B + 1)
              for bc in range(col0 // B, (col0 + w - 1) // B + 1)]
    for scene in scene_order(scenes):
        if valid.all():
            break
        took = False
        with rasterio.open(scene.path) as ds:
            for br, bc in blocks:
                r0, c0 = br * B - row0, bc * B - col0  # block origin in window pixels
                rs, cs = slice(max(r0, 0), min(r0 + B, h)), slice(max(c0, 0), min(c0 + B, w))
                if valid[rs, cs].all():
                    continue
                bt = Affine(gsd, 0, bc * B * gsd, 0, -gsd, -br * B * gsd)
                data, ok = _warp_block(ds, scene, dst_crs, bt, B, gsd)
                brs = slice(rs.start - r0, rs.stop - r0)
                bcs = slice(cs.start - c0, cs.stop - c0)
                take = ok[brs, bcs] & ~valid[rs, cs]
                if take.any():
                    sub = rgb[:, rs, cs]
                    sub[:, take] = data[:, brs, bcs][:, take]
                    rgb[:, rs, cs] = sub
                    valid[rs, cs] |= take
                    took = True
        if took:
            used.append(scene.path)
    return rgb, valid, used


def scenes_for_window(scenes: list[Scene], crs, transform: Affine, shape: tuple[int, int],
                      tree=None) -> list[Scene]:
    h, w = shape
    left, top = transform.c, transform.f
    right, bottom = left + w * transform.a, top + h * transform.e
    west, south, east, north = transform_bounds(crs, "EPSG:4326", left, bottom, right, top,
                                                densify_pts=21)
    window = box(west, south, east, north)
    if tree is None:
        return [s for s in scenes if s.footprint.intersects(window)]
    return [scenes[i] for i in tree.query(window, predicate="intersects")]
