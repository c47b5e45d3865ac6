"""Co-registered chips on the real RGB + CHM pairs: grids, resampling, splits, GEDI, catalog input."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import shapely
from pyproj import Transformer
from rasterio.warp import calculate_default_transform, reproject, Resampling

from data_catalog.catalog import Catalog
from data_catalog.chips import ChipPair, ChipSampler, split_of_block
from data_catalog.errors import CatalogError
from tests.conftest import shared

# rasterio's own window helpers still use Affine * tuple; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")


def kootenay() -> ChipPair:
    folder = ("rgb_chm_pairs", "kootenay_bc_drone")
    return ChipPair(str(shared(*folder, "kootenayOrtho_from_rda.tif")), str(shared(*folder, "kootenayCHM.tif")))


def osbs() -> ChipPair:
    folder = ("rgb_chm_pairs", "neon_osbs_029")
    return ChipPair(str(shared(*folder, "OSBS_029.tif")), str(shared(*folder, "OSBS_029_CHM.tif")), chm_crs="EPSG:32617")


def _source_window(path, transform, size):
    """The source pixels under a chip whose grid coincides with the file's (same res, aligned)."""
    with rasterio.open(path) as ds:
        row = round((ds.transform.f - transform.f) / ds.res[1])
        col = round((transform.c - ds.transform.c) / ds.res[0])
        window = rasterio.windows.Window(col, row, size, size)
        return ds.read(window=window, boundless=True, fill_value=0), ds.nodata


def test_identical_grids_give_the_source_pixels_unchanged():
    pair = kootenay()
    sampler = ChipSampler([pair], chip_size=32, gsd=0.5, split_fractions=(1, 0, 0))
    chips = list(sampler.chips())
    assert len(chips) == sampler.summary()["n_chips"] > 10
    for chip in chips:
        assert chip.image.shape == (3, 32, 32) and chip.image.dtype == np.uint8
        assert chip.chm.shape == chip.valid.shape == (32, 32) and chip.chm.dtype == np.float32
        assert chip.chm_transform == chip.transform and chip.crs.to_epsg() == 32611
        inside = chip.valid.all()
        if not inside:
            continue
        rgb, _ = _source_window(pair.imagery, chip.transform, 32)
        np.testing.assert_array_equal(chip.image, rgb)
        raw, nodata = _source_window(pair.chm, chip.transform, 32)
        expected = np.where(raw[0] == nodata, np.nan, raw[0]).astype(np.float32)  # float64 −1.7e308 → NaN
        np.testing.assert_array_equal(chip.chm, expected)
    assert any(np.isnan(c.chm).any() for c in chips) and not any(np.isinf(c.chm).any() for c in chips)


def test_downsampled_imagery_is_the_block_average_and_chm_stays_on_its_grid():
    pair = osbs()
    chips = list(ChipSampler([pair], chip_size=16, gsd=0.5, min_coverage=1.0).chips())
    # 40 m plot (x 404211.9–404251.9): 8 m chips on the global 8 m lattice, fully inside → 4 × 4.
    assert len(chips) == 16
    with rasterio.open(pair.imagery) as ds:
        rgb = ds.read().astype(float)
        src_valid = ds.read_masks(1) > 0
        src_transform = ds.transform
    for chip in chips:
        assert chip.image.shape == (3, 16, 16)
        assert chip.transform.a == 0.5 and chip.transform.c % 8 == 0 and chip.transform.f % 8 == 0
        # Source 0.1 m pixels under output pixels (0, 0) .. (15, 15): 5×5 blocks.
        r0 = round((src_transform.f - chip.transform.f) / 0.1)
        c0 = round((chip.transform.c - src_transform.c) / 0.1)
        block = rgb[:, r0 : r0 + 80, c0 : c0 + 80].reshape(3, 16, 5, 16, 5)
        full = src_valid[r0 : r0 + 80, c0 : c0 + 80].reshape(16, 5, 16, 5).all(axis=(1, 3))
        mean = block.mean(axis=(2, 4))
        assert full.sum() > 64  # 5×5 blocks without a nodata (255) source pixel
        assert np.abs(chip.image[:, full] - mean[:, full]).max() <= 1.0  # average resampling, uint8 rounding
        assert chip.valid[full].all()
        # The CHM (0.5 m, grid origin at 404211.5) is on a lattice the chip shares: exact values.
        raw, nodata = _source_window(pair.chm, chip.transform, 16)
        expected = np.where(raw[0] < -1e30, np.nan, raw[0])
        np.testing.assert_allclose(chip.chm, expected, equal_nan=True)


