"""``canopy evaluate``: score a canopy-height prediction against reference CHMs (and GEDI shots),
and write a report folder (metrics.json + PNG figures).

Alignment rule (never upsample the coarser raster): for each reference, the prediction is
averaged onto the reference grid when the prediction is finer or equal; when the reference is
finer, the reference is averaged onto the prediction grid instead. Averaging ignores nodata, and
an averaged cell counts only when at least ``min_valid_fraction`` of it was covered by valid
pixels, so a coarse cell is never the mean of one stray pixel. Nodata never counts as 0 m.
"""

from __future__ import annotations

import json
import math
import warnings
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from canopy.errors import InputError, OptionError, OutputError, OutputExistsError
from canopy.io import outputs
from data_catalog.schema import crs_to_text
from canopy.evaluate.metrics import (
    Separation,
    BLOCK_MIN_VALID_SHARE, BLOCK_SIZE, HEIGHT_BIN_EDGES, TREE_COVER_THRESHOLD_M, EdgeSums,
    EvaluationSums, TileLattice, edge_sums, regression_scores)
from data_catalog.gedi import (
    FOOTPRINT_DIAMETER_M, flagged_usable, footprint_percentiles, read_shots)
from data_catalog.raster import open_raster, parse_crs, resolve_crs, warp_average



@dataclass(frozen=True)
class EvaluationConfig:
    """Settings of an evaluation; all of them are echoed in metrics.json."""

    height_bin_edges: tuple[float, ...] = HEIGHT_BIN_EDGES
    block_size: int = BLOCK_SIZE
    block_min_valid_share: float = BLOCK_MIN_VALID_SHARE
    tree_cover_threshold_m: float = TREE_COVER_THRESHOLD_M
    # An averaged (coarse) cell counts only if valid fine pixels cover this share of it.
    min_valid_fraction: float = 0.5
    # Values at or below this are nodata even if undeclared (−9999, −3.4e38, −1.7e308 fill values).
    nodata_floor_m: float = -1000.0
    gedi_rh_column: str | None = None          # default: rh95 if present, else rh98
    gedi_percentile: float | None = None       # default: the column's number (rh98 → 98)
    gedi_footprint_diameter_m: float = FOOTPRINT_DIAMETER_M
    gedi_min_valid_share: float = 0.5          # of the footprint's prediction pixels
    edge_error_max_pixels: int = 200_000_000   # larger predictions: edge error near references
    map_crop_px: int = 512
    max_map_figures: int = 12
    histogram_max_m: float = 60.0
    # The band holding heights, when the raster does not say (a band described canopy_height,
    # or a single non-byte band). RGB imagery, or bytes that may be colours, need it named.
    prediction_band: int | None = None
    reference_band: int | None = None
    # beyond these a raster is probably not heights in metres (a warning, not an error)
    plausible_height_range_m: tuple[float, float] = (-10.0, 150.0)


# ---------------------------------------------------------------------------------------------
# Reading rasters


@dataclass(frozen=True)
class Grid:
    crs: object
    transform: object
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        from rasterio.transform import array_bounds

        west, south, east, north = array_bounds(self.height, self.width, self.transform)
        return west, south, east, north

    def describe(self) -> dict:
        t = self.transform
        return {"crs": crs_to_text(self.crs), "width": self.width, "height": self.height,
                "transform": [t.a, t.b, t.c, t.d, t.e, t.f],
                "pixel_size": [abs(t.a), abs(t.e)]}


def clean_heights(arr: np.ndarray, nodata, floor: float = -1000.0) -> np.ndarray:
    """float32 copy of ``arr`` with every kind of nodata as NaN.

    Nodata: the declared value, non-finite values, and anything ≤ ``floor`` (fill values such as
    −9999, float32 −3.4e38 or float64 −1.7e308 that files often carry undeclared).
    """
    arr = np.asarray(arr)
    bad = np.zeros(arr.shape, bool)
    if np.issubdtype(arr.dtype, np.floating):
        bad |= ~np.isfinite(arr)
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        bad |= arr == nodata
    with np.errstate(invalid="ignore"):
        bad |= arr <= floor
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32)
    out[bad] = np.nan
    return out


def _is_georeferenced(src) -> bool:
    from affine import Affine

    return bool(src.transform != Affine.identity() or src.gcps[0] or src.rpcs)


