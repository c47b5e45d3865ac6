"""State-scale engine (``canopy predict --aoi``): grid, seam-free cells, Dask, resume, mosaics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import from_bounds
from shapely.geometry import box

from canopy.errors import InputError, OptionError, OutputError
from canopy.predict.engine import predict_aoi
from canopy.predict.options import PredictOptions
from canopy.predict.grid import Cell, cells_for_aoi, tile_window
from tests.conftest import shared, write_raster

# fp32 named: runs compared with each other must not each time-probe their own precision
JOB = ("micro", PredictOptions(batch_size=4, precision="fp32"))
OSBS = ("rgb_chm_pairs", "neon_osbs_029", "OSBS_029.tif")
OSBS_AOI = "-81.9900,29.6924,-81.9897,29.69265"


@pytest.fixture(scope="module")
def client():
    """A real dask.distributed LocalCluster with 2 worker processes, shared by this module."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=":0", silence_logs=40)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def read_common(a_path, b_path, band=1):
    with rasterio.open(a_path) as a, rasterio.open(b_path) as b:
        left, right = max(a.bounds.left, b.bounds.left), min(a.bounds.right, b.bounds.right)
        bottom, top = max(a.bounds.bottom, b.bounds.bottom), min(a.bounds.top, b.bounds.top)
        A = a.read(band, window=from_bounds(left, bottom, right, top, a.transform))
        B = b.read(band, window=from_bounds(left, bottom, right, top, b.transform))
    return A, B


# ------------------------------------------------------------------------------- grid


def test_grid_is_anchored_and_stable():
    aoi = box(-121.5, 38.5, -121.45, 38.55)
    a = [c.id for c, _ in cells_for_aoi(aoi, 0.6, 4096)]
    b = [c.id for c, _ in cells_for_aoi(box(-121.48, 38.5, -121.45, 38.53), 0.6, 4096)]
    assert a == sorted(set(a), key=a.index) and set(b) <= set(a)  # neighbours share cells
    cell = Cell(32610, 256, 1736, 4096, 0.6)
    assert cell.bounds[0] == pytest.approx(256 * 4096 * 0.6)
    assert cell.transform.a == 0.6 and cell.id == "32610_E0256_N1736"


def test_state_spanning_two_zones_gets_cells_in_each():
    from data_catalog.aoi import resolve_aoi

    ca = resolve_aoi("California").geometry
    cells = cells_for_aoi(ca, 0.6, 65536)  # coarse cells keep this fast
    assert {c.epsg for c, _ in cells} == {32610, 32611}
    sp = resolve_aoi("São Paulo").geometry
    assert {c.epsg for c, _ in cells_for_aoi(sp, 0.6, 65536)} == {32722, 32723}


def test_zone_bands_follow_the_one_zone_rule():
    """Every piece of an AOI split along zone bands lies in the zone data_catalog.raster gives
    its points (the rule a one-raster prediction and the training chips use)."""
    import shapely
    from shapely.geometry import box

    from canopy.predict.grid import zone_parts
    from data_catalog.raster import utm_epsg

    rng = np.random.default_rng(7)
    aois = [box(-126.0, -3.0, -108.0, 2.0), box(174.0, 10.0, 180.0, 11.0),
            box(-180.0, -5.0, -177.0, 5.0)]
    aois += [box(x, y, x + w, y + h) for x, y, w, h in zip(
        rng.uniform(-179, 170, 20), rng.uniform(-60, 60, 20), rng.uniform(0.1, 9, 20),
        rng.uniform(0.1, 3, 20))]
    for aoi in aois:
        parts = zone_parts(aoi)
        assert sum(p.area for _, p in parts) == pytest.approx(aoi.area)
        for epsg, part in parts:
            x0, y0, x1, y1 = part.bounds
            pts = shapely.points(rng.uniform(x0, x1, 50), rng.uniform(y0, y1, 50))
            for pt in pts[shapely.contains(part, pts)]:  # interior points: edges are tested apart
                assert utm_epsg(pt.x, pt.y) == epsg, (aoi.bounds, epsg, pt)


def test_tile_window_holds_exactly_the_overlapping_tiles():
    cell = Cell(32617, 10, 20, 500, 0.6)
    dr, dc, nr, nc = tile_window(cell, 256, 192)
    r0, c0 = cell.pixel_origin
    assert (r0 + dr) % 192 == 0 and (c0 + dc) % 192 == 0  # window starts on the tile lattice
    assert r0 + dr + 256 > r0 and r0 + dr - 192 + 256 <= r0  # first tile touches, the one before not
    assert (nr - 256) % 192 == 0 and r0 + dr + nr - 256 < r0 + 500 <= r0 + dr + nr


# ------------------------------------------------------------------------------- seam-free


@pytest.fixture(scope="module")
def chmv2_folder(tmp_path_factory):
    """A CHMv2 model in the Hugging Face layout (seeded random weights, micro size)."""
    pytest.importorskip("transformers")
    from tests.test_chmv2 import hf_chmv2

    folder = tmp_path_factory.mktemp("chmv2")
    hf_chmv2(folder)
    return folder


