"""Procedural synthetic scenes with exact ground truth: RGB, canopy height (CHM) and GEDI-like shots.

For pipeline tests, scale tests and demos. Nothing here is real data, and every file it writes
says so (a README.txt next to them and a ``CANOPY_SYNTHETIC`` tag in each raster).

How a scene is made:

1. :func:`plan_layout` draws the objects once, as vectors in scene metres (x east, y south from
   the top-left corner): roads (wandering polylines), fields (rotated rectangles with a crop
   height ≤ 1.5 m), buildings (rotated rectangles near roads, flat roofs) and trees (clustered
   stands where a low-frequency "forest potential" is high, scattered trees elsewhere).
2. :func:`make_scene` renders blocks of pixels with a halo, so any size renders in bounded
   memory and the result does not depend on the block size: every texture is a hash of world
   position, not a draw from a stateful generator.
3. Per block: land cover by rasterizing the vectors, crown surfaces (cone or ellipsoid profiles)
   stamped with a running maximum, the surface model (DSM = CHM + buildings), cast shadows by
   marching the DSM towards the sun, Lambertian shading of crowns, then mild sensor blur and noise.

CHM convention: canopy height is vegetation only. Buildings are 0 m in the CHM (they are in the
DSM and cast shadows), roads and bare ground are 0 m, crops carry their height (≤ 1.5 m).
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage

from canopy.errors import InputError, OptionError, OutputError, OutputExistsError
from canopy.progress import ProgressCallback, report
from data_catalog.gedi import FOOTPRINT_DIAMETER_M, footprint_percentiles

# Land-cover codes of the ``landcover`` layer.
GROUND, TREE, FIELD, ROAD, BUILDING = 0, 1, 2, 3, 4
LANDCOVER_NAMES = {GROUND: "ground", TREE: "tree", FIELD: "field", ROAD: "road", BUILDING: "building"}

DEFAULT_CRS = "EPSG:32617"
# Top-left corner (x_min, y_max) used when no origin is given: round numbers, clearly not a site.
DEFAULT_ORIGIN = (500000.0, 4000000.0)

# Colours are display reflectances in 0..1 (multiplied by 255 at the end).
_CONIFER_COLOURS = np.array([[0.10, 0.20, 0.12], [0.12, 0.22, 0.17], [0.14, 0.24, 0.13]])
_BROADLEAF_COLOURS = np.array([[0.22, 0.36, 0.14], [0.28, 0.40, 0.16], [0.34, 0.43, 0.19],
                               [0.40, 0.37, 0.17]])
_CROP_COLOURS = np.array([[0.36, 0.55, 0.21], [0.48, 0.58, 0.25], [0.70, 0.62, 0.32],
                          [0.46, 0.36, 0.26]])
_ROOF_COLOURS = np.array([[0.55, 0.26, 0.20], [0.52, 0.52, 0.52], [0.26, 0.26, 0.29],
                          [0.80, 0.79, 0.76], [0.45, 0.33, 0.25]])
_ROAD_COLOURS = np.array([[0.40, 0.40, 0.41], [0.60, 0.57, 0.51]])  # asphalt, gravel
_SOIL = np.array([0.50, 0.42, 0.32], np.float32)
_DRY_GRASS = np.array([0.55, 0.52, 0.34], np.float32)
_GREEN_GRASS = np.array([0.33, 0.43, 0.22], np.float32)
_SHADOW_TINT = np.array([0.90, 0.96, 1.12])  # shadows are lit by blue skylight only

_AMBIENT = 0.38        # share of light that is diffuse skylight (what remains in shadow)
_BLUR_SIGMA_PX = 0.5   # sensor point-spread function
_NOISE_SIGMA = 0.008   # sensor noise, in reflectance
_BLUR_HALO_PX = 3


# ---------------------------------------------------------------------------------------------
# Position hashing: every texture is a function of world position, so blocks agree at seams.


def _hash_u01(ix: np.ndarray, iy: np.ndarray, key: int) -> np.ndarray:
    """Uniform [0, 1) values from integer lattice coordinates (splitmix64 finaliser)."""
    ix = np.asarray(ix).astype(np.int64).astype(np.uint64)
    iy = np.asarray(iy).astype(np.int64).astype(np.uint64)
    z = (ix * np.uint64(0x9E3779B97F4A7C15)) ^ (iy * np.uint64(0xC2B2AE3D27D4EB4F))
    z = z ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)


def _key(seed: int, salt: int) -> int:
    return (seed * 0x632BE59BD9B4E019 + salt * 0x85EBCA77C2B2AE63 + 1) & 0xFFFFFFFFFFFFFFFF


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _value_noise_grid(x: np.ndarray, y: np.ndarray, cell: float, key: int) -> np.ndarray:
    """Smooth noise in [0, 1) on the grid of 1-D coordinates ``x`` (W,) × ``y`` (H,), in metres."""
    gx, gy = x / cell, y / cell
    ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    fx, fy = _smooth((gx - ix).astype(np.float32)), _smooth((gy - iy).astype(np.float32))
    lx = np.arange(ix.min(), ix.max() + 2)
    ly = np.arange(iy.min(), iy.max() + 2)
    lattice = _hash_u01(lx[None, :], ly[:, None], key)  # small: one value per cell corner
    cx, cy = ix - lx[0], iy - ly[0]
    # Bilinear interpolation is separable: along x on the lattice rows, then whole-row gathers.
    along_x = lattice[:, cx] * (1 - fx) + lattice[:, cx + 1] * fx
    out = along_x[cy]
    out *= (1 - fy)[:, None]
    out += along_x[cy + 1] * fy[:, None]
    return out


def _value_noise_points(x: np.ndarray, y: np.ndarray, cell: float, key: int) -> np.ndarray:
    """The same noise as :func:`_value_noise_grid`, at scattered points."""
    gx, gy = np.asarray(x) / cell, np.asarray(y) / cell
    ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    fx, fy = _smooth((gx - ix).astype(np.float32)), _smooth((gy - iy).astype(np.float32))
    v00, v10 = _hash_u01(ix, iy, key), _hash_u01(ix + 1, iy, key)
    v01, v11 = _hash_u01(ix, iy + 1, key), _hash_u01(ix + 1, iy + 1, key)
    return (v00 * (1 - fx) + v10 * fx) * (1 - fy) + (v01 * (1 - fx) + v11 * fx) * fy


def _fractal_grid(x, y, cells: Sequence[float], key: int) -> np.ndarray:
    """Octaves of value noise (cell sizes in metres, each half the weight of the last), in [0, 1)."""
    weights = [0.5 ** i for i in range(len(cells))]
    total = sum(weights)
    out = None
    for i, (w, c) in enumerate(zip(weights, cells)):
        octave = _value_noise_grid(x, y, c, key + i)
        octave *= np.float32(w / total)
        out = octave if out is None else np.add(out, octave, out=out)
    return out


def _fractal_points(x, y, cells: Sequence[float], key: int) -> np.ndarray:
    weights = [0.5 ** i for i in range(len(cells))]
    out = sum(w * _value_noise_points(x, y, c, key + i)
              for i, (w, c) in enumerate(zip(weights, cells)))
    return out / sum(weights)


# ---------------------------------------------------------------------------------------------
# The layout: vectors in scene metres (x east, y south, from the top-left corner).


@dataclass(frozen=True)
class Sun:
    """Sun position: elevation above the horizon and azimuth clockwise from north, in degrees."""

    elevation: float = 45.0
    azimuth: float = 135.0

    def __post_init__(self) -> None:
        if not 5.0 <= self.elevation <= 90.0:
            raise OptionError("sun_elevation", f"must be between 5 and 90 degrees, got "
                                               f"{self.elevation}")

    def toward(self) -> tuple[float, float]:
        """Unit horizontal vector pointing to the sun in scene axes (x east, y south)."""
        az = math.radians(self.azimuth)
        return math.sin(az), -math.cos(az)

    def shadow_length(self, height: float) -> float:
        """Length of the shadow a point at ``height`` m casts on flat ground (height / tan e)."""
        return height / math.tan(math.radians(self.elevation))


@dataclass
class Trees:
    """Trees as parallel arrays. Positions sit on pixel centres, so a crown's top pixel is exact."""

    x: np.ndarray
    y: np.ndarray
    height: np.ndarray
    crown_radius: np.ndarray
    crown_depth: np.ndarray
    conifer: np.ndarray      # True: cone-shaped crown; False: ellipsoid (broadleaf)
    colour: np.ndarray       # (N, 3)

    def __len__(self) -> int:
        return int(self.x.size)

    @classmethod
    def empty(cls) -> "Trees":
        z = np.zeros(0)
        return cls(z, z, z, z, z, np.zeros(0, bool), np.zeros((0, 3)))

    @classmethod
    def single(cls, x: float, y: float, height: float, crown_radius: float,
               crown_depth: float | None = None, conifer: bool = False,
               colour: Sequence[float] = (0.25, 0.38, 0.15)) -> "Trees":
        depth = 0.5 * height if crown_depth is None else crown_depth
        return cls(np.array([x], float), np.array([y], float), np.array([height], float),
                   np.array([crown_radius], float), np.array([depth], float),
                   np.array([conifer]), np.array([colour], float))

    def subset(self, keep: np.ndarray) -> "Trees":
        return Trees(self.x[keep], self.y[keep], self.height[keep], self.crown_radius[keep],
                     self.crown_depth[keep], self.conifer[keep], self.colour[keep])

    @staticmethod
    def concat(parts: Sequence["Trees"]) -> "Trees":
        return Trees(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                       ("x", "y", "height", "crown_radius", "crown_depth", "conifer", "colour")))