def _band_indexes(src, named: int | None = None, role: str = "prediction",
                  path: str | None = None) -> tuple[int, int | None]:
    """(height band, std band or None). The height band is ``named`` (1-based), else the band
    described ``canopy_height``, else the only band of a raster whose values can be heights.
    A raster with several bands, or one band of bytes, that says nothing is refused: an RGB
    image scored as heights gave an MAE of 151 m without a word."""
    desc = [d or "" for d in src.descriptions]
    std = desc.index(outputs.STD_BAND) + 1 if outputs.STD_BAND in desc else None
    field = f"{role}_band"
    if named is not None:
        if not 1 <= named <= src.count:
            raise OptionError(field, f"{named} is not a band of '{path or src.name}' (1..{src.count})")
        return named, (std if std != named else None)
    if outputs.HEIGHT_BAND in desc:
        return desc.index(outputs.HEIGHT_BAND) + 1, std
    if src.count == 1 and src.dtypes[0] != "uint8":
        return 1, None
    what = (f"{src.count} bands of {src.dtypes[0]}" if src.count > 1
            else "one band of bytes (an 8-bit image, or whole-metre heights?)")
    raise OptionError(field, f"{role} '{path or src.name}' has {what} and none is described "
                             f"{outputs.HEIGHT_BAND}: name the band of heights with {{{field}}} "
                             "N (RGB imagery is not a height raster)")


def _warn_if_implausible(heights: np.ndarray, role: str, path: str,
                         config: EvaluationConfig) -> None:
    finite = heights[np.isfinite(heights)]
    if not finite.size:
        return
    lo, hi = np.percentile(finite, [1, 99])
    low, high = config.plausible_height_range_m
    if lo < low or hi > high:
        warnings.warn(f"{role} '{path}': heights from {lo:.0f} to {hi:.0f} m (1st–99th "
                      f"percentile); is it a canopy height raster in metres?")


def _apply(t, cols, rows):
    """Pixel (col, row) → map (x, y) through affine ``t``, written out because ``t * (c, r)`` is
    deprecated in affine 3 and ``t @ (c, r)`` does not exist in affine 2."""
    return t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f


def _pixel_size_in(target_crs, grid: Grid, col: float, row: float) -> float:
    """Geometric-mean side (in ``target_crs`` units) of ``grid``'s pixel at (col, row)."""
    from rasterio.warp import transform as warp_xy

    t = grid.transform
    pts = [_apply(t, col, row), _apply(t, col + 1, row), _apply(t, col, row + 1)]
    xs, ys = warp_xy(grid.crs, target_crs, [p[0] for p in pts], [p[1] for p in pts])
    v1 = math.hypot(xs[1] - xs[0], ys[1] - ys[0])
    v2 = math.hypot(xs[2] - xs[0], ys[2] - ys[0])
    return math.sqrt(v1 * v2)


def _window_for_bounds(grid: Grid, bounds, pad: int = 2):
    """Integer window of ``grid`` covering ``bounds`` (grid CRS) plus ``pad`` px, clipped; None
    when it is empty."""
    from rasterio.windows import Window, from_bounds

    w = from_bounds(*bounds, transform=grid.transform)
    c0 = max(int(math.floor(w.col_off)) - pad, 0)
    r0 = max(int(math.floor(w.row_off)) - pad, 0)
    c1 = min(int(math.ceil(w.col_off + w.width)) + pad, grid.width)
    r1 = min(int(math.ceil(w.row_off + w.height)) + pad, grid.height)
    if c1 <= c0 or r1 <= r0:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0)


# ---------------------------------------------------------------------------------------------
# Aligning one reference with the prediction


@dataclass
class AlignedPair:
    """Prediction and reference on one evaluation grid (NaN = nodata)."""

    pred: np.ndarray
    ref: np.ndarray
    std: np.ndarray | None
    grid: Grid
    evaluation_grid: str          # 'reference' or 'prediction'
    pred_window: object           # the prediction window read (rasterio Window)
    notes: list[str] = field(default_factory=list)
    ref_valid_pixels: int = 0     # on the reference's own grid
    ref_crs: object = None