@pytest.mark.parametrize("model,precision", [("micro", "fp32"), ("chmv2", "fp32"),
                                             ("chmv2", "int8")])
def test_two_cell_sizes_give_identical_arrays(tmp_path, client, model, precision, request):
    """Seam-free: another cell size (other tiles in each cell, other batches) gives the
    identical array, for v1-style models and for CHMv2 (RoPE backbone, mixlog head)."""
    src = shared(*OSBS)
    if model == "chmv2":
        model = str(request.getfixturevalue("chmv2_folder"))
    job = (model, PredictOptions(batch_size=4, precision=precision))
    a = predict_aoi(OSBS_AOI, src, tmp_path / "a", *job, cell_px=64, client=client)
    b = predict_aoi(OSBS_AOI, src, tmp_path / "b", *job, cell_px=100, client=client)
    assert a.cells_done == 4 and b.cells_done == 2
    A, B = read_common(a.mosaic, b.mosaic)
    assert np.isfinite(A).sum() > 2000
    np.testing.assert_array_equal(A, B)


# a 6 m square of the OSBS scene without imagery (nodata 255), inside the AOI: x0, y0, x1, y1
OSBS_HOLE = (404232.0, 3285120.0, 404238.0, 3285126.0)


def _osbs_with_a_hole(folder: Path) -> Path:
    """The real OSBS_029 scene (same name) with OSBS_HOLE set to its nodata value."""
    with rasterio.open(shared(*OSBS)) as ds:
        rgb, profile, t = ds.read(), ds.profile, ds.transform
    x0, y0, x1, y1 = OSBS_HOLE
    c0, r0 = ~t * (x0, y1)
    c1, r1 = ~t * (x1, y0)
    rgb[:, round(r0):round(r1), round(c0):round(c1)] = profile["nodata"]
    folder.mkdir()
    with rasterio.open(folder / "OSBS_029.tif", "w", **profile) as ds:
        ds.write(rgb)
    return folder / "OSBS_029.tif"


def test_outputs_of_a_run(tmp_path, client):
    """The outputs of a state run over real imagery with a hole in it. README: "Pixels without
    imagery or outside the AOI are nodata, never 0 m": mosaic pixels wholly inside the hole or
    with their centre outside the AOI polygon are NaN, and every pixel well inside both the AOI
    and the imagery has a height. Guards against: pixels without imagery written as 0 m
    (canopy/predict/blend.py) and pixels outside the AOI written as 0 m
    (canopy/predict/engine.py); the former check (some NaN and some finite pixels) passed
    with both."""
    import shapely

    from canopy.predict.grid import project_geometry
    from data_catalog.aoi import resolve_aoi

    src = _osbs_with_a_hole(tmp_path / "scene")
    s = predict_aoi(OSBS_AOI, src, tmp_path / "o", *JOB, cell_px=64, client=client)
    out = tmp_path / "o"
    with rasterio.open(s.mosaic) as m, rasterio.open(out / "overview.tif") as ov:
        assert m.crs.to_epsg() == 32617 and m.res == (0.6, 0.6)
        assert m.overviews(1), "the mosaic must point to the overview COG"
        assert ov.bounds == pytest.approx(m.bounds)  # GDAL takes an overview to cover the VRT
        h, t = m.read(1), m.transform
    rows, cols = np.mgrid[0:h.shape[0], 0:h.shape[1]]
    xc, yc = t.c + (cols + 0.5) * t.a, t.f + (rows + 0.5) * t.e  # pixel centres
    half = t.a / 2
    x0, y0, x1, y1 = OSBS_HOLE
    in_hole = (xc - half >= x0) & (xc + half <= x1) & (yc - half >= y0) & (yc + half <= y1)
    near_hole = (xc > x0 - 2 * t.a) & (xc < x1 + 2 * t.a) & (yc > y0 - 2 * t.a) & (yc < y1 + 2 * t.a)
    aoi = project_geometry(resolve_aoi(OSBS_AOI).geometry, 32617)
    centres = shapely.points(xc, yc)
    outside = ~shapely.contains(aoi, centres)
    well_inside = shapely.contains(aoi.buffer(-2 * t.a), centres) & ~near_hole
    assert in_hole.sum() >= 64 and outside.sum() >= 10 and well_inside.sum() > 1500
    assert np.isnan(h[in_hole]).all(), h[in_hole]
    assert np.isnan(h[outside]).all(), h[outside][np.isfinite(h[outside])]
    assert np.isfinite(h[well_inside]).all() and (h[well_inside] > 0).all()
    with rasterio.open(out / "overview.tif") as ov:
        assert ov.res[0] == pytest.approx(0.6 * 16, rel=0.2)
    for cell in (out / "cells").glob("*.tif"):
        with rasterio.open(cell) as ds:
            assert ds.descriptions == ("canopy_height",) and ds.units == ("m",)
            assert ds.tags()["CANOPY_CELL"] == cell.stem
        assert cell.with_suffix(".qml").exists()  # a cell opened alone in QGIS is styled too
    collection = json.loads((out / "stac" / "collection.json").read_text())
    items = [ln for ln in collection["links"] if ln["rel"] == "item"]
    assert len(items) == s.cells_done == 4
    item = json.loads((out / "stac" / items[0]["href"]).resolve().read_text())
    assert item["properties"]["proj:code"] == "EPSG:32617"
    assert item["properties"]["canopy:model"] == "micro"
    assert item["properties"]["canopy:source_scenes"] == ["OSBS_029.tif"]
    # no acquisition date in the scene's tags or name: said so; the run's time is 'created'
    run_json = json.loads((out / "run.json").read_text())
    assert item["properties"]["canopy:acquisition_date"] == "unknown"
    assert item["properties"]["created"].startswith(run_json["created"][:19])
    assert (out / "mosaic.qml").exists() and (out / "run.json").exists()



