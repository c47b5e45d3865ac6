"""The one COG writer (canopy/io/cog.py): what QGIS shows at small scales is the average of the
heights, never a resampling artefact."""

from __future__ import annotations

import numpy as np
import rasterio

from canopy.io.cog import write_cog


def test_overviews_are_the_mean_of_the_heights_and_never_negative(tmp_path):
    """README: "overviews averaged (AVERAGE; GDAL's default CUBIC gives negative heights)".

    A map of sharp height steps (bare ground at 0 m beside 30 m stands, single 40 m crowns) with
    a nodata hole, written as a COG: its first overview must equal the mean of each 2×2 block
    of valid pixels (nodata left out, a block with no valid pixel stays nodata) and hold no
    negative height. Guards against: overview resampling CUBIC (rings to -1.6 m beside the
    steps), NEAREST or BILINEAR instead of AVERAGE in canopy/io/cog.py, and nodata averaged in
    as 0 m."""
    h, w = 1024, 1030
    heights = np.zeros((h, w), np.float32)
    heights[:, 517:] = 30.0          # a stand edge through the middle of 2×2 blocks
    heights[301:, :] += 5.0          # and a row step, also mid-block
    heights[100:900:37, 50:450:41] = 40.0  # single-pixel crowns on bare ground
    heights[600:700, 200:260] = np.nan     # nodata, block-aligned ...
    heights[800:803, 601:604] = np.nan     # ... and cutting through 2×2 blocks
    path = write_cog(tmp_path / "steps.tif", heights, crs="EPSG:32617",
                     transform=rasterio.Affine(0.6, 0, 400000.0, 0, -0.6, 3280000.0),
                     nodata=float("nan"), qml=False)

    blocks = heights.reshape(h // 2, 2, w // 2, 2)
    n_valid = np.isfinite(blocks).sum(axis=(1, 3))
    expected = np.where(n_valid > 0, np.nansum(blocks, axis=(1, 3)) / np.maximum(n_valid, 1),
                        np.nan)
    with rasterio.open(path) as ds:
        factors = ds.overviews(1)
    assert factors[0] == 2
    levels = []
    for i in range(len(factors)):
        with rasterio.open(path, overview_level=i) as ov:
            levels.append(ov.read(1))
    assert levels[0].shape == (h // 2, w // 2)
    np.testing.assert_array_equal(np.isnan(levels[0]), np.isnan(expected))
    np.testing.assert_allclose(levels[0], expected, atol=1e-4, equal_nan=True)
    for level in levels:  # every scale QGIS may show
        assert np.nanmin(level) >= 0.0 and np.nanmax(level) <= 45.0


def test_compressing_with_every_core_writes_the_same_bytes(tmp_path):
    """One-raster prediction compresses with all cores (its COG's finishing was 70 % of a GPU
    run); the file must be the same bytes as one compressed by one thread, staged on disk or
    in memory (whose pixels must agree too)."""
    from canopy.io.cog import cog_writer

    rng = np.random.default_rng(0)
    heights = (np.cumsum(rng.normal(size=(1500, 1300)), axis=1) % 40).astype(np.float32)
    files = {}
    for threads, staged in ((1, False), ("ALL_CPUS", False), (1, True), ("ALL_CPUS", True)):
        path = tmp_path / f"{threads}_{staged}.tif"
        with cog_writer(path, width=1300, height=1500, count=1, dtype="float32",
                        crs="EPSG:32617", transform=rasterio.Affine(0.6, 0, 4e5, 0, -0.6, 3.28e6),
                        nodata=float("nan"), descriptions=["canopy_height"], qml=False,
                        stage_on_disk=staged, threads=threads) as dst:
            for r0 in range(0, 1500, 700):  # in windows, as predict_raster writes
                dst.write(heights[r0:r0 + 700], 1, window=rasterio.windows.Window(0, r0, 1300,
                                                                                   min(700, 1500 - r0)))
        files[threads, staged] = path
    for staged in (False, True):
        assert files[1, staged].read_bytes() == files["ALL_CPUS", staged].read_bytes()
    for level in (None, 0, 1):  # full resolution and the overviews
        with rasterio.open(files[1, False], overview_level=level) as a, \
                rasterio.open(files[1, True], overview_level=level) as b:
            np.testing.assert_array_equal(a.read(), b.read())
