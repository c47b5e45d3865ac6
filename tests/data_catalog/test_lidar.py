"""LAS/LAZ → CHM on the real point clouds in ../shared/data, plus synthetic clouds with known answers."""

from __future__ import annotations

import laspy
import numpy as np
import pytest
import rasterio
from pyproj import CRS as ProjCRS
from rasterio.transform import rowcol

from data_catalog.errors import CatalogError
from data_catalog.lidar import (
    chm_from_las,
    derive_chm,
    horizontal_crs_from_las,
    looks_height_normalized,
    read_las_info,
    write_chm_geotiff,
)
from tests.conftest import shared


def _agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float, int]:
    both = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[both], b[both])[0, 1]), float(np.abs(a[both] - b[both]).mean()), int(both.sum())


def _shipped_osbs_chm():
    with rasterio.open(shared("rgb_chm_pairs", "neon_osbs_029", "OSBS_029_CHM.tif")) as ds:
        ref = ds.read(1).astype(np.float64)
        ref[ref < -1e30] = np.nan  # nodata is float32 -3.4e38
        return ref, ds.transform


def test_osbs_derived_chm_agrees_with_shipped_chm(record_property):
    ref, ref_transform = _shipped_osbs_chm()
    chm, transform, crs = chm_from_las(shared("rgb_chm_pairs", "neon_osbs_029", "OSBS_029.laz"), 0.5, crs="EPSG:32617")
    # The snapped origin puts the derived CHM on exactly the shipped CHM's 81×81 grid.
    assert transform == ref_transform and chm.shape == ref.shape == (81, 81)
    assert crs.to_epsg() == 32617 and chm.dtype == np.float32
    corr, mad, n = _agreement(chm, ref)
    print(f"OSBS_029 derived vs shipped CHM at 0.5 m: pearson r = {corr:.3f}, MAD = {mad:.3f} m over {n} cells")
    record_property("osbs_corr", corr)
    record_property("osbs_mad_m", mad)
    # measured: r = 0.962, MAD = 0.576 m, 6361 of 6561 cells
    assert corr > 0.95, f"r={corr:.3f}"
    assert mad < 0.65, f"MAD={mad:.3f} m"
    assert n > 0.95 * ref.size


def test_first_returns_and_pit_fill_each_improve_agreement():
    ref, _ = _shipped_osbs_chm()
    laz = shared("rgb_chm_pairs", "neon_osbs_029", "OSBS_029.laz")
    default = _agreement(chm_from_las(laz, 0.5, crs="EPSG:32617")[0], ref)
    all_returns = _agreement(chm_from_las(laz, 0.5, crs="EPSG:32617", first_returns_only=False)[0], ref)
    no_pits = _agreement(chm_from_las(laz, 0.5, crs="EPSG:32617", pit_fill=False)[0], ref)
    print(f"default r={default[0]:.3f}, all returns r={all_returns[0]:.3f}, no pit fill r={no_pits[0]:.3f}")
    assert default[0] > all_returns[0] + 0.03  # measured 0.962 vs 0.908
    assert default[0] > no_pits[0] + 0.02  # measured 0.962 vs 0.925


def test_missing_crs_is_a_one_line_error_naming_the_file():
    laz = shared("rgb_chm_pairs", "neon_osbs_029", "OSBS_029.laz")
    with pytest.raises(CatalogError, match="OSBS_029.laz.*crs=") as info:
        chm_from_las(laz, 0.5)
    assert "\n" not in str(info.value)


def test_bart_at_1m_is_nearly_gap_free_tall_canopy():
    laz = shared("rgb_chm_pairs", "neon_bart_041", "BART_041.laz")
    chm, transform, crs = chm_from_las(laz, 1.0)
    z_max = laspy.read(laz).z.max()
    assert crs.to_epsg() == 32619 and chm.shape == (41, 41) and transform.a == 1.0
    assert np.isnan(chm).mean() < 0.01  # measured 0.3 %
    assert 20 < np.nanpercentile(chm, 95) < 30  # measured 25.7 m: tall closed broadleaf canopy
    assert np.nanmax(chm) <= z_max + 1e-6  # pit filling only raises cells to neighbouring values
    # At 0.5 m about a quarter of the cells catch no first return; one neighbourhood pass fills most.
    fine, _, _ = chm_from_las(laz, 0.5, fill_empty_passes=0)
    filled, _, _ = chm_from_las(laz, 0.5)
    assert np.isnan(fine).mean() > 0.2 and np.isnan(filled).mean() < 0.05