def test_stac_items_carry_the_imagery_date_not_the_processing_time(tmp_path, client):
    """Issue #13: an item's datetime was the processing time. It is now the imagery's
    acquisition, here from the scene's file name (tags and the catalog are read first), with
    the processing time as 'created'."""
    import shutil

    src = tmp_path / "osbs_20180915.tif"
    shutil.copy(shared(*OSBS), src)
    s = predict_aoi(OSBS_AOI, src, tmp_path / "o", *JOB, cell_px=64, client=client)
    collection = json.loads((tmp_path / "o" / "stac" / "collection.json").read_text())
    href = next(ln["href"] for ln in collection["links"] if ln["rel"] == "item")
    props = json.loads((tmp_path / "o" / "stac" / href).resolve().read_text())["properties"]
    assert props["start_datetime"].startswith("2018-09-15") and props["datetime"] is None
    assert "canopy:acquisition_date" not in props and props["created"].startswith("20")
    assert collection["extent"]["temporal"]["interval"][0][0].startswith("2018-09-15")
    with rasterio.open(next((tmp_path / "o" / "cells").glob("*.tif"))) as ds:
        assert ds.tags()["CANOPY_IMAGERY_DATES"] == "2018-09-15/2018-09-15"
    assert s.cells_done == 4

def test_one_raster_and_a_cell_carry_the_same_tags(tmp_path, client, micro_model):
    """One output contract (canopy.io.outputs): a one-raster prediction and every cell of a
    state run carry the same tag set, and a cell's tile tags name exactly the tiles of the
    zone's lattice that cross it (the borders evaluate looks for)."""
    from canopy.evaluate.metrics import tile_border_positions
    from canopy.io import outputs
    from canopy.predict.raster import predict_raster

    src = shared(*OSBS)
    one = predict_raster(src, tmp_path / "one.tif", micro_model)
    # a short stride puts several tile borders inside every cell
    s = predict_aoi(OSBS_AOI, src, tmp_path / "o", "micro", PredictOptions(batch_size=4, stride=40),
                    cell_px=100, client=client)
    with rasterio.open(one) as ds:
        one_tags = ds.tags()
    expected = set(outputs.PREDICTION_TAGS) | {"AREA_OR_POINT"}
    assert set(one_tags) == expected
    assert one_tags[outputs.CELL] == "none" and one_tags[outputs.SOURCE_IMAGES] == "OSBS_029.tif"
    cells = sorted((tmp_path / "o" / "cells").glob("*.tif"))
    assert len(cells) == s.cells_done == 2
    for path in cells:
        with rasterio.open(path) as ds:
            tags, shape, t = ds.tags(), ds.shape, ds.transform
        assert set(tags) == expected, set(tags) ^ expected
        assert tags[outputs.MODEL_SOURCE] == one_tags[outputs.MODEL_SOURCE]
        lat = outputs.TileLattice.from_tags(tags)
        # the zone's lattice: tiles start at global pixel multiples of the stride
        row0, col0 = round(-t.f / t.a), round(t.c / t.a)
        for axis, (length, g0) in enumerate(zip(shape, (row0, col0))):
            origin, count = (lat.origin_row, lat.count_row) if axis == 0 else (lat.origin_col, lat.count_col)
            borders = tile_border_positions(length, lat.size, lat.stride, origin, count)
            assert len(borders) >= 3
            np.testing.assert_array_equal(
                borders, tile_border_positions(length, lat.size, lat.stride, (-g0) % lat.stride))


def test_aoi_outside_polygon_is_nodata(tmp_path, client):
    src = shared(*OSBS)
    # a triangle: half of its bounding box is outside the polygon
    tri = "POLYGON ((-81.9900 29.6924, -81.9897 29.6924, -81.9900 29.69265, -81.9900 29.6924))"
    s = predict_aoi(tri, src, tmp_path / "t", *JOB, cell_px=128, client=client)
    with rasterio.open(s.mosaic) as m:
        h = m.read(1)
        rows, cols = np.nonzero(np.isfinite(h))
    # finite pixels form a lower-left triangle: the upper-right corner is nodata
    assert np.isfinite(h).any()
    assert not np.isfinite(h[rows.min(), cols.max()])


