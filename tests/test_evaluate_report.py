"""`canopy evaluate` end to end: grids in other CRSs and resolutions, real lidar CHMs, GEDI shots,
bad inputs and the report folder."""

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import Resampling, calculate_default_transform, reproject

from canopy.errors import InputError, OutputError
from canopy.evaluate import evaluate
from canopy.io.cog import write_cog
from data_catalog.errors import RasterError

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SOAP = DATA / "chm_tiles" / "neon" / "NEON_D17_SOAP_DP3_302000_4100000_CHM.tif"
ABBY = DATA / "chm_tiles" / "neon" / "NEON_D16_ABBY_DP3_559000_5070000_CHM.tif"

CRS = "EPSG:32617"
X0, Y0 = 500000.0, 4000000.0
GSD = 0.5
N = 400  # 200 m × 200 m
TILE_TAGS = {"CANOPY_TILE_SIZE": "100", "CANOPY_TILE_STRIDE": "100",
             "CANOPY_TILE_ORIGIN_COL": "0", "CANOPY_TILE_ORIGIN_ROW": "0"}


def _truth(n=N, gsd=GSD):
    """A smooth canopy-like height field (2–23 m) on an n×n grid of gsd metres."""
    yy, xx = np.mgrid[0:n, 0:n] * gsd
    return (12.5 + 8 * np.sin(xx / 30.0) * np.cos(yy / 25.0)
            + 2.5 * np.sin((xx + yy) / 11.0)).astype(np.float32)


def _write(path, data, transform, crs=CRS, nodata=np.nan, tags=None, descriptions=None):
    data = np.asarray(data)
    count = 1 if data.ndim == 2 else data.shape[0]
    return write_cog(path, data, crs=crs, transform=transform, nodata=nodata,
                     descriptions=descriptions or ("canopy_height",) * count, units="m",
                     tags=tags, qml=False)


@pytest.fixture(scope="module")
def prediction(tmp_path_factory):
    """truth + 1 m, with a 40×40 nodata hole, carrying a 100-px model-tile lattice."""
    d = tmp_path_factory.mktemp("pred")
    pred = _truth() + 1.0
    pred[:40, :40] = np.nan
    return _write(d / "pred.tif", pred, from_origin(X0, Y0, GSD, GSD), tags=TILE_TAGS)


def test_every_kind_of_nodata_becomes_nan():
    from canopy.evaluate.report import clean_heights

    assert np.isnan(clean_heights(np.array([1.0, -1.7e308, np.inf, -3.4e38]), None)[1:]).all()
    assert clean_heights(np.array([0, 12, 255], np.uint8), 255.0).tolist()[:2] == [0.0, 12.0]
    assert np.isnan(clean_heights(np.array([0, 12, 255], np.uint8), 255.0)[2])
    assert np.isnan(clean_heights(np.array([1, -9999], np.int16), None)[1])
    # 0 m is a height, not nodata, unless declared so.
    assert clean_heights(np.array([0.0, 5.0], np.float32), np.nan).tolist() == [0.0, 5.0]


def _metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