@dataclass(frozen=True)
class Field:
    polygon: object           # shapely Polygon
    crop_height: float        # m, ≤ 1.5
    colour: tuple[float, float, float]
    row_angle: float          # radians, direction of crop rows
    row_spacing: float        # m


@dataclass(frozen=True)
class Road:
    line: object              # shapely LineString
    width: float              # m
    colour: tuple[float, float, float]


@dataclass(frozen=True)
class Building:
    polygon: object           # shapely Polygon
    height: float             # m, flat roof
    colour: tuple[float, float, float]


@dataclass
class SceneLayout:
    """Everything in a scene, as vectors. ``make_scene`` renders it; tests may build one by hand."""

    width_m: float
    height_m: float
    trees: Trees = field(default_factory=Trees.empty)
    fields: list[Field] = field(default_factory=list)
    roads: list[Road] = field(default_factory=list)
    buildings: list[Building] = field(default_factory=list)

    def max_surface_height(self) -> float:
        heights = [0.0]
        if len(self.trees):
            heights.append(float(self.trees.height.max()))
        heights += [b.height for b in self.buildings]
        heights += [f.crop_height for f in self.fields]
        return max(heights)


@dataclass(frozen=True)
class LayoutConfig:
    """Knobs of the procedural layout (defaults give a mixed rural landscape)."""

    forest_share: float = 0.40           # share of the area inside forest stands
    stand_density: float = 0.75          # trees per 20 m² candidate inside stands
    scattered_density: float = 0.008     # same, outside stands
    field_share: float = 0.20
    roads_per_km: float = 1.5            # roads per km of scene side
    hamlets_per_km2: float = 1.5
    max_tree_height: float = 40.0


def _forest_potential(x, y, seed: int) -> np.ndarray:
    return _fractal_points(x, y, (320.0, 130.0, 55.0), _key(seed, 11))


def _rect(cx: float, cy: float, length: float, width: float, angle: float):
    """A rotated rectangle centred at (cx, cy), long side along ``angle`` (radians)."""
    from shapely import affinity
    from shapely.geometry import box

    r = box(-length / 2, -width / 2, length / 2, width / 2)
    return affinity.translate(affinity.rotate(r, angle, use_radians=True), cx, cy)


def _plan_roads(w: float, h: float, rng: np.random.Generator, cfg: LayoutConfig) -> list[Road]:
    from shapely.geometry import LineString, box

    scene = box(0, 0, w, h)
    n = max(1, int(round(cfg.roads_per_km * math.sqrt(w * h) / 1000.0)))
    roads = []
    for i in range(n):
        # Alternate roughly east-west and north-south roads entering from one side.
        horizontal = i % 2 == 0
        if horizontal:
            x, y, heading = -20.0, rng.uniform(0.1, 0.9) * h, rng.normal(0, 0.25)
        else:
            x, y, heading = rng.uniform(0.1, 0.9) * w, -20.0, math.pi / 2 + rng.normal(0, 0.25)
        pts = [(x, y)]
        while -50 <= x <= w + 50 and -50 <= y <= h + 50 and len(pts) < 10000:
            heading += rng.normal(0, 0.08)
            x += 40.0 * math.cos(heading)
            y += 40.0 * math.sin(heading)
            pts.append((x, y))
        line = LineString(pts)
        if not line.intersects(scene):
            continue
        gravel = rng.random() < 0.4
        roads.append(Road(line, float(rng.uniform(3.5, 5.0) if gravel else rng.uniform(5.0, 8.0)),
                          tuple(_ROAD_COLOURS[1 if gravel else 0])))
    return roads