def test_upsampling_is_bilinear_and_native_mode_keeps_lidar_resolution():
    pair = osbs()
    sampler = ChipSampler([pair], chip_size=64, gsd=0.25, chm_mode="native", min_coverage=1.0)
    chips = list(sampler.chips())
    assert chips
    for chip in chips:
        assert chip.image.shape == (3, 64, 64)
        assert chip.chm.shape == (32, 32) and chip.chm_transform.a == 0.5
        assert (chip.chm_transform.c, chip.chm_transform.f) == (chip.transform.c, chip.transform.f)
        raw, _ = _source_window(pair.chm, chip.chm_transform, 32)
        np.testing.assert_allclose(chip.chm, np.where(raw[0] < -1e30, np.nan, raw[0]), equal_nan=True)
    grid = list(ChipSampler([pair], chip_size=64, gsd=0.25, min_coverage=1.0).chips())
    # model_grid at 0.25 m: the 0.5 m CHM is interpolated, so its values stay within the source range
    # and it has the image's shape.
    assert all(c.chm.shape == (64, 64) for c in grid)
    assert np.nanmax([np.nanmax(c.chm) for c in grid]) <= 14.81


def test_chm_without_crs_needs_chm_crs():
    pair = osbs()
    with pytest.raises(CatalogError, match="OSBS_029_CHM.tif: file has no CRS; pass chm_crs="):
        ChipSampler([(pair.imagery, pair.chm)], chip_size=32, gsd=0.5).summary()


def test_chm_in_another_crs_is_reprojected_onto_the_image_grid(tmp_path):
    pair = osbs()
    with rasterio.open(pair.chm) as src:
        data = src.read(1)
        dst_crs = "EPSG:4326"
        transform, width, height = calculate_default_transform("EPSG:32617", dst_crs, src.width, src.height, *src.bounds)
        out = np.full((height, width), np.nan, np.float32)
        reproject(data, out, src_transform=src.transform, src_crs="EPSG:32617", src_nodata=src.nodata,
                  dst_transform=transform, dst_crs=dst_crs, dst_nodata=np.nan, resampling=Resampling.nearest)
    lonlat = tmp_path / "chm_4326.tif"
    with rasterio.open(lonlat, "w", driver="GTiff", width=width, height=height, count=1, dtype="float32",
                       crs=dst_crs, transform=transform, nodata=np.nan) as dst:
        dst.write(out, 1)
    same = {c.chip_id.rsplit("_", 1)[0]: c for c in ChipSampler([pair], chip_size=32, gsd=0.5, min_coverage=1.0).chips()}
    other = list(ChipSampler([ChipPair(pair.imagery, str(lonlat))], chip_size=32, gsd=0.5, min_coverage=1.0).chips())
    assert other and {c.chip_id.rsplit("_", 1)[0] for c in other} <= set(same)
    for chip in other:
        ref = same[chip.chip_id.rsplit("_", 1)[0]]
        assert chip.transform == ref.transform and chip.crs == ref.crs
        both = np.isfinite(chip.chm) & np.isfinite(ref.chm)
        assert both.mean() > 0.9
        assert np.corrcoef(chip.chm[both], ref.chm[both])[0, 1] > 0.8  # two resamplings of a rough CHM


