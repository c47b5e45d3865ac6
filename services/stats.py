"""Zonal statistics and clipped exports of a layer inside polygons.

Statistics (per feature): mean, median and 95th percentile of height, canopy cover (share of the
area with data that is ≥ 2 m and ≥ 5 m), area by height class, the valid-pixel count and the area
without data. Each pixel counts by the exact share of its square inside the polygon, in the
pixel's own CRS (:func:`coverage`); areas are then scaled to the polygon's area in an equal-area
CRS (EPSG:6933, :func:`data_catalog.aoi.area_km2`), piece by piece, so a UTM layer's scale error
(up to ±0.1 % at a zone's edge) and a Web Mercator layer's (cos⁻² latitude) do not reach the
numbers. A run spanning UTM zones is split along the zone bands first (the rule its cells were
made with, :func:`canopy.predict.grid.zone_parts`): each piece is measured on its own zone's
cells, whose pixels outside their zone are no data, so no area counts twice.

Quantiles come from a histogram of 1 cm bins weighted by coverage (exact to 1 cm; uint8 layers
hold whole metres anyway); means and areas are exact sums.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import shapely
from rasterio.features import geometry_mask
from rasterio.windows import Window, from_bounds

from canopy.io import outputs
from canopy.io.cog import write_cog
from canopy.predict.grid import project_geometry, zone_parts
from data_catalog.aoi import area_km2, reproject_geometry
from services.config import Limits
from services.errors import BadRequest, TooLarge
from services.geojson import Feature
from services.layers import Layer, open_dataset

BIN = 0.01  # m, histogram resolution of the quantiles
LOW, HIGH = -50.0, 200.0  # m, histogram range; heights outside land in its end bins
CLASSES = ((0.0, 2.0), (2.0, 5.0), (5.0, 10.0), (10.0, 20.0), (20.0, 30.0), (30.0, math.inf))
COVER_AT = (2.0, 5.0)
EXPORT_PREFIX = "canopy-export-"  # temporary folder of one export, removed once it is sent
STALE_EXPORT_S = 3600.0  # an export folder older than this was left by a killed server


def _class_name(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}m" if math.isfinite(hi) else f">={lo:g}m"


@dataclass
class _Acc:
    hist: np.ndarray = field(default_factory=lambda: np.zeros(int((HIGH - LOW) / BIN) + 1))
    weight: float = 0.0  # Σ coverage of pixels with data
    wsum: float = 0.0  # Σ coverage × height
    pixels: int = 0  # pixels with data touching the polygon
    area_valid: float = 0.0  # m², equal-area
    classes: np.ndarray = field(default_factory=lambda: np.zeros(len(CLASSES)))

    def add(self, values: np.ndarray, cover: np.ndarray | None, px_area_eq: float) -> None:
        """Heights (float64, all with data) with their shares of area (None: whole pixels)."""
        if values.size == 0:
            return
        # bin i holds [LOW + i·BIN, LOW + (i+1)·BIN): thresholds at whole centimetres are bin
        # edges (the 1e-6 absorbs float error of values that are exactly on one)
        idx = np.clip(np.floor((values - LOW) / BIN + 1e-6), 0, len(self.hist) - 1).astype(np.int64)
        hist = np.bincount(idx, weights=cover, minlength=len(self.hist))
        self.hist += hist
        weight = float(values.size if cover is None else cover.sum())
        self.weight += weight
        self.wsum += float(values.sum() if cover is None else np.dot(values, cover))
        self.pixels += int(values.size)
        self.area_valid += weight * px_area_eq
        # classes from the histogram: their limits are whole bins (1 cm), negative heights
        # (model noise over bare ground) in the lowest class
        edges = [0] + [int(round((lo - LOW) / BIN)) for lo, _ in CLASSES[1:]] + [len(hist)]
        for i in range(len(CLASSES)):
            self.classes[i] += float(hist[edges[i]:edges[i + 1]].sum()) * px_area_eq

    def merge(self, other: "_Acc") -> None:
        self.hist += other.hist
        self.classes += other.classes
        self.weight += other.weight
        self.wsum += other.wsum
        self.pixels += other.pixels
        self.area_valid += other.area_valid

    def quantile(self, q: float) -> float:
        """The weighted quantile to 1 cm (the lower edge of its bin)."""
        c = np.cumsum(self.hist)
        i = int(np.searchsorted(c, q * c[-1] - 1e-9 * c[-1]))
        return round(LOW + i * BIN, 2)

    def share_at_least(self, h: float) -> float:
        i = int(round((h - LOW) / BIN))
        return float(self.hist[i:].sum() / self.hist.sum())


def _pieces(layer: Layer, geom_ll):
    """(crs, geometry in crs, m² equal-area per m² of crs, parts) of a feature."""
    if layer.kind == "run":
        zones = {}
        for p in layer.parts:
            zones.setdefault(p.crs, p.epsg)
        for epsg, piece in zone_parts(geom_ll):
            crs = f"EPSG:{epsg}"
            if crs not in zones:
                continue
            native = project_geometry(piece, epsg)
            k = area_km2(piece) * 1e6 / native.area if native.area > 0 else 0.0
            parts = [p for p in layer.parts_touching(piece) if p.crs == crs]
            if parts:
                yield crs, native, k, parts
    else:
        part = layer.parts[0]
        dense = shapely.segmentize(geom_ll, 0.001)
        native = reproject_geometry(dense, "EPSG:4326", part.crs)
        k = area_km2(geom_ll) * 1e6 / native.area if native.area > 0 else 0.0
        yield part.crs, native, k, [part]


def _window(ds, bounds) -> Window | None:
    left, bottom, right, top = bounds
    b = ds.bounds
    left, bottom, right, top = max(left, b.left), max(bottom, b.bottom), min(right, b.right), min(top, b.top)
    if left >= right or bottom >= top:
        return None
    w = from_bounds(left, bottom, right, top, ds.transform)
    w = w.round_offsets(op="floor").round_lengths(op="ceil")
    c0, r0 = max(0, int(w.col_off)), max(0, int(w.row_off))
    c1 = min(ds.width, int(w.col_off + w.width) + 1)
    r1 = min(ds.height, int(w.row_off + w.height) + 1)
    if c1 <= c0 or r1 <= r0:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0)


def _heights(ds, window: Window, band: int = 1) -> np.ndarray:
    a = ds.read(band, window=window, masked=True)
    return np.where(np.ma.getmaskarray(a), np.nan, np.ma.getdata(a)).astype(np.float32)


def coverage(geom, transform, shape: tuple[int, int], block: int = 256):
    """(interior, rows, cols, shares): the pixels of a window wholly inside ``geom`` (a boolean
    array) and, for the pixels its boundary crosses, their indices and the exact share of each
    pixel's square inside ``geom``.

    Written here rather than taken from exactextract, which computes the same shares: handing
    every pixel's value and share to Python costs it about 3 s per 30 Mpx (its weighted
    quantiles far more), against a target of one second for a 10 km² polygon at 0.6 m. Only the
    boundary needs geometry: a pixel the boundary does not touch is wholly in or wholly out, and
    GDAL's rasterizer says which by its centre. Boundary pixels are intersected with the polygon
    clipped to their 256-px block, so the cost follows the boundary's length, not the product of
    its pixels and its vertices.
    """
    from rasterio.features import rasterize

    if geom.is_empty:
        return np.zeros(shape, bool), np.empty(0, int), np.empty(0, int), np.empty(0)
    inside = rasterize([geom], out_shape=shape, transform=transform, fill=0, default_value=1,
                       dtype="uint8", all_touched=False).astype(bool)
    edge = rasterize([geom.boundary], out_shape=shape, transform=transform, fill=0,
                     default_value=1, dtype="uint8", all_touched=True).astype(bool)
    interior = inside & ~edge
    rows, cols = np.nonzero(edge)
    shares = np.zeros(len(rows))
    if len(rows):
        x0, y0 = transform * (cols, rows)
        x1, y1 = transform * (cols + 1, rows + 1)
        boxes = shapely.box(np.minimum(x0, x1), np.minimum(y0, y1), np.maximum(x0, x1), np.maximum(y0, y1))
        areas = shapely.area(boxes)
        key = (rows // block) * (shape[1] // block + 1) + cols // block
        order = np.argsort(key, kind="stable")
        splits = np.flatnonzero(np.diff(key[order])) + 1
        for idx in np.split(order, splits):
            bx = shapely.total_bounds(boxes[idx])
            piece = shapely.clip_by_rect(geom, *bx)
            if piece.is_empty:
                continue
            shares[idx] = shapely.area(shapely.intersection(boxes[idx], piece)) / areas[idx]
    keep = shares > 0
    return interior, rows[keep], cols[keep], np.clip(shares[keep], 0.0, 1.0)


def _measure(acc: "_Acc", ds, window: Window, geom, px_area_eq: float) -> None:
    data = _heights(ds, window)
    transform = ds.window_transform(window)
    interior, rows, cols, shares = coverage(geom, transform, data.shape)
    values = data[interior]
    values = values[np.isfinite(values)]
    acc.add(values.astype(np.float64), None, px_area_eq)
    edge_values = data[rows, cols].astype(np.float64)
    ok = np.isfinite(edge_values)
    acc.add(edge_values[ok], shares[ok], px_area_eq)


def statistics(layer: Layer, features: list[Feature], limits: Limits) -> list[dict]:
    total = sum(f.area_km2 for f in features)
    if total > limits.max_statistics_km2:
        raise TooLarge(f"the polygons cover {total:,.1f} km²; at most "
                       f"{limits.max_statistics_km2:,.0f} km² per request", field="coordinates")
    layer_box = shapely.box(*layer.bounds_ll)
    if not any(f.geometry.intersects(layer_box) for f in features):
        raise BadRequest(f"the polygon does not overlap layer '{layer.id}' (bounds "
                         f"{[round(v, 6) for v in layer.bounds_ll]})", field="coordinates")
    return [_feature_stats(layer, f) for f in features]


_POOL: list = []


def _pool() -> ThreadPoolExecutor:
    """The threads that measure cells, one per core, for the life of the process: cells are
    measured in parallel (reading, rasterizing and the array work release the GIL), and always
    by the same threads, whose open datasets (:func:`services.layers.open_dataset`) keep GDAL's
    cached blocks; a new thread per request would decompress every block again."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                        thread_name_prefix="canopy-stats"))
    return _POOL[0]


