"""Training chips: co-registered imagery + canopy height (+ GEDI shots), split by spatial block.

For each (imagery, CHM) pair the sampler lays a lattice of square chips over the area where both
rasters (and the AOI, if any) overlap, in the imagery's CRS (the local UTM zone if the imagery is
in degrees or feet, as for a prediction). The lattice is global — chip corners sit on multiples
of ``stride × gsd`` from the CRS origin — so chips from neighbouring files line up and chip ids
are stable between runs.

What a chip holds:

* ``image``: 3×H×W uint8, the imagery on the chip grid, read by
  :class:`data_catalog.raster.LatticeReader` — the reader, resampling rule and lattice blocks a
  state-scale prediction uses, so a chip holds exactly the pixels the model will see there at
  inference. ``valid`` is False (and the pixel 0) where the imagery has no data (nodata, alpha,
  outside the file, outside the AOI).
* ``chm``: float32 metres, NaN where there is no label. ``chm_mode='model_grid'`` resamples it
  onto the image grid (same transform and shape, same resampling rule,
  :func:`data_catalog.raster.resampling_for`); ``chm_mode='native'``
  keeps the CHM's own resolution over exactly the chip's footprint (``chm_transform``), with
  nearest-neighbour sampling so lidar values are not smoothed. CHMs in another CRS than the
  imagery are reprojected.
* ``gedi``: the GEDI shots inside the chip (a GeoDataFrame in EPSG:4326 with ``px_col``/``px_row``,
  continuous pixel coordinates in the image: pixel (r, c) covers [c, c+1) × [r, r+1)), or None
  when the sampler was given no GEDI.

Splits by spatial block. A chip belongs to the block (``block_size_m`` lattice cell, in the chip's
CRS) that holds its centre; the block's id is hashed with the seed to pick train/val/test with
the given fractions. All chips of a block share a split, and with ``drop_cross_split=True``
(default) a chip whose footprint reaches into a block of another split is dropped, so no pixel is
ever seen by two splits. Blocks are per CRS: chips in two UTM zones near the zone boundary are in
different blocks even if they are close on the ground.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator, Sequence

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.features import geometry_mask
from rasterio.warp import reproject
from shapely.geometry.base import BaseGeometry

from data_catalog.aoi import AOI, reproject_geometry, resolve_aoi
from data_catalog.chm import read_chm
from data_catalog.errors import CatalogError
from data_catalog.raster import (
    LatticeReader, check_rgb_dtype, grids_coincide, is_metric, open_raster, pixel_size_m,
    resampling_for, resolve_crs, rgb_bands, utm_crs_for_bounds)

SPLITS = ("train", "val", "test")
CHM_MODES = ("model_grid", "native")


@dataclass(frozen=True)
class ChipPair:
    """One imagery file and the CHM that labels it. The CRS fields fill in files without one."""

    imagery: str
    chm: str
    imagery_crs: str | None = None
    chm_crs: str | None = None


@dataclass(frozen=True)
class ChipWindow:
    """Where one chip is, before any pixel is read."""

    chip_id: str
    pair: ChipPair
    crs: CRS
    transform: Affine
    size: int
    gsd: float
    block_id: str
    split: str

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        left, top = self.transform.c, self.transform.f
        extent = self.size * self.gsd
        return (left, top - extent, left + extent, top)


@dataclass
class Chip:
    """Co-registered training sample (see the module docstring for each field)."""

    chip_id: str
    image: np.ndarray  # (3, H, W) uint8
    valid: np.ndarray  # (H, W) bool: imagery has data here
    chm: np.ndarray  # float32 metres, NaN = no label
    crs: CRS
    transform: Affine  # of image/valid (and of chm in 'model_grid' mode)
    gsd: float
    chm_transform: Affine
    chm_mode: str
    gedi: gpd.GeoDataFrame | None
    split: str
    block_id: str
    imagery_path: str
    chm_path: str

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        h, w = self.image.shape[1:]
        left, top = self.transform.c, self.transform.f
        return (left, top + h * self.transform.e, left + w * self.transform.a, top)


# ------------------------------------------------------------------------------ splits & blocks


def split_of_block(block_id: str, fractions: Sequence[float], seed: int) -> str:
    """Deterministic split for a block: a seeded hash mapped onto the cumulative fractions."""
    digest = hashlib.blake2b(f"{seed}|{block_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    edges = np.cumsum(fractions) / float(sum(fractions))
    return SPLITS[min(int(np.searchsorted(edges, u, side="right")), len(SPLITS) - 1)]


def _crs_tag(crs: CRS) -> str:
    epsg = crs.to_epsg()
    if epsg:
        return f"EPSG{epsg}"
    return "WKT" + hashlib.blake2b(crs.to_wkt().encode(), digest_size=4).hexdigest()


def _block_key(crs_tag: str, bx: int, by: int) -> str:
    return f"{crs_tag}/{bx}/{by}"


# ------------------------------------------------------------------------------- raster helpers


def _rgb_band_indexes(ds: rasterio.DatasetReader, path: str, bands=None) -> tuple[int, ...]:
    bands = rgb_bands(ds, path, bands)
    check_rgb_dtype(ds, bands, path)
    return bands


def _footprint(bounds, src_crs: CRS, dst_crs: CRS) -> BaseGeometry:
    # Densify the edges: a straight edge in one CRS is curved in another.
    box = shapely.segmentize(shapely.box(*bounds), max((bounds[2] - bounds[0]), (bounds[3] - bounds[1])) / 16)
    return reproject_geometry(box, src_crs, dst_crs)


@dataclass(frozen=True)
class _PairGrid:
    """What planning learned about one pair."""

    pair: ChipPair
    crs: CRS
    overlap: BaseGeometry  # in ``crs``
    imagery_crs: CRS
    chm_crs: CRS
    chm_res: float  # mean CHM pixel side in its CRS units (read margins)
    chm_res_m: tuple[float, float]  # CHM pixel (width, height) in metres
    aoi: BaseGeometry | None  # the AOI in ``crs``, to mask chips that reach outside it


# -------------------------------------------------------------------------------------- sampler


@dataclass
class ChipSampler:
    """Yield :class:`Chip` objects for pairs of (imagery, CHM) files or a catalog.

    ``source`` is a list of :class:`ChipPair` / ``(imagery, chm)`` / ``(imagery, chm, chm_crs)``
    tuples, or a ``data_catalog.catalog.Catalog`` (imagery and CHM rows whose footprints
    intersect — and intersect the AOI — are paired; the rows' ``crs`` fills in files without one).
    ``aoi`` is anything :func:`data_catalog.aoi.resolve_aoi` accepts. ``stride`` (pixels) defaults
    to ``chip_size``. ``gedi`` is a GeoDataFrame of shots (EPSG:4326), an ``ingest_gedi`` folder or
    a list of its partition files. ``min_coverage`` is the fraction of a chip that must lie in the
    imagery ∩ CHM ∩ AOI overlap.
    """

    source: object
    aoi: object = None
    chip_size: int = 256
    gsd: float = 0.6
    stride: int | None = None
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    block_size_m: float = 1000.0
    seed: int = 0
    chm_mode: str = "model_grid"
    gedi: object = None
    min_coverage: float = 0.5
    drop_cross_split: bool = True
    bands: tuple[int, ...] | None = None  # imagery bands read (R,G,B or R,G,B,NIR); None: RGB
    _dropped_cross_split: int = field(default=0, init=False, repr=False)
    _pairs_without_overlap: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.chip_size <= 0:
            raise CatalogError(f"chip_size={self.chip_size}: must be a positive number of pixels")
        if not self.gsd or self.gsd <= 0:
            raise CatalogError(f"gsd={self.gsd}: must be a positive number of metres")
        self.stride = int(self.stride or self.chip_size)
        if self.stride <= 0:
            raise CatalogError(f"stride={self.stride}: must be a positive number of pixels")
        if len(self.split_fractions) != 3 or min(self.split_fractions) < 0 or sum(self.split_fractions) <= 0:
            raise CatalogError(f"split_fractions={self.split_fractions}: need three non-negative numbers (train, val, test)")
        if self.block_size_m <= 0:
            raise CatalogError(f"block_size_m={self.block_size_m}: must be positive")
        if self.chm_mode not in CHM_MODES:
            raise CatalogError(f"chm_mode={self.chm_mode!r}: must be one of {', '.join(CHM_MODES)}")
        if not 0 < self.min_coverage <= 1:
            raise CatalogError(f"min_coverage={self.min_coverage}: must be in (0, 1]")
        if self.aoi is not None and not isinstance(self.aoi, AOI):
            self.aoi = resolve_aoi(self.aoi)

    # --- planning ----------------------------------------------------------------------------

    @cached_property
    def pairs(self) -> list[ChipPair]:
        if hasattr(self.source, "query"):
            return pairs_from_catalog(self.source, self.aoi)
        pairs = []
        for item in self.source:  # type: ignore[union-attr]
            if isinstance(item, ChipPair):
                pairs.append(item)
            elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
                pairs.append(ChipPair(str(item[0]), str(item[1]), chm_crs=item[2] if len(item) == 3 else None))
            else:
                raise CatalogError(f"chip source item {item!r}: expected ChipPair or (imagery, chm[, chm_crs])")
        return pairs

    def _pair_grid(self, pair: ChipPair) -> _PairGrid | None:
        with open_raster(pair.imagery) as img:
            _rgb_band_indexes(img, pair.imagery)
            img_crs = resolve_crs(pair.imagery, img.crs, pair.imagery_crs, option="imagery_crs=")
            img_bounds = img.bounds
        with open_raster(pair.chm) as chm:
            chm_crs = resolve_crs(pair.chm, chm.crs, pair.chm_crs, option="chm_crs=")
            chm_bounds, chm_res = chm.bounds, float(abs(chm.res[0]) + abs(chm.res[1])) / 2
            chm_res_m = pixel_size_m(chm.transform, chm_crs, chm.width, chm.height) or (chm_res, chm_res)
        # Chips are cut in metres, as predictions are made: imagery in degrees or feet is mapped
        # in the UTM zone of its centre.
        grid_crs = img_crs if is_metric(img_crs) else utm_crs_for_bounds(img_bounds, img_crs)
        overlap = _footprint(img_bounds, img_crs, grid_crs).intersection(_footprint(chm_bounds, chm_crs, grid_crs))
        aoi = self.aoi.geometry_in(grid_crs) if self.aoi is not None else None
        if aoi is not None:
            overlap = overlap.intersection(aoi)
        if overlap.is_empty or overlap.area == 0:
            return None
        return _PairGrid(pair, grid_crs, overlap, img_crs, chm_crs, chm_res, chm_res_m, aoi)

    def _windows_for(self, grid: _PairGrid) -> list[ChipWindow]:
        step = self.stride * self.gsd
        extent = self.chip_size * self.gsd
        minx, miny, maxx, maxy = grid.overlap.bounds
        i = np.arange(math.floor((minx - extent) / step), math.ceil(maxx / step) + 1)
        j = np.arange(math.floor(miny / step), math.ceil((maxy + extent) / step) + 1)
        ii, jj = (a.ravel() for a in np.meshgrid(i, j))
        lefts, tops = ii * step, jj * step
        boxes = shapely.box(lefts, tops - extent, lefts + extent, tops)
        coverage = shapely.area(shapely.intersection(boxes, grid.overlap)) / extent**2
        keep = coverage >= self.min_coverage - 1e-9
        tag = _crs_tag(grid.crs)
        pair_hash = hashlib.blake2b(f"{grid.pair.imagery}|{grid.pair.chm}".encode(), digest_size=3).hexdigest()
        windows = []
        for left, top, ci, cj in zip(lefts[keep], tops[keep], ii[keep], jj[keep]):
            cx, cy = left + extent / 2, top - extent / 2
            block = _block_key(tag, math.floor(cx / self.block_size_m), math.floor(cy / self.block_size_m))
            split = split_of_block(block, self.split_fractions, self.seed)
            if self.drop_cross_split and self._crosses_split(tag, left, top, extent, split):
                self._dropped_cross_split += 1
                continue
            windows.append(
                ChipWindow(
                    chip_id=f"{tag}_{self.gsd:g}m_{self.chip_size}px_{ci}_{cj}_{pair_hash}",
                    pair=grid.pair,
                    crs=grid.crs,
                    transform=Affine(self.gsd, 0.0, float(left), 0.0, -self.gsd, float(top)),
                    size=self.chip_size,
                    gsd=self.gsd,
                    block_id=block,
                    split=split,
                )
            )
        return windows

    def _crosses_split(self, tag: str, left: float, top: float, extent: float, split: str) -> bool:
        b = self.block_size_m
        eps = 1e-6 * extent
        for bx in range(math.floor(left / b), math.floor((left + extent - eps) / b) + 1):
            for by in range(math.floor((top - extent) / b), math.floor((top - eps) / b) + 1):
                if split_of_block(_block_key(tag, bx, by), self.split_fractions, self.seed) != split:
                    return True
        return False

    @cached_property
    def _plan(self) -> list[tuple[_PairGrid, list[ChipWindow]]]:
        plan = []
        for pair in self.pairs:
            grid = self._pair_grid(pair)
            if grid is None:
                self._pairs_without_overlap.append(pair)
                continue
            plan.append((grid, self._windows_for(grid)))
        return plan

    def windows(self, split: str | None = None) -> list[ChipWindow]:
        """Every chip's window (no pixels read), optionally of one split."""
        _check_split(split)
        return [w for _, ws in self._plan for w in ws if split is None or w.split == split]

    def summary(self) -> dict:
        """Counts per split (chips and blocks), pairs used and skipped, and the settings."""
        windows = self.windows()
        return {
            "n_pairs": len(self.pairs),
            "pairs_without_overlap": [p.imagery for p in self._pairs_without_overlap],
            "n_chips": len(windows),
            "chips_by_split": {s: sum(w.split == s for w in windows) for s in SPLITS},
            "blocks_by_split": {s: len({w.block_id for w in windows if w.split == s}) for s in SPLITS},
            "dropped_cross_split": self._dropped_cross_split,
            "chip_size": self.chip_size,
            "stride": self.stride,
            "gsd": self.gsd,
            "block_size_m": self.block_size_m,
            "split_fractions": tuple(self.split_fractions),
            "chm_mode": self.chm_mode,
            "seed": self.seed,
        }

    # --- reading -----------------------------------------------------------------------------

    def chips(self, split: str | None = None) -> Iterator[Chip]:
        """Read and yield the chips (of one split, or all), one pair at a time."""
        _check_split(split)
        for grid, windows in self._plan:
            selected = [w for w in windows if split is None or w.split == split]
            if not selected:
                continue
            shots = self._gedi_for(grid)
            with open_raster(grid.pair.imagery) as img:
                bands = _rgb_band_indexes(img, grid.pair.imagery, self.bands)
                # Blocks of the lattice, as a prediction reads them: a chip's pixels are those
                # every prediction cell over it sees. Chips come row by row, so the blocks of a
                # few rows of chips are kept (64 blocks ≈ 64 MB).
                reader = LatticeReader(img, grid.crs, self.gsd, src_crs=grid.imagery_crs,
                                       bands=bands, max_blocks=64)
                for window in selected:
                    image, valid = _read_image(reader, grid, window)
                    chm, chm_transform = self._read_chm(grid, window)
                    yield Chip(
                        chip_id=window.chip_id,
                        image=image,
                        valid=valid,
                        chm=chm,
                        crs=window.crs,
                        transform=window.transform,
                        gsd=window.gsd,
                        chm_transform=chm_transform,
                        chm_mode=self.chm_mode,
                        gedi=None if shots is None else _shots_in_window(shots, window),
                        split=window.split,
                        block_id=window.block_id,
                        imagery_path=grid.pair.imagery,
                        chm_path=grid.pair.chm,
                    )

    def _read_chm(self, grid: _PairGrid, window: ChipWindow) -> tuple[np.ndarray, Affine]:
        left, bottom, right, top = window.bounds
        if self.chm_mode == "model_grid":
            transform, size = window.transform, window.size
            resampling = None  # chosen below, once the source grid is known
        else:
            n = max(1, round((right - left) / (sum(grid.chm_res_m) / 2)))
            res = (right - left) / n  # the CHM's resolution, nudged so n cells span the chip exactly
            transform, size = Affine(res, 0.0, left, 0.0, -res, top), n
            resampling = Resampling.nearest
        # Read the source window covering the chip (plus a margin for the resampling kernel).
        src_bounds = _footprint(window.bounds, grid.crs, grid.chm_crs).bounds
        margin = 2 * grid.chm_res
        source = read_chm(
            grid.pair.chm,
            crs=grid.chm_crs,
            bounds=(src_bounds[0] - margin, src_bounds[1] - margin, src_bounds[2] + margin, src_bounds[3] + margin),
        )
        if resampling is None:
            coincide = grids_coincide(source.transform, source.crs, transform, grid.crs)
            resampling = resampling_for(min(grid.chm_res_m), window.gsd, coincide)
        out = np.full((size, size), np.nan, dtype=np.float32)
        reproject(
            source=source.array,
            destination=out,
            src_transform=source.transform,
            src_crs=source.crs,
            src_nodata=np.nan,
            dst_transform=transform,
            dst_crs=grid.crs,
            dst_nodata=np.nan,
            resampling=resampling,
        )
        return out, transform

    # --- GEDI ----------------------------------------------------------------------------------

    def _gedi_for(self, grid: _PairGrid) -> pd.DataFrame | None:
        """The pair's shots with x/y in the chip CRS, or None when no GEDI was given."""
        if self.gedi is None:
            return None
        lonlat = reproject_geometry(grid.overlap, grid.crs, "EPSG:4326").bounds
        if isinstance(self.gedi, gpd.GeoDataFrame):
            shots = self.gedi if self.gedi.crs is not None else self.gedi.set_crs("EPSG:4326")  # GEDI is lon/lat
            shots = shots.to_crs("EPSG:4326")
            shots = shots.cx[lonlat[0] : lonlat[2], lonlat[1] : lonlat[3]]
        else:
            from data_catalog.gedi import shots_in_bbox  # h5py/pyarrow only when GEDI is used

            shots = shots_in_bbox(self.gedi, lonlat)
        projected = shots.geometry.to_crs(grid.crs)
        shots = shots.copy()
        shots["_x"], shots["_y"] = projected.x.to_numpy(), projected.y.to_numpy()
        return shots


def _read_image(reader: LatticeReader, grid: _PairGrid, window: ChipWindow):
    image, valid = reader.read(window.transform, (window.size, window.size))
    if grid.aoi is not None:
        valid &= geometry_mask([grid.aoi], out_shape=valid.shape, transform=window.transform, invert=True)
        image[:, ~valid] = 0  # outside the AOI is no data, and no data reads as 0
    return image, valid


def _shots_in_window(shots: pd.DataFrame, window: ChipWindow) -> gpd.GeoDataFrame:
    left, bottom, right, top = window.bounds
    x, y = shots["_x"].to_numpy(), shots["_y"].to_numpy()
    inside = (x >= left) & (x < right) & (y > bottom) & (y <= top)
    found = shots.loc[inside].copy()
    found["px_col"] = (found["_x"] - left) / window.gsd
    found["px_row"] = (top - found["_y"]) / window.gsd
    return gpd.GeoDataFrame(found.drop(columns=["_x", "_y"]), geometry="geometry", crs="EPSG:4326").reset_index(drop=True)


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise CatalogError(f"split={split!r}: must be one of {', '.join(SPLITS)}")


# ------------------------------------------------------------------------------------- catalog


def pairs_from_catalog(catalog, aoi: AOI | None = None) -> list[ChipPair]:
    """Pair every imagery row with every CHM row whose footprint intersects it (within the AOI)."""
    region = aoi.geometry if aoi is not None else None
    imagery = catalog.query(geometry=region, kinds=["imagery"])
    chms = catalog.query(geometry=region, kinds=["chm"])
    if len(imagery) == 0 or len(chms) == 0:
        return []
    pairs = []
    hits = chms.sindex.query(imagery.geometry.values, predicate="intersects")
    for img_index, chm_index in zip(*hits):
        img_row, chm_row = imagery.iloc[img_index], chms.iloc[chm_index]
        pairs.append(
            ChipPair(
                imagery=str(img_row["path"]),
                chm=str(chm_row["path"]),
                imagery_crs=_text_or_none(img_row.get("crs")),
                chm_crs=_text_or_none(chm_row.get("crs")),
            )
        )
    return sorted(set(pairs), key=lambda p: (p.imagery, p.chm))


def _text_or_none(value) -> str | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
