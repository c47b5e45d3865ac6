"""Layers: the canopy-height maps under the server's folder, named by id and nothing else.

A layer is either one COG written by ``canopy predict`` (``kind="cog"``) or a finished ``--aoi``
run folder (``kind="run"``: ``run.json`` + ``summary.json`` + ``cells/``), whose pixels live in
its cell COGs (one UTM zone each) and whose low zooms come from its ``overview.tif``. Both are
served the same way: a layer is a list of *parts* (COGs with a CRS and a footprint) plus an
optional overview, so tiles, points, statistics and exports never care which kind they read.

Invariant (the security of the server rests on it): every file the server opens is one that a
scan of ``layers_dir`` found, opened with the GeoTIFF driver only (:func:`open_dataset`). A
request carries a layer id, an id is looked up in a dictionary, and no part of a request ever
becomes a path, so ``..``, absolute paths, URLs and VRT XML (GDAL's file-disclosure route in
open-by-URL tile servers) have nothing to reach. Run folders' VRT/GTI mosaics are for QGIS; the
server reads the cells they point to directly and never opens a VRT.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import morecantile
import rasterio
import shapely
from rasterio.warp import transform_bounds
from shapely.geometry import box

from canopy.io import outputs
from canopy.predict.grid import Cell
from canopy.predict.manifest import MANIFEST_FILE, RUN_FILE
from data_catalog.raster import ThreadHandles
from services.errors import NotFound

WEB_MERCATOR = morecantile.tms.get("WebMercatorQuad")
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}"
_ID_RE = re.compile(ID_PATTERN)
_SLUG = re.compile(r"[^A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class Part:
    """One COG holding pixels of a layer."""

    path: Path
    crs: str
    bounds: tuple[float, float, float, float]  # in ``crs``
    footprint: object  # shapely polygon, lon/lat

    @property
    def epsg(self) -> int | None:
        return rasterio.crs.CRS.from_user_input(self.crs).to_epsg()


@dataclass
class Layer:
    id: str
    kind: str  # "cog" | "run"
    root: Path
    parts: list[Part]
    overview: Part | None
    res: float  # metres per pixel of the parts
    overview_res: float | None
    dtype: str
    nodata: float | int | None
    count: int
    descriptions: tuple[str, ...]
    tags: dict
    bounds_ll: tuple[float, float, float, float]
    minzoom: int
    maxzoom: int
    stamp: float  # modification time the layer was read at
    extra: dict = field(default_factory=dict)
    _tree: object = None

    def __post_init__(self):
        self._tree = shapely.STRtree([p.footprint for p in self.parts])

    def parts_touching(self, geom_ll) -> list[Part]:
        return [self.parts[i] for i in self._tree.query(geom_ll, predicate="intersects")]

    @property
    def has_spread(self) -> bool:
        return self.count >= 2 and outputs.STD_BAND in self.descriptions

    def info(self) -> dict:
        west, south, east, north = self.bounds_ll
        t = self.tags
        dates = t.get(outputs.IMAGERY_DATES, "unknown")
        return {
            "id": self.id, "kind": self.kind, "name": self.root.name,
            "bounds": [west, south, east, north],
            "center": [(west + east) / 2, (south + north) / 2, max(self.minzoom, self.maxzoom - 3)],
            "crs": sorted({p.crs for p in self.parts}),
            "resolution_m": self.res, "dtype": self.dtype,
            "nodata": None if self.nodata is None or (isinstance(self.nodata, float) and math.isnan(self.nodata)) else self.nodata,
            "bands": list(self.descriptions), "units": outputs.UNITS,
            "minzoom": self.minzoom, "maxzoom": self.maxzoom,
            "parts": len(self.parts),
            "model": {k: t.get(tag) for k, tag in (
                ("name", outputs.MODEL), ("version", outputs.MODEL_VERSION),
                ("source", outputs.MODEL_SOURCE), ("licence", outputs.MODEL_LICENCE),
                ("precision", outputs.PRECISION), ("gedi_correction", outputs.GEDI_CORRECTION))},
            "acquisition_dates": dates,
            "statistics": self.extra.get("statistics"),
            "stac": self.extra.get("stac"),
        }


# ------------------------------------------------------------------------------------ datasets

_DATASETS = ThreadHandles(max_open=64)


def open_dataset(path: Path):
    """A rasterio dataset of ``path`` for this thread (kept open; GeoTIFF driver only): opening
    costs about a millisecond per request (docs/performance.md)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"a file of this layer is gone ({Path(path).name}); it was removed or "
                       "is being replaced") from None
    # a file replaced in place (os.replace: a new inode) is a new dataset, not the old handle
    key = (str(path), st.st_ino, st.st_mtime_ns)

    def open_gtiff():
        try:
            return rasterio.open(str(path), driver="GTiff")
        except rasterio.errors.RasterioIOError:
            raise NotFound(f"a file of this layer cannot be read ({Path(path).name})") from None

    return _DATASETS.get(key, open_gtiff)


