"""GEDI L2A reading, filtering and GeoParquet partitions, on the real V001 subset and modified copies."""

from __future__ import annotations

import shutil
from pathlib import Path

import geopandas as gpd
import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from data_catalog.errors import CatalogError
from data_catalog.gedi import GediFilters, filter_shots, ingest_gedi, read_gedi_l2a, shots_in_bbox
from tests.conftest import shared

GRANULE = "GEDI02_A_2019108080338_O01964_T05337_02_001_01_sub.h5"


def sample() -> Path:
    return shared("gedi", "rgedi_sub_2019108", GRANULE)


def test_real_v001_subset_reads_all_beams_and_fields():
    shots = read_gedi_l2a(sample())
    assert len(shots) == 301
    assert sorted(shots["beam"].unique()) == ["BEAM0001", "BEAM0010", "BEAM0011", "BEAM0101", "BEAM0110", "BEAM1000", "BEAM1011"]
    assert shots["shot_number"].dtype == np.uint64 and shots["shot_number"].is_unique
    assert shots.crs.to_epsg() == 4326
    assert shots.groupby("beam_type").size().to_dict() == {"coverage": 16 + 37 + 60, "power": 73 + 61 + 38 + 16}
    assert shots["rh98"].min() == pytest.approx(2.88, abs=0.01) and shots["rh98"].max() == pytest.approx(10.90, abs=0.01)
    profile = np.stack(shots["rh"].to_numpy())
    assert profile.shape == (301, 101)
    np.testing.assert_array_equal(profile[:, 98], shots["rh98"].to_numpy())
    assert (shots["rh100"] >= shots["rh50"]).all()
    np.testing.assert_allclose(shots.geometry.y, shots["lat_lowestmode"])
    assert shots["lat_lowestmode"].between(-13.7501, -13.7201).all()
    # delta_time counts from 2018-01-01 UTC; the granule name says 2019, day 108 (April 18), 08:03 start.
    assert shots["acquisition_time"].min().strftime("%Y-%m-%d %H") == "2019-04-18 08"
    assert (shots["solar_elevation"] < 0).all()  # a night pass
    for column in ("quality_flag", "degrade_flag", "surface_flag", "sensitivity", "elev_lowestmode", "digital_elevation_model"):
        assert shots[column].notna().all(), column


def test_default_and_strict_filters_on_the_real_subset():
    shots = read_gedi_l2a(sample())
    kept, report = filter_shots(shots, GediFilters())
    assert len(kept) == report.n_remaining == 301 and sum(report.removed.values()) == 0
    # docs/geo_conventions.md: coverage beams pass sensitivity > 0.95 for 0/16, 20/37, 39/60 shots,
    # power beams for all of them.
    kept, report = filter_shots(shots, GediFilters.strict())
    assert report.removed["0.95 <= sensitivity <= 1"] == 16 + 17 + 21
    assert (kept["beam_type"] == "power").sum() == 188
    assert GediFilters.tropics().min_sensitivity == 0.98


def _modified_copy(tmp_path: Path) -> Path:
    """A copy of the sample with known bad shots planted in BEAM0101 (73 shots, a power beam)."""
    path = tmp_path / GRANULE
    shutil.copy(sample(), path)
    with h5py.File(path, "r+") as h5:
        b = h5["BEAM0101"]
        b["quality_flag"][0:5] = 0  # 5 bad quality
        b["degrade_flag"][3:8] = 1  # 3 new (3, 4 already failed quality)
        b["surface_flag"][10:12] = 0  # 2
        b["sensitivity"][20:24] = np.float32(0.5)  # 4 low
        b["sensitivity"][24] = np.float32(1.2)  # 1 impossible (> 1)
        elev = b["elev_lowestmode"][()]
        elev[30:33] = b["digital_elevation_model"][30:33] + 400  # 3 far from the DEM
        b["elev_lowestmode"][()] = elev
        b["solar_elevation"][40:46] = np.float32(35.0)  # 6 daytime
    return path


