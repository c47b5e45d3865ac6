"""``canopy catalog`` commands, run through Typer's CliRunner (and once as ``python -m``)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from shapely.geometry import box
from typer.testing import CliRunner

from data_catalog.cli import app
from data_catalog.schema import METADATA_KEY

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def filled_catalog(shared_data, catalog_path) -> Path:
    result = invoke("add", "chm", shared_data.soap_chm, shared_data.osbs_tile_chm, "--catalog", catalog_path)
    assert result.exit_code == 0, result.stderr
    result = invoke("add", "imagery", shared_data.sjer_rgb, "-c", catalog_path)
    assert result.exit_code == 0, result.stderr
    return catalog_path


def test_add_reports_counts_and_is_idempotent(shared_data, catalog_path):
    result = invoke("add", "chm", shared_data.soap_chm.parent, "--catalog", catalog_path)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("added 3, updated 0;")
    again = invoke("add", "chm", *sorted(shared_data.soap_chm.parent.glob("*.tif")), "--catalog", catalog_path)
    assert again.stdout.startswith("added 0, updated 0;")
    assert "holds 3 assets" in again.stdout


def test_add_prints_library_warnings(shared_data, catalog_path):
    result = invoke("add", "imagery", shared_data.sjer_rgb, "-c", catalog_path)
    assert result.exit_code == 0
    assert "warning: " in result.stderr and "non-square pixels" in result.stderr


def test_query_table_json_bbox_and_kind(filled_catalog, shared_data):
    table = invoke("query", "-c", filled_catalog)
    assert table.exit_code == 0
    lines = table.stdout.strip().splitlines()
    assert lines[0].split() == ["asset_id", "kind", "date", "res", "crs", "size", "path"]
    assert len(lines) == 4
    assert any("2018-09-15" in line and "EPSG:32617" in line for line in lines)

    california = "-124.5,32.5,-114.1,42.0"
    result = invoke("query", "-c", filled_catalog, "--bbox", california, "--kind", "chm", "--json")
    collection = json.loads(result.stdout)
    assert collection["type"] == "FeatureCollection"
    (feature,) = collection["features"]
    assert feature["properties"]["path"] == str(shared_data.soap_chm)
    assert feature["properties"]["native_bounds"] == [302000.0, 4100000.0, 303000.0, 4101000.0]
    assert feature["properties"]["width"] == 1000
    assert feature["properties"]["extra"]["gsd_m"] == 1.0

    both = json.loads(invoke("query", "-c", filled_catalog, "--bbox", california, "--json").stdout)
    assert sorted(f["properties"]["kind"] for f in both["features"]) == ["chm", "imagery"]
    nothing = invoke("query", "-c", filled_catalog, "--bbox", "0,0,1,1")
    assert nothing.exit_code == 0 and "no assets match" in nothing.stderr


def test_query_by_aoi_uses_resolve_aoi(filled_catalog, monkeypatch, shared_data):
    fake = types.ModuleType("data_catalog.aoi")
    fake.resolve_aoi = lambda spec: types.SimpleNamespace(name=spec, geometry=box(-83, 29, -81, 30))
    monkeypatch.setitem(sys.modules, "data_catalog.aoi", fake)
    result = invoke("query", "-c", filled_catalog, "--aoi", "north-florida", "--json")
    assert [f["properties"]["path"] for f in json.loads(result.stdout)["features"]] == [str(shared_data.osbs_tile_chm)]


def test_query_by_bundled_state_name(filled_catalog, shared_data):
    """README: every US state ships with the package, so `--aoi california` works offline.
    Guards against: the bundled boundaries missing or unreadable, or the name lookup broken
    (this test used to turn any such exception into a skip)."""
    result = invoke("query", "-c", filled_catalog, "--aoi", "california", "--json")
    assert result.exit_code == 0, result.stderr
    paths = sorted(f["properties"]["path"] for f in json.loads(result.stdout)["features"])
    assert paths == sorted([str(shared_data.soap_chm), str(shared_data.sjer_rgb)])


def test_user_errors_exit_2_and_leave_the_catalog_unchanged(filled_catalog, shared_data):
    before = filled_catalog.read_bytes()
    rgb_as_chm = invoke("add", "chm", shared_data.abby_chm, shared_data.osbs_plot_rgb, "-c", filled_catalog)
    assert rgb_as_chm.exit_code == 2
    assert rgb_as_chm.stderr.startswith("error: ") and "RGB" in rgb_as_chm.stderr
    assert len(rgb_as_chm.stderr.strip().splitlines()) == 1
    no_crs = invoke("add", "chm", shared_data.duc_chm, "-c", filled_catalog)
    assert no_crs.exit_code == 2 and "pass --crs" in no_crs.stderr
    bad_bbox = invoke("query", "-c", filled_catalog, "--bbox", "1,2,3")
    assert bad_bbox.exit_code == 2 and "--bbox" in bad_bbox.stderr
    assert filled_catalog.read_bytes() == before

    with_crs = invoke("add", "chm", shared_data.duc_chm, "--crs", "EPSG:31981", "-c", filled_catalog)
    assert with_crs.exit_code == 0 and with_crs.stdout.startswith("added 1,")


def test_newer_schema_is_an_error(filled_catalog, shared_data):
    table = pq.read_table(filled_catalog)
    metadata = {**table.schema.metadata, METADATA_KEY: json.dumps({"schema_version": 999}).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), filled_catalog)
    before = filled_catalog.read_bytes()
    result = invoke("add", "chm", shared_data.abby_chm, "-c", filled_catalog)
    assert result.exit_code == 2 and "schema version 999" in result.stderr
    assert filled_catalog.read_bytes() == before
    assert invoke("query", "-c", filled_catalog).exit_code == 2


def test_check_exit_codes_and_prune(shared_data, catalog_path, copy_data):
    copy = copy_data(shared_data.duc_chm)
    invoke("add", "chm", copy, "--crs", "EPSG:31981", "-c", catalog_path)
    invoke("add", "chm", shared_data.soap_chm, "-c", catalog_path)
    ok = invoke("check", "-c", catalog_path)
    assert ok.exit_code == 0 and "ok: 2 assets checked" in ok.stdout

    copy.unlink()
    failed = invoke("check", "-c", catalog_path)
    assert failed.exit_code == 1
    assert failed.stdout.startswith(f"missing: {copy}")
    pruned = invoke("check", "--prune", "-c", catalog_path)
    assert pruned.exit_code == 1 and "removed 1 rows" in pruned.stderr
    assert invoke("check", "-c", catalog_path).exit_code == 0
    assert invoke("check", "-c", catalog_path.parent / "absent.parquet").exit_code == 2


def test_export_and_import_stac(filled_catalog, tmp_path):
    exported = invoke("export-stac", filled_catalog, tmp_path / "stac")
    assert exported.exit_code == 0, exported.stderr
    collection = Path(exported.stdout.strip())
    assert collection == (tmp_path / "stac" / "collection.json").resolve()
    assert len(list((tmp_path / "stac").glob("*/*.json"))) == 3

    imported = invoke("import-stac", collection, "-c", tmp_path / "copy.parquet")
    assert imported.exit_code == 0, imported.stderr
    assert imported.stdout.startswith("added 3, updated 0;")
    missing = invoke("import-stac", tmp_path / "nope.json", "-c", tmp_path / "copy.parquet")
    assert missing.exit_code == 2 and missing.stderr.startswith("error: ")


def test_gedi_filter_options_build_gedi_filters(shared_data, catalog_path, tmp_path):
    result = invoke(
        "add", "gedi", shared_data.gedi_l2a, "-c", catalog_path, "--gedi-dir", tmp_path / "gedi",
        "--min-sensitivity", "0.95", "--power-beams-only",
    )
    assert result.exit_code == 0, result.stderr
    features = json.loads(invoke("query", "-c", catalog_path, "--kind", "gedi", "--json").stdout)["features"]
    report = features[0]["properties"]["extra"]["filter_report"]
    assert report["n_input"] == 301
    assert report["n_remaining"] < 301  # coverage beams fail sensitivity 0.95 and are not power beams
    bad = invoke("add", "gedi", shared_data.gedi_l2a, "-c", catalog_path, "--min-sensitivity", "-1")
    assert bad.exit_code == 2 and "--min-sensitivity" in bad.stderr


def test_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "data_catalog.cli", "--help"], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0
    for command in ("add", "query", "check", "export-stac", "import-stac"):
        assert command in result.stdout
