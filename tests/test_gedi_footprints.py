"""One GEDI footprint measurement: synthetic shots, the GEDI correction's samples, ``canopy
evaluate`` and the training loss give a shot the same footprint percentile on the same raster,
including footprints that are partly nodata or partly off the raster."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.windows import Window

from canopy.evaluate.report import EvaluationConfig, clean_heights, gedi_metrics
from canopy.model.gedi_correction import CorrectionConfig
from canopy.synth import GediConfig, gedi_like_shots
from canopy.train.gedi_samples import block_samples
from canopy.train.losses import LossConfig, gedi_shot_losses
from data_catalog.gedi import footprint_members, footprint_percentiles
from tests.conftest import shared

ABBY = ("chm_tiles", "neon", "NEON_D16_ABBY_DP3_559000_5070000_CHM.tif")  # 1 m, 38 % NaN
SHARE = 0.5  # evaluation's and the loss's partial-footprint share; the correction asks for 1.0


@pytest.fixture(scope="module")
def abby():
    """A 256 m crop of the real NEON ABBY lidar CHM (EPSG:32610) with its nodata holes."""
    with rasterio.open(shared(*ABBY)) as ds:
        win = Window(440, 300, 256, 256)  # across the edge of the lidar coverage
        chm = clean_heights(ds.read(1, window=win), ds.nodata)
        return chm, ds.window_transform(win), ds.crs


def test_four_callers_agree_on_the_same_raster_and_shots(abby, tmp_path):
    chm, transform, crs = abby
    assert 0.1 < np.isnan(chm).mean() < 0.6  # real holes: partial footprints happen
    # 1. synth: its shots' noise-free RH95 is the footprint percentile at the true position
    shots = gedi_like_shots(chm, 1.0, seed=3, config=GediConfig(track_spacing_m=18,
                                                                along_track_spacing_m=15))
    # and shots whose footprint reaches off the raster (synth keeps only whole footprints)
    rng = np.random.default_rng(0)
    edge = rng.uniform(0, 12.0, (60, 2))
    edge[:30, 1] = rng.uniform(0, 256, 30)
    col = np.concatenate([shots["true_x"], edge[:, 0]])  # scene metres = pixels here
    row = np.concatenate([shots["true_y"], edge[:, 1]])
    x, y = transform.c + col, transform.f - row
    n = len(x)
    synth = np.concatenate([shots["true_rh95"], np.full(len(edge), np.nan)])
    ids = np.arange(n) * 0.1  # an RH value that names the shot, inside the plausible range

    # 2. the correction's samples (heights = the CHM on its own 1 m grid)
    frame = gpd.GeoDataFrame({"rh95": ids}, geometry=gpd.points_from_xy(x, y), crs=crs)
    cfg = CorrectionConfig(block_px=64, input_px=16, gsd=1.0)
    samples, _ = block_samples(np.zeros((3, *chm.shape), np.uint8), np.ones(chm.shape, bool), chm,
                               transform, crs, frame, cfg)
    corr = np.full(n, np.nan)
    for s in samples:
        corr[np.round(s.rh * 10).astype(int)] = s.pred

    # 3. canopy evaluate, from files
    pred_path = tmp_path / "chm.tif"
    with rasterio.open(pred_path, "w", driver="GTiff", width=chm.shape[1], height=chm.shape[0],
                       count=1, dtype="float32", crs=crs, transform=transform, nodata=np.nan) as dst:
        dst.write(chm, 1)
    frame.to_parquet(tmp_path / "shots.parquet")
    config = EvaluationConfig(gedi_rh_column="rh95", gedi_min_valid_share=SHARE)
    with rasterio.open(pred_path) as src:
        metrics, pct, rh = gedi_metrics(src, str(tmp_path / "shots.parquet"), str(pred_path), config)
    evaluation = np.full(n, np.nan)
    evaluation[np.round(rh * 10).astype(int)] = pct

    # 4. the training loss on the raster as one chip: with RH set to the evaluation's value, the
    # loss is ½·(its percentile − that value)², so it measures how far the two are apart
    loss_cfg = LossConfig(gedi_percentile=95.0, gedi_max_shift_m=0.0, gedi_min_coverage=SHARE,
                          gedi_huber_delta=1.0)
    pred = torch.from_numpy(np.nan_to_num(chm))
    valid = torch.from_numpy(np.isfinite(chm))
    loss_counts = np.zeros(n, bool)
    gap = np.full(n, np.nan)
    for i in range(n):
        shot = torch.tensor([[row[i], col[i], evaluation[i] if np.isfinite(evaluation[i]) else 0.0]])
        losses, _ = gedi_shot_losses(pred, valid, shot, 1.0, loss_cfg)
        loss_counts[i] = losses.numel() == 1
        if loss_counts[i]:
            gap[i] = float(torch.sqrt(2 * losses[0]))

    m = len(shots["true_x"])  # the synthetic shots come first, the edge shots after them
    whole = np.isfinite(footprint_percentiles(chm, transform, x, y, 95, min_valid_share=1.0))
    partial = np.isfinite(evaluation) & ~whole
    assert m > 150 and whole.sum() > 40 and partial[:m].sum() > 5 and partial[m:].sum() > 10
    # whole footprints: all four give the same value (synth and the correction count only those)
    np.testing.assert_array_equal(np.isfinite(synth[:m]), whole[:m])
    np.testing.assert_array_equal(np.isfinite(corr), whole)
    np.testing.assert_allclose(corr[whole], evaluation[whole], rtol=0, atol=1e-4)
    np.testing.assert_allclose(synth[:m][whole[:m]], evaluation[:m][whole[:m]], rtol=0, atol=1e-4)
    # partial footprints (nodata holes, off the raster): evaluation and the loss count the same
    # ones, at the same value
    np.testing.assert_array_equal(loss_counts, np.isfinite(evaluation))
    assert np.nanmax(gap) < 1e-3
    # and it is the rule stated once in data_catalog.gedi
    ref = footprint_percentiles(chm, transform, x, y, 95, min_valid_share=SHARE)
    np.testing.assert_array_equal(np.isfinite(ref), np.isfinite(evaluation))
    np.testing.assert_allclose(ref[np.isfinite(ref)], evaluation[np.isfinite(ref)], atol=1e-5)
    assert metrics["n_footprint_nodata"] == int((~np.isfinite(evaluation)).sum())


def test_partial_footprint_rule_by_hand():
    """A 3 m footprint (9 pixel centres at 1 m) on a 6×6 raster: pixels off the raster and NaN
    pixels are missing; the footprint counts when the valid ones are at least the share."""
    h = np.arange(36, dtype=np.float32).reshape(6, 6)
    t = Affine(1, 0, 0, 0, -1, 6)  # pixel (r, c) centre at (c + 0.5, 5.5 − r)
    centre = (2.5, 3.5)  # centre of pixel (2, 2)
    got = footprint_percentiles(h, t, [centre[0]], [centre[1]], 50, diameter_m=3.0)
    assert got[0] == pytest.approx(np.percentile(h[1:4, 1:4], 50))
    # 3 of 9 pixels NaN: counts at share 6/9, not at 7/9; the percentile is of the 6 valid ones
    h2 = h.copy()
    h2[1, 1:4] = np.nan
    assert footprint_percentiles(h2, t, [2.5], [3.5], 50, diameter_m=3.0,
                                 min_valid_share=6 / 9)[0] == pytest.approx(np.median(h[2:4, 1:4]))
    assert np.isnan(footprint_percentiles(h2, t, [2.5], [3.5], 50, diameter_m=3.0,
                                          min_valid_share=7 / 9)[0])
    # at the corner pixel (0, 0): 4 of its 9 pixels are on the raster
    corner = footprint_percentiles(h, t, [0.5], [5.5], (0, 100), diameter_m=3.0, min_valid_share=4 / 9)
    assert corner[0].tolist() == [0.0, 7.0]
    assert np.isnan(footprint_percentiles(h, t, [0.5], [5.5], 50, diameter_m=3.0,
                                          min_valid_share=5 / 9)[0])


def test_a_pixel_larger_than_the_footprint_is_the_footprint():
    """A 30 m map: no pixel centre within 12.5 m of a shot near a pixel corner, so the footprint
    is the pixel holding the shot (a coarse map can still be compared with GEDI)."""
    t = Affine(30, 0, 0, 0, -30, 90)
    h = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.float32)
    rows, cols, member = footprint_members([1.02], [1.02], t, 12.5)  # near pixel (1, 1)'s corner
    assert member.sum() == 1 and rows[member][0] == 1 and cols[member][0] == 1
    assert footprint_percentiles(h, t, [30.6], [59.4], 95)[0] == 5.0
    near_centre = footprint_percentiles(h, t, [45.0], [45.0], 95)  # centre of pixel (1, 1)
    assert near_centre[0] == 5.0


def test_the_same_shots_count_everywhere(abby, tmp_path):
    """One flag rule (data_catalog.gedi.flagged_usable): a shot with quality_flag 0 or
    degrade_flag 1 is left out by evaluation, by the correction's samples and by the training
    loss's per-chip shots alike."""
    import pandas as pd

    from canopy.train.datasets import _shots_array
    from canopy.train.gedi_samples import usable_shots

    chm, transform, crs = abby
    xs = transform.c + np.array([60.5, 120.5, 180.5, 200.5])
    ys = transform.f - np.array([60.5, 120.5, 180.5, 200.5])
    shots = gpd.GeoDataFrame({"rh95": [10.0, 20.0, 30.0, 40.0], "quality_flag": [1, 0, 1, 1],
                              "degrade_flag": [0, 0, 1, 0]},
                             geometry=gpd.points_from_xy(xs, ys), crs=crs).to_crs("EPSG:4326")
    kept = usable_shots(shots, "rh95")
    assert list(kept["rh95"]) == [10.0, 40.0]
    chip = pd.DataFrame({"px_row": [1.0] * 4, "px_col": [2.0] * 4, "rh95": shots["rh95"],
                         "quality_flag": shots["quality_flag"], "degrade_flag": shots["degrade_flag"]})
    assert list(_shots_array(chip, "rh95")[:, 2]) == [10.0, 40.0]
    path = tmp_path / "shots.parquet"
    shots.to_parquet(path)
    with rasterio.open(tmp_path / "chm.tif", "w", driver="GTiff", width=256, height=256, count=1,
                       dtype="float32", crs=crs, transform=transform, nodata=np.nan) as ds:
        ds.write(np.where(np.isfinite(chm), chm, 5.0).astype(np.float32), 1)
    with rasterio.open(tmp_path / "chm.tif") as src:
        metrics, _, rh = gedi_metrics(src, str(path), "chm.tif", EvaluationConfig())
    assert metrics["n_dropped_quality_flag"] == 2 and sorted(rh) == [10.0, 40.0]
