"""Bad input gets a clear 4xx with a JSON error, never a 500; clients reach layers by id only;
keys, limits and CORS do what the configuration says; the OpenAPI schema holds (schemathesis)."""

from __future__ import annotations

import os
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_schema_conformance, status_code_conformance)

from tests.services.conftest import geo_polygon, start_server, stop_server


def _err(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body["error"], str) and body["error"] and "Traceback" not in r.text
    return body


def test_bad_tile_requests(http):
    assert "no layer" in _err(http.get("/layers/nope/tiles/1/0/0.png"), 404)["error"]
    assert "does not exist" in _err(http.get("/layers/osbs/tiles/3/8/0.png"), 422)["error"]
    _err(http.get("/layers/osbs/tiles/25/0/0.png"), 422)
    _err(http.get("/layers/osbs/tiles/-1/0/0.png"), 422)
    _err(http.get("/layers/osbs/tiles/3/0/0.jpg"), 422)
    assert "colormap" in _err(http.get("/layers/osbs/tiles/3/0/0.png", params={"colormap": "nope"}), 422)["error"]
    for bad in ("5,1", "a,b", "nan,1", "1", "0,inf"):
        assert "rescale" in _err(http.get("/layers/osbs/tiles/3/0/0.png", params={"rescale": bad}), 422)["error"]
    _err(http.get("/layers/osbs/point", params={"lon": 200, "lat": 0}), 422)
    _err(http.get("/layers/osbs/point", params={"lon": "x", "lat": 0}), 422)


def test_layers_are_reached_by_id_only(http, live_server, layers_dir, tmp_path):
    # traversal and absolute paths in the id position
    for bad in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "..", "osbs.tif", "zones%2Fcells"):
        r = http.get(f"/layers/{bad}/tiles/1/0/0.png")
        assert r.status_code in (404, 422) and "root:" not in r.text
    # TiTiler's open-by-URL parameter means nothing here
    r = http.get("/layers/osbs/tilejson.json", params={"url": "/etc/passwd"})
    assert r.status_code == 200 and "passwd" not in r.text
    # a VRT disguised as a .tif (GDAL's file-disclosure route) and a link out of the folder
    (layers_dir / "sneaky.tif").write_text(
        '<VRTDataset rasterXSize="10" rasterYSize="10"><SRS>EPSG:32617</SRS>'
        '<GeoTransform>400000, 0.5, 0, 3280000, 0, -0.5</GeoTransform>'
        '<VRTRasterBand dataType="Byte" band="1"><Description>canopy_height</Description>'
        '<SimpleSource><SourceFilename>/etc/passwd</SourceFilename></SimpleSource>'
        '</VRTRasterBand></VRTDataset>')
    outside = tmp_path / "outside.tif"
    outside.write_bytes((layers_dir / "osbs.tif").read_bytes())
    (layers_dir / "linked.tif").symlink_to(outside)
    try:
        time.sleep(1.2)  # the server rescans its folder at most once a second
        ids = {l["id"] for l in http.get("/layers").json()["layers"]}
        assert "sneaky" not in ids and "linked" not in ids and "osbs" in ids
        _err(http.get("/layers/sneaky/tiles/1/0/0.png"), 404)
    finally:
        (layers_dir / "sneaky.tif").unlink()
        (layers_dir / "linked.tif").unlink()


def test_bad_polygons(http):
    url = "/layers/osbs/statistics"
    _err(http.post(url, content=b"{not json", headers={"content-type": "application/json"}), 422)
    _err(http.post(url, json=[1, 2]), 422)
    assert "Polygon" in _err(http.post(url, json={"type": "Point", "coordinates": [0, 0]}), 422)["error"]
    _err(http.post(url, json={"type": "Polygon"}), 422)
    _err(http.post(url, json={"type": "Polygon", "coordinates": [[[0, 0], [1]]]}), 422)
    assert "longitude" in _err(http.post(url, json=geo_polygon(500, 0, 501, 1)), 422)["error"]
    _err(http.post(url, json={"type": "FeatureCollection", "features": []}), 422)
    _err(http.post(url, json={"type": "FeatureCollection", "features": [{"type": "Nope"}]}), 422)
    assert "does not overlap" in _err(http.post(url, json=geo_polygon(10, 10, 10.1, 10.1)), 422)["error"]