def test_reference_in_another_crs_is_reprojected(prediction, tmp_path):
    # Reference: the truth averaged onto a 1 m grid in the neighbouring UTM zone (rotated ~3°).
    src_t = from_origin(X0, Y0, GSD, GSD)
    dst_t, w, h = calculate_default_transform(CRS, "EPSG:32616", N, N, X0, Y0 - N * GSD,
                                              X0 + N * GSD, Y0, resolution=1.0)
    ref = np.full((h, w), -9999.0, np.float32)
    reproject(_truth(), ref, src_transform=src_t, src_crs=CRS, dst_transform=dst_t,
              dst_crs="EPSG:32616", dst_nodata=-9999.0, resampling=Resampling.average)
    ref_path = _write(tmp_path / "ref_utm16.tif", ref, dst_t, crs="EPSG:32616", nodata=-9999.0)

    result = evaluate(prediction, [ref_path], tmp_path / "report")
    r = result["references"][0]
    assert r["crs"] == "EPSG:32616" and r["evaluation_grid"] == "reference"
    o = r["overall"]
    # Both sides averaged onto the same grid with the same weights: the error is the +1 m bias.
    assert o["bias"] == pytest.approx(1.0, abs=0.02)
    assert o["mae"] == pytest.approx(1.0, abs=0.02)
    # R² carries the bias: 1 − mean(e²) / var(ref) with e ≈ 1 m.
    valid_ref = ref[ref != -9999.0]
    assert o["r2"] == pytest.approx(1 - 1.0 / valid_ref.var(), abs=0.01)
    # The prediction's nodata hole (≈ 20×20 m) is left out, not read as 0 m.
    assert r["n_evaluated_pixels"] < r["n_reference_valid_pixels"] - 300
    assert o["n"] == r["n_evaluated_pixels"]
    # Smooth prediction: tile borders invisible.
    assert result["edge_error"]["edge_error"] == pytest.approx(1.0, abs=0.15)
    assert result["edge_error"]["lattice"] == {"size": 100, "stride": 100, "origin_col": 0,
                                               "origin_row": 0}
    files = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"metrics.json", "density_scatter.png", "error_by_height_bin.png",
            "error_histogram.png"} <= files
    assert any(f.startswith("maps_00_") for f in files)
    assert _metrics(tmp_path / "report") == result


