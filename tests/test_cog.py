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