def test_splits_follow_blocks_never_share_pixels_and_are_deterministic():
    pair = kootenay()
    settings = dict(chip_size=16, gsd=0.5, stride=8, block_size_m=20.0, split_fractions=(0.5, 0.25, 0.25), seed=3)
    sampler = ChipSampler([pair], **settings)
    windows = sampler.windows()
    summary = sampler.summary()
    assert summary["n_chips"] == len(windows) > 50 and summary["dropped_cross_split"] > 0
    assert all(summary["chips_by_split"][s] > 0 for s in ("train", "val", "test"))
    split_of = {}
    for w in windows:
        assert split_of.setdefault(w.block_id, w.split) == w.split  # one split per block
        assert w.split == split_of_block(w.block_id, settings["split_fractions"], settings["seed"])
    boxes = {s: shapely.union_all([shapely.box(*w.bounds) for w in windows if w.split == s]) for s in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert boxes[a].intersection(boxes[b]).area == 0, (a, b)  # chips of two splits never overlap
    again = ChipSampler([pair], **settings).windows()
    assert [(w.chip_id, w.split) for w in again] == [(w.chip_id, w.split) for w in windows]
    reseeded = ChipSampler([pair], **{**settings, "seed": 4}).windows()
    assert [w.split for w in reseeded] != [w.split for w in windows] or len(reseeded) != len(windows)
    only_val = list(sampler.chips(split="val"))
    assert len(only_val) == summary["chips_by_split"]["val"] and {c.split for c in only_val} == {"val"}
    with pytest.raises(CatalogError, match="split='validation'"):
        sampler.windows(split="validation")


def test_aoi_limits_chips_and_masks_outside_pixels():
    pair = kootenay()
    blocks = shared("rgb_chm_pairs", "kootenay_bc_drone", "kootenayBlocks.shp")
    everywhere = ChipSampler([pair], chip_size=32, gsd=0.5).summary()["n_chips"]
    sampler = ChipSampler([pair], aoi=str(blocks), chip_size=32, gsd=0.5, min_coverage=0.25)
    chips = list(sampler.chips())
    assert 0 < len(chips) < everywhere
    assert any(not c.valid.all() for c in chips)  # block edges cut through chips
    assert all(c.valid.any() for c in chips)


def test_gedi_shots_come_with_pixel_coordinates():
    import geopandas as gpd

    pair = osbs()
    to_lonlat = Transformer.from_crs("EPSG:32617", "EPSG:4326", always_xy=True)
    xs, ys = np.array([404220.25, 404230.0, 404300.0]), np.array([3285130.5, 3285121.0, 3285130.0])
    lon, lat = to_lonlat.transform(xs, ys)
    shots = gpd.GeoDataFrame({"shot_number": np.array([1, 2, 3], np.uint64), "rh98": [9.0, 7.0, 5.0]},
                             geometry=gpd.points_from_xy(lon, lat), crs="EPSG:4326")
    chips = list(ChipSampler([pair], chip_size=32, gsd=0.5, gedi=shots).chips())
    found = {}
    for chip in chips:
        for _, shot in chip.gedi.iterrows():
            x = chip.transform.c + shot["px_col"] * chip.gsd
            y = chip.transform.f - shot["px_row"] * chip.gsd
            found[int(shot["shot_number"])] = (x, y)
            assert 0 <= shot["px_col"] < 32 and 0 <= shot["px_row"] < 32
    assert set(found) == {1, 2}  # shot 3 is 50 m east of the plot
    np.testing.assert_allclose(found[1], (404220.25, 3285130.5), atol=1e-3)
    assert all(c.gedi is not None for c in chips)
    assert all(c.gedi is None for c in ChipSampler([pair], chip_size=32, gsd=0.5).chips())


def test_gedi_from_partition_files(tmp_path):
    import geopandas as gpd

    pair = osbs()
    lon, lat = Transformer.from_crs("EPSG:32617", "EPSG:4326", always_xy=True).transform(404231.0, 3285122.0)
    shots = gpd.GeoDataFrame({"shot_number": np.array([7], np.uint64)}, geometry=gpd.points_from_xy([lon], [lat]), crs="EPSG:4326")
    path = tmp_path / "part.parquet"
    shots.to_parquet(path, write_covering_bbox=True)
    chips = list(ChipSampler([pair], chip_size=32, gsd=0.5, gedi=[path]).chips())
    assert sum(len(c.gedi) for c in chips) == 1


def test_pairs_without_overlap_and_bad_inputs():
    sampler = ChipSampler([ChipPair(kootenay().imagery, osbs().chm, chm_crs="EPSG:32617")], chip_size=32, gsd=0.5)
    summary = sampler.summary()
    assert summary["n_chips"] == 0 and summary["pairs_without_overlap"] == [kootenay().imagery]
    with pytest.raises(CatalogError, match="nowhere.tif: cannot open as a raster"):
        ChipSampler([("nowhere.tif", kootenay().chm)], chip_size=32, gsd=0.5).summary()
    with pytest.raises(CatalogError, match="has 1 band\\(s\\); RGB imagery needs 3"):
        ChipSampler([(kootenay().chm, kootenay().chm)], chip_size=32, gsd=0.5).summary()
    for bad in (dict(chip_size=0), dict(gsd=-1), dict(split_fractions=(1, 1)), dict(chm_mode="max"), dict(block_size_m=0)):
        with pytest.raises(CatalogError):
            ChipSampler([kootenay()], **{"chip_size": 32, "gsd": 0.5, **bad})


def test_catalog_input_pairs_imagery_with_overlapping_chms(tmp_path):
    pair = osbs()
    catalog = Catalog.open(tmp_path / "cat.parquet")
    catalog.add("imagery", [pair.imagery, kootenay().imagery])
    catalog.add("chm", [pair.chm], crs="EPSG:32617")
    catalog.add("chm", [kootenay().chm])
    sampler = ChipSampler(catalog, aoi="-81.991,29.692,-81.989,29.693", chip_size=32, gsd=0.5)
    assert sampler.pairs == [ChipPair(pair.imagery, pair.chm, imagery_crs="EPSG:32617", chm_crs="EPSG:32617")]
    from_pairs = ChipSampler([pair], aoi="-81.991,29.692,-81.989,29.693", chip_size=32, gsd=0.5)
    assert [w.chip_id for w in sampler.windows()] == [w.chip_id for w in from_pairs.windows()]
    both = ChipSampler(catalog, chip_size=32, gsd=0.5)
    assert {p.imagery for p in both.pairs} == {pair.imagery, kootenay().imagery}


def test_imagery_in_degrees_is_chipped_in_its_utm_zone(tmp_path):
    pair = osbs()
    with rasterio.open(pair.imagery) as src:
        transform, width, height = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height, *src.bounds)
        out = np.full((3, height, width), 255, np.uint8)
        reproject(src.read(), out, src_transform=src.transform, src_crs=src.crs, src_nodata=255,
                  dst_transform=transform, dst_crs="EPSG:4326", dst_nodata=255, resampling=Resampling.nearest)
    lonlat = tmp_path / "rgb_4326.tif"
    with rasterio.open(lonlat, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       crs="EPSG:4326", transform=transform, nodata=255) as dst:
        dst.write(out)
    chips = list(ChipSampler([ChipPair(str(lonlat), pair.chm, chm_crs="EPSG:32617")], chip_size=16, gsd=0.5, min_coverage=1.0).chips())
    native = {c.transform: c for c in ChipSampler([pair], chip_size=16, gsd=0.5, min_coverage=1.0).chips()}
    assert len(chips) == len(native) == 16
    for chip in chips:
        assert chip.crs.to_epsg() == 32617  # UTM 17N, found from the imagery's centre
        ref = native[chip.transform]
        both = chip.valid & ref.valid
        assert np.abs(chip.image[:, both].astype(int) - ref.image[:, both]).mean() < 8  # measured 2.4
        np.testing.assert_array_equal(chip.chm, ref.chm)