# ------------------------------------------------------------------------------- real states, mixed CRSs


def test_california_boundary_with_real_imagery(tmp_path, client):
    src = shared("rgb_only", "2018_SJER_3_252000_4107000_image_477.tif")
    s = predict_aoi("California", src, tmp_path / "ca", *JOB, cell_px=128, client=client)
    assert s.cells_done >= 1
    with rasterio.open(s.mosaic) as m:
        assert m.crs.to_epsg() == 32611


def _sao_paulo_scenes(folder: Path, rgb_array):
    """Two generated scenes in São Paulo state, in UTM 22S and 23S, overlapping the 48° W meridian."""
    folder.mkdir()
    from pyproj import Transformer

    for epsg in (32722, 32723):
        x, y = Transformer.from_crs(4326, epsg, always_xy=True).transform(-48.0, -23.6)
        t = Affine(0.5, 0, x - 60, 0, -0.5, y + 60)
        write_raster(folder / f"scene_{epsg}.tif", rgb_array(240, 240), crs=f"EPSG:{epsg}", transform=t)
    return folder


def test_sao_paulo_mixed_crs_imagery_two_zones(tmp_path, client, rgb_array):
    imagery = _sao_paulo_scenes(tmp_path / "img", rgb_array)
    s = predict_aoi("São Paulo", imagery, tmp_path / "sp", *JOB, cell_px=128, client=client)
    out = tmp_path / "sp"
    assert s.mosaic.name == "mosaic.gti.gpkg"
    assert (out / "mosaic_32722.vrt").exists() and (out / "mosaic_32723.vrt").exists()
    cwd = os.getcwd()
    os.chdir(tmp_path)  # QGIS opens the index from anywhere: the overview must still be found
    try:
        with rasterio.open(s.mosaic) as m:  # GDAL's GTI driver reads cells of both zones
            assert m.overviews(1), "the GTI mosaic must use the overview COG"
            assert m.res == pytest.approx((0.6, 0.6))
            # its pixel grid sits on the main zone's lattice: cells are copied, not resampled
            assert m.transform.c / 0.6 == pytest.approx(round(m.transform.c / 0.6), abs=1e-6)
            assert m.transform.f / 0.6 == pytest.approx(round(m.transform.f / 0.6), abs=1e-6)
            assert np.isfinite(m.read(1, out_shape=(1, 64, 64))).any()
    finally:
        os.chdir(cwd)


