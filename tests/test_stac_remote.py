"""`canopy predict --aoi` with imagery from a STAC API or a STAC file, read over HTTP range
requests from a server on 127.0.0.1 (tests/stac_fixture_server.py): the same cells as a run over
the same COGs on local disk, through injected 503s, never reading whole files; a scene changed
after planning is named; bad searches are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from canopy.predict.engine import predict_aoi
from canopy.predict.options import PredictOptions
from tests.conftest import ROOT, shared
from tests.services.conftest import free_port

OSBS = ("rgb_chm_pairs", "neon_osbs_029", "OSBS_029.tif")
OSBS_AOI = "-81.9900,29.6924,-81.9897,29.69265"
JOB = ("micro", PredictOptions(batch_size=4, precision="fp32"))


def _cogs(folder: Path) -> list[Path]:
    """Two overlapping COGs cut from the real NEON OSBS_029 RGB (west and east parts)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with rasterio.open(shared(*OSBS)) as src:
        for name, c0, c1 in (("osbs_west.tif", 0, 230), ("osbs_east.tif", 170, 400)):
            win = Window(c0, 0, c1 - c0, src.height)
            profile = {**src.profile, "width": c1 - c0, "height": src.height,
                       "transform": src.window_transform(win), "driver": "GTiff"}
            tmp = folder / f".{name}"
            with rasterio.open(tmp, "w", **profile) as dst:
                dst.write(src.read(window=win))
            rasterio.shutil.copy(tmp, folder / name, driver="COG", blocksize=128,
                                 compress="deflate")
            tmp.unlink()
            out.append(folder / name)
    return out


def _item(path: Path) -> dict:
    with rasterio.open(path) as ds:
        west, south, east, north = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)
        t = ds.transform
        return {
            "type": "Feature", "stac_version": "1.0.0", "id": path.stem, "collection": "osbs",
            "stac_extensions": ["https://stac-extensions.github.io/projection/v2.0.0/schema.json",
                                "https://stac-extensions.github.io/raster/v1.1.0/schema.json"],
            "geometry": {"type": "Polygon", "coordinates": [[[west, south], [east, south],
                                                             [east, north], [west, north],
                                                             [west, south]]]},
            "bbox": [west, south, east, north],
            "properties": {"datetime": "2018-09-01T00:00:00Z", "proj:code": f"EPSG:{ds.crs.to_epsg()}",
                           "proj:bbox": list(ds.bounds), "proj:shape": [ds.height, ds.width],
                           "proj:transform": [t.a, t.b, t.c, t.d, t.e, t.f]},
            "assets": {"image": {"href": f"{{base}}/files/{path.name}",
                                 "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                                 "roles": ["data"],
                                 "raster:bands": [{"data_type": "uint8"}] * 3}},
            "links": []}


@pytest.fixture(scope="module")
def stac_server(tmp_path_factory):
    data = tmp_path_factory.mktemp("stac")
    cogs = _cogs(data)
    (data / "items.json").write_text(json.dumps([_item(p) for p in cogs]))
    from tests.stac_fixture_server import start

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(data, port, log=open(data / "server.log", "w"))
    yield base, data, cogs
    proc.terminate()
    proc.wait(10)


def _faults(base, rate, seed=0):
    httpx.post(base + "/admin/faults", json={"rate": rate, "seed": seed}).raise_for_status()


def _cells(folder: Path) -> dict:
    out = {}
    for p in sorted((folder / "cells").glob("*.tif")):
        with rasterio.open(p) as ds:
            out[p.name] = ds.read()
    return out


@pytest.fixture(scope="module")
def local_run(stac_server, tmp_path_factory):
    _, data, cogs = stac_server
    folder = tmp_path_factory.mktemp("local-imagery")
    for c in cogs:
        (folder / c.name).write_bytes(c.read_bytes())
    out = tmp_path_factory.mktemp("local-run") / "run"
    predict_aoi(OSBS_AOI, folder, out, *JOB, cell_px=64, workers=1)
    return _cells(out)


def test_a_stac_search_gives_the_cells_of_the_same_scenes_on_local_disk(stac_server, local_run, tmp_path):
    base, data, cogs = stac_server
    _faults(base, 0.0)
    before = httpx.get(base + "/admin/stats").json()
    s = predict_aoi(OSBS_AOI, f"stac+{base}/?collections=osbs", tmp_path / "run", *JOB,
                    cell_px=64, workers=1)
    assert s.cells_done == 4
    remote = _cells(tmp_path / "run")
    assert remote.keys() == local_run.keys()
    for name in remote:
        np.testing.assert_array_equal(remote[name], local_run[name])  # seam-free, same pixels
    after = httpx.get(base + "/admin/stats").json()
    total = sum(c.stat().st_size for c in cogs)
    fetched = after["bytes"] - before["bytes"]
    assert after["ranges"] > before["ranges"]  # range requests, not whole files
    assert 0 < fetched < 2.5 * total  # GDAL's caches are per process: each worker reads its own
    # provenance: each cell names the STAC items it was made from
    items = json.loads((tmp_path / "run" / "manifest.jsonl").read_text().splitlines()[-1])["items"]
    assert set(items) <= {"osbs_west", "osbs_east"} and items
    # no signed URL or token is written: hrefs stay as the catalogue gave them
    assert "token" not in (tmp_path / "run" / "manifest.jsonl").read_text()