# ------------------------------------------------------------------------------------ scanning


def _is_canopy_raster(ds) -> bool:
    return ds.count >= 1 and (ds.descriptions[0] == outputs.HEIGHT_BAND
                              or outputs.MODEL in ds.tags())


def _part(path: Path) -> tuple[Part, object]:
    ds = rasterio.open(path, driver="GTiff")
    ll = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)
    return Part(path, ds.crs.to_string(), tuple(ds.bounds), box(*ll)), ds


def _zooms(ds) -> tuple[int, int]:
    from rio_tiler.io import Reader

    with Reader(None, dataset=ds, tms=WEB_MERCATOR) as r:
        return r.minzoom, r.maxzoom


def _res_m(ds) -> float:
    from data_catalog.raster import finest_pixel_m

    return float(finest_pixel_m(ds))


def _cog_layer(layer_id: str, path: Path) -> Layer | None:
    part, ds = _part(path)
    with ds:
        if not _is_canopy_raster(ds):
            return None
        minzoom, maxzoom = _zooms(ds)
        stats = _band_statistics(ds)
        return Layer(
            id=layer_id, kind="cog", root=path, parts=[part], overview=None, res=_res_m(ds),
            overview_res=None, dtype=ds.dtypes[0], nodata=ds.nodata, count=ds.count,
            descriptions=tuple(d or "" for d in ds.descriptions), tags=ds.tags(),
            bounds_ll=tuple(part.footprint.bounds), minzoom=minzoom, maxzoom=maxzoom,
            stamp=path.stat().st_mtime, extra={"statistics": stats})


def _band_statistics(ds) -> dict | None:
    t = ds.tags(1)
    keys = ("STATISTICS_MINIMUM", "STATISTICS_MAXIMUM", "STATISTICS_MEAN", "STATISTICS_STDDEV")
    if all(k in t for k in keys):
        return {k.split("_")[1].lower(): float(t[k]) for k in keys}
    return None


def _run_layer(layer_id: str, folder: Path) -> Layer | None:
    run = json.loads((folder / RUN_FILE).read_text())
    summary = json.loads((folder / "summary.json").read_text())
    cell_px, gsd = int(run["cell_px"]), float(run["gsd"])
    records = {}
    for line in (folder / MANIFEST_FILE).read_text().splitlines():
        rec = json.loads(line) if line.strip() else None
        if rec and rec.get("status") == "done":
            records[rec["id"]] = rec
    if not records:
        return None
    parts = []
    for cell_id, rec in sorted(records.items()):
        cell = Cell.from_id(cell_id, cell_px, gsd)
        ll = transform_bounds(cell.crs, "EPSG:4326", *cell.bounds, densify_pts=21)
        parts.append(Part(folder / rec["path"], cell.crs, cell.bounds, box(*ll)))
    overview, ov_ds = _part(folder / summary["overview"])
    with ov_ds:
        minzoom, _ = _zooms(ov_ds)
        overview_res = _res_m(ov_ds)
    with rasterio.open(parts[0].path, driver="GTiff") as ds:
        _, maxzoom = _zooms(ds)
        dtype, nodata, count = ds.dtypes[0], ds.nodata, ds.count
        descriptions, tags = tuple(d or "" for d in ds.descriptions), ds.tags()
    tags.pop(outputs.CELL, None)
    bounds = shapely.union_all([p.footprint for p in parts]).bounds
    stac = folder / "stac" / "collection.json"
    return Layer(
        id=layer_id, kind="run", root=folder, parts=parts, overview=overview, res=gsd,
        overview_res=overview_res, dtype=dtype, nodata=nodata, count=count,
        descriptions=descriptions, tags=tags, bounds_ll=tuple(bounds), minzoom=minzoom,
        maxzoom=maxzoom, stamp=(folder / "summary.json").stat().st_mtime,
        extra={"stac": json.loads(stac.read_text()) if stac.exists() else None,
               "zones": summary.get("zones"), "cells": len(parts)})