# ------------------------------------------------------------------------------- resume


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "canopy.cli", "predict", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _sigkill_after_cells(run: subprocess.Popen, manifest: Path, cells: int = 5) -> int:
    """SIGKILL a run's process group (driver and workers) once ``cells`` are logged; returns
    the number of manifest lines it left."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if manifest.exists() and len(manifest.read_text().splitlines()) >= cells:
            break
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    return len(manifest.read_text().splitlines())


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "cells").glob("*.tif"))}


def test_sigkill_then_rerun_is_byte_identical(tmp_path, rgb_array):
    src = write_raster(tmp_path / "scene.tif", rgb_array(400, 400),
                       transform=Affine(0.6, 0, 404000.2, 0, -0.6, 3285000.4))
    aoi = "-81.99,29.68,-81.97,29.70"
    args = ["--aoi", aoi, "--imagery", src, "-c", "micro", "--cell-size", "64", "-q",
            "--batch-size", "4"]
    full = _cli(*args, "-o", tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stderr.read()

    run = _cli(*args, "-o", tmp_path / "killed", start_new_session=True)
    n_before = _sigkill_after_cells(run, tmp_path / "killed" / "manifest.jsonl")
    expected = _files(tmp_path / "full")
    assert 5 <= n_before < len(expected), "the kill must land part-way"
    assert not (tmp_path / "killed" / "mosaic.vrt").exists()

    again = _cli(*args, "-o", tmp_path / "killed")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    # the rerun skipped exactly the cells logged before the kill (a rerun redoing everything
    # printed "0 already done" and wrote them all again)
    import re

    written, already = map(int, re.match(r"(\d+) cell\(s\) written, (\d+) already done", out).groups())
    assert already == n_before and written >= 1, out
    assert _files(tmp_path / "killed") == expected

    # a truncated cell and a corrupted one (same size) are redone, not trusted
    cells = sorted((tmp_path / "killed" / "cells").glob("*.tif"))
    cells[0].write_bytes(cells[0].read_bytes()[:100])
    data = bytearray(cells[1].read_bytes())
    data[-10] ^= 0xFF
    cells[1].write_bytes(bytes(data))
    again = _cli(*args, "-o", tmp_path / "killed")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert out.startswith("2 cell(s) written")
    assert _files(tmp_path / "killed") == expected


def test_ctrl_c_says_how_to_go_on_and_exits_at_once(tmp_path, rgb_array):
    """Issue #13: Ctrl-C during a state run printed nothing and the cluster's shutdown waited
    for the cells in flight. Now the run stops within seconds with one line saying what was
    kept and that the same command goes on; the rerun finishes the map."""
    src = write_raster(tmp_path / "scene.tif", rgb_array(400, 400),
                       transform=Affine(0.6, 0, 404000.2, 0, -0.6, 3285000.4))
    args = ["--aoi", "-81.99,29.68,-81.97,29.70", "--imagery", src, "-c", "micro",
            "--cell-size", "64", "-q", "--batch-size", "4", "-o", tmp_path / "run"]
    run = _cli(*args)
    manifest = tmp_path / "run" / "manifest.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (manifest.exists()
                                          and len(manifest.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    t0 = time.time()
    out, err = run.communicate(timeout=120)
    assert run.returncode == 130 and time.time() - t0 < 60, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("interrupted: ") and "run the same command to go on" in lines[-1]
    again = _cli(*args)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0 and (tmp_path / "run" / "mosaic.vrt").exists(), err


# ------------------------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path, client, rgb_array):
    src = shared(*OSBS)
    with pytest.raises(InputError, match="does not intersect any"):
        predict_aoi("Nevada", src, tmp_path / "x", *JOB, client=client)
    from data_catalog.errors import CatalogError

    with pytest.raises(CatalogError, match="empty"):
        predict_aoi("POLYGON EMPTY", src, tmp_path / "x", *JOB, client=client)
    with pytest.raises(InputError, match="does not exist"):
        predict_aoi(OSBS_AOI, tmp_path / "nope", tmp_path / "x", *JOB, client=client)
    assert not (tmp_path / "x").exists()


def test_invalid_aoi_is_repaired_and_said(tmp_path, client):
    src = shared(*OSBS)
    bowtie = ("POLYGON ((-81.9900 29.6924, -81.9897 29.69265, -81.9897 29.6924, "
              "-81.9900 29.69265, -81.9900 29.6924))")
    from data_catalog.aoi import AOIRepairWarning

    with pytest.warns(AOIRepairWarning):
        s = predict_aoi(bowtie, src, tmp_path / "r", *JOB, cell_px=128, client=client)
    assert s.cells_done >= 1


def test_other_runs_manifest_needs_overwrite(tmp_path, client):
    src = shared(*OSBS)
    predict_aoi(OSBS_AOI, src, tmp_path / "o", *JOB, cell_px=128, client=client)
    other = ("micro", PredictOptions(batch_size=4, dtype="uint8"))
    with pytest.raises(OutputError, match="different run.*dtype"):
        predict_aoi(OSBS_AOI, src, tmp_path / "o", *other, cell_px=128, client=client)
    s = predict_aoi(OSBS_AOI, src, tmp_path / "o", *other, cell_px=128, client=client, overwrite=True)
    with rasterio.open(s.mosaic) as m:
        assert m.dtypes[0] == "uint8"
    # a run with another batch shape would change bits: also another run
    with pytest.raises(OutputError, match="batch_size"):
        predict_aoi(OSBS_AOI, src, tmp_path / "o", "micro", PredictOptions(batch_size=2, dtype="uint8"),
                    cell_px=128, client=client)


def test_scheduler_that_does_not_answer(tmp_path):
    src = shared(*OSBS)
    with pytest.raises(InputError, match="did not answer"):
        predict_aoi(OSBS_AOI, src, tmp_path / "s", *JOB, cell_px=128,
                    scheduler="tcp://127.0.0.1:9")


# ------------------------------------------------------------------------------- GEDI correction


@pytest.fixture(scope="module")
def correction_dir(tmp_path_factory):
    """An untrained correction model whose factor varies from block to block (plumbing only)."""
    import torch

    from canopy.model.gedi_correction import CorrectionConfig, GediCorrectionNet, save_correction

    torch.manual_seed(3)
    model = GediCorrectionNet(CorrectionConfig(block_px=64, input_px=32, gsd=0.6)).eval()
    torch.nn.init.normal_(model.head[-1].weight, std=0.5)
    return save_correction(model, tmp_path_factory.mktemp("corr") / "gedi1")


def test_gedi_correction_keeps_cells_seam_free(tmp_path, client, correction_dir):
    """With a correction, two cell sizes still give identical arrays, and the factor is applied."""
    src = shared(*OSBS)
    job = ("micro", PredictOptions(batch_size=4, gedi_correction=str(correction_dir),
                                   precision="fp32"))
    a = predict_aoi(OSBS_AOI, src, tmp_path / "a", *job, cell_px=64, client=client)
    b = predict_aoi(OSBS_AOI, src, tmp_path / "b", *job, cell_px=100, client=client)
    A, B = read_common(a.mosaic, b.mosaic)
    np.testing.assert_array_equal(A, B)
    plain = predict_aoi(OSBS_AOI, src, tmp_path / "p", *JOB, cell_px=64, client=client)
    P, C = read_common(plain.mosaic, a.mosaic)
    ok = np.isfinite(C)
    assert ok.sum() > 2000
    ratio = C[ok] / P[ok]
    assert ratio.std() > 1e-3 and (ratio > 0.25).all() and (ratio < 4).all()


# ----------------------------------------------------------------- edge error, trained weights

KOOTENAY = ("rgb_chm_pairs", "kootenay_bc_drone", "kootenayOrtho_from_rda.tif")


def _mosaic_edge_error(summary) -> dict:
    """Edge error of a run's mosaic over the engine's global model-tile lattice. The lattice is
    anchored at the UTM zone origin, so its phase in the mosaic follows from the mosaic's
    upper-left corner."""
    from canopy.evaluate.metrics import TileLattice, edge_sums  # the lattice, computed by hand

    with rasterio.open(summary.mosaic) as m:
        a = m.read(1)
        g = m.res[0]
        col0, row0 = round(m.bounds.left / g), round(-m.bounds.top / g)
    cell = next((Path(summary.mosaic).parent / "cells").glob("*.tif"))
    with rasterio.open(cell) as ds:
        tags = ds.tags()
    size, stride = int(tags["CANOPY_TILE_SIZE"]), int(tags["CANOPY_TILE_STRIDE"])
    return edge_sums(a, TileLattice(size, stride, (-col0) % stride, (-row0) % stride)).metrics()


def test_edge_error_of_trained_model_on_real_imagery(tmp_path, client):
    """Issue #5 item 2: with trained weights on real imagery (the Kootenay drone ortho, 0.5 m,
    UTM 11) the mean height jump across model-tile borders is within 1.1× the jump inside tiles,
    and cell borders leave no trace. The same run without tile overlap (stride = tile) shows what a
    seam looks like to this figure, so the check can fail."""
    from canopy.model.checkpoints import DEFAULT_MODEL_DIR

    weights = DEFAULT_MODEL_DIR / "model.safetensors"
    assert weights.exists(), f"the bundled default model is missing: {weights}"
    src = shared(*KOOTENAY)
    with rasterio.open(src) as ds:
        from rasterio.warp import transform_bounds

        w, s, e, n = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    aoi = f"{w},{s},{e},{n}"
    job = ("default", PredictOptions(batch_size=8, precision="fp32"))
    run = predict_aoi(aoi, src, tmp_path / "blend", *job, cell_px=128, client=client)
    tiles = _mosaic_edge_error(run)
    assert tiles["n_border_pairs"] > 2000 and tiles["inside_mean_abs_jump"] > 0.02
    assert tiles["edge_error"] <= 1.1, tiles
    # Cell borders: not a statistic but an identity — another cell size, the same array.
    # (The jump ratio along the few cell-border lines of this small scene is just the image's
    # own texture there: 0.97 with one trained model, 1.18 with another, identical either way.)
    other = predict_aoi(aoi, src, tmp_path / "cells200", *job, cell_px=200, client=client)
    A, B = read_common(run.mosaic, other.mosaic)
    assert np.isfinite(A).sum() > 50_000
    np.testing.assert_array_equal(A, B)

    with rasterio.open(next((tmp_path / "blend" / "cells").glob("*.tif"))) as ds:
        tile = int(ds.tags()["CANOPY_TILE_SIZE"])
    seams = predict_aoi(aoi, src, tmp_path / "no_overlap", "default",
                        PredictOptions(batch_size=8, stride=tile, precision="fp32"), cell_px=128,
                        client=client)
    assert _mosaic_edge_error(seams)["edge_error"] > 2 * tiles["edge_error"]

    # canopy evaluate finds the lattice in the mosaic's own tags and measures the same figure
    from canopy.evaluate import evaluate

    chm = shared("rgb_chm_pairs", "kootenay_bc_drone", "kootenayCHM.tif")
    for summary, name in ((run, "eval_blend"), (seams, "eval_seams")):
        report = evaluate(summary.mosaic, [chm], tmp_path / name)
        expected = _mosaic_edge_error(summary)
        assert report["edge_error"]["scope"] == "whole prediction", report["edge_error"]
        assert report["edge_error"]["edge_error"] == pytest.approx(expected["edge_error"], rel=1e-9)
        assert report["edge_error"]["n_border_pairs"] == expected["n_border_pairs"]


def test_int8_maps_are_seam_free_across_cell_sizes(tmp_path, client):
    """--precision int8 keeps the engine's guarantees: dynamic int8 scales are taken per tile,
    so another cell size (other tiles batched together) gives the identical array, and the
    trained model's edge error on the real ortho stays within 1.1."""
    src = shared(*KOOTENAY)
    with rasterio.open(src) as ds:
        from rasterio.warp import transform_bounds

        w, s, e, n = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    aoi = f"{w},{s},{e},{n}"
    job = ("default", PredictOptions(batch_size=8, precision="int8"))
    a = predict_aoi(aoi, src, tmp_path / "c128", *job, cell_px=128, client=client)
    # and two lanes of one torch thread each (the default on a 2-core worker) change nothing
    lanes = ("default", PredictOptions(batch_size=8, precision="int8", torch_threads=2, lanes=2))
    b = predict_aoi(aoi, src, tmp_path / "c200", *lanes, cell_px=200, client=client)
    A, B = read_common(a.mosaic, b.mosaic)
    assert np.isfinite(A).sum() > 50_000
    np.testing.assert_array_equal(A, B)
    assert _mosaic_edge_error(a)["edge_error"] <= 1.1