def test_a_saved_item_collection_and_injected_faults(stac_server, local_run, tmp_path):
    """Through 503s (GDAL's retries), connections dropped mid-body (ours: a fresh handle after a
    back-off) and stalls: the run completes with the same pixels."""
    base, data, _ = stac_server
    items = httpx.get(base + "/search", params={"collections": "osbs"}).json()
    (tmp_path / "items.json").write_text(json.dumps(items))
    httpx.post(base + "/admin/faults", json={"rate": 0.25, "drop": 0.1, "slow": 0.05,
                                             "seed": 3}).raise_for_status()
    try:
        s = predict_aoi(OSBS_AOI, tmp_path / "items.json", tmp_path / "run", *JOB, cell_px=64,
                        workers=1)
        stats = httpx.get(base + "/admin/stats").json()
    finally:
        _faults(base, 0.0)
    assert s.cells_done == 4
    assert stats["faults"] >= 2 and stats["drops"] >= 1
    for name, arr in _cells(tmp_path / "run").items():
        np.testing.assert_array_equal(arr, local_run[name])


def test_a_scene_changed_after_planning_is_named(stac_server, tmp_path):
    from canopy.predict.sources import SceneChangedError, index_imagery, read_mosaic
    from data_catalog.aoi import resolve_aoi

    base, data, cogs = stac_server
    scenes, _ = index_imagery(f"stac+{base}/?collections=osbs", aoi=resolve_aoi(OSBS_AOI).geometry)
    assert {s.item for s in scenes} == {"osbs_west", "osbs_east"} and all(s.version for s in scenes)
    east = data / "osbs_east.tif"
    stamp = east.stat().st_mtime
    os.utime(east, (stamp + 100, stamp + 100))  # the file is replaced on the server
    try:
        s = [x for x in scenes if x.item == "osbs_east"][0]
        with pytest.raises(SceneChangedError, match="osbs_east.*changed since the run was planned"):
            with rasterio.open(cogs[0]) as ds:
                read_mosaic([s], ds.crs, ds.transform, (8, 8), 0.6)
    finally:
        os.utime(east, (stamp, stamp))