def test_each_filter_removes_exactly_what_it_should(tmp_path):
    shots = read_gedi_l2a(_modified_copy(tmp_path))
    assert len(shots) == 301
    kept, report = filter_shots(shots, GediFilters(night_only=True))
    assert report.removed == {
        "quality_flag == 1": 5,
        "degrade_flag == 0": 3,
        "surface_flag == 1": 2,
        "0.9 <= sensitivity <= 1": 5,
        "|elev_lowestmode - dem| < 150 m": 3,
        "night only (solar_elevation < 0)": 6,
    }
    assert report.n_input == 301 and report.n_remaining == 301 - 24 == len(kept)
    assert (kept["quality_flag"] == 1).all() and (kept["degrade_flag"] == 0).all()
    # Every filter can be switched off.
    kept, report = filter_shots(shots, GediFilters.none())
    assert len(kept) == 301 and report.removed == {}
    kept, report = filter_shots(shots, GediFilters(quality_flag=False, min_sensitivity=None))
    assert report.removed["degrade_flag == 0"] == 5 and "quality_flag == 1" not in report.removed
    kept, report = filter_shots(shots, GediFilters(power_beams_only=True))
    assert report.removed["power beams only"] == 113


def _write_v002_like(path: Path, n: int = 50, lat0: float = 10.2, lon0: float = -0.3) -> Path:
    """A small granule in a V002-like layout: BEAM0000 present, float32 rh, no surface_flag,
    one beam without a description attribute, and land-cover fields. Shots straddle lon 0."""
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as h5:
        h5.attrs["short_name"] = np.array([b"GEDI_L2A"], dtype=object)
        for k, (name, description) in enumerate([("BEAM0000", "Coverage beam"), ("BEAM0101", None)]):
            g = h5.create_group(name)
            if description:
                g.attrs["description"] = np.array([description.encode()], dtype=object)
            g["shot_number"] = np.arange(n, dtype=np.uint64) + 10**17 * (k + 1)
            g["lat_lowestmode"] = lat0 + np.linspace(0, 0.5, n)
            g["lon_lowestmode"] = lon0 + np.linspace(0, 0.6, n)
            rh = np.sort(rng.uniform(0, 30, (n, 101)).astype(np.float32), axis=1)
            g["rh"] = rh
            g["quality_flag"] = np.ones(n, np.uint8)
            g["degrade_flag"] = np.zeros(n, np.uint8)
            g["sensitivity"] = np.full(n, 0.97, np.float32)
            g["elev_lowestmode"] = np.full(n, 100, np.float32)
            g["digital_elevation_model"] = np.full(n, 101, np.float32)
            g["delta_time"] = 1.9e8 + np.arange(n, dtype=np.float64)
            g.create_group("land_cover_data")["pft_class"] = np.full(n, 2, np.uint8)
    return path


def test_v002_like_layout_is_read_tolerantly(tmp_path):
    shots = read_gedi_l2a(_write_v002_like(tmp_path / "GEDI02_A_2024001000000_O00001_01_T00001_02_004_01_V002.h5"))
    assert len(shots) == 100 and set(shots["beam"]) == {"BEAM0000", "BEAM0101"}
    assert shots.set_index("beam")["beam_type"].groupby(level=0).first().to_dict() == {"BEAM0000": "coverage", "BEAM0101": "power"}
    assert shots["surface_flag"].isna().all() and shots["solar_elevation"].isna().all()
    assert (shots["pft_class"] == 2).all() and shots["rh98"].dtype == np.float32
    assert shots["acquisition_time"].min().year == 2024  # 1.9e8 s after 2018-01-01
    kept, report = filter_shots(shots, GediFilters(night_only=True))
    assert set(report.skipped) == {"surface_flag == 1", "night only (solar_elevation < 0)"}
    assert len(kept) == 100


