"""Imagery for state-scale runs: an index of scenes, and their mosaic on one output window.

``--imagery`` may be a folder (searched recursively), one raster or VRT, a catalog GeoParquet
written by ``canopy catalog``, or STAC (an API search or a JSON file; remote COGs read over HTTP,
:mod:`data_catalog.stac_remote`). Scenes may be in different CRSs; each is warped into the output
cell's grid. Where scenes overlap, the newest acquisition wins, then the finest resolution, then
the path (so the choice never depends on the order files were listed).

Pixels are read by :class:`data_catalog.raster.LatticeReader`, the reader training chips use
too: the same resampling rule, exact warper tolerance and fixed lattice blocks, so a cell shows
the model exactly the pixels a training chip of the same place held.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_bounds
from shapely.geometry import box

from canopy.errors import InputError, OptionError
from data_catalog.errors import CatalogError
from data_catalog.stac_remote import (
    RemoteItem, forget_remote, is_remote, is_stac_file, is_stac_search, items_from_file,
    remote_item, remote_version, search, signed, use_remote_defaults)
from data_catalog.raster import (
    LatticeReader, ThreadHandles, check_complete, check_rgb_dtype, finest_pixel_m, lattice_pieces,
    open_raster, resampling_onto, resolve_crs, rgb_bands)

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
    item: str | None = None  # STAC item id (remote imagery)
    version: str | None = None  # ETag/Last-Modified at planning (remote imagery)

    @property
    def footprint(self):
        return shapely.from_wkb(self.footprint_wkb)


# remote scenes stay open in their thread for the next cells: a new handle fetches again what
# the last one fetched (re-opening per cell fetched 2.6× the assets' bytes, benchmarks/stac_http.py)
_REMOTE = ThreadHandles(max_open=32)


def _remote_dataset(path: str):
    """This thread's dataset of a remote scene, opened through the signing hook, whose signed
    URL (it may hold a token) never reaches an error message."""
    def open_signed():
        url = signed(path)
        try:
            return open_raster(url, "imagery")
        except CatalogError as exc:
            raise type(exc)(str(exc).replace(url, path)) from None

    return _REMOTE.get(path, open_signed)


def _open(path: str):
    """A scene's dataset as a context manager (a remote one stays open: :data:`_REMOTE`)."""
    if not is_remote(path):
        return open_raster(path, "imagery")
    return contextlib.nullcontext(_remote_dataset(path))


def acquisition_text(tags: dict, path: str) -> str | None:
    """When a scene was flown or shot, as ``ISO`` or ``ISO/ISO``: from its metadata tags (the
    catalog's rule, :func:`data_catalog.imagery.acquisition_time`), else from a date in its file
    name (``naip_20200915.tif``), else None. Never the file's processing time."""
    from data_catalog.imagery import AcquisitionTime, acquisition_time, parse_datetimes

    when = acquisition_time(tags)
    if when is None:
        found = parse_datetimes(Path(path).stem)
        when = AcquisitionTime(min(found), max(found)) if found else None
    if when is None:
        return None
    start, end = (f"{d:%Y-%m-%dT%H:%M:%SZ}" for d in (when.start, when.end))
    return start if start == end else f"{start}/{end}"


def _scene_from_raster(path: str, datetime: str | None = None, *, item: str | None = None,
                       version: str | None = None) -> Scene:
    remote = is_remote(path)
    with _open(path) as ds:
        bh, bw = ds.block_shapes[0]
        if remote and ds.driver == "GTiff" and bw >= ds.width and bh < ds.height:
            # each window read would fetch whole strips (rows across the scene) over HTTP
            warnings.warn(f"{path} is not tiled (not a Cloud Optimized GeoTIFF): every "
                          "read fetches whole rows of the scene over HTTP; convert it with "
                          "gdal_translate -of COG for runs many times faster")
        resolve_crs(path, ds.crs, None, option=None)  # state-scale runs take no --crs
        check_complete(ds, path)
        check_rgb_dtype(ds, rgb_bands(ds, path), path)
        west, south, east, north = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)
        if datetime is None:
            datetime = acquisition_text(ds.tags(), path)
        return Scene(
            path=path if remote else str(Path(path).resolve()), crs_wkt=ds.crs.to_wkt(),
            bounds=tuple(ds.bounds), footprint_wkb=shapely.to_wkb(box(west, south, east, north)),
            res=finest_pixel_m(ds), datetime=datetime, count=ds.count,
            dtype=ds.dtypes[0], item=item, version=version,
        )