def test_heights_near_imagery_edges_match_one_raster(tmp_path, client):
    """Issue #13 item 1: a state run over a real NEON plot (BART_041, tall closed canopy, 40 m
    across) gives the heights one-raster prediction gives, right up to the imagery's edge. The
    engine used to fill pixels without imagery with a constant colour that entered the model's
    tiles: 0.3 m instead of 22 m within 4 m of the edge. Both paths now mirror the imagery into
    the missing pixels (blend.mirror_fill)."""
    from rasterio.enums import Resampling
    from rasterio.warp import reproject, transform_bounds
    from scipy import ndimage

    from canopy.model.checkpoints import load_model
    from canopy.predict.raster import predict_raster

    src = shared("rgb_chm_pairs", "neon_bart_041", "BART_041.tif")
    one = predict_raster(src, tmp_path / "one.tif", load_model("default"))
    with rasterio.open(src) as ds:
        w, s, e, n = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)
    run = predict_aoi(f"{w},{s},{e},{n}", src, tmp_path / "aoi", "default",
                      PredictOptions(batch_size=8), cell_px=128, client=client)
    with rasterio.open(run.mosaic) as m, rasterio.open(one) as o:
        aoi = m.read(1)
        one_on_grid = np.full(aoi.shape, np.nan, np.float32)
        reproject(o.read(1), one_on_grid, src_transform=o.transform, src_crs=o.crs,
                  dst_transform=m.transform, dst_crs=m.crs, src_nodata=np.nan, dst_nodata=np.nan,
                  resampling=Resampling.nearest)
        gsd = m.res[0]
    both = np.isfinite(aoi) & np.isfinite(one_on_grid)
    dist = ndimage.distance_transform_edt(np.pad(both, 1))[1:-1, 1:-1] * gsd
    for lo, hi in ((0, 4), (4, 8), (8, 16)):
        band = both & (dist > lo) & (dist <= hi)
        assert band.sum() > 300
        a, b = float(aoi[band].mean()), float(one_on_grid[band].mean())
        assert b > 15 and abs(a - b) < 0.1 * b, (lo, hi, a, b)