def _plan_fields(w: float, h: float, rng: np.random.Generator, cfg: LayoutConfig, seed: int,
                 threshold: float, roads: list[Road]) -> list[Field]:
    from shapely import STRtree

    grid_angle = rng.uniform(0, math.pi)  # parcels share an orientation, as cadastres do
    target = cfg.field_share * w * h
    road_zone = [r.line.buffer(r.width / 2 + 2.0) for r in roads]
    fields: list[Field] = []
    polys = []
    area = 0.0
    for _ in range(400):
        if area >= target:
            break
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        if _forest_potential(np.array([cx]), np.array([cy]), seed)[0] > threshold - 0.03:
            continue
        size = min(w, h)
        length = rng.uniform(0.08, 0.25) * max(size, 400.0)
        width = rng.uniform(0.4, 1.0) * length
        angle = grid_angle + rng.normal(0, 0.05)
        poly = _rect(cx, cy, length, width, angle)
        if polys and len(STRtree(polys).query(poly.buffer(6.0), predicate="intersects")):
            continue
        for zone in road_zone:
            poly = poly.difference(zone)
        if poly.is_empty or poly.area < 0.3 * length * width:
            continue
        kind = int(rng.integers(len(_CROP_COLOURS)))
        crop_h = 0.05 if kind == 3 else float(rng.uniform(0.2, 1.5))  # kind 3: ploughed soil
        colour = tuple(np.clip(_CROP_COLOURS[kind] * rng.uniform(0.92, 1.08, 3), 0, 1))
        fields.append(Field(poly, crop_h, colour, angle + rng.choice([0.0, math.pi / 2]),
                            float(rng.uniform(0.7, 2.5))))
        polys.append(poly)
        area += poly.area
    return fields


def _plan_buildings(w: float, h: float, rng: np.random.Generator, cfg: LayoutConfig,
                    roads: list[Road], fields: list[Field]) -> list[Building]:
    from shapely import STRtree

    if not roads:
        return []
    obstacles = [r.line.buffer(r.width / 2 + 2.0) for r in roads] + [f.polygon for f in fields]
    obstacle_index = STRtree(obstacles) if obstacles else None
    n_hamlets = max(1, rng.poisson(cfg.hamlets_per_km2 * w * h / 1e6))
    buildings: list[Building] = []
    polys: list = []
    for _ in range(n_hamlets):
        road = roads[int(rng.integers(len(roads)))]
        s0 = rng.uniform(0, road.line.length)
        for _ in range(int(rng.integers(3, 10))):
            s = float(np.clip(s0 + rng.normal(0, 60), 0, road.line.length))
            p, q = road.line.interpolate(s), road.line.interpolate(min(s + 1.0, road.line.length))
            angle = math.atan2(q.y - p.y, q.x - p.x) if q.distance(p) > 0 else 0.0
            side = rng.choice([-1.0, 1.0])
            length, width = rng.uniform(10, 30), rng.uniform(8, 16)
            offset = road.width / 2 + 4.0 + width / 2 + rng.uniform(0, 15)
            cx = p.x - side * offset * math.sin(angle)
            cy = p.y + side * offset * math.cos(angle)
            if not (10 < cx < w - 10 and 10 < cy < h - 10):
                continue
            poly = _rect(cx, cy, length, width, angle + rng.normal(0, 0.03))
            if obstacle_index is not None and len(obstacle_index.query(poly, predicate="intersects")):
                continue
            if polys and len(STRtree(polys).query(poly.buffer(3.0), predicate="intersects")):
                continue
            height = float(rng.uniform(3.0, 9.0) if rng.random() < 0.85 else rng.uniform(9, 18))
            roof = _ROOF_COLOURS[int(rng.integers(len(_ROOF_COLOURS)))]
            buildings.append(Building(poly, height, tuple(roof)))
            polys.append(poly)
    return buildings


def _plan_trees(w: float, h: float, gsd: float, rng: np.random.Generator, cfg: LayoutConfig,
                seed: int, threshold: float, roads, fields, buildings) -> Trees:
    import shapely

    n = rng.poisson(w * h / 20.0)
    x = rng.uniform(0, w, n)
    y = rng.uniform(0, h, n)
    pot = _forest_potential(x, y, seed)
    in_stand = 1.0 / (1.0 + np.exp(-(pot - threshold) / 0.015))
    p_keep = cfg.scattered_density + (cfg.stand_density - cfg.scattered_density) * in_stand
    keep = rng.random(n) < p_keep
    x, y, in_stand = x[keep], y[keep], in_stand[keep]
    # Snap to pixel centres: the top of each crown is then a pixel whose CHM value is exact.
    x = (np.floor(x / gsd) + 0.5) * gsd
    y = (np.floor(y / gsd) + 0.5) * gsd
    n = x.size

    # Stands differ in mean height and in conifer share; scattered trees are smaller.
    stand_mean = 8.0 + 24.0 * _fractal_points(x, y, (400.0, 150.0), _key(seed, 12))
    conifer_share = np.clip(1.6 * _fractal_points(x, y, (500.0, 200.0), _key(seed, 13)) - 0.3, 0, 1)
    conifer = rng.random(n) < conifer_share
    height = np.where(in_stand > 0.5, rng.normal(stand_mean, 0.15 * stand_mean),
                      rng.uniform(4.0, 22.0, n))
    height = np.clip(height, 2.5, cfg.max_tree_height)
    jitter = rng.uniform(0.85, 1.15, n)
    radius = np.where(conifer, 0.8 + 0.09 * height, 1.2 + 0.17 * height) * jitter
    depth = height * np.where(conifer, rng.uniform(0.5, 0.75, n), rng.uniform(0.3, 0.5, n))
    palette_c = _CONIFER_COLOURS[rng.integers(len(_CONIFER_COLOURS), size=n)]
    palette_b = _BROADLEAF_COLOURS[rng.integers(len(_BROADLEAF_COLOURS), size=n)]
    colour = np.where(conifer[:, None], palette_c, palette_b) * rng.uniform(0.88, 1.12, (n, 3))
    trees = Trees(x, y, height, radius, depth, conifer, np.clip(colour, 0, 1))

    # No trees in fields, on roads (crowns may overhang) or touching buildings, so the CHM is
    # exactly 0 on every roof.
    pts = shapely.points(x, y)
    tree_index = shapely.STRtree(pts)
    bad = np.zeros(n, bool)
    for f in fields:
        bad[tree_index.query(f.polygon, predicate="intersects")] = True
    for r in roads:
        bad[tree_index.query(r.line, predicate="dwithin", distance=r.width / 2 + 1.0)] = True
    for b in buildings:
        idx = tree_index.query(b.polygon, predicate="dwithin", distance=float(radius.max()) + 1.5)
        close = shapely.distance(pts[idx], b.polygon) < radius[idx] + 1.0
        bad[idx[close]] = True
    return trees.subset(~bad)