def test_amazon_uses_ground_points_for_the_terrain():
    las_path = shared("lidar", "rgedi_brazil", "Amazon.las")
    las = laspy.read(las_path)
    assert not looks_height_normalized(np.asarray(las.z), np.asarray(las.classification))
    with pytest.raises(CatalogError, match="Amazon.las.*no CRS"):
        chm_from_las(las_path, 1.0)
    chm, _, crs = chm_from_las(las_path, 1.0, crs="EPSG:31982")  # UTM 22S, SIRGAS 2000
    assert crs.to_epsg() == 31982
    ground_min = las.z[las.classification == 2].min()
    assert np.nanmax(chm) <= las.z.max() - ground_min  # 38.9 m bound; measured max 38.3 m
    assert 30 < np.nanpercentile(chm, 95) < 40  # measured 37.0 m (plot terrain rises 4.6 m)
    assert np.nanmin(chm) >= 0


@pytest.mark.parametrize("name, epsg", [("MixedConifer.laz", 26912), ("Megaplot.laz", 26917)])
def test_lidr_clouds_read_their_crs_and_heights(name, epsg):
    """Two height-normalised lidR clouds (EPSG per ../shared/data/README.md), read here with
    laspy directly: the CRS is the file's, and before gap and pit filling each 1 m cell holds
    the highest first return (noise classes and withheld points left out) that falls in it on
    the CHM's own grid, exactly; filling only raises cells and keeps the highest point (32.07
    and 29.97 m). Guards against: all returns instead of first returns, points binned one cell
    off or with x/y swapped, heights rescaled or offset, and a CRS read from the wrong place."""
    path = shared("lidar", "lidR", name)
    las = laspy.read(path)
    keep = (np.asarray(las.return_number) == 1) & ~np.isin(np.asarray(las.classification), (7, 18))
    if "withheld" in las.point_format.dimension_names:
        keep &= ~np.asarray(las.withheld, dtype=bool)
    x, y, z = (np.asarray(v, dtype=np.float64)[keep] for v in (las.x, las.y, las.z))

    raw, transform, crs = chm_from_las(path, 1.0, pit_fill=False, fill_empty_passes=0)
    assert crs.to_epsg() == las.header.parse_crs().to_epsg() == epsg
    assert transform.a == -transform.e == 1.0
    h, w = raw.shape
    cols = np.clip(np.floor((x - transform.c) / transform.a).astype(int), 0, w - 1)
    rows = np.clip(np.floor((y - transform.f) / transform.e).astype(int), 0, h - 1)
    assert (np.abs(x - (transform.c + (cols + 0.5) * transform.a)) <= 0.5 + 1e-6).all()
    by_hand = np.full((h, w), -np.inf)
    np.maximum.at(by_hand, (rows, cols), np.maximum(z, 0.0))  # points under 0 m are ground
    hit = np.isfinite(by_hand)
    np.testing.assert_array_equal(np.isfinite(raw), hit)
    np.testing.assert_allclose(raw[hit], by_hand[hit], atol=1e-3)  # float32 of cm-scaled z

    chm, transform_filled, _ = chm_from_las(path, 1.0)
    assert transform_filled == transform
    assert (chm[hit] >= by_hand[hit] - 1e-3).all()
    assert np.nanmax(chm) == pytest.approx(by_hand[hit].max(), abs=1e-3)
    assert np.isnan(chm).mean() < 0.1


@pytest.mark.parametrize("name", ["Cerrado.las", "Savanna.las"])
def test_unclassified_unnormalised_clouds_are_refused(name):
    with pytest.raises(CatalogError, match=f"{name}.*no ground points"):
        chm_from_las(shared("lidar", "rgedi_brazil", name), 1.0)


