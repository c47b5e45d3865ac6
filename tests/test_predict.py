"""``canopy predict`` on one raster: real NEON/drone imagery in several UTM zones, generated rasters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from canopy.io.cog import cog_problems
from canopy.predict.options import PredictOptions
from canopy.predict.raster import predict_raster
from tests.conftest import shared, write_raster

REAL_SCENES = [
    ("rgb_chm_pairs/neon_osbs_029/OSBS_029.tif", 32617),  # 0.1 m, nodata 255
    ("rgb_chm_pairs/neon_bart_041/BART_041.tif", 32619),
    ("rgb_only/2018_SJER_3_252000_4107000_image_477.tif", 32611),  # non-square pixels
    ("rgb_chm_pairs/kootenay_bc_drone/kootenayOrtho_from_rda.tif", 32611),  # 0.5 m, no nodata
]


def run_cli(*args, capsys=None):
    """Run the console entry point in-process; returns (exit code, stdout, stderr)."""
    from canopy import cli

    argv = sys.argv
    sys.argv = ["canopy", *map(str, args)]
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = argv
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


@pytest.mark.parametrize("rel,epsg", REAL_SCENES)
def test_real_scene_output_matches_input_footprint(tmp_path, micro_model, rel, epsg):
    src = shared(*rel.split("/"))
    out = predict_raster(src, tmp_path / "chm.tif", micro_model, PredictOptions())
    with rasterio.open(src) as a, rasterio.open(out) as b:
        assert b.crs.to_epsg() == epsg == a.crs.to_epsg()
        assert b.res == pytest.approx((0.6, 0.6))
        # same upper-left corner; the grid lies inside the input, less than a pixel short of it
        assert b.bounds.left == pytest.approx(a.bounds.left, abs=1e-6)
        assert b.bounds.top == pytest.approx(a.bounds.top, abs=1e-6)
        # whole pixels inside the input: never past its extent (issue #13), less than a pixel short
        assert 0 <= a.bounds.right - b.bounds.right < 0.6
        assert 0 <= b.bounds.bottom - a.bounds.bottom < 0.6
        assert b.descriptions == ("canopy_height",) and b.units == ("m",)
        assert np.isnan(b.nodata)
        heights = b.read(1)
        assert np.isfinite(heights).mean() > 0.9
        assert b.tags()["CANOPY_RESAMPLING"] == "average"
    assert cog_problems(out) == []
    assert out.with_suffix(".qml").read_text().count("<item ") == 5


def test_one_tile_at_model_gsd_is_the_model_output(tmp_path, micro_model, rgb_array):
    """A 256×256 raster already at 0.6 m reaches the model as one unmodified tile. The tile
    travels in a fixed-size (padded) batch, so float sums run in another order than a batch of
    one: equal to 1e-4 m (measured 1.5e-5), far below any resampling or misplacement."""
    rgb = rgb_array(256, 256)
    src = write_raster(tmp_path / "tile.tif", rgb)
    out = predict_raster(src, tmp_path / "chm.tif", micro_model, PredictOptions(precision="fp32"))
    expected = micro_model.predict_tensor(torch.from_numpy(rgb[None]))[0].numpy()
    with rasterio.open(out) as ds:
        assert ds.tags()["CANOPY_RESAMPLING"] == "none"
        assert ds.transform == Affine(0.6, 0, 400000.0, 0, -0.6, 3280000.0)
        np.testing.assert_allclose(ds.read(1), expected, rtol=0, atol=1e-4)


def test_large_output_has_average_overviews_and_uint8(tmp_path, micro_model, rgb_array):
    src = write_raster(tmp_path / "big.tif", rgb_array(1100, 1030))
    out = predict_raster(src, tmp_path / "big_chm.tif", micro_model,
                         PredictOptions(dtype="uint8", batch_size=16))
    with rasterio.open(out) as ds:
        assert ds.overviews(1) == [2, 4]  # down to smaller than one 512 block
        assert ds.dtypes[0] == "uint8" and ds.nodata == 255
        assert ds.profile["blockxsize"] == 512 and ds.compression.name == "deflate"
    assert cog_problems(out) == []


def test_nodata_stays_nodata_and_uncertainty_band(tmp_path, micro_model, rgb_array):
    rgb = rgb_array(300, 300)
    rgb[:, :, :100] = 0
    src = write_raster(tmp_path / "nd.tif", rgb, nodata=0)
    out = predict_raster(src, tmp_path / "nd_chm.tif", micro_model,
                         PredictOptions(uncertainty=True))
    with rasterio.open(out) as ds:
        assert ds.count == 2 and ds.descriptions == ("canopy_height", "canopy_height_std")
        h, s = ds.read(1), ds.read(2)
    assert np.isnan(h[:, :100]).all() and np.isfinite(h[:, 100:]).all()
    assert np.isnan(s[:, :100]).all() and (s[:, 100:] >= 0).all()


def test_int8_tile_does_not_depend_on_its_batch_mates():
    """int8 activation scales come from the tensor an op sees: the model runs one tile at a
    time, so a tile's heights are the same whichever tiles share its batch (cells
    of another size batch other tiles together; a tile in two cells' halos must agree)."""
    from canopy.model.checkpoints import load_model

    with rasterio.open(shared("rgb_chm_pairs", "kootenay_bc_drone", "kootenayOrtho_from_rda.tif")) as ds:
        img = torch.from_numpy(ds.read([1, 2, 3], window=((0, 192), (0, 192))))
    tiles = img.unfold(1, 96, 96).unfold(2, 96, 96).permute(1, 2, 0, 3, 4).reshape(-1, 3, 96, 96)
    dark = (tiles[1:] // 4).contiguous()  # batch-mates with a much smaller activation range
    q = load_model("default").quantize_int8()
    a = q.predict_tensor(tiles, precision="int8")
    b = q.predict_tensor(torch.cat([tiles[:1], dark]), precision="int8")
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[1], b[1])  # the batch-mates did change: their own heights differ


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_lanes_do_not_change_the_map(precision, rgb_array):
    """Batches run in parallel lanes (each on its share of the torch threads) give bit-identical
    heights to one batch after another, and the caller keeps its own thread count."""
    from canopy.model.checkpoints import load_model
    from canopy.predict.blend import predict_array

    model = load_model("micro").prepare_for_inference(precision)
    img = rgb_array(300, 260)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one, sd_one = predict_array(model, img, precision=precision, batch_size=2, lanes=1,
                                    with_std=True, fixed_batch=True)
        two, sd_two = predict_array(model, img, precision=precision, batch_size=2, lanes=2,
                                    with_std=True, fixed_batch=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert np.isfinite(one).all() and one.std() > 0
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(sd_one, sd_two)


def test_lane_plan_splits_the_threads_evenly():
    from canopy.predict.blend import lane_plan

    cpu, before = torch.device("cpu"), torch.get_num_threads()
    try:
        plans = {}
        for n in (1, 2, 3, 6, 16):
            torch.set_num_threads(n)
            plans[n] = lane_plan(None, cpu)
        torch.set_num_threads(6)
        assert lane_plan(4, cpu) == (4, 1) and lane_plan(9, cpu) == (6, 1)
        with pytest.raises(ValueError, match="at least 1"):
            lane_plan(0, cpu)
        if torch.cuda.is_available():
            assert lane_plan(None, torch.device("cuda"))[0] == 1
    finally:
        torch.set_num_threads(before)
    # one thread per lane up to 4 lanes, then equal teams; never more threads than given
    assert plans == {1: (1, 1), 2: (2, 1), 3: (3, 1), 6: (3, 2), 16: (4, 4)}


def test_geographic_input_is_mapped_in_utm(tmp_path, micro_model, rgb_array):
    t = Affine(0.6 / 111320, 0, -81.9, 0, -0.6 / 110900, 29.7)
    src = write_raster(tmp_path / "geo.tif", rgb_array(200, 200), crs="EPSG:4326", transform=t)
    with pytest.warns(UserWarning, match="geographic"):
        out = predict_raster(src, tmp_path / "geo_chm.tif", micro_model, PredictOptions())
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 32617
        assert ds.res == pytest.approx((0.6, 0.6))


def test_band_selection_and_scaling(tmp_path, micro_model, rgb_array):
    rgbn = np.concatenate([rgb_array(256, 256), rgb_array(256, 256)[:1]]).astype(np.uint16) * 10
    src = write_raster(tmp_path / "rgbn.tif", rgbn)
    out = predict_raster(src, tmp_path / "o.tif", micro_model,
                         PredictOptions(bands="1,2,3", scale=(0, 2550), precision="fp32"))
    expected = micro_model.predict_tensor(torch.from_numpy((rgbn[:3] // 10).astype(np.uint8)[None]))[0]
    with rasterio.open(out) as ds:
        np.testing.assert_allclose(ds.read(1), expected.numpy(), atol=1e-4)


def test_rgba_drone_orthomosaic(tmp_path, micro_model, rgb_array):
    """A 4th alpha band (as drone orthomosaics have) is the mask, not a reason to fail."""
    rgb = rgb_array(400, 400)
    alpha = np.full((1, 400, 400), 255, np.uint8)
    alpha[:, :, :150] = 0
    src = tmp_path / "rgba.tif"
    with rasterio.open(src, "w", driver="GTiff", width=400, height=400, count=4, dtype="uint8",
                       crs="EPSG:32617", transform=Affine(0.1, 0, 400000, 0, -0.1, 3280000),
                       photometric="RGB", alpha="YES") as ds:
        ds.write(np.concatenate([rgb, alpha]))
    out = predict_raster(src, tmp_path / "o.tif", micro_model, PredictOptions())
    with rasterio.open(out) as ds:
        h = ds.read(1)
    assert np.isnan(h[:, :24]).all() and np.isfinite(h[:, 26:]).all()


def test_feet_crs_is_mapped_in_metres(tmp_path, micro_model, rgb_array):
    """California State Plane in US feet: 1 ft pixels are 0.3048 m, not 1 m."""
    t = Affine(1.0, 0, 6_000_000, 0, -1.0, 2_000_000)
    src = write_raster(tmp_path / "ft.tif", rgb_array(300, 300), crs="EPSG:2227", transform=t)
    with pytest.warns(UserWarning, match="non-metre"):
        out = predict_raster(src, tmp_path / "o.tif", micro_model, PredictOptions())
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 32610 and ds.res == pytest.approx((0.6, 0.6))
        # 300 ft = 91.4 m ≈ 152 px at 0.6 m (a little more: the UTM box holds the rotated square)
        assert 150 <= ds.width <= 160
        assert ds.tags()["CANOPY_RESAMPLING"] == "average"


def test_training_chips_and_predictions_see_the_same_pixels():
    """A training chip, a state-scale (--aoi) read and a one-raster prediction read of the same
    grid hold the same imagery and mask (one reader, data_catalog.raster.read_rgb): the model is
    shown at training what it will see at inference. Real 0.5 m drone ortho, at its own GSD
    (a copy) and at the model's 0.6 m (averaged)."""
    from canopy.predict.sources import index_imagery, read_mosaic
    from data_catalog.chips import ChipSampler
    from data_catalog.raster import read_rgb_on_grid

    folder = ("rgb_chm_pairs", "kootenay_bc_drone")
    img, chm = shared(*folder, "kootenayOrtho_from_rda.tif"), shared(*folder, "kootenayCHM.tif")
    scenes, _ = index_imagery(img)
    one = read_rgb_on_grid(img, 0.5)  # already at 0.5 m: the file's own grid, on the 0.5 lattice
    for gsd in (0.5, 0.6):
        chips = list(ChipSampler([(str(img), str(chm))], chip_size=48, gsd=gsd, stride=40,
                                 min_coverage=0.3).chips())
        assert len(chips) >= 6 and any(not c.valid.all() for c in chips)  # edges included
        for chip in chips:
            rgb, valid, _ = read_mosaic(scenes, chip.crs, chip.transform, chip.valid.shape, gsd)
            np.testing.assert_array_equal(valid, chip.valid)
            np.testing.assert_array_equal(rgb, chip.image)
            if gsd == 0.5:
                r0 = round((one.transform.f - chip.transform.f) / gsd)
                c0 = round((chip.transform.c - one.transform.c) / gsd)
                rs, cs = slice(max(r0, 0), r0 + 48), slice(max(c0, 0), c0 + 48)
                inside = (slice(rs.start - r0, rs.stop - r0), slice(cs.start - c0, cs.stop - c0))
                part = one.rgb[:, rs, cs]
                n_r, n_c = part.shape[1:]
                np.testing.assert_array_equal(
                    part, chip.image[:, inside[0].start:inside[0].start + n_r,
                                     inside[1].start:inside[1].start + n_c])


# ------------------------------------------------------------------------------------------
# bad input: one line, non-zero exit, no output file


@pytest.fixture
def good_rgb(tmp_path, rgb_array):
    return write_raster(tmp_path / "good.tif", rgb_array(64, 64))


def _bad_cases(tmp_path, rgb_array, micro_model):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    nocrs = write_raster(tmp_path / "nocrs.tif", rgb_array(64, 64), crs=None)
    two = write_raster(tmp_path / "two.tif", rgb_array(64, 64)[:2])
    u16 = write_raster(tmp_path / "u16.tif", rgb_array(64, 64).astype(np.uint16))
    empty = write_raster(tmp_path / "empty.tif", np.zeros((3, 64, 64), np.uint8), nodata=0)
    wrong = tmp_path / "wrong_arch.pth"
    sd = dict(micro_model.state_dict())
    sd["decode_head.conv_depth.head.4.weight"] = torch.zeros(5, 16, 1, 1)
    torch.save({"state_dict": sd}, wrong)
    good = write_raster(tmp_path / "ok.tif", rgb_array(64, 64))
    import rasterio as rio

    nogeo = tmp_path / "nogeo.tif"  # pixels only: no geotransform, no CRS
    with rio.open(nogeo, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8") as ds:
        ds.write(rgb_array(64, 64))
    return [
        ([tmp_path / "missing.tif"], "cannot open as a raster"),
        ([text], "cannot open as a raster"),
        ([nocrs], "has no CRS"),
        ([two], "has 2 band(s)"),
        ([u16], "--scale"),
        ([empty], "no valid pixels"),
        ([good, "--checkpoint", wrong], "mismatched shapes"),
        ([good, "--checkpoint", tmp_path / "nope.pth"], "not found"),
        ([good, "--device", "tpu"], "--device"),
        ([good, "--stride", "300"], "--stride"),
        ([good, "--precision", "fp16"], "--precision"),
        ([good, "--precision", "int8", "--device", "cuda"], "CPU only"),
        # the options type names fields; the CLI turns them into its flags
        ([good, "--crs", "EPSG:99999"], "--crs 'EPSG:99999' is not a coordinate reference system"),
        ([good, "--bands", "1,2"], "--bands must be three band numbers"),
        ([good, "--scale", "3", "1"], "--scale needs MIN < MAX"),
        ([good, "--dtype", "int16"], "--dtype must be one of float32, uint8"),
        # issue #13: tracebacks and silent wrong results before
        ([nocrs, "--crs", "EPSG:4326"], "do not fit EPSG:4326"),
        ([good, "--scale", "0", "3000"], "holds uint8 data, already 0..255; drop --scale"),
        ([u16, "--scale", "0", "70000"], "reaches outside what uint16 data can hold"),
        ([nogeo, "--crs", "EPSG:32617"], "has no georeferencing"),
    ]


def test_bad_inputs_one_line_nonzero_no_output(tmp_path, rgb_array, micro_model, capsys):
    for args, needle in _bad_cases(tmp_path, rgb_array, micro_model):
        out = tmp_path / "out" / "chm.tif"
        checkpoint = [] if "--checkpoint" in map(str, args) else ["--checkpoint", "micro"]
        code, _, err = run_cli("predict", *args, "-o", out, "-q", *checkpoint, capsys=capsys)
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
        assert code == 2, (args, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (args, err)
        assert not out.exists() and not list(tmp_path.glob("out/*.tif"))


def test_existing_output_needs_overwrite(tmp_path, good_rgb, capsys):
    out = tmp_path / "chm.tif"
    assert run_cli("predict", good_rgb, "-o", out, "-c", "micro", "-q", capsys=capsys)[0] == 0
    before = out.stat().st_mtime_ns
    code, _, err = run_cli("predict", good_rgb, "-o", out, "-c", "micro", "-q", capsys=capsys)
    assert code == 2 and "already exists (use --overwrite to replace it)" in err
    assert out.stat().st_mtime_ns == before
    code, _, err = run_cli("predict", good_rgb, "-o", out, "-c", "micro", "-q", "--overwrite",
                           capsys=capsys)
    assert code == 0


def test_console_script_end_to_end(tmp_path, good_rgb):
    """The installed ``canopy`` entry point, as a user runs it (progress bar on stderr)."""
    out = tmp_path / "e2e.tif"
    res = subprocess.run([sys.executable, "-m", "canopy.cli", "predict", str(good_rgb), "-o",
                          str(out), "--checkpoint", "micro", "--uncertainty"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and out.exists() and out.with_suffix(".qml").exists()
    assert "random weights" in res.stderr


def test_edge_error_tags_describe_the_tiles_actually_run(tmp_path, micro_model, rgb_array):
    """canopy evaluate finds tile borders from the tags: exactly the tiles predict cut."""
    from canopy.evaluate.metrics import tile_border_positions
    from canopy.io.outputs import TileLattice

    src = write_raster(tmp_path / "t.tif", rgb_array(500, 300))
    out = predict_raster(src, tmp_path / "o.tif", micro_model, PredictOptions())
    with rasterio.open(out) as ds:
        tags = ds.tags()
    assert (tags["CANOPY_TILE_COUNT_ROW"], tags["CANOPY_TILE_COUNT_COL"]) == ("3", "2")
    lattice = TileLattice.from_tags(tags)
    assert (lattice.count_row, lattice.count_col, lattice.stride) == (3, 2, 192)
    # rows: tiles at 0, 192, 384 (the last one padded past 500) → borders 192, 256, 384, 448
    assert list(tile_border_positions(500, 256, 192, 0, 3)) == [192, 256, 384, 448]
    assert list(tile_border_positions(300, 256, 192, 0, 2)) == [192, 256]


def test_gedi_correction_multiplies_by_the_factor_field(tmp_path, micro_model, rgb_array):
    import torch as _torch

    from canopy.predict.correction import factor_field
    from canopy.model.gedi_correction import CorrectionConfig, GediCorrectionNet, save_correction

    _torch.manual_seed(1)
    corr = GediCorrectionNet(CorrectionConfig(block_px=128, input_px=32, gsd=0.6)).eval()
    _torch.nn.init.normal_(corr.head[-1].weight, std=0.5)
    folder = save_correction(corr, tmp_path / "gedi1")
    rgb = rgb_array(300, 300)
    src = write_raster(tmp_path / "s.tif", rgb)
    plain = predict_raster(src, tmp_path / "plain.tif", micro_model, PredictOptions())
    fixed = predict_raster(src, tmp_path / "fixed.tif", micro_model,
                           PredictOptions(gedi_correction=str(folder)))
    with rasterio.open(plain) as p, rasterio.open(fixed) as f:
        h, hc, t = p.read(1), f.read(1), p.transform
        assert f.tags()["CANOPY_GEDI_CORRECTION"] == "gedi1"
    field = factor_field(t, h.shape, rgb, "EPSG:32617", corr)
    np.testing.assert_allclose(hc, (h.astype(np.float64) * field).astype(np.float32), rtol=1e-6)
    assert field.std() > 1e-3


def test_options_are_validated_once_naming_the_field():
    """PredictOptions refuses bad values when made, naming the field (an API shows the field,
    the CLI its flag), and normalises what it accepts."""
    from canopy.errors import OptionError
    from canopy.predict.options import PredictOptions

    bad = [dict(batch_size=0), dict(stride=0), dict(lanes=-1), dict(torch_threads=0),
           dict(device="gpu"), dict(device="cuda:x"), dict(precision="fp16"),
           dict(precision="int8", device="cuda"), dict(dtype="int16"), dict(bands="1,2"),
           dict(bands="r,g,b"), dict(bands=(0, 1, 2)), dict(scale=(3, 1)), dict(crs="EPSG:99999"),
           dict(batch_size=True)]
    for kwargs in bad:
        with pytest.raises(OptionError) as err:
            PredictOptions(**kwargs)
        field = next(iter(kwargs))
        assert err.value.field == field and str(err.value).startswith(f"{field} "), kwargs
        assert err.value.render(lambda n: f"--{n}").startswith(f"--{field} ")
    opts = PredictOptions(bands="3,2,1", scale=[0, 3000], gedi_correction=Path("g"))
    assert opts.bands == (3, 2, 1) and opts.scale == (0.0, 3000.0) and opts.gedi_correction == "g"
    with pytest.raises(OptionError, match="stride must be between 1 and the model tile size 256"):
        PredictOptions(stride=300).check_for(256)


@pytest.mark.parametrize("precision,message", [
    ("fp32", "non-finite heights for .* valid pixels"), ("bf16", "non-finite heights"),
    ("int8", r"weights hold NaN .*decode_head.project.conv.bias")])
def test_a_model_giving_nan_writes_no_map(tmp_path, good_rgb, precision, message):
    """A model whose output is NaN over valid input is an error, not a finished-looking COG of
    nodata (before: a 100 % NaN map, 'wrote …', exit 0), in every precision: int8 kernels clamp
    NaN into range, so there the weights are checked before quantising (they gave a finite,
    wrong map when ``auto`` chose int8)."""
    from canopy.errors import ModelOutputError
    from canopy.model.checkpoints import load_model

    broken = load_model("micro")
    with torch.no_grad():
        broken.decode_head.project.conv.bias.fill_(float("nan"))
    with pytest.raises(ModelOutputError, match=message):
        predict_raster(good_rgb, tmp_path / "nan.tif", broken, PredictOptions(precision=precision))
    assert not list(tmp_path.glob("*nan*"))


def test_mirror_fill_is_reflect_padding_at_a_straight_edge_and_window_independent(rgb_array):
    """The edge rule: at a raster's straight edge the mirror fill is numpy's reflect padding (so
    one-raster outputs did not change), and inside a larger area a window with 2·reach of
    context fills its pixels exactly as the whole area does (so cells stay seam-free)."""
    from canopy.predict.blend import mirror_fill

    fill = np.array([107, 105, 75], np.uint8)
    img = rgb_array(40, 60)
    padded = np.zeros((3, 40 + 17, 60 + 20), np.uint8)
    valid = np.zeros(padded.shape[1:], bool)
    padded[:, 7:47, 5:65], valid[7:47, 5:65] = img, True
    np.testing.assert_array_equal(mirror_fill(padded, valid, 64, fill),
                                  np.pad(img, ((0, 0), (7, 10), (5, 15)), mode="reflect"))
    # an irregular footprint: a disc of imagery with a hole, in a 200² area
    rng = np.random.default_rng(1)
    area = rng.integers(0, 255, (3, 200, 200)).astype(np.uint8)
    yy, xx = np.mgrid[:200, :200]
    ok = ((yy - 90) ** 2 + (xx - 110) ** 2 < 70 ** 2) & ~((yy - 80) ** 2 + (xx - 100) ** 2 < 8 ** 2)
    reach = 24
    whole = mirror_fill(area, ok, reach, fill)
    for r0, c0 in ((10, 20), (70, 90), (120, 5)):
        win = (slice(r0, r0 + 64), slice(c0, c0 + 64))
        ctx = (slice(max(r0 - 2 * reach, 0), r0 + 64 + 2 * reach),
               slice(max(c0 - 2 * reach, 0), c0 + 64 + 2 * reach))
        part = mirror_fill(area[:, ctx[0], ctx[1]], ok[ctx], reach, fill)
        dr, dc = r0 - ctx[0].start, c0 - ctx[1].start
        np.testing.assert_array_equal(part[:, dr:dr + 64, dc:dc + 64], whole[:, win[0], win[1]])
    assert (whole[:, ~ok] != fill[:, None]).any(1).all()  # missing pixels near imagery mirrored


def test_unwritable_or_full_output_fails_before_any_work(tmp_path, good_rgb, micro_model,
                                                        monkeypatch, capsys):
    """Issue #13: a folder that cannot be written, or a disk without room for the map, is one
    line at the start (before: a 46-line traceback after the whole inference)."""
    import shutil

    from canopy.errors import OutputError

    unwritable = Path("/sys/canopy-test-out")  # sysfs refuses new files, even to root
    probe = Path("/sys") / "canopy-write-check"
    try:
        probe.write_bytes(b"")
        probe.unlink()
        pytest.skip("/sys is writable here: no unwritable folder to try")
    except OSError:
        pass
    code, _, err = run_cli("predict", good_rgb, "-o", unwritable / "chm.tif", "-c", "micro",
                           "-q", capsys=capsys)
    assert code == 2 and err.startswith("error: cannot write to '/sys'") and len(err.splitlines()) == 1

    calls = []
    import canopy.predict.raster as raster_mod

    class CountingReader(raster_mod.LatticeReader):
        def __init__(self, *a, **k):
            calls.append(a)
            super().__init__(*a, **k)

    monkeypatch.setattr(raster_mod, "LatticeReader", CountingReader)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=1000))
    with pytest.raises(OutputError, match=r"a 64×64 px map needs about 16.4 kB on disk, but only 1.0 kB"):
        predict_raster(good_rgb, tmp_path / "full.tif", micro_model)
    assert calls == [] and not (tmp_path / "full.tif").exists()


def test_progress_goes_to_logs_when_stderr_is_not_a_terminal():
    """Issue #13: with stderr redirected (a batch job's log) there was no progress at all. The
    CLI's renderer writes a plain line every so often and at the end; on a terminal, bars."""
    import io

    from canopy.console import ProgressBars
    from canopy.progress import Progress

    log = io.StringIO()  # not a terminal
    with ProgressBars("run", log_every_s=0.0, stream=log) as bars:
        for done in range(0, 5):
            bars(Progress("cells", done, 4))
        bars(Progress("cells", 4, 4, message="Dask dashboard: http://x"))
    lines = log.getvalue().splitlines()
    assert "Dask dashboard: http://x" in lines
    assert any(line.startswith("run: cells 2/4 (50.0 %)") for line in lines)
    assert lines[-1].startswith("run: cells 4/4 (100.0 %)")
    quiet = io.StringIO()
    with ProgressBars("run", log_every_s=3600, stream=quiet) as bars:
        for done in range(0, 5):
            bars(Progress("cells", done, 4))
    lines = quiet.getvalue().splitlines()  # an hour apart: only the final line
    assert len(lines) == 1 and lines[0].startswith("run: cells 4/4 (100.0 %)")


def test_cli_small_things_a_gis_analyst_notices(tmp_path, good_rgb, capsys):
    """Issue #13 item 4: --aoi with an -o ending in .tif made a folder called x.tif; a positional
    input beside --imagery was silently ignored; `canopy demo` replaced its map silently; and
    `canopy predict` said nothing about the bundled model being a demonstration model."""
    aoi = ["--aoi", "-81.99,29.68,-81.97,29.70"]
    code, _, err = run_cli("predict", *aoi, "--imagery", good_rgb, "-o", tmp_path / "x.tif",
                           "-c", "micro", capsys=capsys)
    assert code == 2 and "ends in .tif, but --aoi writes a folder" in err
    assert not (tmp_path / "x.tif").exists()
    code, _, err = run_cli("predict", good_rgb, *aoi, "--imagery", good_rgb, "-o",
                           tmp_path / "run", "-c", "micro", capsys=capsys)
    assert code == 2 and "give the imagery once" in err and not (tmp_path / "run").exists()
    code, _, err = run_cli("predict", good_rgb, "--imagery", good_rgb, "-o", tmp_path / "a.tif",
                           "-c", "micro", capsys=capsys)
    assert code == 2 and "--imagery goes with --aoi" in err

    code, _, err = run_cli("predict", good_rgb, "-o", tmp_path / "d.tif", "-q", capsys=capsys)
    assert code == 0 and err.count("demonstration model") == 1, err

    assert run_cli("demo", "-o", tmp_path / "demo", capsys=capsys)[0] == 0
    before = (tmp_path / "demo" / "sample_chm.tif").stat().st_mtime_ns
    code, _, err = run_cli("demo", "-o", tmp_path / "demo", capsys=capsys)
    assert code == 2 and "already exists (use --overwrite" in err
    assert (tmp_path / "demo" / "sample_chm.tif").stat().st_mtime_ns == before
    assert run_cli("demo", "-o", tmp_path / "demo", "--overwrite", capsys=capsys)[0] == 0


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_windowed_prediction_equals_one_piece_bytes(tmp_path, rgb_array, precision):
    """#21: one raster is predicted window by window in bounded memory. The map is the same
    bytes as the one-piece computation (one window over everything), here with nodata holes,
    imagery ending inside the raster, an input finer than the model (averaged) and the spread
    band; a window far smaller than the raster stresses every boundary."""
    from affine import Affine

    from canopy.model.checkpoints import load_model

    rgb = rgb_array(700, 1000)
    rgb[:, 300:340, 100:180] = 0  # a hole of nodata
    # a 180 px (output) band without imagery across the tile start at 192 px: pixels of that
    # tile mirror imagery from well left of it, which a window sees only in its context
    rgb[:, :, 340:700] = 0
    src = write_raster(tmp_path / "in.tif", rgb, nodata=0,
                       transform=Affine(0.3, 0, 400000.1, 0, -0.3, 3280000.2))
    opts = PredictOptions(precision=precision, uncertainty=True, batch_size=4)
    whole = predict_raster(src, tmp_path / "whole.tif", load_model("micro"), opts)
    windowed = predict_raster(src, tmp_path / "windowed.tif", load_model("micro"), opts,
                              window_px=96)
    assert whole.read_bytes() == windowed.read_bytes()
    with rasterio.open(whole) as ds:
        h = ds.read(1)
        assert ds.width == 500 and np.isfinite(h).any() and np.isnan(h).any()
    assert not list(tmp_path.glob(".*"))  # no staging file left behind