def plan_layout(width_m: float, height_m: float, gsd: float, seed: int,
                config: LayoutConfig = LayoutConfig()) -> SceneLayout:
    """Draw roads, fields, buildings and trees for a ``width_m`` × ``height_m`` scene."""
    rng = np.random.default_rng(seed)
    # The forest threshold is the quantile of the potential that gives the wanted forest share.
    sx = np.linspace(0, width_m, 64)
    sy = np.linspace(0, height_m, 64)
    gx, gy = np.meshgrid(sx, sy)
    threshold = float(np.quantile(_forest_potential(gx.ravel(), gy.ravel(), seed),
                                  1.0 - config.forest_share))
    roads = _plan_roads(width_m, height_m, rng, config)
    fields = _plan_fields(width_m, height_m, rng, config, seed, threshold, roads)
    buildings = _plan_buildings(width_m, height_m, rng, config, roads, fields)
    trees = _plan_trees(width_m, height_m, gsd, rng, config, seed, threshold, roads, fields,
                        buildings)
    return SceneLayout(width_m, height_m, trees, fields, roads, buildings)


# ---------------------------------------------------------------------------------------------
# Rendering


class Scene(NamedTuple):
    rgb: np.ndarray           # (3, H, W) uint8
    chm: np.ndarray           # (H, W) float32, exact canopy height (m)
    layers: dict              # optional 'dsm' (float32), 'landcover' (uint8), 'shadow' (bool)


