"""``canopy.xarray.predict``: heights of a DataArray, lazily, equal to ``canopy predict`` on a
GeoTIFF of the same pixels, whatever the chunking (real NEON RGB at the model's GSD)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine

from canopy.errors import OptionError
from tests.conftest import shared

OSBS = ("rgb_chm_pairs", "neon_osbs_029", "OSBS_029.tif")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """OSBS_029's real pixels given the micro model's 0.6 m pixels (a 240 m scene), with a
    nodata corner, as a GeoTIFF."""
    path = tmp_path_factory.mktemp("xr") / "scene.tif"
    with rasterio.open(shared(*OSBS)) as src:
        rgb = src.read([1, 2, 3])
    rgb[:, :60, :80] = 255  # nodata, as the source marks it
    with rasterio.open(path, "w", driver="GTiff", width=400, height=400, count=3, dtype="uint8",
                       crs="EPSG:32617", transform=Affine(0.6, 0, 403200.0, 0, -0.6, 3285600.0),
                       nodata=255) as dst:
        dst.write(rgb)
    return path


def test_heights_equal_canopy_predict_on_the_same_pixels_whatever_the_chunks(scene, tmp_path):
    import rioxarray  # noqa: F401 - the .rio accessor

    from canopy.predict.options import PredictOptions
    from canopy.predict.raster import predict_raster
    from canopy.model.checkpoints import load_model
    from canopy.xarray import predict

    out = predict_raster(scene, tmp_path / "one.tif", load_model("micro"),
                         PredictOptions(precision="fp32", batch_size=8))
    with rasterio.open(out) as ds:
        want = ds.read(1)
        assert ds.transform == rasterio.open(scene).transform  # same grid
    da = rioxarray.open_rasterio(scene, chunks={"x": 128, "y": 128})
    for chunk in (96, 160):
        heights = predict(da, "micro", chunk=chunk, precision="fp32", batch_size=8)
        assert heights.dims == ("y", "x") and heights.shape == want.shape
        assert heights.chunks[0][0] == chunk  # lazy, in chunks
        got = heights.compute().values
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(got, want)
    assert np.isnan(got[:60, :80]).all() and np.isfinite(got[100:, 100:]).mean() > 0.9


def test_a_dataarray_at_another_gsd_or_without_crs_is_refused(scene):
    import rioxarray

    from canopy.xarray import predict

    da = rioxarray.open_rasterio(scene)
    with pytest.raises(OptionError, match="resample it first"):
        predict(da.coarsen(x=2, y=2).mean().astype("uint8"), "micro")
    bare = da.drop_vars("spatial_ref")
    bare.attrs.clear()
    with pytest.raises(OptionError, match="no CRS"):
        predict(bare, "micro")
