"""Imagery and CHM readers: CRS rules, pixel shape, acquisition dates, kind checks, nodata as NaN."""

from __future__ import annotations

import shutil
import warnings
from datetime import datetime, timezone

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from data_catalog.catalog import Catalog
from data_catalog.chm import describe_chm, heights_with_nan, read_chm
from data_catalog.errors import CatalogError
from data_catalog.imagery import NonSquarePixelWarning, acquisition_time, describe_imagery, parse_datetimes


def write_tif(path, data, **profile):
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    base = dict(
        driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype.name,
        crs="EPSG:32617", transform=Affine(1, 0, 400_000, 0, -1, 3_280_000),
    )
    base.update(profile)
    with rasterio.open(path, "w", **base) as ds:
        ds.write(data)
    return path


# --- imagery ------------------------------------------------------------------------------------


def test_non_square_pixels_warn_and_square_ones_do_not(shared_data):
    with pytest.warns(NonSquarePixelWarning, match=r"0\.100235 x 0\.0997475"):
        sjer = describe_imagery(str(shared_data.sjer_rgb))
    assert sjer.res_x == pytest.approx(0.100235, abs=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonSquarePixelWarning)
        osbs = describe_imagery(str(shared_data.osbs_plot_rgb))
    assert osbs.res_x == osbs.res_y == pytest.approx(0.1)
    assert osbs.crs_text == "EPSG:32617"


def test_a_chm_is_acceptable_imagery(shared_data, catalog_path):
    (row,) = Catalog.open(catalog_path).add("imagery", [shared_data.soap_chm])
    assert (row.kind, row.bands, row.dtype) == ("imagery", 1, "float32")


def test_neon_flight_dates_in_tiff_datetime_become_a_range(shared_data, catalog_path):
    catalog = Catalog.open(catalog_path)
    osbs, abby, soap = catalog.add("chm", [shared_data.osbs_tile_chm, shared_data.abby_chm, shared_data.soap_chm])
    # "Flown on 2018091513, 2018100513, 2018101214, 2018101215"
    assert (osbs.datetime, osbs.start_datetime, osbs.end_datetime) == (
        "2018-09-15T13:00:00Z", "2018-09-15T13:00:00Z", "2018-10-12T15:00:00Z",
    )
    # "Flown on 2018071415-P3C1"
    assert abby.start_datetime == abby.end_datetime == "2018-07-14T15:00:00Z"
    assert soap.datetime is None  # no date tag at all


def test_acquisition_tags_win_over_tiff_datetime(tmp_path, shared_data):
    path = shutil.copy(shared_data.osbs_plot_rgb, tmp_path / "tagged.tif")
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(TIFFTAG_DATETIME="2021:06:30 10:11:12")
    assert describe_imagery(str(path)).acquisition.start == datetime(2021, 6, 30, 10, 11, 12, tzinfo=timezone.utc)
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(ACQUISITION_DATE="2019-05-02")
    when = describe_imagery(str(path)).acquisition
    assert when.start == when.end == datetime(2019, 5, 2, tzinfo=timezone.utc)


def test_date_parsing_ignores_numbers_that_are_not_dates():
    assert parse_datetimes("serial 20181399 and 12SEN311") == []
    assert parse_datetimes("2020-02-29T23:59:58Z") == [datetime(2020, 2, 29, 23, 59, 58, tzinfo=timezone.utc)]
    assert acquisition_time({"TIFFTAG_SOFTWARE": "LAStools version 180728"}) is None


def test_rasters_without_georeferencing_or_not_rasters_are_refused(tmp_path):
    plain = write_tif(tmp_path / "plain.tif", np.zeros((4, 4), "float32"), crs=None, transform=Affine.identity())
    with pytest.raises(CatalogError, match="not georeferenced"):
        describe_imagery(str(plain))
    text = tmp_path / "notes.tif"
    text.write_text("hello")
    with pytest.raises(CatalogError, match="notes.tif: cannot open as a raster"):
        describe_imagery(str(text))


# --- CHM kind checks and CRS ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["osbs_plot_rgb", "kootenay_rgb"])
def test_rgb_given_as_chm_is_refused(shared_data, catalog_path, name):
    with pytest.raises(CatalogError, match="3 uint8 bands, which is RGB imagery"):
        Catalog.open(catalog_path).add("chm", [getattr(shared_data, name)])


def test_multiband_float_chm_is_refused(tmp_path):
    path = write_tif(tmp_path / "two.tif", np.zeros((2, 3, 3), "float32"))
    with pytest.raises(CatalogError, match="1 band, this raster has 2"):
        describe_chm(str(path))


def test_missing_crs_is_refused_and_crs_option_accepted(shared_data, catalog_path):
    catalog = Catalog.open(catalog_path)
    with pytest.raises(CatalogError, match="OSBS_029_CHM.tif: file has no CRS; pass --crs"):
        catalog.add("chm", [shared_data.osbs_plot_chm])
    assert len(catalog) == 0

    (chm,) = catalog.add("chm", [shared_data.osbs_plot_chm], crs="EPSG:32617")
    assert chm.crs == "EPSG:32617"
    assert chm.extra_dict["crs_source"] == "override"
    # The plot CHM and its RGB are co-registered: with the right CRS their footprints coincide.
    (rgb,) = catalog.add("imagery", [shared_data.osbs_plot_rgb])
    overlap = chm.geometry.intersection(rgb.geometry).area / rgb.geometry.area
    assert overlap > 0.98


def test_crs_option_does_not_override_a_files_own_crs(shared_data, catalog_path):
    with pytest.warns(UserWarning, match="has CRS EPSG:32611; --crs EPSG:4326 applies only to files without one"):
        (row,) = Catalog.open(catalog_path).add("chm", [shared_data.soap_chm], crs="EPSG:4326")
    assert row.crs == "EPSG:32611"


def test_bad_crs_option_is_a_one_line_error(shared_data, catalog_path):
    with pytest.raises(CatalogError, match="--crs 'EPSG:999999'"):
        Catalog.open(catalog_path).add("chm", [shared_data.duc_chm], crs="EPSG:999999")


# --- nodata variants ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "crs", "n_nan", "max_height"),
    [
        ("soap_chm", None, 0, 54.72),  # -9999 declared, none present
        ("abby_chm", None, 383_438, 50.738),  # NaN cells under a -9999 declaration
        ("duc_chm", "EPSG:31981", 0, 51.19),  # NaN declared
        ("osbs_plot_chm", "EPSG:32617", 175, 14.801),  # float32 low -3.4e38
        ("kootenay_chm", None, 6_814, 13.491),  # float64 low -1.7e308
    ],
)
def test_every_nodata_variant_reads_as_nan(shared_data, name, crs, n_nan, max_height):
    heights, transform, chm_crs = read_chm(str(getattr(shared_data, name)), crs=crs)
    assert heights.dtype == np.float32
    assert int(np.isnan(heights).sum()) == n_nan
    assert np.nanmin(heights) >= -0.01  # no sentinel left
    assert float(np.nanmax(heights)) == pytest.approx(max_height, abs=1e-3)
    assert chm_crs is not None and transform.a > 0


def test_undeclared_sentinels_and_scaled_integers(tmp_path):
    raw = np.array([[1.5, -9999.0], [np.inf, 3.0]], dtype="float32")
    heights = heights_with_nan(raw, nodata=None)
    assert np.isnan(heights).tolist() == [[False, True], [True, False]]

    decimetres = write_tif(tmp_path / "dm.tif", np.array([[125, 65535]], dtype="uint16"), nodata=65535)
    with rasterio.open(decimetres, "r+") as ds:
        ds.scales, ds.offsets = (0.1,), (0.0,)
    heights, _, _ = read_chm(str(decimetres))
    assert heights[0, 0] == pytest.approx(12.5)
    assert np.isnan(heights[0, 1])


def test_read_chm_window_and_bounds(shared_data):
    soap = str(shared_data.soap_chm)
    full, _, _ = read_chm(soap)
    window, transform, crs = read_chm(soap, bounds=(302100, 4100800, 302200, 4100900))
    assert window.shape == (100, 100)
    assert (transform.c, transform.f) == (302100, 4100900)
    assert crs.to_epsg() == 32611
    np.testing.assert_array_equal(window, full[100:200, 100:200])

    # half outside the tile: the outside half is NaN, not zeros or -9999
    edge, transform, _ = read_chm(soap, bounds=(302950, 4100000, 303050, 4100100))
    assert edge.shape == (100, 100)
    assert np.isnan(edge[:, 50:]).all() and not np.isnan(edge[:, :50]).any()

    by_window, _, _ = read_chm(soap, window=Window(10, 20, 5, 4))
    np.testing.assert_array_equal(by_window, full[20:24, 10:15])


def test_read_chm_needs_a_crs_for_files_without_one(shared_data):
    with pytest.raises(CatalogError, match="no CRS"):
        read_chm(str(shared_data.duc_chm))
    _, _, crs = read_chm(str(shared_data.duc_chm), crs="EPSG:31981")
    assert crs.to_epsg() == 31981