@dataclass(frozen=True)
class _Window:
    """A padded block: pixel rows/cols [r0, r1) × [c0, c1) of the scene grid (may exceed it)."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.r1 - self.r0, self.c1 - self.c0


def _rasterize_index(geoms: list, win: _Window, gsd: float) -> np.ndarray:
    """1-based index of the geometry covering each pixel centre (0: none; later ones win)."""
    from affine import Affine
    from rasterio.features import rasterize
    from shapely.geometry import box

    out = np.zeros(win.shape, np.int32)
    if not geoms:
        return out
    bounds = box(win.c0 * gsd, win.r0 * gsd, win.c1 * gsd, win.r1 * gsd)
    shapes = [(g, i + 1) for i, g in enumerate(geoms) if g.intersects(bounds)]
    if shapes:
        transform = Affine(gsd, 0, win.c0 * gsd, 0, gsd, win.r0 * gsd)
        rasterize(shapes, out_shape=win.shape, transform=transform, out=out, dtype="int32")
    return out


def _stamp_trees(trees: Trees, win: _Window, gsd: float) -> tuple[np.ndarray, np.ndarray]:
    """Crown surface heights (running maximum over trees) and the index of the top tree."""
    top = np.zeros(win.shape, np.float32)
    owner = np.full(win.shape, -1, np.int32)
    if not len(trees):
        return top, owner
    col = np.rint(trees.x / gsd - 0.5).astype(np.int64)
    row = np.rint(trees.y / gsd - 0.5).astype(np.int64)
    rad_px = np.ceil(trees.crown_radius / gsd).astype(np.int64)
    hit = ((col + rad_px >= win.c0) & (col - rad_px < win.c1) &
           (row + rad_px >= win.r0) & (row - rad_px < win.r1))
    for i in np.flatnonzero(hit):
        ra, rb = max(row[i] - rad_px[i], win.r0), min(row[i] + rad_px[i] + 1, win.r1)
        ca, cb = max(col[i] - rad_px[i], win.c0), min(col[i] + rad_px[i] + 1, win.c1)
        dy = (np.arange(ra, rb) - row[i]) * gsd
        dx = (np.arange(ca, cb) - col[i]) * gsd
        t = (dx[None, :] ** 2 + dy[:, None] ** 2) / trees.crown_radius[i] ** 2  # (d / r)²
        inside = t < 1.0
        h, depth = trees.height[i], trees.crown_depth[i]
        if trees.conifer[i]:
            surface = h - depth * np.sqrt(t)                       # cone
        else:
            surface = h - depth + depth * np.sqrt(np.maximum(1.0 - t, 0.0))  # ellipsoid cap
        surface = np.where(inside, surface, 0.0).astype(np.float32)
        sub_top = top[ra - win.r0:rb - win.r0, ca - win.c0:cb - win.c0]
        sub_owner = owner[ra - win.r0:rb - win.r0, ca - win.c0:cb - win.c0]
        higher = surface > sub_top
        sub_top[higher] = surface[higher]
        sub_owner[higher] = i
    return top, owner


def _cast_shadows(dsm: np.ndarray, inner: tuple[slice, slice], max_shift: int, gsd: float,
                  sun: Sun) -> np.ndarray:
    """Boolean shadow mask over ``dsm[inner]``: a pixel is in shadow when the surface somewhere
    towards the sun rises above the ray from the pixel to the sun.

    March outwards one pixel at a time along the major axis of the sun direction; at horizontal
    distance d the ray has risen d·tan(e).
    """
    rs, cs = inner
    z = dsm[rs, cs]
    shadow = np.zeros(z.shape, bool)
    tan_e = math.tan(math.radians(sun.elevation))
    if sun.elevation >= 90.0 or max_shift <= 0:
        return shadow
    ux, uy = sun.toward()
    major = max(abs(ux), abs(uy))
    step_m = gsd / major                     # horizontal distance per step
    z_top = float(dsm.max())
    n_steps = min(max_shift, int(math.ceil((z_top - float(z.min())) / (tan_e * step_m))) + 1)
    eps = 1e-3
    for k in range(1, n_steps + 1):
        dc = int(round(k * ux / major))
        dr = int(round(k * uy / major))
        shifted = dsm[rs.start + dr:rs.stop + dr, cs.start + dc:cs.stop + dc]
        shadow |= shifted > z + (k * step_m * tan_e + eps)
    return shadow


def _crown_illumination(dsm: np.ndarray, gsd: float, sun: Sun) -> np.ndarray:
    """Direct-light factor n·L / sin(e) of the surface (1.0 on flat ground)."""
    dz_dy, dz_dx = np.gradient(dsm, gsd)  # axis 0 is y (south), axis 1 is x (east)
    e = math.radians(sun.elevation)
    ux, uy = sun.toward()
    lx, ly, lz = math.cos(e) * ux, math.cos(e) * uy, math.sin(e)
    norm = np.sqrt(dz_dx ** 2 + dz_dy ** 2 + 1.0)
    n_dot_l = (-dz_dx * lx - dz_dy * ly + lz) / norm
    return np.clip(n_dot_l / math.sin(e), 0.0, 1.6).astype(np.float32)


def _ground_colour(x: np.ndarray, y: np.ndarray, fine: np.ndarray, seed: int) -> np.ndarray:
    """Soil, dry and green grass mixed at several scales; darker litter inside forest stands."""
    f32 = np.float32
    a = np.clip((_fractal_grid(x, y, (60.0, 20.0, 6.0), _key(seed, 21)) - f32(0.3)) * f32(2.5), 0, 1)
    b = np.clip((_fractal_grid(x, y, (35.0, 9.0, 2.0), _key(seed, 22)) - f32(0.35)) * f32(2.5), 0, 1)
    forest = np.clip((_fractal_grid(x, y, (320.0, 130.0, 55.0), _key(seed, 11)) - f32(0.45)) * 4, 0, 1)
    shade = (1 - f32(0.35) * forest) * (f32(0.93) + f32(0.14) * fine)
    colour = np.empty((3,) + a.shape, np.float32)
    for ch in range(3):
        grass = _DRY_GRASS[ch] * (1 - b) + _GREEN_GRASS[ch] * b
        colour[ch] = (_SOIL[ch] * (1 - a) + grass * a) * shade
    return colour


def _paint_fields(layout: SceneLayout, win: _Window, gsd: float, seed: int, x: np.ndarray,
                  y: np.ndarray, colour: np.ndarray, chm: np.ndarray, landcover: np.ndarray) -> None:
    """Crop height (≤ 1.5 m) with row texture; colour striped along the rows."""
    fid = _rasterize_index([f.polygon for f in layout.fields], win, gsd)
    m = fid > 0
    if not m.any():
        return
    k = fid[m] - 1
    crop_h = np.array([f.crop_height for f in layout.fields], np.float32)[k]
    angle = np.array([f.row_angle for f in layout.fields])[k]
    spacing = np.array([f.row_spacing for f in layout.fields])[k]
    rr, cc = np.nonzero(m)
    u = x[cc] * np.cos(angle) + y[rr] * np.sin(angle)
    stripe = (0.5 + 0.5 * np.sin(2 * np.pi * u / spacing)).astype(np.float32)
    patch = _fractal_grid(x, y, (15.0, 4.0), _key(seed, 24))[m]
    chm[m] = np.clip(crop_h * (0.9 + 0.1 * stripe) * (0.9 + 0.2 * patch), 0, 1.5)
    fcol = np.array([f.colour for f in layout.fields], np.float32)[k].T
    colour[:, m] = fcol * ((0.88 + 0.2 * stripe) * (0.9 + 0.2 * patch))[None]
    landcover[m] = FIELD


def _paint_roads(layout: SceneLayout, win: _Window, gsd: float, fine: np.ndarray,
                 colour: np.ndarray, chm: np.ndarray, landcover: np.ndarray) -> None:
    """Roads are 0 m and drawn over fields."""
    rid = _rasterize_index([r.line.buffer(r.width / 2) for r in layout.roads], win, gsd)
    m = rid > 0
    if not m.any():
        return
    rcol = np.array([r.colour for r in layout.roads], np.float32)[rid[m] - 1].T
    colour[:, m] = rcol * (0.94 + 0.12 * fine[m])[None]
    chm[m] = 0.0
    landcover[m] = ROAD


def _paint_trees(layout: SceneLayout, win: _Window, gsd: float, seed: int, x: np.ndarray,
                 y: np.ndarray, fine: np.ndarray, colour: np.ndarray, chm: np.ndarray,
                 landcover: np.ndarray) -> None:
    """Crowns overwrite ground, fields and road edges wherever they are higher."""
    top, owner = _stamp_trees(layout.trees, win, gsd)
    crown = top > chm
    if not crown.any():
        return
    chm[crown] = top[crown]
    landcover[crown] = TREE
    clump = _fractal_grid(x, y, (1.6, 0.6), _key(seed, 25))[crown]
    tcol = layout.trees.colour.astype(np.float32)[owner[crown]].T
    colour[:, crown] = tcol * ((0.75 + 0.45 * clump) * (0.9 + 0.2 * fine[crown]))[None]


def _paint_buildings(layout: SceneLayout, win: _Window, gsd: float, fine: np.ndarray,
                     colour: np.ndarray, chm: np.ndarray, dsm: np.ndarray,
                     landcover: np.ndarray) -> None:
    """Buildings are in the surface model (they cast shadows) but 0 m in the canopy height model."""
    bid = _rasterize_index([b.polygon for b in layout.buildings], win, gsd)
    m = bid > 0
    if not m.any():
        return
    k = bid[m] - 1
    dsm[m] = np.array([b.height for b in layout.buildings], np.float32)[k]
    chm[m] = 0.0
    landcover[m] = BUILDING
    bcol = np.array([b.colour for b in layout.buildings], np.float32)[k].T
    colour[:, m] = bcol * (0.96 + 0.08 * fine[m])[None]


def _light_and_sensor(colour: np.ndarray, dsm: np.ndarray, landcover: np.ndarray,
                      inner: tuple[slice, slice], rows: np.ndarray, cols: np.ndarray, gsd: float,
                      seed: int, sun: Sun, max_shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Direct sun (shaded by crown slopes, removed in cast shadows) plus skylight, then slight
    blur and noise and 8-bit quantisation. Returns (rgb uint8, shadow) over ``inner``."""
    shadow = _cast_shadows(dsm, inner, max_shift, gsd, sun)
    direct = _crown_illumination(dsm[inner], gsd, sun)
    direct[landcover[inner] != TREE] = 1.0
    light = np.float32(_AMBIENT) + np.float32(1 - _AMBIENT) * direct * ~shadow
    img = colour[:, inner[0], inner[1]] * light[None]
    for ch in range(3):
        img[ch][shadow] *= np.float32(_SHADOW_TINT[ch])
    img = ndimage.gaussian_filter(img, sigma=(0, _BLUR_SIGMA_PX, _BLUR_SIGMA_PX), mode="nearest")
    noise = _hash_u01(cols[inner[1]][None, :], rows[inner[0]][:, None], _key(seed, 26)) - 0.5
    img += (noise * np.float32(_NOISE_SIGMA * math.sqrt(12)))[None]
    img *= 255.0
    np.rint(img, out=img)
    return np.clip(img, 0, 255).astype(np.uint8), shadow


