"""Kinds that produce files: 'lidar' (a derived CHM per cloud) and 'gedi' (filtered shot partitions).

These use the real data_catalog.lidar and data_catalog.gedi; stubs (monkeypatch) only stand in
where a test needs a failure or a partition layout the real sample cannot give.
"""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import Point

from data_catalog import gedi, lidar
from data_catalog.catalog import Catalog
from data_catalog.chm import read_chm
from data_catalog.errors import CatalogError


# --- lidar --------------------------------------------------------------------------------------


def test_lidar_adds_the_cloud_and_its_derived_chm(shared_data, catalog_path, tmp_path):
    laz = shared_data.osbs_plot_laz
    catalog = Catalog.open(catalog_path)
    with pytest.raises(CatalogError, match="OSBS_029.laz: point cloud has no CRS; pass --crs"):
        catalog.add("lidar", [laz])

    chm_dir = tmp_path / "chm"
    rows = catalog.add("lidar", [laz], crs="EPSG:32617", chm_resolution=0.5, chm_dir=chm_dir)
    cloud, chm = sorted(rows, key=lambda r: r.kind, reverse=True)
    assert (cloud.kind, chm.kind) == ("lidar", "chm")
    assert cloud.path == str(laz) and cloud.crs == "EPSG:32617"
    assert cloud.extra_dict["point_count"] == 6515
    assert cloud.native_bounds == pytest.approx((404211.91, 3285102.95, 404251.91, 3285142.92), abs=0.01)
    assert chm.extra_dict["source"] == str(laz)
    assert chm.extra_dict["source_asset_id"] == cloud.asset_id
    assert cloud.extra_dict["derived_chm"] == chm.path
    assert chm.path.startswith(str(chm_dir.resolve()))
    assert (chm.crs, chm.res_x, chm.bands) == ("EPSG:32617", 0.5, 1)
    assert list(chm_dir.iterdir()) == [chm_dir / chm.path.rsplit("/", 1)[1]]  # no temporary files left

    heights, _, _ = read_chm(chm.path)
    assert 10 < np.nanmax(heights) < 16  # the plot's canopy is 0-15 m
    # The derived raster sits on the shipped plot CHM (same plot, same CRS once given).
    (shipped,) = catalog.add("chm", [shared_data.osbs_plot_chm], crs="EPSG:32617")
    overlap = chm.geometry.intersection(shipped.geometry).area / chm.geometry.union(shipped.geometry).area
    assert overlap > 0.9
    assert catalog.add("lidar", [laz], crs="EPSG:32617", chm_resolution=0.5, chm_dir=chm_dir) == []


def test_lidar_with_its_own_crs_and_a_new_resolution(shared_data, catalog_path, tmp_path):
    catalog = Catalog.open(catalog_path)
    laz = shared_data.mixed_conifer_laz
    first = catalog.add("lidar", [laz], chm_resolution=1.0, chm_dir=tmp_path)
    assert {r.crs for r in first} == {"EPSG:26912"}
    second = catalog.add("lidar", [laz], chm_resolution=2.0, chm_dir=tmp_path)
    # the cloud row is updated (new resolution) and a second CHM is derived next to the first
    assert sorted(r.kind for r in second) == ["chm", "lidar"]
    assert sorted(r.res_x for r in catalog.records() if r.kind == "chm") == [1.0, 2.0]
    assert (catalog.frame["kind"] == "lidar").sum() == 1


def test_lidar_that_cannot_give_heights_is_refused(shared_data, catalog_path, tmp_path):
    catalog = Catalog.open(catalog_path)
    with pytest.raises(CatalogError, match="no ground points"):
        catalog.add("lidar", [shared_data.cerrado_las], chm_dir=tmp_path / "chm")
    assert len(catalog) == 0
    assert list((tmp_path / "chm").iterdir()) == []


