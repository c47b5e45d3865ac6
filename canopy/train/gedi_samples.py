"""Training samples for the GEDI correction: blocks of imagery with the GEDI shots inside them.

Each scene is read on the correction's grid (the decoder's GSD), the decoder's heights are
predicted (or read), and every block of the global lattice (``canopy.predict.correction``) that
holds usable shots becomes a :class:`BlockSample`: the block as the network sees it
(:func:`canopy.model.gedi_correction.downsample_block`) and, per shot, the decoder's footprint
percentile and the shot's RH.

Footprint percentiles are :func:`data_catalog.gedi.footprint_percentiles`, the measurement
evaluation and the training loss use, with the whole footprint required
(:data:`FOOTPRINT_MIN_VALID_SHARE`): the correction learns from shots whose footprint the decoder
saw entirely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from canopy.errors import InputError, OptionError
from canopy.progress import ProgressCallback, report
from canopy.model.gedi_correction import (
    CorrectionConfig, block_centres_lonlat, cut_block, downsample_block, scalar_features)
from canopy.predict.correction import global_origin
from data_catalog.gedi import (
    flagged_usable, footprint_percentiles, read_shots, shots_in_bbox)
from data_catalog.raster import open_raster, read_rgb_on_grid, resolve_crs

#: Share of a footprint's pixels that must hold decoder heights for a shot to become a sample.
FOOTPRINT_MIN_VALID_SHARE = 1.0


@dataclass
class BlockSample:
    """One block of imagery and the shots whose reported position falls inside it."""

    key: str              # "<source>:<block row>:<block col>"
    rgb: np.ndarray       # 3×S×S uint8, the averaged block
    valid: np.ndarray     # S×S bool
    scalars: np.ndarray   # (k,) float32
    pred: np.ndarray      # (n,) decoder's footprint percentile at each shot (m)
    rh: np.ndarray        # (n,) the shots' GEDI RH (m)


def pixel_coords(transform, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Fractional (col, row) of CRS points on a north-up grid."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return (x - transform.c) / transform.a, (y - transform.f) / transform.e


def usable_shots(shots, rh_metric: str, source: str = "shots"):
    """Shots usable by their flags (:func:`data_catalog.gedi.flagged_usable`) with a finite RH
    value (GeoDataFrame, any CRS)."""
    if rh_metric not in shots.columns:
        raise InputError(f"GEDI shots of {source} have no column '{rh_metric}'")
    if shots.crs is None:
        shots = shots.set_crs("EPSG:4326")  # GEDI positions are lon/lat
    keep = np.isfinite(shots[rh_metric].to_numpy(dtype=np.float64)) & flagged_usable(shots)
    return shots.loc[keep]


@dataclass
class SceneShots:
    """How the shots of one scene were used (for the report)."""

    source: str
    n_shots: int = 0         # usable shots given for the scene
    n_inside: int = 0        # whose footprint lies wholly on valid heights
    n_blocks: int = 0


def block_samples(rgb: np.ndarray, valid: np.ndarray, height: np.ndarray, transform, crs,
                  shots, cfg: CorrectionConfig, *, sun_elevation: float | None = None,
                  source: str = "scene") -> tuple[list[BlockSample], SceneShots]:
    """Blocks of one scene that hold GEDI shots, with the decoder's footprint percentiles.

    ``rgb`` (3×H×W uint8), ``valid`` and ``height`` (the decoder's output, metres, NaN nodata)
    share the north-up grid ``transform`` in ``crs`` at ``cfg.gsd``. ``shots`` is a GeoDataFrame
    of points with a ``cfg.rh_metric`` column, in any CRS.
    """
    from rasterio.crs import CRS

    if height.shape != rgb.shape[1:] or valid.shape != height.shape:
        raise InputError(f"{source}: heights {height.shape} and imagery {rgb.shape[1:]} differ in size")
    if CRS.from_user_input(crs).is_geographic:
        raise InputError(f"{source}: GEDI correction needs a projected CRS in metres")
    origin = global_origin(transform, cfg.gsd)
    shots = usable_shots(shots, cfg.rh_metric, source)
    report = SceneShots(source, n_shots=len(shots))
    if not len(shots):
        return [], report
    pts = shots.geometry.to_crs(crs)
    x, y = pts.x.to_numpy(), pts.y.to_numpy()
    rh = shots[cfg.rh_metric].to_numpy(dtype=np.float64)
    pred = footprint_percentiles(height, transform, x, y, cfg.percentile,
                                 diameter_m=cfg.footprint_diameter_m,
                                 min_valid_share=FOOTPRINT_MIN_VALID_SHARE)
    ok = np.isfinite(pred) & (rh > -5.0) & (rh < 120.0)  # RH beyond these is a processing failure
    report.n_inside = int(ok.sum())
    if not ok.any():
        return [], report
    cols, rows = pixel_coords(transform, x[ok], y[ok])
    g_row = origin[0] + np.floor(rows).astype(np.int64)
    g_col = origin[1] + np.floor(cols).astype(np.int64)
    p = cfg.block_px
    blocks = np.stack([np.floor_divide(g_row, p), np.floor_divide(g_col, p)], axis=1)
    uniq, which = np.unique(blocks, axis=0, return_inverse=True)
    which = which.ravel()
    if cfg.scalars:
        lon, lat = block_centres_lonlat(uniq[:, 0], uniq[:, 1], p, cfg.gsd, crs)
        scal = scalar_features(cfg.scalars, lon, lat, sun_elevation)
    else:
        scal = np.zeros((len(uniq), 0), np.float32)
    samples = []
    for i, (br, bc) in enumerate(uniq):
        block, block_ok = cut_block(rgb, valid, origin, (int(br), int(bc)), p)
        small, small_ok = downsample_block(block, block_ok, cfg.input_px)
        sel = which == i
        samples.append(BlockSample(f"{source}:{br}:{bc}", small, small_ok, scal[i],
                                   pred[ok][sel].astype(np.float32), rh[ok][sel].astype(np.float32)))
    report.n_blocks = len(samples)
    return samples, report



# ---------------------------------------------------------------------------------------------
# from files or a catalog to a fitted model


@dataclass
class TrainingScene:
    """One imagery raster with the GEDI shots over it."""

    imagery: str
    shots: object                    # GeoDataFrame of points, any CRS
    heights: str | None = None       # the decoder's heights on the imagery grid (skips the decoder)
    sun_elevation: float | None = None


def raster_bbox_wgs84(path: str) -> tuple[float, float, float, float]:
    from rasterio.warp import transform_bounds

    with open_raster(path) as ds:
        crs = resolve_crs(path, ds.crs, None, option=None)  # GEDI shots need a place on the map
        return transform_bounds(crs, "EPSG:4326", *ds.bounds, densify_pts=21)


def _sun_tag(path: str) -> float | None:
    with open_raster(path) as ds:
        value = ds.tags().get("CANOPY_SUN_ELEVATION")
    return float(value) if value else None


def scenes_from_files(imagery: Sequence[str], gedi: Sequence[str],
                      heights: Sequence[str] | None = None) -> list[TrainingScene]:
    """Every GEDI file applies to every imagery raster; shots are cut to each raster's bbox."""
    if not imagery:
        raise OptionError("imagery", "give one or more RGB rasters ({imagery}) or a catalog "
                                     "({catalog})")
    if not gedi:
        raise OptionError("gedi", "give GEDI shots ({gedi}: GeoParquet, GeoJSON or an ingest "
                                  "folder)")
    if heights and len(heights) != len(imagery):
        raise OptionError("heights", f"give one {{heights}} raster per {{imagery}} raster "
                                     f"({len(heights)} for {len(imagery)})")
    import pandas as pd

    scenes = []
    for i, path in enumerate(imagery):
        bbox = raster_bbox_wgs84(str(path))
        parts = [read_shots(g, bbox) for g in gedi]
        parts = [p.to_crs("EPSG:4326") for p in parts if len(p)]
        shots = pd.concat(parts, ignore_index=True) if parts else read_shots(gedi[0]).iloc[0:0]
        scenes.append(TrainingScene(str(path), shots, str(heights[i]) if heights else None,
                                    _sun_tag(str(path))))
    return scenes


def scenes_from_catalog(catalog_path: str | os.PathLike) -> list[TrainingScene]:
    """Imagery rows of a catalog, each with the shots of the 'gedi' rows over it."""
    from data_catalog.catalog import Catalog

    cat = Catalog.open(catalog_path, must_exist=True)
    imagery = cat.query(kinds="imagery")
    if not len(imagery):
        raise InputError(f"catalog '{catalog_path}' has no imagery (kind 'imagery')")
    if not len(cat.query(kinds="gedi")):
        raise InputError(f"catalog '{catalog_path}' has no GEDI shots (add granules with "
                         "`canopy catalog add gedi ...`)")
    scenes = []
    for path, geom in zip(imagery["path"], imagery.geometry):
        rows = cat.query(geometry=geom, kinds="gedi")
        if not len(rows):
            continue
        shots = shots_in_bbox(list(rows["path"]), geom.bounds)
        scenes.append(TrainingScene(str(path), shots, None, _sun_tag(str(path))))
    if not scenes:
        raise InputError(f"no GEDI shot of catalog '{catalog_path}' lies over its imagery")
    return scenes


def _read_heights(path: str, img, source: str) -> np.ndarray:
    with open_raster(path) as ds:
        same = (ds.crs == img.crs and ds.transform.almost_equals(img.transform)
                and (ds.height, ds.width) == img.valid.shape)
        if not same:
            raise InputError(f"heights '{path}' are not on the grid of imagery '{source}' as read at "
                             f"{img.transform.a:g} m (predict them from that imagery)")
        data = ds.read(1, masked=True).astype(np.float32)
    return np.ma.filled(data, np.nan)


def decoder_gsd(decoder, heights: str | None) -> tuple[float, str]:
    """The GSD and name of what produced the heights: the decoder model, else the heights raster."""
    if decoder is not None:
        from canopy.model.checkpoints import load_config

        cfg = decoder.cfg if hasattr(decoder, "cfg") else load_config(decoder)
        return float(cfg.gsd), cfg.name
    if heights is None:
        raise OptionError("model", "give the decoder whose heights are corrected ({model}) or "
                                   "its heights ({heights})")
    with open_raster(heights) as ds:
        return float(abs(ds.transform.a)), Path(heights).name


def samples_from_scenes(scenes: Sequence[TrainingScene], cfg: CorrectionConfig, *, decoder=None,
                        device="cpu", precision: str = "fp32", batch_size: int | None = None,
                        sun_elevation: float | None = None,
                        progress: ProgressCallback | None = None
                        ) -> tuple[list[BlockSample], list[SceneShots]]:
    """Read each scene on the correction's grid, predict (or read) heights, cut blocks.
    ``precision`` ``auto`` and ``batch_size`` None are resolved as ``canopy predict`` does."""
    from canopy.predict.blend import predict_array

    model = None
    if decoder is not None and any(s.heights is None for s in scenes):
        from canopy.model.auto import batch_size_for, choose_precision, own_model
        from canopy.model.checkpoints import load_model

        model = decoder if hasattr(decoder, "predict_tensor") else load_model(decoder, device=device)
        if model.cfg.backbone.in_chans != 3:  # the scenes are read as RGB here
            raise OptionError("model", f"{{model}} reads {model.cfg.backbone.in_chans} bands; "
                                       "fitting a GEDI correction takes an RGB decoder (or give "
                                       "its heights with {heights})")
        batch_size = batch_size_for(model.device, batch_size)
        if precision == "auto":
            choice = choose_precision(model, precision, batch_size=batch_size)
            precision = choice.precision
            report(progress, "scenes", 0, len(scenes), choice.reason)
            if model is decoder:
                model = own_model(model, precision)
    samples, reports = [], []
    n_shots = 0
    for scene in scenes:
        n_shots += len(scene.shots)
        if not len(scene.shots):
            reports.append(SceneShots(Path(scene.imagery).name))
            continue
        img = read_rgb_on_grid(scene.imagery, cfg.gsd)
        if scene.heights is not None:
            height = _read_heights(scene.heights, img, scene.imagery)
        elif model is not None:
            report(progress, "scenes", len(reports), len(scenes),
                   f"predicting heights for {Path(scene.imagery).name}")
            height, _ = predict_array(model, img.rgb, img.valid, precision=precision,
                                      batch_size=batch_size)
        else:
            raise OptionError("model", "give the decoder whose heights are corrected ({model}) "
                                       "or its heights ({heights})")
        sun = scene.sun_elevation if scene.sun_elevation is not None else sun_elevation
        s, rep = block_samples(img.rgb, img.valid, height, img.transform, img.crs, scene.shots,
                               cfg, sun_elevation=sun, source=Path(scene.imagery).name)
        samples += s
        reports.append(rep)
    if not samples:
        names = ", ".join(Path(s.imagery).name for s in scenes[:3]) + (" ..." if len(scenes) > 3 else "")
        if n_shots == 0:
            raise InputError(f"no GEDI shot lies within the bounds of the imagery ({names})")
        raise InputError(f"none of the {n_shots} GEDI shots lies wholly on the imagery ({names})")
    return samples, reports