def _render_window(layout: SceneLayout, win: _Window, gsd: float, seed: int, sun: Sun,
                   max_shift: int) -> dict[str, np.ndarray]:
    """Render a padded window; returns arrays over the window's inner part (halo removed)."""
    h, w = win.shape
    rows = np.arange(win.r0, win.r1)
    cols = np.arange(win.c0, win.c1)
    x = (cols + 0.5) * gsd
    y = (rows + 0.5) * gsd
    fine = _hash_u01(cols[None, :], rows[:, None], _key(seed, 23))  # per-pixel texture

    colour = _ground_colour(x, y, fine, seed)
    chm = np.zeros((h, w), np.float32)
    landcover = np.full((h, w), GROUND, np.uint8)
    _paint_fields(layout, win, gsd, seed, x, y, colour, chm, landcover)
    _paint_roads(layout, win, gsd, fine, colour, chm, landcover)
    _paint_trees(layout, win, gsd, seed, x, y, fine, colour, chm, landcover)
    dsm = chm.copy()
    _paint_buildings(layout, win, gsd, fine, colour, chm, dsm, landcover)
    del fine

    inner = (slice(max_shift, h - max_shift), slice(max_shift, w - max_shift))
    rgb, shadow = _light_and_sensor(colour, dsm, landcover, inner, rows, cols, gsd, seed, sun,
                                    max_shift)
    b = _BLUR_HALO_PX
    halo = max_shift + b
    core = (slice(halo, h - halo), slice(halo, w - halo))
    return {
        "rgb": rgb[:, b:-b, b:-b],
        "chm": chm[core],
        "dsm": dsm[core],
        "landcover": landcover[core],
        "shadow": shadow[b:-b, b:-b],
    }


def _max_shift_px(layout: SceneLayout, gsd: float, sun: Sun) -> int:
    """Halo (px) that holds the longest shadow any object of the layout can cast."""
    return int(math.ceil(sun.shadow_length(layout.max_surface_height()) / gsd)) + 1


def render_blocks(layout: SceneLayout, width: int, height: int, gsd: float, seed: int, sun: Sun,
                  block_size: int = 1024):
    """Yield ``(row, col, arrays)`` for each block of the scene, in row-major order."""
    max_shift = _max_shift_px(layout, gsd, sun)
    halo = max_shift + _BLUR_HALO_PX
    for r in range(0, height, block_size):
        for c in range(0, width, block_size):
            rb, cb = min(r + block_size, height), min(c + block_size, width)
            win = _Window(r - halo, rb + halo, c - halo, cb + halo)
            yield r, c, _render_window(layout, win, gsd, seed, sun, max_shift)