def align_reference(pred_src, pred_path: str, ref_path: str, reference_crs=None,
                    config: EvaluationConfig = EvaluationConfig()) -> AlignedPair:
    """Read one reference CHM and bring it and the prediction onto a common grid."""
    from rasterio.warp import transform_bounds

    notes: list[str] = []
    with open_raster(ref_path, "reference") as ref_src:
        if not _is_georeferenced(ref_src):
            raise InputError(f"reference '{ref_path}' has no georeferencing (no geotransform)")
        ref_crs = resolve_crs(ref_path, ref_src.crs, reference_crs, option="--reference-crs")
        if not ref_src.crs:
            notes.append(f"reference has no CRS tag; assumed {crs_to_text(ref_crs)} (--reference-crs)")
        ref_grid = Grid(ref_crs, ref_src.transform, ref_src.width, ref_src.height)
        pred_grid = Grid(pred_src.crs, pred_src.transform, pred_src.width, pred_src.height)

        ref_bounds_in_pred = transform_bounds(ref_crs, pred_grid.crs, *ref_grid.bounds,
                                              densify_pts=21)
        pw, ps, pe, pn = pred_grid.bounds
        rw, rs, re_, rn = ref_bounds_in_pred
        if min(pe, re_) <= max(pw, rw) or min(pn, rn) <= max(ps, rs):
            raise InputError(f"prediction '{pred_path}' does not overlap reference '{ref_path}'")
        window = _window_for_bounds(pred_grid, ref_bounds_in_pred)
        if window is None:
            raise InputError(f"prediction '{pred_path}' does not overlap reference '{ref_path}'")

        ref_band, _ = _band_indexes(ref_src, config.reference_band, "reference", ref_path)
        ref = clean_heights(ref_src.read(ref_band), ref_src.nodatavals[ref_band - 1],
                            config.nodata_floor_m)
    _warn_if_implausible(ref, "reference", ref_path, config)
    ref_valid = int(np.count_nonzero(np.isfinite(ref)))
    if ref_valid == 0:
        raise InputError(f"reference '{ref_path}' holds only nodata")

    band, std_band = _band_indexes(pred_src, config.prediction_band, "prediction", pred_path)
    pred_nodata = pred_src.nodatavals[band - 1]
    pred = clean_heights(pred_src.read(band, window=window), pred_nodata, config.nodata_floor_m)
    _warn_if_implausible(pred, "prediction", pred_path, config)
    std = None
    if std_band is not None:
        std = clean_heights(pred_src.read(std_band, window=window),
                            pred_src.nodatavals[std_band - 1], config.nodata_floor_m)
    win_transform = pred_src.window_transform(window)
    win_grid = Grid(pred_grid.crs, win_transform, int(window.width), int(window.height))

    # Compare pixel sizes in the reference CRS, at the middle of the window read.
    pred_px = _pixel_size_in(ref_crs, win_grid, win_grid.width / 2, win_grid.height / 2)
    t = ref_grid.transform
    ref_px = math.sqrt(abs(t.a * t.e - t.b * t.d))
    if pred_px <= ref_px * 1.001:
        warp = dict(src_transform=win_transform, src_crs=pred_grid.crs,
                    dst_shape=(ref_grid.height, ref_grid.width), dst_transform=ref_grid.transform,
                    dst_crs=ref_crs, min_valid_fraction=config.min_valid_fraction)
        pred_on = warp_average(pred, **warp)
        std_on = None if std is None else warp_average(std, **warp)
        pair = AlignedPair(pred_on, ref, std_on, ref_grid, "reference", window, notes)
    else:
        ref_on = warp_average(ref, ref_grid.transform, ref_crs, (win_grid.height, win_grid.width),
                              win_transform, pred_grid.crs, config.min_valid_fraction)
        pair = AlignedPair(pred, ref_on, std, win_grid, "prediction", window, notes)
    pair.ref_valid_pixels = ref_valid
    pair.ref_crs = ref_crs
    if std is not None:
        pair.notes.append("uncertainty band averaged as the mean σ (errors assumed correlated "
                          "within a cell)" if pair.evaluation_grid == "reference" else
                          "uncertainty band used on its own grid")
    if not np.any(np.isfinite(pair.pred) & np.isfinite(pair.ref)):
        raise InputError(f"prediction '{pred_path}' and reference '{ref_path}' overlap, but no "
                         "pixel is valid in both")
    return pair


def _band_on_pair(src, band: int, pair: AlignedPair) -> np.ndarray:
    """Another band of the prediction on the pair's evaluation grid, as its heights were."""
    data = src.read(band, window=pair.pred_window).astype(np.float32)
    if src.nodatavals[band - 1] is not None and np.isfinite(src.nodatavals[band - 1]):
        data[data == src.nodatavals[band - 1]] = np.nan
    if pair.evaluation_grid == "prediction":
        return data
    return warp_average(data, src.window_transform(pair.pred_window), src.crs, pair.ref.shape,
                        pair.grid.transform, pair.grid.crs)


# ---------------------------------------------------------------------------------------------
# Edge error and GEDI