def test_files_that_are_not_gedi_l2a_are_refused(tmp_path):
    l2b = shared("gedi", "rgedi_sub_2019108", GRANULE.replace("02_A", "02_B"))
    with pytest.raises(CatalogError, match="not a GEDI L2A granule \\(product GEDI_L2B\\)"):
        read_gedi_l2a(l2b)
    text = tmp_path / "fake.h5"
    text.write_text("not hdf5")
    with pytest.raises(CatalogError, match="fake.h5: not an HDF5 file"):
        read_gedi_l2a(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5:
        h5["x"] = np.arange(3)
    with pytest.raises(CatalogError, match="other.h5: not a GEDI L2A granule"):
        read_gedi_l2a(other)


def test_ingest_writes_cell_partitions_and_bbox_queries_find_shots(tmp_path):
    granule = _write_v002_like(tmp_path / "G_V002.h5")
    out = tmp_path / "shots"
    partitions = ingest_gedi([granule, sample()], out)
    cells = sorted(p["cell"] for p in partitions)
    # The synthetic granule spans lat 10.2–10.7 and lon −0.3–0.3 (two cells); the real one one cell.
    assert cells == [(-14, -45), (10, -1), (10, 0)]
    for p in partitions:
        assert Path(p["path"]).is_file() and p["n_shots"] > 0
        assert set(p) >= {"path", "bbox", "n_shots", "datetime_start", "datetime_end", "filter_report"}
        minx, miny, maxx, maxy = p["bbox"]
        la, lo = p["cell"]
        assert lo <= minx <= maxx < lo + 1 and la <= miny <= maxy < la + 1
        assert p["datetime_start"] <= p["datetime_end"] and p["datetime_start"].tzinfo is not None
        assert f"lat_cell={la}" in p["path"] and f"lon_cell={lo}" in p["path"]
        # Rows inside a partition are in Hilbert order over the cell; the bbox covering column is stored.
        assert "bbox" in pq.read_schema(p["path"]).names
        stored = gpd.read_parquet(p["path"])
        key = stored.geometry.hilbert_distance(total_bounds=(lo, la, lo + 1, la + 1), level=16).to_numpy()
        assert (np.diff(key) >= 0).all()
    assert sum(p["n_shots"] for p in partitions if p["granule"] == "G_V002") == 100
    real = next(p for p in partitions if p["cell"] == (-14, -45))
    assert real["n_shots"] == 301 and real["filter_report"]["n_remaining"] == 301

    everything = read_gedi_l2a(sample())
    bbox = (-44.13, -13.745, -44.115, -13.73)
    inside = everything.cx[bbox[0] : bbox[2], bbox[1] : bbox[3]]
    found = shots_in_bbox(out, bbox)
    assert 0 < len(found) < 301
    assert sorted(found["shot_number"]) == sorted(inside["shot_number"])
    assert len(np.stack(found["rh"].to_numpy())[0]) == 101
    # Across the prime meridian: both cells of the synthetic granule answer.
    across = shots_in_bbox(out, (-0.05, 10.0, 0.05, 11.0))
    assert len(across) > 0 and (across.geometry.x < 0).any() and (across.geometry.x >= 0).any()
    assert len(shots_in_bbox(out, (100, 0, 101, 1))) == 0


def test_reingest_is_idempotent_and_drops_stale_partitions(tmp_path):
    granule = _write_v002_like(tmp_path / "G_V002.h5")
    out = tmp_path / "shots"
    first = ingest_gedi(granule, out)
    again = ingest_gedi(granule, out)
    assert [p["path"] for p in first] == [p["path"] for p in again]
    assert len(list(out.rglob("*.parquet"))) == 2
    # Make every shot west of lon 0 fail the quality filter: that cell's partition must go.
    with h5py.File(granule, "r+") as h5:
        for beam in ("BEAM0000", "BEAM0101"):
            lon = h5[beam]["lon_lowestmode"][()]
            q = h5[beam]["quality_flag"][()]
            q[lon < 0] = 0
            h5[beam]["quality_flag"][()] = q
    third = ingest_gedi(granule, out)
    assert [p["cell"] for p in third] == [(10, 0)]
    assert [p.parent.name for p in out.rglob("*.parquet")] == ["lon_cell=0"]
    assert not list(out.rglob("*.partial"))


def test_granule_with_only_empty_beams_gives_no_shots_and_no_partitions(tmp_path):
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as h5:
        h5.attrs["short_name"] = np.array([b"GEDI_L2A"], dtype=object)
        h5.create_group("BEAM0000")
    shots = read_gedi_l2a(path)
    assert len(shots) == 0 and "rh98" in shots.columns and shots.crs.to_epsg() == 4326
    assert ingest_gedi(path, tmp_path / "out") == []