def test_a_server_without_byte_ranges_is_refused_at_planning(stac_server, tmp_path):
    base, _, _ = stac_server
    httpx.post(base + "/admin/faults", json={"ranges_off": True}).raise_for_status()
    try:
        r = subprocess.run([sys.executable, "-m", "canopy.cli", "predict", "--aoi", OSBS_AOI,
                            "--imagery", f"stac+{base}/?collections=osbs", "-o",
                            str(tmp_path / "run"), "-c", "micro"], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
    finally:
        _faults(base, 0.0)
    assert r.returncode == 2 and "does not serve byte ranges" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run" / "cells").exists()


@pytest.mark.parametrize("spec, words", [
    ("stac+http://127.0.0.1:9/?collections=osbs", "did not answer"),
    ("stac+{base}/?collections=nothing", "no items over the area of interest"),
    ("stac+{base}/?collections=osbs&asset=nope", "has no asset 'nope'"),
    ("stac+{base}/?colections=osbs", "not supported"),
])
def test_bad_stac_input_is_one_line(stac_server, tmp_path, spec, words):
    base, _, _ = stac_server
    r = subprocess.run([sys.executable, "-m", "canopy.cli", "predict", "--aoi", OSBS_AOI,
                        "--imagery", spec.format(base=base), "-o", str(tmp_path / "run"),
                        "-c", "micro"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert not (tmp_path / "run" / "cells").exists()


def test_catalog_import_stac_from_a_search(stac_server, tmp_path):
    base, _, cogs = stac_server
    w, s, e, n = (float(v) for v in OSBS_AOI.split(","))
    spec = f"stac+{base}/?collections=osbs&bbox={w},{s},{e},{n}"
    r = subprocess.run([sys.executable, "-m", "canopy.cli", "catalog", "import-stac", spec,
                        "--catalog", str(tmp_path / "cat.parquet")], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    from data_catalog.catalog import Catalog

    rows = Catalog.open(tmp_path / "cat.parquet").query(kinds=["imagery"])
    assert sorted(rows["path"]) == sorted(f"{base}/files/{c.name}" for c in cogs)
    with rasterio.open(cogs[0]) as ds:  # planned from the items' projection metadata
        row = rows[rows["path"].str.endswith(cogs[0].name)].iloc[0]
        assert row["res_x"] == pytest.approx(ds.res[0]) and row["width"] == ds.width
    bad = subprocess.run([sys.executable, "-m", "canopy.cli", "catalog", "import-stac",
                          f"stac+{base}/?collections=osbs", "--catalog", str(tmp_path / "c2.parquet")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "needs bbox" in bad.stderr


def test_a_run_over_http_killed_and_run_again_is_byte_identical(tmp_path, rgb_array):
    """SIGKILL of the driver and its workers mid-run over HTTP, then the same command: only
    the missing cells are made, and the cells are the bytes of an uninterrupted run."""
    import re

    from affine import Affine

    from tests.conftest import write_raster
    from tests.stac_fixture_server import start
    from tests.test_engine import _cli, _files, _sigkill_after_cells

    data = tmp_path / "served"
    data.mkdir()
    tmp = write_raster(tmp_path / "scene.tif", rgb_array(400, 400),
                       transform=Affine(0.6, 0, 404000.2, 0, -0.6, 3285000.4))
    rasterio.shutil.copy(tmp, data / "scene.tif", driver="COG", blocksize=128)
    (data / "items.json").write_text(json.dumps([_item(data / "scene.tif")]))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start(data, port)
    try:
        args = ["--aoi", "-81.99,29.68,-81.97,29.70", "--imagery", f"stac+{base}/?collections=osbs",
                "-c", "micro", "--cell-size", "64", "-q", "--batch-size", "4"]
        full = _cli(*args, "-o", tmp_path / "full")
        assert full.wait(timeout=600) == 0, full.stderr.read()
        run = _cli(*args, "-o", tmp_path / "killed", start_new_session=True)
        n_before = _sigkill_after_cells(run, tmp_path / "killed" / "manifest.jsonl")
        expected = _files(tmp_path / "full")
        assert 5 <= n_before < len(expected), "the kill must land part-way"
        again = _cli(*args, "-o", tmp_path / "killed")
        out, err = again.communicate(timeout=600)
        assert again.returncode == 0, err
        written, already = map(int, re.match(r"(\d+) cell\(s\) written, (\d+) already done", out).groups())
        assert already == n_before and written >= 1, out
        assert _files(tmp_path / "killed") == expected
    finally:
        server.terminate()
        server.wait(10)


def test_a_remote_scene_that_is_not_tiled_is_named_at_planning(stac_server, tmp_path):
    """A STAC item whose asset does not say it is a COG is planned from the file's header, and a
    striped GeoTIFF (every window read would fetch whole rows over HTTP) gets one warning naming
    it; the COGs of the same server do not."""
    from canopy.predict.sources import index_imagery
    from data_catalog.aoi import resolve_aoi

    base, data, cogs = stac_server
    striped = data / "osbs_striped.tif"
    with rasterio.open(shared(*OSBS)) as src:
        profile = {**src.profile, "driver": "GTiff", "tiled": False}
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
        with rasterio.open(striped, "w", **profile) as dst:
            dst.write(src.read())
    item = _item(striped)
    item["assets"]["image"]["type"] = "image/tiff; application=geotiff"
    cog_item = _item(cogs[0])
    items = {"type": "FeatureCollection", "features": [item, cog_item]}
    (tmp_path / "items.json").write_text(json.dumps(items).replace("{base}", base))
    aoi = resolve_aoi(OSBS_AOI).geometry
    try:
        with pytest.warns(UserWarning) as caught:
            scenes, _ = index_imagery(tmp_path / "items.json", aoi=aoi)
    finally:
        striped.unlink()
    messages = [str(w.message) for w in caught if "not tiled" in str(w.message)]
    assert len(messages) == 1 and "osbs_striped.tif" in messages[0]
    assert {s.item for s in scenes} == {"osbs_striped", "osbs_west"}


def test_a_remote_asset_that_is_not_rgb_and_says_nothing_is_one_line(stac_server, tmp_path):
    """An item whose asset carries no band metadata and holds one float32 band (a DEM, say):
    planning reads its header over HTTP and stops with one line naming it; nothing is written."""
    base, data, _ = stac_server
    dem = data / "osbs_dem.tif"
    with rasterio.open(shared(*OSBS)) as src:
        profile = {**src.profile, "driver": "GTiff", "count": 1, "dtype": "float32", "nodata": None,
                   "tiled": True, "blockxsize": 128, "blockysize": 128}
        with rasterio.open(dem, "w", **profile) as dst:
            dst.write(src.read(1).astype("float32"), 1)
    item = _item(dem)
    del item["assets"]["image"]["raster:bands"]
    (tmp_path / "items.json").write_text(json.dumps(
        {"type": "FeatureCollection", "features": [item]}).replace("{base}", base))
    try:
        r = subprocess.run([sys.executable, "-m", "canopy.cli", "predict", "--aoi", OSBS_AOI,
                            "--imagery", str(tmp_path / "items.json"), "-o", str(tmp_path / "run"),
                            "-c", "micro"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    finally:
        dem.unlink()
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "osbs_dem.tif" in lines[0], r.stderr
    assert not (tmp_path / "run" / "cells").exists()