MEASURE_BLOCK = 2048  # px: memory per thread stays ≈ 2048² × 14 bytes whatever the polygon


def _part_stats(part, geom, k) -> "_Acc":
    """One COG's share of a feature, measured block by block: only blocks the polygon touches
    are read (two parcels 45 km apart do not read the land between), each against the polygon
    clipped to it (exact still: a pixel lies wholly inside one block)."""
    acc = _Acc()
    ds = open_dataset(part.path)
    window = _window(ds, geom.bounds)
    if window is None:
        return acc
    px_area = abs(ds.transform.a * ds.transform.e - ds.transform.b * ds.transform.d)
    for r0 in range(int(window.row_off), int(window.row_off + window.height), MEASURE_BLOCK):
        for c0 in range(int(window.col_off), int(window.col_off + window.width), MEASURE_BLOCK):
            sub = Window(c0, r0, min(MEASURE_BLOCK, int(window.col_off + window.width) - c0),
                         min(MEASURE_BLOCK, int(window.row_off + window.height) - r0))
            left, bottom, right, top = rasterio.windows.bounds(sub, ds.transform)
            piece = shapely.clip_by_rect(geom, left, bottom, right, top)
            if piece.is_empty or piece.area == 0:
                continue
            _measure(acc, ds, sub, piece, px_area * k)
    return acc