def test_coarser_reference_gets_the_prediction_averaged_and_finer_one_is_averaged(
        prediction, tmp_path):
    truth = _truth()
    coarse = truth.reshape(N // 4, 4, N // 4, 4).mean(axis=(1, 3))  # 2 m
    coarse_path = _write(tmp_path / "coarse.tif", coarse, from_origin(X0, Y0, 2.0, 2.0))
    fine = np.repeat(np.repeat(truth, 2, axis=0), 2, axis=1)  # 0.25 m
    fine_path = _write(tmp_path / "fine.tif", fine, from_origin(X0, Y0, 0.25, 0.25))

    result = evaluate(prediction, [coarse_path, fine_path], tmp_path / "r")
    rc, rf = result["references"]
    assert rc["evaluation_grid"] == "reference" and rc["grid"]["pixel_size"] == [2.0, 2.0]
    assert rf["evaluation_grid"] == "prediction" and rf["grid"]["pixel_size"] == [0.5, 0.5]
    # 100×100 coarse cells minus the 10×10 under the hole; 400×400 fine-grid cells minus 40×40.
    assert rc["n_evaluated_pixels"] == 100 * 100 - 10 * 10
    assert rf["n_evaluated_pixels"] == 400 * 400 - 40 * 40
    for r in (rc, rf):
        assert r["overall"]["bias"] == pytest.approx(1.0, abs=1e-4)
        assert r["overall"]["mae"] == pytest.approx(1.0, abs=1e-4)
    pooled = result["pooled"]["overall"]
    assert pooled["n"] == rc["n_evaluated_pixels"] + rf["n_evaluated_pixels"]
    assert pooled["bias"] == pytest.approx(1.0, abs=1e-4)
    assert sum(b["n"] for b in result["pooled"]["by_height_bin"].values()) == pooled["n"]


def test_a_cell_counts_only_when_half_of_it_is_covered(tmp_path):
    """README/docs/evaluate.md: nodata is left out of each average and an averaged cell counts
    only if valid pixels cover at least half of it. Holes that cut through cells (off the
    coarser grid) give exactly the number of cells the rule gives, counted here by hand, on
    both sides: the prediction averaged onto a 2 m reference (a cell of 4×4 prediction pixels
    counts with ≥ 8 valid ones; the hole's edges leave 10, 8 — exactly half — and 4) and a
    0.25 m reference averaged onto the 0.5 m prediction (2×2 reference pixels count with ≥ 2
    valid; its holes leave 3, 2 and 1).
    Guards against: the rule removed (min_valid_fraction 0 in canopy/evaluate/report.py, or
    the mask line gone from data_catalog/raster.py:warp_average: one stray pixel would make a
    cell) and "at least half" turned into "more than half"."""
    truth = _truth()
    pred = truth + 1.0
    pred[2:42, 1:43] = np.nan  # rows: 2 of 4 pixels of the edge cells; columns: 1 and 3 of 4
    pred_path = _write(tmp_path / "pred.tif", pred, from_origin(X0, Y0, GSD, GSD))
    coarse = truth.reshape(N // 4, 4, N // 4, 4).mean(axis=(1, 3))  # 2 m
    coarse_path = _write(tmp_path / "coarse.tif", coarse, from_origin(X0, Y0, 2.0, 2.0))
    fine = np.repeat(np.repeat(truth, 2, axis=0), 2, axis=1)  # 0.25 m
    fine[201:262, 103:160] = np.nan  # odd edges: 1 or 2 of a 2×2 block's pixels missing
    fine[300, 300:340] = np.nan       # and a strip of blocks with one stray valid pixel left
    fine[301, 300:340:2] = np.nan
    fine_path = _write(tmp_path / "fine.tif", fine, from_origin(X0, Y0, 0.25, 0.25))

    result = evaluate(pred_path, [coarse_path, fine_path], tmp_path / "r")
    rc, rf = result["references"]
    assert rc["evaluation_grid"] == "reference" and rf["evaluation_grid"] == "prediction"
    valid_4x4 = np.isfinite(pred).reshape(N // 4, 4, N // 4, 4).sum(axis=(1, 3))
    assert {10, 8, 4} <= set(np.unique(valid_4x4).tolist())
    # 9,901 of 10,000 cells (9,919 hold a valid pixel, 9,883 more than half)
    assert rc["n_evaluated_pixels"] == int((valid_4x4 >= 8).sum())
    valid_2x2 = np.isfinite(fine).reshape(N, 2, N, 2).sum(axis=(1, 3))
    assert {1, 2, 3} <= set(np.unique(valid_2x2).tolist())
    assert rf["n_evaluated_pixels"] == int(((valid_2x2 >= 2) & np.isfinite(pred)).sum())
    for r in (rc, rf):  # averages of valid pixels only: the +1 m offset, not a pull to 0 m
        assert r["overall"]["bias"] == pytest.approx(1.0, abs=0.01)


def test_tile_seams_raise_the_edge_error(tmp_path):
    truth = _truth()
    r, c = np.indices(truth.shape)
    offsets = np.where(((r // 100) + (c // 100)) % 2 == 0, 0.0, 2.0)  # checkerboard of tiles
    pred = _write(tmp_path / "seams.tif", truth + offsets, from_origin(X0, Y0, GSD, GSD),
                  tags=TILE_TAGS)
    ref = _write(tmp_path / "ref.tif", truth, from_origin(X0, Y0, GSD, GSD))
    result = evaluate(pred, [ref], tmp_path / "r")
    e = result["edge_error"]
    assert e["scope"] == "whole prediction"
    # Border jumps ≈ 2 m against ≈ 0.15 m between neighbours inside tiles.
    assert e["edge_error"] > 5
    assert e["n_border_pairs"] == 2 * 3 * 400  # 3 borders per axis, 400 pairs each

    plain = _write(tmp_path / "plain.tif", truth, from_origin(X0, Y0, GSD, GSD))
    untagged = evaluate(plain, [ref], tmp_path / "r2")
    assert "skipped" in untagged["edge_error"]


def test_uncertainty_band_calibration(tmp_path):
    rng = np.random.default_rng(0)
    truth = _truth()
    sigma = np.where(truth > 12, 2.0, 0.5).astype(np.float32)
    pred = truth + rng.normal(0, 1, truth.shape).astype(np.float32) * sigma
    path = _write(tmp_path / "pred_std.tif", np.stack([pred, sigma]), from_origin(X0, Y0, GSD, GSD),
                  descriptions=("canopy_height", "canopy_height_std"))
    ref = _write(tmp_path / "ref.tif", truth, from_origin(X0, Y0, GSD, GSD))
    o = evaluate(path, [ref], tmp_path / "r")["pooled"]["overall"]
    assert o["n_calibration"] == N * N
    assert o["within_1sigma"] == pytest.approx(0.683, abs=0.01)
    assert o["within_2sigma"] == pytest.approx(0.954, abs=0.01)


@pytest.mark.skipif(not SOAP.exists(), reason="shared real data not present")
def test_real_neon_chm_with_known_noise(tmp_path):
    with rasterio.open(SOAP) as src:
        ref = src.read(1)
        transform, crs, nodata = src.transform, src.crs, src.nodata
    assert nodata == -9999.0
    rng = np.random.default_rng(42)
    noise = rng.normal(0, 2.0, ref.shape).astype(np.float32)
    valid = ref != nodata
    pred = np.where(valid, ref + noise, np.nan).astype(np.float32)
    pred_path = _write(tmp_path / "soap_pred.tif", pred, transform, crs=crs)

    result = evaluate(pred_path, [SOAP], tmp_path / "r")
    o = result["pooled"]["overall"]
    assert o["n"] == int(valid.sum())
    assert o["mae"] == pytest.approx(float(np.abs(noise[valid]).mean()), rel=1e-4)
    assert o["mae"] == pytest.approx(2.0 * np.sqrt(2 / np.pi), rel=0.01)
    assert o["rmse"] == pytest.approx(2.0, rel=0.01)
    assert o["bias"] == pytest.approx(0.0, abs=0.01)
    # Per-bin MAE is the noise MAE everywhere (noise does not depend on height).
    for label, b in result["pooled"]["by_height_bin"].items():
        if b["n"] > 1000:
            assert b["mae"] == pytest.approx(1.596, rel=0.05), label
    assert 0 < o["block_r2"] <= 1 and o["block_r2"] > o["r2"]  # noise averages out in blocks
    assert o["n_blocks"] == 20 * 20


@pytest.mark.skipif(not ABBY.exists(), reason="shared real data not present")
def test_real_chm_with_nan_nodata_is_not_read_as_zero(tmp_path):
    with rasterio.open(ABBY) as src:
        ref = src.read(1)
        transform, crs = src.transform, src.crs
    holes = np.isnan(ref)
    assert holes.mean() > 0.3
    # Prediction: reference + 1 m, and 0 m where the reference has nodata.
    pred = np.where(holes, 0.0, ref + 1.0).astype(np.float32)
    pred_path = _write(tmp_path / "abby_pred.tif", pred, transform, crs=crs)
    o = evaluate(pred_path, [ABBY], tmp_path / "r")["pooled"]["overall"]
    assert o["n"] == int((~holes).sum())
    assert o["bias"] == pytest.approx(1.0, abs=1e-5)


def _gedi_file(tmp_path, points, rh, quality=None):
    import geopandas as gpd
    from shapely.geometry import Point

    cols = {"rh95": rh}
    if quality is not None:
        cols["quality_flag"] = quality
    gdf = gpd.GeoDataFrame(cols, geometry=[Point(x, y) for x, y in points], crs=CRS)
    path = tmp_path / "shots.geojson"
    gdf.to_crs("EPSG:4326").to_file(path, driver="GeoJSON")
    return path


def test_gedi_metrics_by_hand(tmp_path):
    # Prediction 10 m in the west half, 20 m in the east half of a 200 m square.
    pred = np.where(np.arange(N)[None, :] < N // 2, 10.0, 20.0).repeat(N, axis=0).astype(np.float32)
    pred_path = _write(tmp_path / "halves.tif", pred, from_origin(X0, Y0, GSD, GSD))
    ref_path = _write(tmp_path / "ref.tif", pred, from_origin(X0, Y0, GSD, GSD))
    points = [(X0 + 40, Y0 - 100), (X0 + 160, Y0 - 100),   # west (10 m), east (20 m)
              (X0 + 1000, Y0 - 100),                        # outside the prediction
              (X0 + 150, Y0 - 50)]                          # quality_flag 0: dropped
    shots = _gedi_file(tmp_path, points, [12.0, 19.0, 5.0, 99.0], quality=[1, 1, 1, 0])
    g = evaluate(pred_path, [ref_path], tmp_path / "r", gedi=shots)["gedi"]
    assert g["rh_column"] == "rh95" and g["prediction_percentile"] == 95
    assert g["n"] == 2 and g["n_outside_prediction"] == 1 and g["n_dropped_quality_flag"] == 1
    assert g["mae"] == pytest.approx(1.5, abs=1e-4)       # |10 − 12|, |20 − 19|
    assert g["bias"] == pytest.approx(-0.5, abs=1e-4)
    assert (tmp_path / "r" / "gedi_scatter.png").exists()

    far = _gedi_file(tmp_path, [(X0 + 5000, Y0)], [3.0])
    with pytest.raises(InputError, match="none of the 1 GEDI shots"):
        evaluate(pred_path, [ref_path], tmp_path / "r2", gedi=far)


def test_gedi_on_a_synthetic_scene(tmp_path):
    """A perfect prediction (the scene's exact CHM) against its GEDI-like shots: what remains is
    GEDI noise and geolocation error, and the footprint metrics equal a hand computation — the
    95th percentile (numpy's linear rule) of the CHM pixels whose centres lie within 12.5 m of
    each reported position, a footprint counting when at least half of its pixels are on the
    map. Measured: 12 shots, MAE 3.39 m, bias +0.20 m, RMSE 5.50 m. Guards against: a footprint
    radius doubled (in evaluate's config or in data_catalog.gedi, where synth's own RH values
    would move with it), another percentile, and shots read at the wrong place; the former
    bounds (|bias| < 4, RMSE < 8 m) let a doubled radius pass by 0.54 m."""
    import geopandas as gpd

    from canopy.synth import synth_scene

    paths = synth_scene(tmp_path / "s", area_km2=0.09, gsd=1.0, seed=4)
    result = evaluate(paths["chm"], [paths["chm"]], tmp_path / "r", gedi=paths["gedi"])
    assert result["pooled"]["overall"]["mae"] == 0.0
    g = result["gedi"]

    with rasterio.open(paths["chm"]) as ds:
        chm = ds.read(1, masked=True).filled(np.nan).astype(np.float64)
        t, crs = ds.transform, ds.crs
    assert t.a == -t.e == 1.0 and t.b == t.d == 0.0
    shots = gpd.read_parquet(paths["gedi"])
    shots = shots[(shots["quality_flag"] == 1) & (shots["degrade_flag"] == 0)].to_crs(crs)
    pad = 20  # > the 12.5 px radius: every footprint pixel has a place, on the map or off it
    h, w = chm.shape
    padded = np.full((h + 2 * pad, w + 2 * pad), np.nan)
    padded[pad:-pad, pad:-pad] = chm
    rows, cols = np.mgrid[-pad:h + pad, -pad:w + pad]
    xc, yc = t.c + (cols + 0.5) * t.a, t.f + (rows + 0.5) * t.e  # pixel centres
    pct, rh = [], []
    for x, y, value in zip(shots.geometry.x, shots.geometry.y, shots["rh95"]):
        disc = (xc - x) ** 2 + (yc - y) ** 2 <= 12.5 ** 2
        heights = padded[disc]
        ok = np.isfinite(heights)
        if ok.sum() >= 0.5 * disc.sum():
            pct.append(np.percentile(heights[ok], 95))
            rh.append(value)
    e = np.array(pct) - np.array(rh)
    assert g["n"] == len(e) >= 10
    assert g["mae"] == pytest.approx(np.abs(e).mean(), abs=1e-4)
    assert g["bias"] == pytest.approx(e.mean(), abs=1e-4)
    assert g["rmse"] == pytest.approx(np.sqrt((e ** 2).mean()), abs=1e-4)
    assert g["n_outside_prediction"] == 0 and g["footprint_diameter_m"] == 25.0


def test_bad_inputs_are_one_line_errors_and_leave_nothing(prediction, tmp_path):
    truth = _truth()
    far = _write(tmp_path / "far.tif", truth, from_origin(X0 + 10_000, Y0, GSD, GSD))
    with pytest.raises(InputError) as err:
        evaluate(prediction, [far], tmp_path / "r")
    msg = str(err.value)
    assert "does not overlap" in msg and "pred.tif" in msg and "far.tif" in msg
    assert "\n" not in msg

    empty = _write(tmp_path / "empty.tif", np.full((50, 50), -9999.0, np.float32),
                   from_origin(X0, Y0, 1.0, 1.0), nodata=-9999.0)
    good = _write(tmp_path / "good.tif", truth, from_origin(X0, Y0, GSD, GSD))
    with pytest.raises(InputError, match="empty.tif' holds only nodata"):
        evaluate(prediction, [good, empty], tmp_path / "r")
    # The failure came after a reference was scored: no report, no temporary folder left.
    assert sorted(p.name for p in tmp_path.iterdir() if "r" == p.name or "partial" in p.name) == []

    # A float64 CHM with the −1.7e308 fill and no declared nodata: the fill is nodata.
    odd = np.full((N, N), -1.7e308)
    odd[:, :200] = truth[:, :200]
    with rasterio.open(tmp_path / "odd.tif", "w", driver="GTiff", width=N, height=N, count=1,
                       dtype="float64", crs=CRS, transform=from_origin(X0, Y0, GSD, GSD)) as dst:
        dst.write(odd, 1)
    o = evaluate(prediction, [tmp_path / "odd.tif"], tmp_path / "r_odd")["pooled"]["overall"]
    assert o["n"] == 200 * N - 40 * 40 and o["bias"] == pytest.approx(1.0, abs=1e-4)

    # A reference without CRS needs --reference-crs.
    with rasterio.open(tmp_path / "nocrs.tif", "w", driver="GTiff", width=N, height=N, count=1,
                       dtype="float32", transform=from_origin(X0, Y0, GSD, GSD)) as dst:
        dst.write(truth, 1)
    with pytest.raises(RasterError, match="no CRS; pass --reference-crs"):
        evaluate(prediction, [tmp_path / "nocrs.tif"], tmp_path / "r")
    res = evaluate(prediction, [tmp_path / "nocrs.tif"], tmp_path / "r_nocrs",
                   reference_crs="EPSG:32617")
    assert res["pooled"]["overall"]["bias"] == pytest.approx(1.0, abs=1e-4)
    assert "assumed EPSG:32617" in res["references"][0]["notes"][0]

    with pytest.raises(RasterError, match="does not exist"):
        evaluate(tmp_path / "missing.tif", [good], tmp_path / "r")
    # An existing non-empty report folder is refused without overwrite, replaced with it.
    with pytest.raises(OutputError, match="not empty"):
        evaluate(prediction, [good], tmp_path / "r_nocrs")
    evaluate(prediction, [good], tmp_path / "r_nocrs", overwrite=True)
    assert _metrics(tmp_path / "r_nocrs")["references"][0]["path"].endswith("good.tif")


def test_evaluate_cli_takes_several_references(prediction, tmp_path):
    import typer
    from typer.testing import CliRunner

    from canopy.evaluate.cli import register

    truth = _truth()
    a = _write(tmp_path / "a.tif", truth, from_origin(X0, Y0, GSD, GSD))
    b = _write(tmp_path / "b.tif", truth.reshape(200, 2, 200, 2).mean(axis=(1, 3)),
               from_origin(X0, Y0, 1.0, 1.0))
    app = typer.Typer()
    register(app)
    app.command("version")(lambda: None)  # a second command keeps 'evaluate' a subcommand
    res = CliRunner().invoke(app, ["evaluate", str(prediction), "--reference", str(a), str(b),
                                   "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "MAE 1.000 m" in res.output
    assert len(_metrics(tmp_path / "out")["references"]) == 2
    # User errors reach the caller as canopy errors (the main CLI prints them and exits 2).
    res = CliRunner().invoke(app, ["evaluate", str(prediction), "-o", str(tmp_path / "out2")])
    assert isinstance(res.exception, InputError)


def test_rgb_given_as_heights_is_refused_unless_a_band_is_named(tmp_path, capsys):
    """Issue #13: an RGB raster given as the prediction or as a reference was scored (MAE 151 m)
    without a word. Rasters with several bands, or one band of bytes, that do not say which band
    holds heights are refused with one line naming the flag; naming the band goes on, with a
    warning when the values cannot be heights in metres."""
    from tests.conftest import shared
    from tests.test_predict import run_cli

    rgb = shared("rgb_chm_pairs", "neon_osbs_029", "OSBS_029.tif")
    chm = shared("rgb_chm_pairs", "neon_osbs_029", "OSBS_029_CHM.tif")
    base = ["--reference-crs", "EPSG:32617"]
    code, _, err = run_cli("evaluate", rgb, "--reference", chm, "-o", tmp_path / "a", *base,
                           capsys=capsys)
    assert code == 2 and err.startswith("error: prediction ") and "3 bands of uint8" in err, err
    assert "--band N" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists()
    koot = ("rgb_chm_pairs", "kootenay_bc_drone")
    code, _, err = run_cli("evaluate", shared(*koot, "kootenayCHM.tif"), "--reference",
                           shared(*koot, "kootenayOrtho_from_rda.tif"), "-o", tmp_path / "b",
                           capsys=capsys)
    assert code == 2 and err.startswith("error: reference ") and "--reference-band N" in err, err
    code, out, err = run_cli("evaluate", rgb, "--band", "1", "--reference", chm, "-o",
                             tmp_path / "c", *base, capsys=capsys)
    assert code == 0 and "is it a canopy height raster in metres?" in err, err


def test_two_models_maps_in_one_report(tmp_path, capsys):
    """`canopy evaluate A --compare B -r lidar`: both maps scored against the same real NEON
    CHM in one report, each with its model and licence tags, on its own pixels and on the
    pixels valid in both (B has a hole A does not)."""
    from tests.test_predict import run_cli

    with rasterio.open(SOAP) as src:
        ref = src.read(1)
        transform, crs = src.transform, src.crs
    valid = ref != -9999.0
    a = np.where(valid, ref + 1.0, np.nan).astype(np.float32)  # bias +1 m
    b = np.where(valid, ref * 0.5, np.nan).astype(np.float32)
    b[:200, :] = np.nan  # a strip without data in B only
    pa = _write(tmp_path / "v1.tif", a, transform, crs=crs,
                tags={"CANOPY_MODEL": "hrch_v1_large", "CANOPY_MODEL_LICENCE": "Apache-2.0"})
    pb = _write(tmp_path / "v2.tif", b, transform, crs=crs,
                tags={"CANOPY_MODEL": "chmv2", "CANOPY_MODEL_LICENCE": "DINOv3 License"})
    code, out, err = run_cli("evaluate", pa, "--compare", pb, "-r", SOAP, "-o", tmp_path / "r",
                             capsys=capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "r" / "metrics.json").read_text())
    rows = {r["model"]: r for r in result["comparison"]["maps"]}
    assert rows["chmv2"]["model_licence"] == "DINOv3 License"
    assert rows["hrch_v1_large"]["bias"] == pytest.approx(1.0, abs=1e-4)
    assert rows["hrch_v1_large"]["n"] == int(valid.sum())
    common = int((valid & np.isfinite(b)).sum())
    assert rows["hrch_v1_large"]["common_pixels"]["n"] == rows["chmv2"]["n"] == common
    half = -0.5 * ref[valid & np.isfinite(b)].astype(np.float64)
    assert rows["chmv2"]["bias"] == pytest.approx(half.mean(), rel=1e-3)
    sub = tmp_path / "r" / rows["chmv2"]["report"]
    assert json.loads((sub / "metrics.json").read_text())["prediction"]["path"] == str(pb)
    assert "chmv2 (v2.tif): MAE" in out and "on common pixels" in out