def _synthetic_cloud(path, *, crs=None, n=40_000, seed=0, wkt=False):
    """Sloped terrain (z = 200 + 0.3·x) under three flat-topped 'trees' of known height."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 60, n)
    y = rng.uniform(0, 60, n)
    terrain = 200 + 0.3 * x
    height = np.zeros(n)
    for (cx, cy, h) in [(15, 15, 12.0), (40, 20, 25.0), (30, 45, 8.0)]:
        inside = np.hypot(x - cx, y - cy) < 6
        height[inside] = h * (rng.random(inside.sum()) < 0.8)  # 20 % of pulses reach the ground
    ground = height == 0
    # LAS 1.4 stores the CRS as WKT (needed for CRSs without an EPSG code); 1.2 as GeoTIFF keys.
    header = laspy.LasHeader(point_format=6, version="1.4") if wkt else laspy.LasHeader(point_format=1, version="1.2")
    header.offsets = [500000.0, 4000000.0, 0.0]
    header.scales = [0.001, 0.001, 0.001]
    if crs is not None:
        header.add_crs(crs, keep_compatibility=not wkt)
    las = laspy.LasData(header)
    las.x, las.y, las.z = x + 500000, y + 4000000, terrain + height
    las.classification = np.where(ground, 2, 1).astype(np.uint8)
    las.return_number = np.ones(n, np.uint8)
    las.number_of_returns = np.ones(n, np.uint8)
    las.write(path)
    return path


def test_synthetic_sloped_terrain_gives_known_tree_heights(tmp_path):
    path = _synthetic_cloud(tmp_path / "slope.las", crs=ProjCRS.from_epsg(32611))
    chm, transform, crs = chm_from_las(path, 1.0)
    assert crs.to_epsg() == 32611
    row, col = rowcol(transform, 500040.0, 4000020.0)  # centre of the 25 m tree
    assert abs(chm[row, col] - 25.0) < 0.3
    row, col = rowcol(transform, 500055.0, 4000055.0)  # open ground far from trees
    assert abs(chm[row, col]) < 0.3


def test_bound_crs_with_towgs84_resolves_to_its_source_crs(tmp_path):
    bound = ProjCRS.from_proj4("+proj=utm +zone=11 +ellps=WGS84 +towgs84=0,0,0 +units=m +no_defs")
    assert bound.is_bound and bound.to_epsg() is None
    path = _synthetic_cloud(tmp_path / "bound.las", crs=bound, n=2000, wkt=True)
    with laspy.open(path) as reader:
        parsed = reader.header.parse_crs()
        assert parsed is not None and parsed.is_bound
        horizontal = horizontal_crs_from_las(reader.header, path)
    assert horizontal is not None and not ProjCRS.from_user_input(horizontal).is_bound
    assert ProjCRS.from_user_input(horizontal).is_projected
    info = read_las_info(path)
    assert info.point_count == 2000 and info.bounds[0] >= 500000


def test_write_chm_geotiff_round_trip_and_no_leftovers(tmp_path):
    chm = np.array([[1.5, np.nan], [30.25, 0.0]], dtype=np.float32)
    transform = rasterio.Affine(0.5, 0, 404211.5, 0, -0.5, 3285143.0)
    out = write_chm_geotiff(tmp_path / "sub" / "chm.tif", chm, transform, "EPSG:32617")
    assert sorted(p.name for p in out.parent.iterdir()) == ["chm.tif"]
    with rasterio.open(out) as ds:
        assert ds.dtypes == ("float32",) and np.isnan(ds.nodata)
        assert ds.compression.name.upper() == "DEFLATE" and ds.block_shapes[0] == (256, 256)
        assert ds.crs.to_epsg() == 32617 and ds.transform == transform and ds.units == ("m",)
        np.testing.assert_array_equal(ds.read(1), chm)


def test_derive_chm_writes_a_geotiff(tmp_path):
    out = derive_chm(shared("rgb_chm_pairs", "neon_bart_041", "BART_041.laz"), tmp_path / "bart.tif", 1.0)
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 32619 and ds.shape == (41, 41)


def test_not_a_point_cloud_is_refused(tmp_path):
    bogus = tmp_path / "notes.laz"
    bogus.write_text("hello")
    with pytest.raises(CatalogError, match="notes.laz: not a readable LAS/LAZ"):
        chm_from_las(bogus)
    with pytest.raises(CatalogError, match="resolution"):
        chm_from_las(shared("rgb_chm_pairs", "neon_bart_041", "BART_041.laz"), 0)


def test_teak_cloud_not_normalised_gives_sierra_heights_and_ignores_an_outlier(tmp_path):
    """NEON TEAK_056 is not height-normalised (absolute elevations ~2,100 m, ground classed) and
    holds one point ~3,190 m high (classed noise). The CHM gives tree heights (tallest ≤ 60 m),
    and stays so when that point's class is changed to 1 (unclassified): the 150 m ceiling drops
    it. Without the ceiling the relabelled point makes a cell of ~1,000 m."""
    src = shared("rgb_chm_pairs", "neon_teak", "neon_TEAK_056.laz")
    chm, _, _ = chm_from_las(src, resolution=1.0, crs="EPSG:32611")
    assert 30 < np.nanmax(chm) < 60 and np.nanmin(chm) >= 0
    las = laspy.read(src)
    cls = np.asarray(las.classification).copy()
    top = int(np.argmax(np.asarray(las.z)))
    assert float(las.z[top]) > 3000 and cls[top] == 7
    cls[top] = 1
    las.classification = cls
    relabelled = tmp_path / "teak_056_unclassed_outlier.laz"
    las.write(relabelled)
    again, _, _ = chm_from_las(relabelled, resolution=1.0, crs="EPSG:32611")
    assert np.nanmax(again) < 60
    np.testing.assert_allclose(again, chm, equal_nan=True)