def prediction_edge_error(src, lattice: TileLattice, windows: Sequence = (),
                          max_pixels: int = 200_000_000, strip_pixels: int = 8_000_000,
                          band: int | None = None) -> tuple[dict, str]:
    """Edge error of the prediction's height band (``band``, or the one it describes) on its
    own grid; returns (metrics, scope).

    The whole raster is read in strips (one row of overlap so vertical pairs at strip seams count
    once); a raster above ``max_pixels`` is only measured inside ``windows`` (those read for the
    references).
    """
    from rasterio.windows import Window

    band = band or _band_indexes(src)[0]
    nodata = src.nodatavals[band - 1]
    shape = (src.height, src.width)
    sums = EdgeSums()
    if src.width * src.height <= max_pixels:
        rows = max(1, strip_pixels // src.width)
        for r in range(0, src.height, rows):
            n = min(rows, src.height - r)
            extra = 1 if r + n < src.height else 0
            arr = clean_heights(src.read(band, window=Window(0, r, src.width, n + extra)), nodata)
            sums += edge_sums(arr, lattice, row_off=r, col_off=0, raster_shape=shape,
                              pair_rows=n if extra else None)
        return sums.metrics(), "whole prediction"
    for w in windows:
        arr = clean_heights(src.read(band, window=w), nodata)
        sums += edge_sums(arr, lattice, row_off=int(w.row_off), col_off=int(w.col_off),
                          raster_shape=shape)
    return sums.metrics(), "prediction windows covering the references"


def _pick_rh_column(columns, wanted: str | None, path: str) -> str:
    lower = {c.lower(): c for c in columns}
    if wanted:
        if wanted.lower() not in lower:
            raise InputError(f"GEDI shots '{path}' have no column '{wanted}'")
        return lower[wanted.lower()]
    for name in ("rh95", "rh98"):
        if name in lower:
            return lower[name]
    raise InputError(f"GEDI shots '{path}' have neither an rh95 nor an rh98 column")


def gedi_metrics(src, shots_path: str, pred_path: str, config: EvaluationConfig
                 ) -> tuple[dict, np.ndarray, np.ndarray]:
    """Compare footprint percentiles of the prediction with GEDI RH values.

    Returns (metrics, predicted percentiles, RH values) for the shots that count.
    """
    from rasterio.warp import transform as warp_xy
    from rasterio.windows import Window

    if src.crs is None or not src.crs.is_projected:
        raise InputError(f"prediction '{pred_path}' needs a projected CRS (metres) for GEDI metrics")
    gdf = read_shots(shots_path)
    column = _pick_rh_column(gdf.columns, config.gedi_rh_column, shots_path)
    if config.gedi_percentile is not None:
        pct = float(config.gedi_percentile)
    else:
        digits = re.findall(r"\d+", column)
        pct = float(digits[-1]) if digits else 95.0
    notes = []
    n_total = len(gdf)
    if n_total == 0:
        raise InputError(f"GEDI shots '{shots_path}' hold no shots")
    if gdf.attrs.get("crs_assumed"):
        notes.append(f"shots carry no CRS; assumed {gdf.attrs['crs_assumed']}")
    good = flagged_usable(gdf)  # the same rule as the correction's samples and training
    n_quality = int((~good).sum())
    gdf = gdf[good]
    rh = gdf[column].to_numpy(dtype=np.float64)
    xs, ys = warp_xy(gdf.crs, src.crs, gdf.geometry.x.to_numpy(), gdf.geometry.y.to_numpy())
    xs, ys = np.asarray(xs), np.asarray(ys)
    cols, rows = _apply(~src.transform, xs, ys)
    inside = (cols >= 0) & (cols < src.width) & (rows >= 0) & (rows < src.height) & np.isfinite(rh)
    n_outside = int(np.count_nonzero(~inside))
    if not inside.any():
        raise InputError(f"none of the {n_total} GEDI shots in '{shots_path}' fall inside "
                         f"prediction '{pred_path}'")

    # The footprint rule (which pixels, partial footprints, the percentile) is
    # data_catalog.gedi.footprint_percentiles, as in training.
    band, _ = _band_indexes(src, config.prediction_band, "prediction", pred_path)
    nodata = src.nodatavals[band - 1]
    idx = np.flatnonzero(inside)
    pred_pct = np.full(rh.shape, np.nan)
    fp = dict(diameter_m=config.gedi_footprint_diameter_m,
              min_valid_share=config.gedi_min_valid_share)
    if src.width * src.height <= 50_000_000:
        heights = clean_heights(src.read(band), nodata)
        pred_pct[idx] = footprint_percentiles(heights, src.transform, xs[idx], ys[idx], pct, **fp)
    else:  # a window around each shot holds every map pixel of its footprint
        t = src.transform
        half = int(math.ceil(fp["diameter_m"] / 2 / min(math.hypot(t.a, t.d), math.hypot(t.b, t.e)))) + 2
        for i in idx:
            c, r = int(math.floor(cols[i])), int(math.floor(rows[i]))
            c0, r0 = max(c - half, 0), max(r - half, 0)
            win = Window(c0, r0, min(c + half + 1, src.width) - c0, min(r + half + 1, src.height) - r0)
            heights = clean_heights(src.read(band, window=win), nodata)
            pred_pct[i] = footprint_percentiles(heights, src.window_transform(win), xs[i:i + 1],
                                                ys[i:i + 1], pct, **fp)[0]
    n_nodata = int(np.count_nonzero(~np.isfinite(pred_pct[idx])))
    used = np.isfinite(pred_pct)
    scores = regression_scores(pred_pct[used], rh[used])
    metrics = {
        "shots_file": str(shots_path), "rh_column": column, "prediction_percentile": pct,
        "footprint_diameter_m": config.gedi_footprint_diameter_m,
        "n_shots_in_file": n_total, "n_dropped_quality_flag": n_quality,
        "n_outside_prediction": n_outside, "n_footprint_nodata": n_nodata, **scores,
        "notes": notes,
    }
    return metrics, pred_pct[used], rh[used]


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib's object API with the Agg canvas: no pyplot global state)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.2f}"


def plot_density(hist: np.ndarray, edges: np.ndarray, stats: dict, path: Path) -> None:
    from matplotlib.colors import LogNorm

    fig = _figure(5.6, 5)
    ax = fig.add_subplot()
    counts = np.ma.masked_equal(hist.T, 0)
    if counts.count():
        mesh = ax.pcolormesh(edges, edges, counts, norm=LogNorm(vmin=1, vmax=max(counts.max(), 2)),
                             cmap="viridis")
        fig.colorbar(mesh, ax=ax, label="pixels")
    # Zoom to the occupied range (the histogram spans 0..60 m whatever the heights are).
    occupied = np.flatnonzero(hist.sum(0) + hist.sum(1))
    top = float(edges[min(occupied[-1] + 1, edges.size - 1)]) if occupied.size else float(edges[-1])
    top = min(max(top * 1.05, 5.0), float(edges[-1]))
    ax.plot([edges[0], top], [edges[0], top], "k--", lw=1, label="1:1")
    ax.set_xlim(edges[0], top)
    ax.set_ylim(edges[0], top)
    ax.set_aspect("equal")
    ax.set_xlabel("reference height (m)")
    ax.set_ylabel("predicted height (m)")
    ax.set_title(f"n={stats['n']:,}  MAE {_fmt(stats['mae'])} m  RMSE {_fmt(stats['rmse'])} m  "
                 f"R² {_fmt(stats['r2'])}", fontsize=9)
    ax.legend(loc="upper left")
    fig.savefig(path, dpi=110)


def plot_error_by_bin(by_bin: dict, path: Path) -> None:
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    labels = list(by_bin)
    x = np.arange(len(labels))
    mae = [by_bin[k]["mae"] if by_bin[k]["n"] else np.nan for k in labels]
    bias = [by_bin[k]["bias"] if by_bin[k]["n"] else np.nan for k in labels]
    ax.bar(x - 0.2, mae, 0.4, label="MAE", color="tab:blue")
    ax.bar(x + 0.2, bias, 0.4, label="bias (pred − ref)", color="tab:orange")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, [f"{k} m\nn={by_bin[k]['n']:,}" for k in labels], fontsize=8)
    ax.set_ylabel("m")
    ax.set_title("error by reference height bin")
    ax.legend()
    fig.savefig(path, dpi=110)