def _feature_stats(layer: Layer, feature: Feature) -> dict:
    jobs = [(part, geom, k) for _, geom, k, parts in _pieces(layer, feature.geometry)
            for part in parts]
    results = list(_pool().map(lambda j: _part_stats(*j), jobs))
    acc = _Acc()
    for r in results:
        acc.merge(r)
    area = feature.area_km2 * 1e6
    out = {"properties": feature.properties, "repaired": feature.repaired,
           "area_m2": round(area, 3), "valid_pixels": acc.pixels,
           "valid_area_m2": round(acc.area_valid, 3),
           "nodata_area_m2": round(max(0.0, area - acc.area_valid), 3), "units": outputs.UNITS}
    if acc.weight <= 0:
        return {**out, "mean": None, "median": None, "p95": None, "cover_2m": None,
                "cover_5m": None, "area_by_class_m2": None}
    return {**out,
            "mean": round(acc.wsum / acc.weight, 4),
            "median": acc.quantile(0.5), "p95": acc.quantile(0.95),
            "cover_2m": round(acc.share_at_least(COVER_AT[0]), 6),
            "cover_5m": round(acc.share_at_least(COVER_AT[1]), 6),
            "area_by_class_m2": {_class_name(lo, hi): round(a, 3)
                                 for (lo, hi), a in zip(CLASSES, acc.classes)}}


# ---------------------------------------------------------------------------------- export

_KEEP_TAGS = tuple(t for t in outputs.PREDICTION_TAGS if not t.startswith("CANOPY_TILE_")
                   and t != outputs.CELL)