def _scene_from_item(it: RemoteItem) -> Scene:
    """A scene of a STAC item: planned from the item's projection metadata when it is complete,
    says uint8 RGB(N) and the asset says it is a COG (no request but one HEAD for the version),
    else from the file's header read over HTTP (which also finds a file that is not tiled)."""
    version = remote_version(it.href, need_ranges=True) if is_remote(it.href) else None
    if not is_remote(it.href):
        return _scene_from_raster(it.href, it.datetime, item=it.item_id)
    says_cog = "cloud-optimized" in (it.media_type or "").lower()
    if says_cog and it.crs and it.bounds and it.res and it.count and it.count >= 3 \
            and it.dtype == "uint8":
        west, south, east, north = transform_bounds(it.crs, "EPSG:4326", *it.bounds, densify_pts=21)
        return Scene(path=it.href, crs_wkt=CRS.from_user_input(it.crs).to_wkt(), bounds=it.bounds,
                     footprint_wkb=shapely.to_wkb(box(west, south, east, north)), res=it.res,
                     datetime=it.datetime, count=it.count, dtype="uint8", item=it.item_id,
                     version=version)
    return _scene_from_raster(it.href, it.datetime, item=it.item_id, version=version)


class SceneChangedError(InputError):
    """A remote scene is not the file that was planned with (replaced or gone)."""


def check_unchanged(scene: Scene) -> None:
    """Before reading a remote scene: it is still the version planning saw (and a handle kept
    open on an older version is dropped)."""
    if scene.version is None or not is_remote(scene.path):
        return
    now = remote_version(scene.path)
    if now != scene.version:
        _REMOTE.drop(scene.path)
        raise SceneChangedError(f"imagery {scene.path} (item {scene.item}) changed since the run "
                                f"was planned ({scene.version} → {now}); run again to plan with "
                                "the new version")


def index_imagery(spec: str | Path, *, skip_bad: bool = False, aoi=None
                  ) -> tuple[list[Scene], list[dict]]:
    """Scenes from a folder, one raster/VRT, a catalog GeoParquet (its 'imagery' rows), a STAC
    API search (``stac+https://…``, over ``aoi``'s bounds) or a STAC JSON file (ItemCollection,
    Catalog, Collection, Item; :mod:`data_catalog.stac_remote`), and the files left out.

    Every scene's header is checked here, before any model runs: readable, a CRS, uint8 RGB, not
    cut short (:func:`data_catalog.raster.check_complete`). A bad one is an error naming the file,
    or with ``skip_bad`` is left out and listed (``{"path", "error"}``).
    """
    if is_stac_search(spec):
        if aoi is None:
            raise OptionError("imagery", "{imagery}: a STAC search needs an area of interest")
        use_remote_defaults()
        try:
            items, key = search(str(spec), aoi.bounds)
            remote = [remote_item(i, key, str(spec)) for i in items]
        except CatalogError as exc:
            raise OptionError("imagery", f"{{imagery}}: {exc}") from None
        return _scenes(((r.href, r) for r in remote), spec, skip_bad)
    path = Path(spec)
    if not path.exists():
        raise OptionError("imagery", f"'{spec}' does not exist")
    if is_stac_file(path):
        use_remote_defaults()
        try:
            remote = [remote_item(i, None, str(path)) for i in items_from_file(path)]
        except CatalogError as exc:
            raise OptionError("imagery", f"{{imagery}}: {exc}") from None
        return _scenes(((r.href, r) for r in remote), spec, skip_bad)
    if path.is_dir():
        entries = [(str(p), None) for p in sorted(path.rglob("*"))
                   if p.suffix.lower() in RASTER_SUFFIXES and not p.name.startswith(".")]
    elif path.suffix.lower() == ".parquet":
        from data_catalog.catalog import Catalog

        frame = Catalog.open(path).query(kinds=["imagery"])
        entries = [(str(row.path), row.datetime if isinstance(row.datetime, str) else None)
                   for row in frame.itertuples()]
    else:
        entries = [(str(path), None)]
    return _scenes(entries, spec, skip_bad)