def _slug(rel: Path) -> str:
    text = _SLUG.sub("-", rel.with_suffix("").as_posix() if rel.suffix else rel.as_posix())
    text = text.replace("/", "-").strip("-.") or "layer"
    return text[:120]


class LayerRegistry:
    """The layers under ``root``, rescanned when asked for an unknown id or the list (at most
    once a second), so a finished job's run appears without a restart."""

    def __init__(self, root: str | Path, min_rescan_s: float = 1.0):
        self.root = Path(root).resolve()
        self.min_rescan_s = min_rescan_s
        self._layers: dict[str, Layer] = {}
        self._errors: dict[str, str] = {}
        self._scanned = 0.0
        self._lock = threading.Lock()

    def all(self) -> list[Layer]:
        self.rescan()
        return sorted(self._layers.values(), key=lambda l: l.id)

    def get(self, layer_id: str) -> Layer | None:
        if not _ID_RE.fullmatch(layer_id):
            return None
        self.rescan()  # at most once a second: a replaced file gets a new stamp (tile cache key)
        return self._layers.get(layer_id)

    def rescan(self, force: bool = False) -> None:
        with self._lock:
            if not force and time.monotonic() - self._scanned < self.min_rescan_s:
                return
            self._scanned = time.monotonic()
            old = {l.root: l for l in self._layers.values()}
            found: dict[str, Layer] = {}
            candidates = list(self._candidates())
            ids = self._ids(candidates, old)
            for rel, kind in candidates:
                path = self.root / rel
                layer_id = ids[rel]
                try:
                    stamp = (path / "summary.json" if kind == "run" else path).stat().st_mtime
                    prev = old.get(path)
                    if prev is not None and prev.stamp == stamp and prev.id == layer_id:
                        found[layer_id] = prev
                        continue
                    layer = _run_layer(layer_id, path) if kind == "run" else _cog_layer(layer_id, path)
                except (OSError, ValueError, KeyError, rasterio.errors.RasterioError) as exc:
                    self._errors[str(rel)] = f"{type(exc).__name__}: {exc}"
                    continue
                if layer is not None:
                    found[layer_id] = layer
            self._layers = found

    def _ids(self, candidates, old: dict) -> dict:
        """Layer ids that do not depend on scan order and never move: a layer keeps the id it
        had; a new one takes its slug, or, where the slug is taken or shared (``a b.tif`` and
        ``a-b.tif``), the slug plus a hash of its relative path."""
        ids: dict = {}
        taken: set = set()
        for rel, _ in candidates:
            prev = old.get(self.root / rel)
            if prev is not None:
                ids[rel] = prev.id
                taken.add(prev.id)
        slugs: dict = {}
        for rel, _ in candidates:
            if rel not in ids:
                slugs.setdefault(_slug(rel), []).append(rel)
        for slug, rels in slugs.items():
            for rel in rels:
                if len(rels) == 1 and slug not in taken:
                    ids[rel] = slug
                else:
                    ids[rel] = f"{slug[:110]}-{hashlib.sha1(rel.as_posix().encode()).hexdigest()[:8]}"
                taken.add(ids[rel])
        return ids

    def _candidates(self):
        """(relative path, kind) of every run folder and loose COG under the root; files inside
        a run folder (cells, overview) belong to its layer, hidden and partial files to nobody."""
        stack = [self.root]
        while stack:
            folder = stack.pop()
            try:
                entries = sorted(folder.iterdir())
            except OSError:
                continue
            if (folder / RUN_FILE).is_file() and (folder / "summary.json").is_file():
                yield folder.relative_to(self.root), "run"
                continue
            if (folder / RUN_FILE).is_file():  # a run still going: not a layer yet
                continue
            for entry in entries:
                if entry.name.startswith(".") or ".partial" in entry.name:
                    continue
                if entry.is_symlink():  # never leave the root through a link
                    continue
                if entry.is_dir():
                    stack.append(entry)
                elif entry.suffix.lower() in (".tif", ".tiff"):
                    yield entry.relative_to(self.root), "cog"