def make_scene(width: int, height: int, gsd: float = 0.6, seed: int = 0,
               sun_elevation: float = 45.0, sun_azimuth: float = 135.0, *,
               layout: SceneLayout | None = None, config: LayoutConfig = LayoutConfig(),
               layers: Sequence[str] = ("dsm", "landcover", "shadow"),
               block_size: int = 1024, progress: ProgressCallback | None = None) -> Scene:
    """Render a synthetic scene in memory: ``(rgb (3,H,W) uint8, chm (H,W) float32, layers)``.

    ``layout`` defaults to :func:`plan_layout` for the scene's size and ``seed``; pass one to
    place objects by hand. ``layers`` picks the extra arrays to return: ``dsm`` (surface height
    including buildings), ``landcover`` (codes in ``LANDCOVER_NAMES``) and ``shadow``.
    ``progress`` receives ``blocks`` counts as blocks are rendered.
    """
    if width < 1 or height < 1 or gsd <= 0:
        raise InputError(f"scene size must be positive, got {width}×{height} px at gsd {gsd}")
    unknown = set(layers) - {"dsm", "landcover", "shadow"}
    if unknown:
        raise ValueError(f"unknown layers {sorted(unknown)}")
    sun = Sun(sun_elevation, sun_azimuth)
    if layout is None:
        layout = plan_layout(width * gsd, height * gsd, gsd, seed, config)
    rgb = np.empty((3, height, width), np.uint8)
    chm = np.empty((height, width), np.float32)
    extra = {"dsm": np.float32, "landcover": np.uint8, "shadow": bool}
    out_layers = {name: np.empty((height, width), extra[name]) for name in layers}
    n_blocks = -(-height // block_size) * -(-width // block_size)
    report(progress, "blocks", 0, n_blocks)
    for i, (r, c, block) in enumerate(render_blocks(layout, width, height, gsd, seed, sun,
                                                    block_size)):
        report(progress, "blocks", i + 1, n_blocks)
        bh, bw = block["chm"].shape
        rgb[:, r:r + bh, c:c + bw] = block["rgb"]
        chm[r:r + bh, c:c + bw] = block["chm"]
        for name, arr in out_layers.items():
            arr[r:r + bh, c:c + bw] = block[name]
    return Scene(rgb, chm, out_layers)


# ---------------------------------------------------------------------------------------------
# GEDI-like shots


@dataclass(frozen=True)
class GediConfig:
    along_track_spacing_m: float = 60.0
    track_spacing_m: float = 600.0       # GEDI beams are ~600 m apart across track
    footprint_diameter_m: float = FOOTPRINT_DIAMETER_M
    rh_sigma_m: float = 1.5              # waveform-processing noise on RH metrics
    geolocation_sigma_m: float = 10.0    # radial RMS error of the reported position


def scene_transform(gsd: float):
    """Scene metres (x east, y south from the top-left corner) as a map: pixel (r, c) spans
    x in [c, c+1)·gsd and y in [r, r+1)·gsd."""
    from affine import Affine

    return Affine(gsd, 0, 0, 0, gsd, 0)


def gedi_like_shots(chm: np.ndarray, gsd: float, seed: int, config: GediConfig = GediConfig()) -> dict:
    """GEDI-like shots along parallel tracks over a scene (scene metres, not yet georeferenced).

    RH95/RH98 are percentiles of the exact CHM within the footprint at the true position, plus
    Gaussian noise; the reported position carries a Gaussian geolocation error. Only shots whose
    true footprint lies wholly inside the scene are kept. Returns parallel arrays.
    """
    rng = np.random.default_rng([seed, 7])
    h, w = chm.shape
    wm, hm = w * gsd, h * gsd
    diag = math.hypot(wm, hm)
    # Tracks run roughly north-south, tilted as the ISS ground track is at mid latitudes.
    theta = math.radians(rng.uniform(15, 40) * rng.choice([-1, 1]))
    along = np.array([math.sin(theta), -math.cos(theta)])
    across = np.array([math.cos(theta), math.sin(theta)])
    spacing = min(config.track_spacing_m, diag / 4)
    offsets = np.arange(-diag / 2, diag / 2 + 1e-9, spacing) + rng.uniform(0, spacing)
    offsets = offsets[np.abs(offsets) <= diag / 2]
    r = config.footprint_diameter_m / 2
    xs, ys, beams, idx = [], [], [], []
    for j, off in enumerate(offsets):
        s = np.arange(-diag / 2, diag / 2, config.along_track_spacing_m) + rng.uniform(0, 60)
        px = wm / 2 + off * across[0] + s * along[0]
        py = hm / 2 + off * across[1] + s * along[1]
        inside = (px >= r) & (px <= wm - r) & (py >= r) & (py <= hm - r)
        xs.append(px[inside])
        ys.append(py[inside])
        beams += [j] * int(inside.sum())
        idx.append(np.flatnonzero(inside))
    x = np.concatenate(xs) if xs else np.zeros(0)
    y = np.concatenate(ys) if ys else np.zeros(0)
    # whole footprints inside the scene (kept above), so every share rule gives the same value
    true = footprint_percentiles(chm, scene_transform(gsd), x, y, (95, 98, 100),
                                 diameter_m=config.footprint_diameter_m)
    n = x.size
    noise = rng.normal(0, config.rh_sigma_m, n)
    rh95 = true[:, 0] + noise
    # RH98 shares the waveform noise of RH95 (same waveform) and cannot be below it.
    rh98 = np.maximum(true[:, 1] + noise + rng.normal(0, 0.2 * config.rh_sigma_m, n), rh95)
    rh100 = np.maximum(true[:, 2] + noise, rh98)
    axis_sigma = config.geolocation_sigma_m / math.sqrt(2)
    return {
        "true_x": x, "true_y": y,
        "x": x + rng.normal(0, axis_sigma, n), "y": y + rng.normal(0, axis_sigma, n),
        "beam": np.array(beams, dtype=np.int64),
        "index_in_track": np.concatenate(idx) if idx else np.zeros(0, np.int64),
        "true_rh95": true[:, 0], "true_rh98": true[:, 1],
        "rh95": rh95, "rh98": rh98, "rh100": rh100,
        "sensitivity": rng.uniform(0.95, 0.99, n),
    }


# ---------------------------------------------------------------------------------------------
# Writing a scene folder


_README = """SYNTHETIC DATA - NOT REAL OBSERVATIONS
=======================================

Every file in this folder was generated procedurally by `canopy synth` (canopy-height {version}).
None of it is imagery, lidar or GEDI data of a real place, whatever the coordinates say.
Use it for pipeline tests, scale tests and demos only; never present it as real data.

Parameters: area {area_km2:g} km2, {width} x {height} px at {gsd:g} m, seed {seed},
sun elevation {sun_elevation:g} deg, sun azimuth {sun_azimuth:g} deg (clockwise from north),
CRS {crs}, top-left corner ({x0:.2f}, {y0:.2f}).

Files
- scene_rgb.tif   uint8 RGB COG (red, green, blue), with cast shadows from the sun angle above.
- scene_chm.tif   float32 COG, the exact canopy height (m) on the same grid. Vegetation only:
                  buildings and roads are 0 m, crops <= 1.5 m, tree crowns are cone or
                  ellipsoid surfaces whose top equals the tree's drawn height.
- gedi_shots.parquet  GeoParquet, EPSG:4326 points at the *reported* (mis-located) positions:
                  shot_number, beam, rh95, rh98, rh100 (m), quality_flag (=1), degrade_flag (=0),
                  sensitivity, lat/lon_lowestmode; truth columns true_x/true_y (scene CRS),
                  true_rh95/true_rh98 (noise-free percentiles at the true position).
                  RH = percentile of the exact CHM within a {footprint:g} m footprint
                  + N(0, {rh_sigma:g} m); position error N(0, {geo_sigma:g} m radial RMS).
"""


def _resolve_crs(crs: str):
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        out = CRS.from_user_input(crs)
    except (CRSError, ValueError):
        raise OptionError("crs", f"'{crs}' is not a coordinate reference system") from None
    if not out.is_projected:
        raise OptionError("crs", f"'{crs}' is geographic; synthetic scenes need a projected CRS "
                                 "in metres")
    return out


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output '{out_dir}' exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder '{out_dir}' is not empty")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder '{out_dir}': {exc.strerror}") from None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_shots(path: Path, shots: dict, transform_xy, crs, seed: int) -> int:
    """Georeference shots (scene metres → CRS → EPSG:4326) and write them as GeoParquet."""
    import geopandas as gpd
    from pyproj import Transformer

    X, Y = transform_xy(shots["x"], shots["y"])
    TX, TY = transform_xy(shots["true_x"], shots["true_y"])
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(X, Y)
    n = len(X)
    beam_names = np.array([f"BEAM{int(b):04b}" for b in shots["beam"] % 16]) if n else np.array([], str)
    base = 10_000_000_000_000 + (seed % 1000) * 10_000_000_000
    gdf = gpd.GeoDataFrame(
        {
            "shot_number": (base + shots["beam"] * 1_000_000 + shots["index_in_track"]).astype(np.int64),
            "beam": beam_names,
            "rh95": shots["rh95"].astype(np.float32),
            "rh98": shots["rh98"].astype(np.float32),
            "rh100": shots["rh100"].astype(np.float32),
            "quality_flag": np.ones(n, np.uint8),
            "degrade_flag": np.zeros(n, np.uint8),
            "sensitivity": shots["sensitivity"].astype(np.float32),
            "lat_lowestmode": lat, "lon_lowestmode": lon,
            "true_x": TX, "true_y": TY,
            "true_rh95": shots["true_rh95"].astype(np.float32),
            "true_rh98": shots["true_rh98"].astype(np.float32),
            "synthetic": np.ones(n, bool),
        },
        geometry=gpd.points_from_xy(lon, lat), crs="EPSG:4326",
    )
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        gdf.to_parquet(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


# What a scene costs per pixel: in memory the RGB and CHM arrays plus the COG writer's copy of
# the larger one and a block's temporaries; on disk the two COGs (RGB ~3, CHM ~4 bytes with
# overviews), both rounded up
SCENE_MEMORY_BYTES_PER_PIXEL = 12
SCENE_DISK_BYTES_PER_PIXEL = 7


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux), or None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_room(out: Path, side_px: int, area_km2: float) -> None:
    """Refuse a scene that cannot fit in memory or on the disk before rendering starts (a
    100,000 km² request ran for minutes towards ~830 GB before)."""
    from canopy.io.cog import check_free_space

    pixels = side_px * side_px
    memory = available_memory()
    if memory is not None and pixels * SCENE_MEMORY_BYTES_PER_PIXEL > memory:
        raise OptionError("area_km2", f"{area_km2:g} km² is {side_px:,}² px, which needs about "
                                      f"{pixels * SCENE_MEMORY_BYTES_PER_PIXEL / 1e9:.1f} GB of "
                                      f"memory; {memory / 1e9:.1f} GB are available")
    check_free_space(out, pixels * SCENE_DISK_BYTES_PER_PIXEL,
                     f"a synthetic scene of {area_km2:g} km² ({side_px:,}² px)")