def test_a_self_intersecting_polygon_is_repaired(http):
    w, s, e, n = http.get("/layers/osbs").json()["bounds"]
    bowtie = {"type": "Polygon", "coordinates": [[[w, s], [e, n], [e, s], [w, n], [w, s]]]}
    r = http.post("/layers/osbs/statistics", json=bowtie)
    assert r.status_code == 200, r.text
    f = r.json()["features"][0]
    assert f["repaired"] is True and f["mean"] is not None
    # the repaired bow tie is its two triangles: half the box
    whole = http.post("/layers/osbs/statistics", json=geo_polygon(w, s, e, n)).json()["features"][0]
    assert f["area_m2"] == pytest.approx(whole["area_m2"] / 2, rel=1e-3)


def test_limits(http):
    w, s, e, n = http.get("/layers/osbs").json()["bounds"]
    ring = [[w + (e - w) * i / 30000, s] for i in range(30000)] + [[e, n], [w, s]]
    r = http.post("/layers/osbs/statistics", json={"type": "Polygon", "coordinates": [ring]})
    assert r.status_code == 413 and "vertices" in r.json()["error"]
    huge = b'{"type": "Polygon", "coordinates": [[' + b"[0.0, 0.0]," * 300_000 + b"[0, 0]]]}"
    r = http.post("/layers/osbs/statistics", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "body" in r.json()["error"]
    r = http.post("/layers/osbs/statistics", json=geo_polygon(-100, 20, -60, 45))
    assert r.status_code == 413 and "km²" in r.json()["error"]


def test_private_reads_cors_and_metrics(layers_dir, tmp_path):
    (tmp_path / "cfg.yaml").write_text("public_read: false\ncors_origins: [https://maps.example.org]\n"
                                       f"layers_dir: {layers_dir}\n")
    server = start_server(layers_dir, "--config", str(tmp_path / "cfg.yaml"))
    try:
        with server.client() as c:
            _err(c.get("/layers"), 401)
            _err(c.get("/layers/osbs/tiles/1/0/0.png"), 401)
            ok = c.get("/layers", headers={"X-API-Key": server.key, "Origin": "https://maps.example.org"})
            assert ok.status_code == 200
            assert ok.headers["access-control-allow-origin"] == "https://maps.example.org"
            other = c.get("/healthz", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in other.headers
            m = c.get("/metrics").text
            assert 'canopy_http_requests_total{route="/layers",status="401"} 1.0' in m
    finally:
        stop_server(server)


def test_bad_config_is_one_line(layers_dir, tmp_path):
    import subprocess
    import sys

    (tmp_path / "cfg.yaml").write_text("tile_cache_megabytes: 3\n")
    for args, words in ((["--config", str(tmp_path / "cfg.yaml")], "tile_cache_megabytes"),
                        (["--layers", str(tmp_path / "nope")], "is not a folder"),
                        (["--imagery", "x"], "NAME=PATH")):
        r = subprocess.run([sys.executable, "-m", "services", *[a.strip() for a in args]],
                           capture_output=True, text=True, timeout=60,
                           cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.fixture(scope="module")
def api_schema(live_server):
    return schemathesis.openapi.from_url(live_server.url + "/openapi.json")


def test_openapi_schema_holds_under_generated_requests(api_schema):
    """schemathesis: requests generated from /openapi.json for every operation: no 5xx, and the
    status codes, content types and bodies the schema declares. (Driven through hypothesis
    directly: schemathesis' pytest plugin does not run under pytest 9.)"""
    from hypothesis import given

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    failures, ran = [], 0
    for result in api_schema.get_all_operations():
        op = result.ok()

        @settings(max_examples=10, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            case.call_and_validate(checks=checks, timeout=60)

        try:
            check()
        except Exception as exc:  # noqa: BLE001 - gather every operation's failure
            failures.append(f"{op.method.upper()} {op.path}: {str(exc)[:400]}")
        ran += 1
    assert ran >= 15, ran
    assert not failures, "\n\n".join(failures)


def test_unknown_routes_and_methods_are_json(http):
    _err(http.get("/nope"), 404)
    _err(http.put("/layers"), 405)
    assert http.get("/docs").status_code == 200
    assert "openapi" in http.get("/openapi.json").json()


def test_no_trace_on_an_internal_error(layers_dir, monkeypatch):
    from fastapi.testclient import TestClient

    from services import tiles
    from services.app import create_app
    from services.config import ServiceConfig

    def broken(*a, **k):
        raise RuntimeError("secret path /srv/data")

    monkeypatch.setattr(tiles, "read_tile", broken)
    client = TestClient(create_app(ServiceConfig(layers_dir=str(layers_dir)), run_jobs=False),
                        raise_server_exceptions=False)
    r = client.get("/layers/osbs/tiles/18/71368/108412.png")
    assert r.status_code == 500 and r.json() == {"error": "internal error", "field": None}


def test_a_chunked_body_is_refused_at_the_limit(http):
    def body():
        yield b'{"type": "Polygon", "coordinates": [['
        for _ in range(400_000):
            yield b"[0.0, 0.0],"
        yield b"[0, 0]]]}"

    r = http.post("/layers/osbs/statistics", content=body(),
                  headers={"content-type": "application/json"})
    assert r.status_code == 413 and "body" in r.json()["error"]


def _cog(path, value, size=64):
    import numpy as np
    from affine import Affine

    from canopy.io.cog import write_cog

    return write_cog(path, np.full((size, size), value, np.float32), crs="EPSG:32617",
                     transform=Affine(0.5, 0, 400000, 0, -0.5, 3280000), nodata=None,
                     overwrite=True)


def test_layer_ids_never_move_and_replaced_or_removed_files_are_served_right(tmp_path):
    """A new file whose name slugs like an old one's gets another id; a file replaced in place
    is read anew (not an old handle); a removed one is a 404, not a 500."""
    from fastapi.testclient import TestClient

    from services.app import create_app
    from services.config import ServiceConfig

    _cog(tmp_path / "a-b.tif", 1.0)
    # one request thread: the thread that opened the old file serves the next request too
    with TestClient(create_app(ServiceConfig(layers_dir=str(tmp_path), threads=1),
                               run_jobs=False)) as c:
        _check_ids_and_files(c, tmp_path)


def _check_ids_and_files(c, tmp_path):
    info = c.get("/layers/a-b").json()
    lon, lat = (info["bounds"][0] + info["bounds"][2]) / 2, (info["bounds"][1] + info["bounds"][3]) / 2
    assert c.get("/layers/a-b/point", params={"lon": lon, "lat": lat}).json()["height"] == 1.0
    _cog(tmp_path / "a b.tif", 5.0)
    time.sleep(1.1)
    ids = {l["id"]: l["name"] for l in c.get("/layers").json()["layers"]}
    assert ids["a-b"] == "a-b.tif" and len(ids) == 2  # the old id still names the old file
    _cog(tmp_path / "a-b.tif", 2.0)  # replaced atomically (a new inode)
    time.sleep(1.1)
    assert c.get("/layers/a-b/point", params={"lon": lon, "lat": lat}).json()["height"] == 2.0
    (tmp_path / "a-b.tif").unlink()
    r = c.get("/layers/a-b/point", params={"lon": lon, "lat": lat})
    assert r.status_code == 404 and "Traceback" not in r.text


def test_statistics_read_only_the_blocks_a_polygon_touches(tmp_path, monkeypatch):
    """Two small parcels at opposite corners of a 6000² map: blocks of at most 2048² px are
    read, and only those the parcels touch (not the 36 Mpx between them)."""
    import numpy as np
    from affine import Affine
    from pyproj import Transformer

    from canopy.io.cog import write_cog
    from services import stats
    from services.config import Limits
    from services.geojson import parse_polygons
    from services.layers import LayerRegistry

    t = Affine(0.6, 0, 400000, 0, -0.6, 3290000)
    write_cog(tmp_path / "big.tif", np.full((6000, 6000), 7.0, np.float32), crs="EPSG:32617",
              transform=t, nodata=None)
    layer = LayerRegistry(tmp_path).get("big")
    to_ll = Transformer.from_crs(32617, 4326, always_xy=True)

    def square(x, y, s=30.0):
        pts = [to_ll.transform(*p) for p in ((x, y), (x + s, y), (x + s, y + s), (x, y + s), (x, y))]
        return [pts]

    body = {"type": "MultiPolygon", "coordinates": [square(400010, 3286410),
                                                    square(403550, 3289950)]}
    reads = []
    real = stats._heights
    monkeypatch.setattr(stats, "_heights", lambda ds, w, band=1: reads.append(w) or real(ds, w, band))
    feat = stats.statistics(layer, parse_polygons(body, Limits()), Limits())[0]
    assert feat["mean"] == pytest.approx(7.0) and feat["area_m2"] == pytest.approx(1800, rel=0.01)
    assert all(w.width <= 2048 and w.height <= 2048 for w in reads)
    assert sum(w.width * w.height for w in reads) <= 2 * 2048 * 2048