def _scenes(entries, spec, skip_bad: bool) -> tuple[list[Scene], list[dict]]:
    scenes, skipped = [], []
    for file, when in entries:
        try:
            scenes.append(_scene_from_item(when) if isinstance(when, RemoteItem)
                          else _scene_from_raster(file, when))
        except CatalogError as exc:
            if not skip_bad:
                raise OptionError("imagery", f"{{imagery}}: {exc} (fix or remove it, or pass "
                                             "{skip_bad_scenes} to go on without it)") from None
            skipped.append({"path": file if is_remote(file) else str(Path(file).resolve()),
                            "error": str(exc)})
    if not scenes:
        raise OptionError("imagery", f"'{spec}' holds no {'usable ' if skipped else ''}rasters")
    return scenes, skipped


def scene_order(scenes: list[Scene]) -> list[Scene]:
    """Newest first, then finest, then by path."""
    return sorted(scenes, key=lambda s: (-(_date_key(s.datetime)), s.res, s.path))


def _date_key(dt: str | None) -> float:
    if not dt:
        return -math.inf
    digits = "".join(ch for ch in dt if ch.isdigit())[:14]
    return float(digits.ljust(14, "0")) if digits else -math.inf


def scene_resampling(scene: Scene, crs, gsd: float) -> str:
    """How :func:`read_mosaic` brings ``scene`` onto the zone lattice at ``gsd`` (cells and read
    blocks all sit on that lattice, so one answer holds for every window)."""
    with _open(scene.path) as ds:
        return resampling_onto(ds, crs, Affine(gsd, 0, 0, 0, -gsd, 0), (1, 1)).name


def read_mosaic(scenes: list[Scene], crs: CRS | str, transform: Affine, shape: tuple[int, int],
                gsd: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Mosaic of ``scenes`` on a window of the zone's pixel lattice (uint8 3×H×W, valid H×W,
    paths actually used).

    Scenes are read through :class:`data_catalog.raster.LatticeReader` (fixed blocks of the
    global lattice), so the same pixel gets the same value whichever cell, or training chip,
    reads it.
    """
    h, w = shape
    rgb = np.zeros((3, h, w), np.uint8)
    valid = np.zeros((h, w), bool)
    used = []
    pieces = lattice_pieces(transform, shape, gsd)
    if any(is_remote(s.path) for s in scenes):
        use_remote_defaults()
    for scene in scene_order(scenes):
        if valid.all():
            break
        took = False
        check_unchanged(scene)
        with _open(scene.path) as ds:
            reader = LatticeReader(ds, crs, gsd)
            for (br, bc), (rs, cs), (brs, bcs) in pieces:
                if valid[rs, cs].all():
                    continue
                data, ok, reader = _read_block(reader, scene, crs, gsd, br, bc)
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


REMOTE_READ_TRIES = 4


def _read_block(reader, scene: Scene, crs, gsd: float, br: int, bc: int):
    """(data, ok, reader) of one lattice block. A remote read that fails — GDAL retries HTTP
    errors itself, not a connection dropped mid-body — is tried again on a fresh handle after a
    back-off, up to :data:`REMOTE_READ_TRIES` times; then the error names the scene (the cell
    fails and the next run redoes it)."""
    import random
    import time

    for attempt in range(REMOTE_READ_TRIES):
        try:
            data, ok = reader.block(br, bc)
            return data, ok, reader
        except CatalogError:
            if not is_remote(scene.path) or attempt == REMOTE_READ_TRIES - 1:
                raise
        _REMOTE.drop(scene.path)
        forget_remote(scene.path)  # GDAL would serve the cut-short transfer again
        time.sleep(min(4.0, 0.25 * 2 ** attempt) * (0.5 + random.random()))
        check_unchanged(scene)
        reader = LatticeReader(_remote_dataset(scene.path), crs, gsd)
    raise AssertionError("unreachable")


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