def test_a_truncated_scene_is_named_before_any_work(tmp_path, client, capsys):
    """Issue #13: a folder of scenes with one GeoTIFF cut short. The header check names the file
    before any model runs (before: a Dask worker traceback, the good scene in the same cell
    lost); --skip-bad-scenes goes on without it, gives the map the good scene alone gives and
    lists the file in summary.json; one-raster prediction names the file too."""
    import shutil

    from tests.test_predict import run_cli

    good = shared(*OSBS)
    folder = tmp_path / "scenes"
    folder.mkdir()
    shutil.copy(good, folder / "a_good.tif")
    data = (folder / "a_good.tif").read_bytes()
    (folder / "b_cut.tif").write_bytes(data[: int(len(data) * 0.6)])  # same place, cut short
    out = tmp_path / "run"
    args = ["predict", "--aoi", OSBS_AOI, "--imagery", folder, "-o", out, "-c", "micro",
            "--cell-size", "64", "--batch-size", "4", "--precision", "fp32", "-q"]
    code, _, err = run_cli(*args, capsys=capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "b_cut.tif: truncated or damaged" in lines[0] and "--skip-bad-scenes" in lines[0]
    assert not out.exists() or not list(out.rglob("*.tif"))

    code, stdout, err = run_cli(*args, "--skip-bad-scenes", capsys=capsys)
    assert code == 0, err
    assert "1 imagery file(s) skipped" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(s["path"]).name for s in summary["skipped_scenes"]] == ["b_cut.tif"]
    alone = predict_aoi(OSBS_AOI, good, tmp_path / "alone", *JOB, cell_px=64, client=client)
    A, B = read_common(out / "mosaic.vrt", alone.mosaic)
    np.testing.assert_array_equal(A, B)

    code, _, err = run_cli("predict", folder / "b_cut.tif", "-o", tmp_path / "one.tif", "-c",
                           "micro", "-q", capsys=capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "b_cut.tif: truncated or damaged" in lines[0], err


def test_a_small_aoi_gives_a_mosaic_of_the_aoi(tmp_path, client):
    """Issue #13: an AOI far smaller than a cell gave a cell-sized mosaic that was 99.8 %
    nodata. The mosaic and its overview are cut to the AOI's bounds; the cells stay whole (they
    are the resumable unit and neighbouring runs share them)."""
    from data_catalog.aoi import resolve_aoi

    src = shared(*OSBS)
    s = predict_aoi(OSBS_AOI, src, tmp_path / "o", *JOB, cell_px=1024, client=client)
    assert s.cells_done == 1
    aoi = resolve_aoi(OSBS_AOI).geometry
    from canopy.predict.grid import project_geometry

    left, bottom, right, top = project_geometry(aoi, 32617).bounds
    with rasterio.open(s.mosaic) as m, rasterio.open(tmp_path / "o" / "overview.tif") as ov:
        assert m.width < 80 and m.height < 80  # the AOI is ~29 × 28 m at 0.6 m; a cell is 1024 px
        assert m.bounds.left <= left < m.bounds.left + 0.6 and m.bounds.top >= top > m.bounds.top - 0.6
        assert m.bounds.right >= right > m.bounds.right - 0.6
        assert np.isfinite(m.read(1)).mean() > 0.5
        assert ov.bounds == pytest.approx(m.bounds)
    with rasterio.open(next((tmp_path / "o" / "cells").glob("*.tif"))) as cell:
        assert cell.width == cell.height == 1024
        # and the mosaic holds the cell's pixels, unchanged
        A, B = read_common(s.mosaic, next((tmp_path / "o" / "cells").glob("*.tif")))
        np.testing.assert_array_equal(A, B)


def test_a_state_run_says_how_much_of_its_map_is_unlike_the_training_data(tmp_path, client):
    """With the default model (it carries an OOD reference), every cell of a run over the real
    Lake Zürich image (water, never trained on) carries CANOPY_OOD_UNLIKE_SHARE; the run's share
    in summary.json and the returned summary is the cells' shares weighted by their mapped
    pixels (computed here from the cells), and it is large: most of a lake is unlike three NEON
    forests."""
    import json

    from canopy.io.outputs import OOD_UNLIKE_SHARE

    lake = shared("overhead_rgb", "swissimage_lake_zurich_ref-img.tif")
    with rasterio.open(lake) as ds:
        from rasterio.warp import transform_bounds

        w, s_, e, n = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    aoi = f"{w + 0.1 * (e - w)},{s_ + 0.1 * (n - s_)},{w + 0.5 * (e - w)},{s_ + 0.6 * (n - s_)}"
    s = predict_aoi(aoi, lake, tmp_path / "o", "default", PredictOptions(precision="fp32"),
                    cell_px=256, client=client)
    unlike = scored = 0
    cells = list((tmp_path / "o" / "cells").glob("*.tif"))
    assert cells
    for cell in cells:
        with rasterio.open(cell) as ds:
            share = float(ds.tags()[OOD_UNLIKE_SHARE])
            n = int(np.isfinite(ds.read(1)).sum())
        unlike += share * n
        scored += n
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["ood_unlike_share"] == pytest.approx(unlike / scored, abs=1e-3)
    assert s.ood_unlike_share == pytest.approx(summary["ood_unlike_share"])
    assert s.ood_unlike_share > 0.5


def test_a_state_run_writes_the_out_of_distribution_band_in_every_cell(tmp_path, client):
    """--ood-band with --aoi: each cell (and the mosaic) gets the score band after the heights,
    unitless, mapped exactly where heights are, its share above 1 the cell's tag; a model
    without a reference, or uint8 output, is refused before anything is written."""
    from canopy.io.outputs import OOD_BAND, OOD_UNLIKE, OOD_UNLIKE_SHARE

    lake = shared("overhead_rgb", "swissimage_lake_zurich_ref-img.tif")
    with rasterio.open(lake) as ds:
        from rasterio.warp import transform_bounds

        w, s_, e, n = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    aoi = f"{w + 0.2 * (e - w)},{s_ + 0.2 * (n - s_)},{w + 0.45 * (e - w)},{s_ + 0.45 * (n - s_)}"
    predict_aoi(aoi, lake, tmp_path / "o", "default",
                PredictOptions(precision="fp32", ood_band=True), cell_px=256, client=client)
    cells = list((tmp_path / "o" / "cells").glob("*.tif"))
    assert cells
    for cell in cells:
        with rasterio.open(cell) as ds:
            assert ds.count == 2 and ds.descriptions == ("canopy_height", OOD_BAND)
            assert ds.units[0] == "m" and not ds.units[1]
            h, score = ds.read(1), ds.read(2)
            np.testing.assert_array_equal(np.isfinite(h), np.isfinite(score))
            ok = np.isfinite(score)
            share = float((score[ok] > OOD_UNLIKE).mean())
            assert float(ds.tags()[OOD_UNLIKE_SHARE]) == pytest.approx(share, abs=1e-4)
    with rasterio.open(tmp_path / "o" / "mosaic.vrt") as ds:
        assert ds.count == 2 and ds.descriptions[1] == OOD_BAND and not ds.units[1]
    for checkpoint, dtype, word in [("micro", "float32", "no out-of-distribution reference"),
                                    ("default", "uint8", "needs --dtype float32")]:
        with pytest.raises(OptionError, match=word):
            predict_aoi(aoi, lake, tmp_path / word[:4], checkpoint,
                        PredictOptions(precision="fp32", ood_band=True, dtype=dtype),
                        cell_px=256, client=client)
        assert not (tmp_path / word[:4]).exists()
