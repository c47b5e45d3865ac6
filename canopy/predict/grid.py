"""The output grid: per-UTM-zone square cells on a lattice anchored at each zone's origin.

Scheme (documented in the README):

* Each cell lives in the WGS 84 / UTM zone (EPSG:326zz north, 327zz south) whose 6° band holds it;
  an AOI spanning several zones (California: 10 and 11; São Paulo: 22 and 23) gets cells in each.
  UTM keeps scale error under 0.1 % inside a zone; Web Mercator would need ≈1.66× the pixels at
  39° N for the same ground resolution (docs/geo_conventions.md).
* Pixels are ``gsd`` metres, on a lattice anchored at easting 0 / northing 0 of the zone, so every
  run at the same GSD shares one pixel lattice. Cells are ``cell_px`` pixels square; cell
  ``(ix, iy)`` covers easting ``[ix·W, (ix+1)·W)`` and northing ``[iy·W, (iy+1)·W)`` with
  ``W = cell_px · gsd``. Its id is ``{epsg}_E{ix}_N{iy}``: the same AOI always yields the same
  cells, and neighbouring AOIs share them.
* Model tiles sit on their own lattice in the same global pixel grid (starts at multiples of the
  stride from the zone origin), so a pixel's value cannot depend on where cell borders fall.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from shapely.geometry import box

from data_catalog.raster import utm_zone, utm_zone_band, utm_zone_epsg

_CELL_ID = re.compile(r"(\d+)_E(-?\d+)_N(-?\d+)")


@dataclass(frozen=True)
class Cell:
    epsg: int
    ix: int
    iy: int
    cell_px: int
    gsd: float

    @property
    def id(self) -> str:
        return f"{self.epsg}_E{self.ix:04d}_N{self.iy:04d}"

    @classmethod
    def from_id(cls, cell_id: str, cell_px: int, gsd: float) -> "Cell":
        """The cell named ``cell_id`` (:attr:`id`) of a run with ``cell_px`` and ``gsd``."""
        m = _CELL_ID.fullmatch(cell_id)
        if m is None:
            raise ValueError(f"not a cell id: {cell_id!r}")
        return cls(int(m[1]), int(m[2]), int(m[3]), cell_px, gsd)

    @property
    def size_m(self) -> float:
        return self.cell_px * self.gsd

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        w = self.size_m
        return (self.ix * w, self.iy * w, (self.ix + 1) * w, (self.iy + 1) * w)

    @property
    def transform(self) -> Affine:
        left, _, _, top = self.bounds
        return Affine(self.gsd, 0, left, 0, -self.gsd, top)

    @property
    def pixel_origin(self) -> tuple[int, int]:
        """(row, col) of the cell's upper-left pixel in the zone's global pixel grid
        (row 0 at northing 0, increasing southward; col 0 at easting 0)."""
        return (-(self.iy + 1) * self.cell_px, self.ix * self.cell_px)

    @property
    def crs(self) -> str:
        return f"EPSG:{self.epsg}"


def zone_parts(aoi_4326) -> list[tuple[int, object]]:
    """Split an AOI (lon/lat) into (epsg, part) pieces along UTM zone bands and the equator
    (the zone rule of :func:`data_catalog.raster.utm_zone`)."""
    minx, miny, maxx, maxy = aoi_4326.bounds
    parts = []
    z0 = utm_zone(minx)
    z1 = 60 if maxx >= 180 else utm_zone(maxx)  # an AOI reaching the antimeridian ends in zone 60
    for zone in range(z0, z1 + 1):
        west, east = utm_zone_band(zone)
        for south, (lat0, lat1) in ((False, (0, 90)), (True, (-90, 0))):
            piece = aoi_4326.intersection(box(west, lat0, east, lat1))
            if not piece.is_empty and piece.area > 0:
                parts.append((utm_zone_epsg(zone, south), piece))
    return parts


@lru_cache(maxsize=64)
def _to_zone(epsg: int) -> Transformer:
    return Transformer.from_crs(CRS.from_epsg(4326), CRS.from_epsg(epsg), always_xy=True)


def project_geometry(geom_4326, epsg: int):
    t = _to_zone(epsg)
    # densify first: long straight lon/lat edges are curves in UTM
    return shapely.transform(shapely.segmentize(geom_4326, 0.01),
                             lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))


def cells_for_aoi(aoi_4326, gsd: float, cell_px: int) -> list[tuple[Cell, object]]:
    """Every cell whose square intersects the AOI, with the AOI part in that cell's CRS."""
    out = []
    size = cell_px * gsd
    for epsg, part in zone_parts(aoi_4326):
        geom = project_geometry(part, epsg)
        minx, miny, maxx, maxy = geom.bounds
        ixs = np.arange(math.floor(minx / size), math.floor(maxx / size) + 1)
        iys = np.arange(math.floor(miny / size), math.floor(maxy / size) + 1)
        gx, gy = np.meshgrid(ixs, iys)
        boxes = shapely.box(gx.ravel() * size, gy.ravel() * size,
                            (gx.ravel() + 1) * size, (gy.ravel() + 1) * size)
        shapely.prepare(geom)
        hit = shapely.intersects(geom, boxes)
        for ix, iy in zip(gx.ravel()[hit], gy.ravel()[hit]):
            out.append((Cell(epsg, int(ix), int(iy), cell_px, gsd), geom))
    out.sort(key=lambda cg: (cg[0].epsg, -cg[0].iy, cg[0].ix))
    return out


def tile_window(cell: Cell, tile: int, stride: int) -> tuple[int, int, int, int]:
    """The pixel window (row0, col0, rows, cols), relative to the cell's upper-left pixel, that
    holds every model tile of the global lattice overlapping the cell, and nothing more."""
    r0, c0 = cell.pixel_origin

    def span(start: int) -> tuple[int, int]:
        first = (math.floor((start - tile) / stride) + 1) * stride
        last = math.floor((start + cell.cell_px - 1) / stride) * stride
        return first - start, last + tile - first

    (dr, nr), (dc, nc) = span(r0), span(c0)
    return dr, dc, nr, nc