def test_failed_lidar_batch_leaves_no_derived_files(shared_data, catalog_path, tmp_path, monkeypatch):
    real = lidar.chm_from_las

    def fails_on_second(path, resolution, crs=None):
        if "MixedConifer" in str(path):
            raise CatalogError(f"{path}: simulated failure")
        return real(path, resolution, crs=crs)

    monkeypatch.setattr(lidar, "chm_from_las", fails_on_second)
    catalog = Catalog.open(catalog_path)
    with pytest.raises(CatalogError, match="simulated failure"), pytest.warns(UserWarning, match="applies only to files without one"):
        catalog.add("lidar", [shared_data.osbs_plot_laz, shared_data.mixed_conifer_laz], crs="EPSG:32617", chm_dir=tmp_path / "chm")
    assert len(catalog) == 0
    assert list((tmp_path / "chm").iterdir()) == []  # the first cloud's CHM was not left behind


# --- gedi ---------------------------------------------------------------------------------------


def test_gedi_adds_one_row_per_partition(shared_data, catalog_path, tmp_path):
    catalog = Catalog.open(catalog_path)
    rows = catalog.add("gedi", [shared_data.gedi_l2a], gedi_dir=tmp_path / "gedi")
    assert rows and {r.kind for r in rows} == {"gedi"}
    assert sum(r.extra_dict["n_shots"] for r in rows) == len(
        pd.concat([gpd.read_parquet(r.path) for r in rows])
    )
    report = rows[0].extra_dict["filter_report"]
    assert report["n_input"] == 301
    assert all(r.extra_dict["source"] == str(shared_data.gedi_l2a) for r in rows)
    assert all(r.start_datetime.startswith("2019-04-18") for r in rows)
    assert all(r.crs == "EPSG:4326" for r in rows)
    # the granule lies over Bahia, Brazil: lat -13.75..-13.72, lon -44.14..-44.11
    hits = catalog.query(geometry=Point(-44.125, -13.735).buffer(0.01), kinds="gedi")
    assert len(hits) >= 1
    assert catalog.add("gedi", [shared_data.gedi_l2a], gedi_dir=tmp_path / "gedi") == []


def test_gedi_filters_reach_the_ingest_and_stale_partitions_are_dropped(catalog_path, tmp_path, monkeypatch):
    """A re-ingest that writes fewer partitions (stricter filters) drops the rows of the others."""
    calls = []

    def fake_ingest(paths, out_dir, filters=None):
        calls.append(filters)
        cells = [(-14, -45), (-13, -45)] if filters is None else [(-14, -45)]
        written = []
        for lat, lon in cells:
            path = out_dir / f"lat_cell={lat}" / f"lon_cell={lon}" / "granule.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"{lat},{lon}".encode())
            written.append({
                "path": str(path), "bbox": (lon + 0.1, lat + 0.1, lon + 0.2, lat + 0.2), "n_shots": 5,
                "datetime_start": "2019-04-18T08:21:59Z", "datetime_end": "2019-04-18T08:22:00Z",
                "filter_report": {"n_input": 10}, "granule": "granule", "cell": (lat, lon),
            })
        return written

    monkeypatch.setattr(gedi, "ingest_gedi", fake_ingest)
    granule = tmp_path / "granule.h5"
    granule.write_bytes(b"stub")
    catalog = Catalog.open(catalog_path)
    assert len(catalog.add("gedi", [granule], gedi_dir=tmp_path / "out")) == 2
    strict = gedi.GediFilters.strict(power_beams_only=True)
    catalog.add("gedi", [granule], gedi_dir=tmp_path / "out", gedi_filters=strict)
    assert calls == [None, strict]
    assert [json.loads(e)["cell"] for e in catalog.frame["extra"]] == [[-14, -45]]


def test_hdf5_that_is_not_gedi_is_refused(catalog_path, tmp_path):
    import h5py  # a required dependency (pyproject.toml): a missing one is a broken install

    path = tmp_path / "not_gedi.h5"
    with h5py.File(path, "w") as handle:
        handle["temperature"] = np.arange(3)
    catalog = Catalog.open(catalog_path)
    with pytest.raises(CatalogError, match="not_gedi.h5"):
        catalog.add("gedi", [path], gedi_dir=tmp_path / "gedi")
    assert len(catalog) == 0