def export(layer: Layer, feature: Feature, limits: Limits, fmt: str) -> tuple[Path, str]:
    """The layer's pixels touching the polygon (others no data) as a COG in the layer's CRS (a
    run: the zone holding the polygon), in a temporary folder; returns (file, media type).
    ``fmt`` ``tif`` gives the COG, ``zip`` the COG with its QGIS style (.qml)."""
    pieces = list(_pieces(layer, feature.geometry))
    if not pieces:
        raise BadRequest(f"the polygon does not overlap layer '{layer.id}'", field="coordinates")
    if len(pieces) > 1:
        raise BadRequest("the polygon spans UTM zones "
                         f"{', '.join(c for c, *_ in pieces)} of this run; export one zone's part "
                         "at a time", field="coordinates")
    crs, geom, _, parts = pieces[0]
    first = open_dataset(parts[0].path)
    res_x, res_y = first.transform.a, -first.transform.e
    # the output grid: the parts' own pixel lattice (runs share one per zone), over the part of
    # the polygon's bounds that holds pixels
    have = shapely.union_all([shapely.box(*p.bounds) for p in parts])
    if not geom.intersects(have) or not shapely.box(*layer.bounds_ll).intersects(feature.geometry):
        raise BadRequest(f"the polygon does not overlap layer '{layer.id}'", field="coordinates")
    left, bottom, right, top = shapely.box(*geom.bounds).intersection(have).bounds
    x0 = first.transform.c + math.floor((left - first.transform.c) / res_x + 1e-9) * res_x
    y1 = first.transform.f - math.floor((first.transform.f - top) / res_y + 1e-9) * res_y
    width = max(1, math.ceil((right - x0) / res_x - 1e-9))
    height = max(1, math.ceil((y1 - bottom) / res_y - 1e-9))
    if width * height > limits.max_export_pixels:
        raise TooLarge(f"the export would be {width} × {height} px; at most "
                       f"{limits.max_export_pixels:,} px", field="coordinates")
    transform = rasterio.Affine(res_x, 0, x0, 0, -res_y, y1)
    count, dtype, nodata = first.count, first.dtypes[0], first.nodata
    fill = np.nan if nodata is None or (isinstance(nodata, float) and math.isnan(nodata)) else nodata
    data = np.full((count, height, width), fill, dtype=dtype)
    any_read = False
    for part in parts:
        ds = open_dataset(part.path)
        # integer offset of this part's grid in the output grid (same lattice)
        dc = round((ds.transform.c - x0) / res_x)
        dr = round((y1 - ds.transform.f) / res_y)
        r0, c0 = max(0, dr), max(0, dc)
        r1, c1 = min(height, dr + ds.height), min(width, dc + ds.width)
        if r1 <= r0 or c1 <= c0:
            continue
        block = ds.read(window=Window(c0 - dc, r0 - dr, c1 - c0, r1 - r0))
        dst = data[:, r0:r1, c0:c1]
        if len(parts) > 1:  # cells do not overlap, but keep whatever holds data
            empty = np.isnan(dst) if np.isnan(fill) else dst == fill
            dst[empty] = block[empty]
        else:
            dst[...] = block
        any_read = True
    if not any_read:
        raise BadRequest(f"the polygon does not overlap layer '{layer.id}'", field="coordinates")
    outside = geometry_mask([geom], out_shape=(height, width), transform=transform,
                            all_touched=True)
    data[:, outside] = fill
    tags = {k: v for k, v in first.tags().items() if k in _KEEP_TAGS}
    folder = Path(tempfile.mkdtemp(prefix=EXPORT_PREFIX))
    name = f"{layer.id}_export"
    try:
        tif = write_cog(folder / f"{name}.tif", data, crs=crs, transform=transform, nodata=nodata,
                        descriptions=[d or outputs.HEIGHT_BAND for d in first.descriptions],
                        units=outputs.UNITS, tags=tags, qml=True)
        if fmt == "tif":
            return tif, "image/tiff"
        zpath = folder / f"{name}.zip"
        with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as z:
            z.write(tif, tif.name)
            qml = tif.with_suffix(".qml")
            if qml.exists():
                z.write(qml, qml.name)
        return zpath, "application/zip"
    except BaseException:  # nothing half-written stays behind (the response removes the rest)
        shutil.rmtree(folder, ignore_errors=True)
        raise


def remove_export(path: Path) -> None:
    """After the response: the export's folder (unless a sweep removed it meanwhile)."""
    shutil.rmtree(path.parent, ignore_errors=True)


def sweep_stale_exports(max_age_s: float = STALE_EXPORT_S) -> int:
    """Remove export folders older than ``max_age_s`` that a server killed between writing an
    export and sending it left in the temporary folder; returns how many. An export is written
    and sent in seconds, so no live request (of this or another worker) owns one that old."""
    now, removed = time.time(), 0
    for folder in Path(tempfile.gettempdir()).glob(EXPORT_PREFIX + "*"):
        try:
            if folder.is_dir() and now - folder.stat().st_mtime > max_age_s:
                shutil.rmtree(folder)
                removed += 1
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed
