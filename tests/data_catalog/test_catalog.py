"""The catalog itself: rows, idempotent adds, updates, queries, checks, schema versions, atomic saves."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from affine import Affine
from pyproj import Geod, Transformer
from rasterio.warp import transform_bounds
from shapely.geometry import MultiPolygon, Point, Polygon, box

from data_catalog import catalog as catalog_module
from data_catalog.catalog import Catalog, footprint_wgs84
from data_catalog.errors import CatalogError
from data_catalog.imagery import NonSquarePixelWarning
from data_catalog.schema import METADATA_KEY, SCHEMA_VERSION



def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_imagery_row_records_grid_crs_gsd_and_checksum(shared_data, catalog_path):
    sjer = shared_data.sjer_rgb
    catalog = Catalog.open(catalog_path)
    with pytest.warns(NonSquarePixelWarning, match="non-square"):
        (row,) = catalog.add("imagery", [sjer])

    assert row.kind == "imagery"
    assert row.path == str(sjer.resolve())
    assert row.asset_id == hashlib.sha256(str(sjer.resolve()).encode()).hexdigest()[:16]
    assert row.crs == "EPSG:32611"
    assert row.res_x == pytest.approx(0.100235, abs=1e-6)
    assert row.res_y == pytest.approx(0.0997475, abs=1e-6)
    assert (row.width, row.height, row.bands, row.dtype, row.nodata) == (400, 400, 3, "uint8", "255.0")
    assert row.native_bounds == pytest.approx((252645.951, 4107276.05, 252686.045, 4107315.949))
    assert row.checksum == f"sha256:{sha256_of(sjer)}"
    assert row.size == sjer.stat().st_size
    assert row.datetime is None
    assert [band["colorinterp"] for band in json.loads(row.band_info)] == ["red", "green", "blue"]
    assert row.extra_dict["gsd_m"] == pytest.approx(0.1, rel=0.01)
    assert row.schema_version == SCHEMA_VERSION


def test_same_file_twice_is_one_row_even_across_save_and_reload(shared_data, catalog_path, monkeypatch):
    soap = shared_data.soap_chm
    catalog = Catalog.open(catalog_path)
    assert len(catalog.add("chm", [soap])) == 1
    assert catalog.add("chm", [soap, soap]) == []
    monkeypatch.chdir(soap.parent)
    assert catalog.add("chm", [soap.name]) == []  # a relative path names the same asset
    catalog.save()

    reopened = Catalog.open(catalog_path)
    assert reopened.add("chm", [soap]) == []  # nanosecond mtimes survive the Parquet round trip
    assert reopened.frame["path"].tolist() == [str(soap)]


def test_directory_adds_its_rasters_once(shared_data, catalog_path):
    neon = shared_data.soap_chm.parent
    catalog = Catalog.open(catalog_path)
    added = catalog.add("chm", [neon])
    assert sorted(r.path for r in added) == sorted(str(p) for p in neon.glob("*.tif"))
    assert catalog.add("chm", [neon, str(neon / "*.tif")]) == []  # folder and (quoted) glob again
    assert len(catalog) == len(added) == 3


def test_patterns_give_only_files_of_the_kind(shared_data, catalog_path):
    bart = shared_data.bart_rgb
    catalog = Catalog.open(catalog_path)
    (row,) = catalog.add("imagery", [str(bart.parent / "*")])  # not the .aux.xml nor the .laz
    assert row.path == str(bart)
    (cloud, chm) = sorted(catalog.add("lidar", [str(bart.parent.parent / "**" / "BART_*")], chm_dir=catalog_path.parent), key=lambda r: r.kind, reverse=True)
    assert cloud.path == str(bart.with_suffix(".laz")) and chm.kind == "chm"


def test_changed_file_updates_its_row(shared_data, catalog_path, copy_data):
    chm = copy_data(shared_data.duc_chm)
    catalog = Catalog.open(catalog_path)
    (first,) = catalog.add("chm", [chm], crs="EPSG:31981")
    with rasterio.open(chm, "r+") as ds:  # same size, new content
        heights = ds.read(1)
        heights[0, 0] = 99.0
        ds.write(heights, 1)

    (second,) = catalog.add("chm", [chm], crs="EPSG:31981")
    assert second.asset_id == first.asset_id
    assert second.checksum != first.checksum
    assert second.checksum == f"sha256:{sha256_of(chm)}"
    assert len(catalog) == 1
    assert catalog.frame.loc[0, "checksum"] == second.checksum


def test_query_by_bbox_geometry_and_kind(shared_data, catalog_path):
    soap, osbs, abby, sjer = shared_data.soap_chm, shared_data.osbs_tile_chm, shared_data.abby_chm, shared_data.sjer_rgb
    catalog = Catalog.open(catalog_path)
    catalog.add("chm", [soap, osbs, abby])
    with pytest.warns(NonSquarePixelWarning):
        catalog.add("imagery", [sjer])

    california = (-124.5, 32.5, -114.1, 42.0)
    assert sorted(catalog.query(bbox=california)["path"]) == sorted([str(soap), str(sjer)])
    assert catalog.frame.has_sindex  # the query went through the STRtree
    assert catalog.query(bbox=california, kinds=["chm"])["path"].tolist() == [str(soap)]
    assert catalog.query(bbox=california, kinds="imagery")["path"].tolist() == [str(sjer)]

    lon, lat = Transformer.from_crs("EPSG:32617", "EPSG:4326", always_xy=True).transform(399500, 3284500)
    assert catalog.query(geometry=Point(lon, lat))["path"].tolist() == [str(osbs)]
    assert catalog.query(geometry={"type": "Point", "coordinates": [lon, lat]})["path"].tolist() == [str(osbs)]
    # geometry and bbox together: both must hold
    assert catalog.query(geometry=Point(lon, lat).buffer(0.1), bbox=california).empty
    assert catalog.query(bbox=(0, 0, 1, 1)).empty
    assert len(catalog.query()) == 4

    with pytest.raises(CatalogError, match="bbox"):
        catalog.query(bbox=(10, 0, 0, 1))
    with pytest.raises(CatalogError, match="kind 'trees'"):
        catalog.query(kinds=["trees"])


def test_check_reports_deleted_moved_and_changed_files(shared_data, catalog_path, copy_data, tmp_path):
    deleted = copy_data(shared_data.duc_chm)
    moved = copy_data(shared_data.kootenay_chm)
    edited = copy_data(shared_data.osbs_plot_chm)
    untouched = copy_data(shared_data.soap_chm)
    catalog = Catalog.open(catalog_path)
    catalog.add("chm", [deleted, edited], crs="EPSG:31981")
    catalog.add("chm", [moved, untouched])
    catalog.save()
    assert Catalog.open(catalog_path).check() == []

    deleted.unlink()
    shutil.move(moved, tmp_path / "elsewhere.tif")
    stat = edited.stat()
    data = bytearray(edited.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    edited.write_bytes(bytes(data))

    problems = {p.path: p for p in Catalog.open(catalog_path).check()}
    assert set(problems) == {str(deleted), str(moved), str(edited)}
    assert problems[str(deleted)].problem == "missing"
    assert problems[str(moved)].problem == "missing"
    assert "moved or deleted" in str(problems[str(moved)])
    assert problems[str(edited)].problem == "changed"

    # An edit that restores the old mtime is only found by re-hashing everything.
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert str(edited) not in {p.path for p in Catalog.open(catalog_path).check()}
    assert str(edited) in {p.path for p in Catalog.open(catalog_path).check(full=True)}


def test_catalog_from_newer_schema_is_refused(shared_data, catalog_path):
    catalog = Catalog.open(catalog_path)
    catalog.add("chm", [shared_data.soap_chm])
    catalog.save()
    table = pq.read_table(catalog_path)
    metadata = dict(table.schema.metadata)
    assert json.loads(metadata[METADATA_KEY])["schema_version"] == SCHEMA_VERSION
    metadata[METADATA_KEY] = json.dumps({"schema_version": SCHEMA_VERSION + 1}).encode()
    pq.write_table(table.replace_schema_metadata(metadata), catalog_path)

    with pytest.raises(CatalogError, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade"):
        Catalog.open(catalog_path)


def test_parquet_that_is_not_a_catalog_is_refused(tmp_path):
    other = tmp_path / "other.parquet"
    pq.write_table(pq.read_table(_tiny_parquet(tmp_path)), other)
    with pytest.raises(CatalogError, match="not a canopy catalog"):
        Catalog.open(other)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("not parquet")
    with pytest.raises(CatalogError, match="not a readable Parquet"):
        Catalog.open(garbage)


def _tiny_parquet(tmp_path):
    import pyarrow as pa

    path = tmp_path / "tiny.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), path)
    return path


def test_failed_add_changes_nothing(shared_data, catalog_path):
    catalog = Catalog.open(catalog_path)
    catalog.add("chm", [shared_data.soap_chm])
    before = catalog.frame.copy()

    with pytest.raises(CatalogError, match="RGB"):
        catalog.add("chm", [shared_data.abby_chm, shared_data.osbs_plot_rgb])
    # ABBY came before the bad file and was fine, but is not added either
    assert catalog.frame.drop(columns="geometry").equals(before.drop(columns="geometry"))


def test_interrupted_save_keeps_the_old_file(shared_data, catalog_path, monkeypatch):
    catalog = Catalog.open(catalog_path)
    catalog.add("chm", [shared_data.soap_chm])
    catalog.save()
    before = catalog_path.read_bytes()
    catalog.add("chm", [shared_data.abby_chm])

    real_write = catalog_module.pq.write_table

    def broken_write(table, where, **kwargs):
        if not isinstance(where, (str, os.PathLike)):
            return real_write(table, where, **kwargs)  # the in-memory encode step
        with open(where, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(catalog_module.pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        catalog.save()
    assert catalog_path.read_bytes() == before
    assert [p.name for p in catalog_path.parent.iterdir()] == [catalog_path.name]  # no temp file left


def test_missing_inputs_are_one_line_errors(shared_data, catalog_path, tmp_path):
    catalog = Catalog.open(catalog_path)
    with pytest.raises(CatalogError, match="no such file"):
        catalog.add("imagery", [tmp_path / "nope.tif"])
    with pytest.raises(CatalogError, match="pattern matches no .tif"):
        catalog.add("imagery", [str(tmp_path / "*.tif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogError, match="directory has no"):
        catalog.add("imagery", [tmp_path / "empty"])
    with pytest.raises(CatalogError, match="kind 'trees'"):
        catalog.add("trees", [shared_data.soap_chm])


def test_soap_footprint_contains_its_centre_and_has_the_right_area(shared_data, catalog_path):
    soap = shared_data.soap_chm
    (row,) = Catalog.open(catalog_path).add("chm", [soap])

    to_lonlat = Transformer.from_crs("EPSG:32611", "EPSG:4326", always_xy=True)
    centre = Point(to_lonlat.transform(302500, 4100500))
    assert row.geometry.contains(centre)
    assert -119.23 < centre.x < -119.21 and 37.02 < centre.y < 37.04  # Sierra Nevada, California
    with rasterio.open(soap) as ds:
        expected_bounds = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)
    assert row.geometry.bounds == pytest.approx(expected_bounds, abs=1e-7)
    area_m2, _ = Geod(ellps="WGS84").geometry_area_perimeter(row.geometry)
    # 1 km x 1 km of UTM grid, shrunk by the zone's scale factor (k ~ 1.0001 at 198 km from the meridian)
    assert abs(area_m2) == pytest.approx(1e6, rel=1e-3)


def test_footprint_follows_curved_edges_of_large_rasters():
    # 1000 km of UTM zone 33N at 60 N: lines of constant northing bow in lon/lat.
    native = box(0, 6_600_000, 1_000_000, 6_700_000)
    footprint = footprint_wgs84(native, rasterio.crs.CRS.from_epsg(32633))
    to_lonlat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    top_middle = Point(to_lonlat.transform(500_000, 6_700_000))
    corners_only = Polygon([to_lonlat.transform(x, y) for x, y in native.exterior.coords])
    assert footprint.boundary.distance(top_middle) < 1e-3
    assert corners_only.boundary.distance(top_middle) > 0.1  # the 4-corner polygon misses the bulge
    assert len(footprint.exterior.coords) > 5


def test_footprint_across_the_antimeridian_is_split_and_found_on_both_sides(tmp_path, catalog_path):
    path = tmp_path / "fiji.tif"
    # UTM 60S: easting 650-950 km at ~17 S straddles 180 degrees.
    with rasterio.open(
        path, "w", driver="GTiff", width=30, height=10, count=1, dtype="float32",
        crs="EPSG:32760", transform=Affine(10_000, 0, 650_000, 0, -10_000, 8_150_000),
    ) as ds:
        ds.write(np.ones((1, 10, 30), dtype="float32"))
    catalog = Catalog.open(catalog_path)
    (row,) = catalog.add("chm", [path])
    assert isinstance(row.geometry, MultiPolygon)
    assert len(catalog.query(bbox=(179.5, -18, 179.9, -17))) == 1
    assert len(catalog.query(bbox=(-179.9, -18, -179.5, -17))) == 1
    assert catalog.query(bbox=(0, -18, 1, -17)).empty  # not a band around the whole globe


def test_catalog_modules_import_neither_torch_nor_canopy():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, data_catalog.catalog, data_catalog.stac, data_catalog.cli, data_catalog.chm, data_catalog.imagery; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'canopy')); "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