def synth_scene(out_dir: str | os.PathLike, area_km2: float = 4.0, gsd: float = 0.6, seed: int = 0,
                sun_elevation: float = 45.0, sun_azimuth: float = 135.0, crs: str = DEFAULT_CRS,
                origin: tuple[float, float] | None = None, overwrite: bool = False,
                gedi: GediConfig = GediConfig(), config: LayoutConfig = LayoutConfig(),
                block_size: int = 1024, progress: ProgressCallback | None = None
                ) -> dict[str, Path]:
    """Write a square synthetic scene of ``area_km2`` at ``gsd`` m into ``out_dir``.

    Writes scene_rgb.tif, scene_chm.tif (COGs), gedi_shots.parquet and README.txt; returns their
    paths by name ('rgb', 'chm', 'gedi', 'readme'). ``origin`` is the top-left corner (x, y) in
    ``crs`` (default a round UTM position). Memory: the RGB and CHM arrays (7 bytes/px) plus one
    block's temporaries; the COG writer holds one more copy of the raster being written. A scene
    that would not fit in the memory or on the disk available is refused before any work.
    ``progress`` receives ``blocks`` counts while the scene is rendered.
    """
    from rasterio.transform import from_origin

    from canopy import __version__
    from canopy.io.cog import write_cog

    if not (area_km2 > 0):
        raise OptionError("area_km2", f"must be positive, got {area_km2}")
    if not (gsd > 0):
        raise OptionError("gsd", f"must be positive, got {gsd}")
    side_px = int(round(math.sqrt(area_km2 * 1e6) / gsd))
    if side_px < 32:
        raise OptionError("area_km2", f"{{area_km2}} {area_km2} at {{gsd}} {gsd} gives under 32 px "
                                      "per side")
    sun = Sun(sun_elevation, sun_azimuth)  # validates the angle before any work
    crs_obj = _resolve_crs(crs)
    x0, y0 = DEFAULT_ORIGIN if origin is None else (float(origin[0]), float(origin[1]))
    out = Path(out_dir)
    _check_room(out, side_px, area_km2)
    _check_out_dir(out, overwrite)

    scene = make_scene(side_px, side_px, gsd, seed, sun.elevation, sun.azimuth, config=config,
                       layers=(), block_size=block_size, progress=progress)
    shots = gedi_like_shots(scene.chm, gsd, seed, gedi)
    if shots["x"].size == 0:
        raise OptionError("area_km2", f"{area_km2} is too small to hold a GEDI footprint")
    transform = from_origin(x0, y0, gsd, gsd)
    tags = {
        "CANOPY_SYNTHETIC": "true", "CANOPY_SYNTH_SEED": str(seed),
        "CANOPY_SUN_ELEVATION": f"{sun.elevation:g}", "CANOPY_SUN_AZIMUTH": f"{sun.azimuth:g}",
        "CANOPY_VERSION": __version__,
    }
    # The README goes first: no synthetic raster should ever sit in a folder without it.
    paths = {"readme": out / "README.txt"}
    _atomic_write_text(paths["readme"], _README.format(
        version=__version__, area_km2=area_km2, width=side_px, height=side_px, gsd=gsd, seed=seed,
        sun_elevation=sun.elevation, sun_azimuth=sun.azimuth, crs=crs_obj.to_string(), x0=x0, y0=y0,
        footprint=gedi.footprint_diameter_m, rh_sigma=gedi.rh_sigma_m,
        geo_sigma=gedi.geolocation_sigma_m))
    paths["chm"] = write_cog(out / "scene_chm.tif", scene.chm, crs=crs_obj, transform=transform,
                             nodata=-9999.0, descriptions=("canopy_height",), units="m",
                             tags=tags, overwrite=overwrite)
    paths["rgb"] = write_cog(out / "scene_rgb.tif", scene.rgb, crs=crs_obj, transform=transform,
                             nodata=None, descriptions=("red", "green", "blue"), units="",
                             tags=tags, overwrite=overwrite, qml=False)
    del scene

    def scene_to_crs(sx: np.ndarray, sy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x0 + sx, y0 - sy

    paths["gedi"] = out / "gedi_shots.parquet"
    _write_shots(paths["gedi"], shots, scene_to_crs, crs_obj, seed)
    return paths
