"""The raster helpers every layer uses: metres per degree, UTM zones, the CRS rule, the resampling
rule, window-independent warping and the one-line errors, on the real rasters in ../shared/data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Geod
from pyproj.aoi import AreaOfInterest
from pyproj.database import query_utm_crs_info
from rasterio.crs import CRS
from rasterio.enums import Resampling

from data_catalog import raster
from data_catalog.errors import RasterError
from tests.conftest import shared, write_raster

EVERGLADES = ("overhead_rgb", "drone_everglades_hd_output_4b.tif")  # RGBA drone ortho in EPSG:4326
KOOTENAY = ("rgb_chm_pairs", "kootenay_bc_drone", "kootenayOrtho_from_rda.tif")  # 0.5 m, EPSG:32611
OSBS = ("rgb_chm_pairs", "neon_osbs_029", "OSBS_029.tif")  # 0.1 m, nodata 255, EPSG:32617
OSBS_CHM = ("rgb_chm_pairs", "neon_osbs_029", "OSBS_029_CHM.tif")  # no CRS tag (EPSG:32617)

WGS84 = Geod(ellps="WGS84")


# --------------------------------------------------------------------------- metres per degree


@pytest.mark.parametrize("lat", [0.0, 25.8, 45.0, 60.0, 84.0, -33.9])
def test_metres_per_degree_is_the_geodesic_length(lat):
    d = 1e-4  # degrees: a long pixel
    per_lon, per_lat = raster.metres_per_degree(lat)
    _, _, along_parallel = WGS84.inv(10.0, lat, 10.0 + d, lat)
    _, _, along_meridian = WGS84.inv(10.0, lat - d / 2, 10.0, lat + d / 2)
    assert per_lon * d == pytest.approx(along_parallel, rel=1e-7)
    assert per_lat * d == pytest.approx(along_meridian, rel=1e-7)


def test_pixel_size_of_a_real_raster_in_degrees_is_its_ground_size():
    """The Everglades drone ortho (EPSG:4326, 25.8° N) has ground-square pixels of ≈ 8.5 mm; the
    spherical 111 320·cos φ for both axes made their height 7.7 mm."""
    with rasterio.open(shared(*EVERGLADES)) as ds:
        width_m, height_m = raster.pixel_size_m(ds.transform, ds.crs, ds.width, ds.height)
        lat = (ds.bounds.bottom + ds.bounds.top) / 2
        lon = (ds.bounds.left + ds.bounds.right) / 2
        _, _, across = WGS84.inv(ds.bounds.left, lat, ds.bounds.right, lat)
        _, _, down = WGS84.inv(lon, ds.bounds.bottom, lon, ds.bounds.top)
        assert width_m == pytest.approx(across / ds.width, rel=1e-6)
        assert height_m == pytest.approx(down / ds.height, rel=1e-6)
        assert width_m == pytest.approx(height_m, rel=1e-3) and 0.0084 < width_m < 0.0085
        assert raster.finest_pixel_m(ds) == pytest.approx(min(width_m, height_m))


def test_pixel_size_in_feet_and_metres(tmp_path):
    ft = write_raster(tmp_path / "ft.tif", np.zeros((3, 8, 8), np.uint8), crs="EPSG:2227",
                      transform=Affine(1.0, 0, 6_000_000, 0, -1.0, 2_000_000))
    with rasterio.open(ft) as ds:
        assert raster.pixel_size_m(ds.transform, ds.crs, 8, 8) == pytest.approx((0.3048006, 0.3048006))
        assert not raster.is_metric(ds.crs)
    with rasterio.open(shared(*KOOTENAY)) as ds:
        assert raster.pixel_size_m(ds.transform, ds.crs, ds.width, ds.height) == (0.5, 0.5)
        assert raster.is_metric(ds.crs)


# ---------------------------------------------------------------------------------------- UTM


def test_utm_zone_agrees_with_the_epsg_database_and_settles_its_edges():
    rng = np.random.default_rng(3)
    for lon, lat in zip(rng.uniform(-179.9, 179.9, 200), rng.uniform(-79.5, 83.5, 200)):
        if abs(lon / 6 - round(lon / 6)) < 1e-3 or abs(lat) < 1e-3:
            continue  # on an edge the database lists both zones
        (info,) = query_utm_crs_info(datum_name="WGS 84", area_of_interest=AreaOfInterest(lon, lat, lon, lat))
        assert raster.utm_epsg(lon, lat) == int(info.code), (lon, lat)
    # edges: a zone holds its western meridian, the equator is north, 180° is −180°
    assert raster.utm_epsg(-120.0, 35.0) == 32611
    assert raster.utm_epsg(3.0, 0.0) == 32631 and raster.utm_epsg(3.0, -1e-9) == 32731
    assert raster.utm_zone(180.0) == raster.utm_zone(-180.0) == 1 and raster.utm_zone(179.99) == 60
    for zone in range(1, 61):  # the bands the AOI splitter cuts are the zones of this rule
        west, east = raster.utm_zone_band(zone)
        assert raster.utm_zone(west) == raster.utm_zone(east - 1e-9) == zone


def test_rasters_in_degrees_and_feet_are_mapped_in_the_utm_zone_of_their_centre(tmp_path):
    with rasterio.open(shared(*EVERGLADES)) as ds:  # Florida, 80.84° W
        assert raster.utm_crs_for_bounds(ds.bounds, ds.crs) == CRS.from_epsg(32617)
        with pytest.warns(UserWarning, match="geographic coordinates; output is in EPSG:32617"):
            crs, transform, height, width = raster.grid_at_gsd(ds, ds.crs, 0.6)
    assert crs == CRS.from_epsg(32617) and transform.a == 0.6 and transform.e == -0.6


# ------------------------------------------------------------------------------------- the CRS


def test_a_files_own_crs_wins_and_an_override_fills_in_only_where_there_is_none():
    with rasterio.open(shared(*OSBS_CHM)) as ds:
        assert not ds.crs
        with pytest.raises(RasterError, match="OSBS_029_CHM.tif: file has no CRS; pass --crs"):
            raster.resolve_crs(ds.name, ds.crs, None)
        assert raster.resolve_crs(ds.name, ds.crs, "EPSG:32617") == CRS.from_epsg(32617)
        with pytest.raises(RasterError, match="--crs 'EPSG:999999': not a CRS"):
            raster.resolve_crs(ds.name, ds.crs, "EPSG:999999")
    with rasterio.open(shared(*KOOTENAY)) as ds:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert raster.resolve_crs(ds.name, ds.crs, "EPSG:32611") == ds.crs  # agrees: silent
            assert raster.resolve_crs(ds.name, ds.crs, "EPSG:4326") == ds.crs  # contradicts
        assert [str(w.message) for w in caught] == [
            f"{ds.name}: has CRS EPSG:32611; --crs EPSG:4326 applies only to files without one"]


def test_unreadable_rasters_are_one_line_errors_naming_the_file(tmp_path):
    text = tmp_path / "notes.tif"
    text.write_text("hello")
    for path, needle in ((tmp_path / "missing.tif", "missing.tif: cannot open as a raster (file does not"),
                         (text, "notes.tif: cannot open as a raster (")):
        with pytest.raises(RasterError) as err:
            raster.open_raster(path, "reference")
        assert needle in str(err.value) and str(err.value).startswith("reference ")
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ resampling


def test_resampling_rule():
    assert raster.resampling_for(0.1, 0.6, False) == Resampling.average
    assert raster.resampling_for(0.6, 0.6, True) == Resampling.nearest
    assert raster.resampling_for(0.6, 0.6, False) == Resampling.bilinear  # same size, off-lattice
    assert raster.resampling_for(0.6 * (1 - 1e-7), 0.6, False) == Resampling.bilinear  # float noise
    assert raster.resampling_for(1.0, 0.6, False) == Resampling.bilinear
    t = Affine(0.5, 0, 439689.0, 0, -0.5, 5526562.5)
    on = Affine(0.5, 0, 439600.0, 0, -0.5, 5526600.0)  # 178 and 75 pixels away: same lattice
    off = Affine(0.5, 0, 439600.2, 0, -0.5, 5526600.0)
    assert raster.grids_coincide(t, "EPSG:32611", on, "EPSG:32611")
    assert not raster.grids_coincide(t, "EPSG:32611", off, "EPSG:32611")
    assert not raster.grids_coincide(t, "EPSG:32611", on, "EPSG:32610")
    assert not raster.grids_coincide(t, "EPSG:32611", Affine(0.6, 0, 439600, 0, -0.6, 5526600), "EPSG:32611")


@pytest.mark.parametrize("rel,gsd,method", [
    (OSBS, 0.6, "average"),      # 0.1 m NEON onto the model's 0.6 m
    (KOOTENAY, 0.5, "none"),     # already there: its own grid, no warper
    (KOOTENAY, 0.25, "bilinear"),
])
def test_read_rgb_on_grid_applies_the_rule_to_real_imagery(rel, gsd, method):
    img = raster.read_rgb_on_grid(shared(*rel), gsd)
    assert img.resampling == method and img.rgb.dtype == np.uint8
    assert img.transform.a == pytest.approx(gsd) and img.valid.mean() > 0.9


def test_a_pixel_does_not_depend_on_the_window_it_is_read_in():
    """Exact warper tolerance: reprojecting the Everglades ortho (degrees → UTM) and averaging it,
    any window gives each pixel the value the whole grid gives it (GDAL's default approximate
    transformer changed ~30 pixels per window here)."""
    with rasterio.open(shared(*EVERGLADES)) as ds, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "in geographic coordinates"
        crs, t, h, w = raster.grid_at_gsd(ds, ds.crs, 0.02)
        whole, valid, method = raster.read_rgb(ds, crs, t, (h, w))
        assert method == "average" and valid.mean() > 0.5
        for r0, c0, hh, ww in [(h // 4, w // 4, h // 3, w // 3), (7, 13, h // 2, w // 2),
                               (h // 2, w // 3, h // 3, w // 2)]:
            part, part_valid, _ = raster.read_rgb(ds, crs, t * Affine.translation(c0, r0), (hh, ww))
            np.testing.assert_array_equal(part, whole[:, r0:r0 + hh, c0:c0 + ww])
            np.testing.assert_array_equal(part_valid, valid[r0:r0 + hh, c0:c0 + ww])


def test_pixels_without_data_read_as_zero():
    """NEON marks nodata with 255; the Kootenay ortho has no mask at all (the warper's alpha band
    says where the file ends). Either way a pixel without data is invalid and 0 in every band."""
    for rel in (OSBS, KOOTENAY):
        with rasterio.open(shared(*rel)) as ds:
            left, top = ds.bounds.left - 6.0, ds.bounds.top + 6.0  # a grid reaching past the file
            rgb, valid, method = raster.read_rgb(ds, ds.crs, Affine(0.6, 0, left, 0, -0.6, top),
                                                 (90, 90))
        assert method == "average" and 0.2 < valid.mean() < 0.9, rel
        assert (rgb[:, ~valid] == 0).all() and rgb[:, valid].mean() > 50


def test_rgb_bands_and_dtypes(tmp_path):
    bgr = tmp_path / "bgr.tif"
    with rasterio.open(bgr, "w", driver="GTiff", width=4, height=4, count=3, dtype="uint8",
                       crs="EPSG:32617", transform=Affine(1, 0, 0, 0, -1, 0)) as ds:
        ds.colorinterp = [rasterio.enums.ColorInterp.blue, rasterio.enums.ColorInterp.green,
                          rasterio.enums.ColorInterp.red]
    u16 = write_raster(tmp_path / "u16.tif", np.zeros((4, 4, 4), np.uint16))
    with rasterio.open(bgr) as ds:
        assert raster.rgb_bands(ds) == (3, 2, 1)
        assert raster.rgb_bands(ds, bands="1,2,3") == (1, 2, 3)
        with pytest.raises(RasterError, match="need three band numbers in 1..3"):
            raster.rgb_bands(ds, bands="1,2,4")
    with rasterio.open(u16) as ds:
        with pytest.raises(RasterError, match="u16.tif: holds uint16 data; .*--scale MIN MAX"):
            raster.check_rgb_dtype(ds, (1, 2, 3))
        raster.check_rgb_dtype(ds, (1, 2, 3), scale=(0, 3000))
        with pytest.raises(RasterError, match="MIN < MAX"):
            raster.check_rgb_dtype(ds, (1, 2, 3), scale=(10, 10))


def test_warp_average_needs_minimum_cover():
    src = np.full((4, 4), np.nan, np.float32)
    src[:2, :2] = [[1, 2], [3, 4]]  # one valid 2×2 block out of four
    src[2:, 2:] = [[5, np.nan], [np.nan, np.nan]]  # one valid pixel of its block
    t = Affine(1, 0, 0, 0, -1, 4)
    out = raster.warp_average(src, t, "EPSG:32617", (2, 2), Affine(2, 0, 0, 0, -2, 4),
                              "EPSG:32617", min_valid_fraction=0.5)
    assert out[0, 0] == pytest.approx(2.5)
    assert np.isnan(out[1, 1]) and np.isnan(out[0, 1]) and np.isnan(out[1, 0])
    half = raster.warp_average(src, t, "EPSG:32617", (2, 2), Affine(2, 0, 0, 0, -2, 4),
                               "EPSG:32617", min_valid_fraction=0.25)
    assert half[1, 1] == pytest.approx(5.0)