def plot_error_histogram(counts: np.ndarray, edges: np.ndarray, stats: dict, path: Path) -> None:
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("error, prediction − reference (m)")
    ax.set_ylabel("pixels")
    ax.set_title(f"bias {_fmt(stats['bias'])} m, RMSE {_fmt(stats['rmse'])} m "
                 f"(values beyond ±{edges[-1]:g} m in the end bins)", fontsize=9)
    fig.savefig(path, dpi=110)


def best_crop(valid: np.ndarray, size: int) -> tuple[slice, slice]:
    """The ``size``×``size`` crop (on a half-crop lattice) holding the most valid pixels."""
    h, w = valid.shape
    ch, cw = min(size, h), min(size, w)
    integral = np.pad(valid.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best, best_rc = -1, (0, 0)
    for r in sorted(set(list(range(0, h - ch + 1, max(ch // 2, 1))) + [h - ch])):
        for c in sorted(set(list(range(0, w - cw + 1, max(cw // 2, 1))) + [w - cw])):
            n = (integral[r + ch, c + cw] - integral[r, c + cw] - integral[r + ch, c]
                 + integral[r, c])
            if n > best:
                best, best_rc = n, (r, c)
    r, c = best_rc
    return slice(r, r + ch), slice(c, c + cw)


def plot_maps(pred: np.ndarray, ref: np.ndarray, title: str, path: Path, crop_px: int) -> None:
    import matplotlib

    both = np.isfinite(pred) & np.isfinite(ref)
    rs, cs = best_crop(both, crop_px)
    p, y = pred[rs, cs], ref[rs, cs]
    err = np.where(both[rs, cs], p - y, np.nan)
    finite = np.concatenate([p[np.isfinite(p)], y[np.isfinite(y)]])
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    vmax = max(vmax, 1.0)
    emax = float(np.nanpercentile(np.abs(err), 98)) if np.isfinite(err).any() else 1.0
    emax = max(emax, 0.5)
    fig = _figure(13, 4.6)
    axes = fig.subplots(1, 3)
    height_cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    err_cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.85")
    im = None
    for ax, arr, name in ((axes[0], p, "prediction"), (axes[1], y, "reference")):
        im = ax.imshow(arr, cmap=height_cmap, vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(name)
    fig.colorbar(im, ax=axes[:2], label="height (m), shared scale", shrink=0.85)
    ie = axes[2].imshow(err, cmap=err_cmap, vmin=-emax, vmax=emax, interpolation="nearest")
    axes[2].set_title("error (prediction − reference)")
    fig.colorbar(ie, ax=axes[2], label="m", shrink=0.85)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}  (crop {p.shape[1]}×{p.shape[0]} px of the evaluation grid; grey = nodata)",
                 fontsize=9)
    fig.savefig(path, dpi=100)


def plot_gedi(pred_pct: np.ndarray, rh: np.ndarray, stats: dict, path: Path) -> None:
    fig = _figure(5, 5)
    ax = fig.add_subplot()
    ax.scatter(rh, pred_pct, s=8, alpha=0.6)
    hi = float(max(np.nanmax(rh, initial=1), np.nanmax(pred_pct, initial=1))) * 1.05
    lo = min(0.0, float(np.nanmin(rh, initial=0)), float(np.nanmin(pred_pct, initial=0)))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"GEDI {stats['rh_column']} (m)")
    ax.set_ylabel(f"predicted {stats['prediction_percentile']:g}th percentile in footprint (m)")
    ax.set_title(f"n={stats['n']}  MAE {_fmt(stats['mae'])} m  bias {_fmt(stats['bias'])} m",
                 fontsize=9)
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------
# The report folder


def _json_ready(obj):
    """NaN/inf → None, numpy scalars → Python, tuples → lists, Paths → str."""
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_json_ready(v) for v in obj.tolist()]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> Path:
    """Check ``out_dir`` and make a temporary sibling folder to build the report in."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output '{out_dir}' exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder '{out_dir}' is not empty")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot create output folder '{out_dir}': {exc.strerror}") from None
    return tmp


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished report into place; an old report is replaced only at this point."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _safe_stem(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).stem)[:60]


def evaluate(prediction_path: str | os.PathLike, reference_paths: Sequence[str | os.PathLike],
             out_dir: str | os.PathLike, gedi: str | os.PathLike | None = None, *,
             reference_crs: str | None = None, overwrite: bool = False,
             tile_lattice: TileLattice | None = None,
             config: EvaluationConfig = EvaluationConfig(),
             compare: Sequence[str | os.PathLike] = ()) -> dict:
    """Score ``prediction_path`` against each reference CHM (and GEDI shots); write a report.

    Writes ``out_dir/metrics.json`` and PNG figures, building them in a temporary folder that
    is renamed into place at the end. Returns the metrics dictionary (JSON-ready).

    ``compare``: more maps (another model's, say) scored against the same references in the
    same report: each gets its full report in ``compare/NN_name/``, and ``comparison`` in the
    top-level metrics lists every map's scores twice, on its own valid pixels and on the pixels
    valid in every map and the reference (the fair comparison when one map has more nodata).
    """
    pred_path = str(prediction_path)
    refs = [str(r) for r in reference_paths]
    others = [str(c) for c in compare]
    if not refs:
        raise OptionError("reference", "give at least one reference CHM ({reference})")
    ref_crs = parse_crs(reference_crs, "--reference-crs") if reference_crs else None
    out = Path(out_dir)
    tmp = _prepare_out_dir(out, overwrite)
    try:
        result = _evaluate_into(pred_path, refs, tmp, str(gedi) if gedi else None, ref_crs,
                                tile_lattice, config)
        if others:
            result["comparison"] = _compare_maps(result, pred_path, others, refs, tmp, gedi,
                                                 ref_crs, config)
        result = _json_ready(result)
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2, allow_nan=False))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _compare_maps(main: dict, main_path: str, others: list[str], refs: list[str], folder: Path,
                  gedi, ref_crs, config: EvaluationConfig) -> dict:
    """Every map's scores against the same references (see :func:`evaluate`)."""
    rows, reports = [], [(main_path, main, ".")]
    for j, path in enumerate(others, start=1):
        sub = Path("compare") / f"{j:02d}_{_safe_stem(path)}"
        (folder / sub).mkdir(parents=True)
        r = _json_ready(_evaluate_into(path, refs, folder / sub, str(gedi) if gedi else None,
                                       ref_crs, None, config))
        (folder / sub / "metrics.json").write_text(json.dumps(r, indent=2, allow_nan=False))
        reports.append((path, r, str(sub)))
    keys = ("n", "mae", "rmse", "bias", "r2", "block_r2")
    for path, r, sub in reports:
        with open_raster(path, "prediction") as src:
            tags = src.tags()
        o = r["pooled"]["overall"]
        rows.append({"path": path, "model": tags.get(outputs.MODEL, "unknown"),
                     "model_licence": tags.get(outputs.MODEL_LICENCE, "unknown"), "report": sub,
                     **{k: o.get(k) for k in keys},
                     "edge_error": r["edge_error"].get("edge_error")})
    common, note = _common_pixel_scores([main_path, *others], refs, ref_crs, config)
    for row, scores in zip(rows, common or [None] * len(rows)):
        row["common_pixels"] = None if scores is None else {k: scores.get(k) for k in keys}
    return {"maps": rows, "common_pixels_note": note}


def _common_pixel_scores(paths: list[str], refs: list[str], ref_crs, config: EvaluationConfig):
    """Each map's overall scores on the pixels valid in every map and the reference, or
    (None, why) when the maps do not share an evaluation grid."""
    edges = tuple(config.height_bin_edges)
    pooled: list[EvaluationSums | None] = [None] * len(paths)
    for ref_path in refs:
        pairs = []
        for path in paths:
            with open_raster(path, "prediction") as src:
                pairs.append(align_reference(src, path, ref_path, ref_crs, config))
        grids = {json.dumps(p.grid.describe(), sort_keys=True, default=str) for p in pairs}
        if len(grids) > 1:
            return None, (f"the maps reach '{Path(ref_path).name}' on different grids (finer "
                          "than the reference in one, coarser in another); scores on common "
                          "pixels skipped")
        ok = np.isfinite(pairs[0].ref)
        for p in pairs:
            ok &= np.isfinite(p.pred)
        for i, p in enumerate(pairs):
            sums = EvaluationSums.from_arrays(
                np.where(ok, p.pred, np.nan), p.ref, None, edges=edges, block=config.block_size,
                min_valid_share=config.block_min_valid_share,
                threshold=config.tree_cover_threshold_m)
            pooled[i] = sums if pooled[i] is None else pooled[i] + sums
    return [s.metrics()["overall"] for s in pooled], "pixels valid in every map and the reference"


def _evaluate_into(pred_path: str, refs: list[str], folder: Path, gedi: str | None, ref_crs,
                   tile_lattice: TileLattice | None, config: EvaluationConfig) -> dict:
    from canopy import __version__

    edges = tuple(config.height_bin_edges)
    hist_edges = np.arange(0.0, config.histogram_max_m + 0.25, 0.5)
    err_edges = np.arange(-30.0, 30.0 + 0.125, 0.25)
    density = np.zeros((hist_edges.size - 1, hist_edges.size - 1), np.int64)
    err_counts = np.zeros(err_edges.size - 1, np.int64)
    pooled: EvaluationSums | None = None
    per_ref: list[dict] = []
    figures: list[str] = []
    notes: list[str] = []
    windows = []

    with open_raster(pred_path, "prediction") as src:
        if src.crs is None or not _is_georeferenced(src):
            raise InputError(f"prediction '{pred_path}' has no CRS or geotransform")
        band, std_band = _band_indexes(src, config.prediction_band, "prediction", pred_path)
        desc = [d or "" for d in src.descriptions]
        ood_band = desc.index(outputs.OOD_BAND) + 1 if outputs.OOD_BAND in desc else None
        separation = Separation() if ood_band else None
        for i, ref_path in enumerate(refs):
            pair = align_reference(src, pred_path, ref_path, ref_crs, config)
            windows.append(pair.pred_window)
            if separation is not None:
                separation.add(_band_on_pair(src, ood_band, pair), np.abs(pair.pred - pair.ref))
            sums = EvaluationSums.from_arrays(
                pair.pred, pair.ref, pair.std, edges=edges, block=config.block_size,
                min_valid_share=config.block_min_valid_share,
                threshold=config.tree_cover_threshold_m)
            pooled = sums if pooled is None else pooled + sums
            m = sums.metrics()
            both = np.isfinite(pair.pred) & np.isfinite(pair.ref)
            p, y = pair.pred[both], pair.ref[both]
            density += np.histogram2d(np.clip(y, 0, hist_edges[-1] - 1e-6),
                                      np.clip(p, 0, hist_edges[-1] - 1e-6),
                                      bins=(hist_edges, hist_edges))[0].astype(np.int64)
            err_counts += np.histogram(np.clip(p - y, err_edges[0] + 1e-6, err_edges[-1] - 1e-6),
                                       bins=err_edges)[0]
            entry = {
                "path": ref_path,
                "crs": crs_to_text(pair.ref_crs),
                "evaluation_grid": pair.evaluation_grid,
                "grid": pair.grid.describe(),
                "n_reference_valid_pixels": pair.ref_valid_pixels,
                "n_evaluated_pixels": int(both.sum()),
                **m,
                "notes": pair.notes,
            }
            if i < config.max_map_figures:
                name = f"maps_{i:02d}_{_safe_stem(ref_path)}.png"
                plot_maps(pair.pred, pair.ref, Path(ref_path).name, folder / name, config.map_crop_px)
                entry["figure"] = name
                figures.append(name)
            per_ref.append(entry)
            del pair, p, y, both
        if len(refs) > config.max_map_figures:
            notes.append(f"map figures drawn for the first {config.max_map_figures} references only")

        tags = src.tags()
        lattice = tile_lattice or TileLattice.from_tags(tags)
        if lattice is None:
            edge = {"skipped": f"prediction carries no {outputs.TILE_SIZE}/{outputs.TILE_STRIDE} tags "
                               "(model-tile lattice unknown)"}
        else:
            e, scope = prediction_edge_error(src, lattice, windows, config.edge_error_max_pixels,
                                             band=band)
            edge = {**e, "scope": scope,
                    "lattice": {k: v for k, v in asdict(lattice).items() if v is not None}}

        gedi_result = None
        if gedi:
            g, gp, grh = gedi_metrics(src, gedi, pred_path, config)
            gedi_result = g
            if g["n"]:
                plot_gedi(gp, grh, g, folder / "gedi_scatter.png")
                figures.append("gedi_scatter.png")
        pred_info = {"path": pred_path, "crs": crs_to_text(src.crs), "width": src.width,
                     "height": src.height, "pixel_size": [abs(src.transform.a), abs(src.transform.e)],
                     "height_band": band, "std_band": std_band}

    assert pooled is not None
    pooled_m = pooled.metrics()
    plot_density(density, hist_edges, pooled_m["overall"], folder / "density_scatter.png")
    plot_error_by_bin(pooled_m["by_height_bin"], folder / "error_by_height_bin.png")
    plot_error_histogram(err_counts, err_edges, pooled_m["overall"], folder / "error_histogram.png")
    figures = ["density_scatter.png", "error_by_height_bin.png", "error_histogram.png"] + figures
    if std_band is None:
        notes.append("prediction has no 'canopy_height_std' band: calibration not measured")
    if separation is None:
        notes.append(f"prediction has no '{outputs.OOD_BAND}' band (canopy predict --ood-band): "
                     "how well it flags large errors not measured")

    return {
        "canopy_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "prediction": pred_info,
        "settings": asdict(config),
        "references": per_ref,
        "pooled": pooled_m,
        "edge_error": edge,
        "gedi": gedi_result,
        "ood": separation.result() if separation is not None else None,
        "figures": figures,
        "notes": notes,
    }
