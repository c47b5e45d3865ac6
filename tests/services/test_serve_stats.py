"""Point values, zonal statistics and exports against numbers computed here directly from the
COGs with rasterio, numpy and shapely (each pixel's square intersected with the polygon), on a
one-raster map and on a run across two UTM zones."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import rasterio
import shapely
from pyproj import Geod, Transformer
from shapely.geometry import box

from tests.services.conftest import geo_polygon


def _pixel_shares(ds, geom) -> tuple[np.ndarray, np.ndarray]:
    """(heights, share of each pixel's square inside geom) of every pixel with data, by shapely."""
    h = ds.read(1, masked=True)
    rows, cols = np.nonzero(~np.ma.getmaskarray(h) & np.isfinite(h.filled(np.nan)))
    x0, y0 = ds.transform * (cols, rows)
    x1, y1 = ds.transform * (cols + 1, rows + 1)
    boxes = shapely.box(np.minimum(x0, x1), np.minimum(y0, y1), np.maximum(x0, x1), np.maximum(y0, y1))
    share = shapely.area(shapely.intersection(boxes, geom)) / shapely.area(boxes)
    keep = share > 0
    return h.data[rows, cols][keep].astype(np.float64), share[keep]


def _weighted_quantile(v, w, q):
    order = np.argsort(v)
    c = np.cumsum(w[order])
    return v[order][np.searchsorted(c, q * c[-1] - 1e-9)]


def _to(crs, geom_ll):
    t = Transformer.from_crs(4326, crs, always_xy=True)
    return shapely.transform(shapely.segmentize(geom_ll, 1e-5),
                             lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))


def _geodesic_area(geom_ll) -> float:
    # pyproj sums signed ring areas: holes must wind the other way (shapely's orient)
    oriented = shapely.geometry.polygon.orient(geom_ll, sign=1.0)
    return abs(Geod(ellps="WGS84").geometry_area_perimeter(oriented)[0])


def _check(feat, values, shares, px_area_m2, area_m2):
    w = shares
    assert feat["mean"] == pytest.approx(np.dot(values, w) / w.sum(), abs=1e-3)
    assert feat["median"] == pytest.approx(_weighted_quantile(values, w, 0.5), abs=0.011)
    assert feat["p95"] == pytest.approx(_weighted_quantile(values, w, 0.95), abs=0.011)
    assert feat["cover_2m"] == pytest.approx(w[values >= 2].sum() / w.sum(), abs=2e-3)
    assert feat["cover_5m"] == pytest.approx(w[values >= 5].sum() / w.sum(), abs=2e-3)
    assert feat["area_m2"] == pytest.approx(area_m2, rel=1e-3)
    valid = w.sum() * px_area_m2
    assert feat["valid_area_m2"] == pytest.approx(valid, rel=3e-4)
    assert feat["nodata_area_m2"] == pytest.approx(max(0.0, area_m2 - valid), rel=2e-3, abs=0.5)
    classes = feat["area_by_class_m2"]
    assert sum(classes.values()) == pytest.approx(feat["valid_area_m2"], rel=1e-6)
    assert classes["2-5m"] == pytest.approx(w[(values >= 2) & (values < 5)].sum() * px_area_m2,
                                            rel=5e-3, abs=0.05)
    assert feat["valid_pixels"] == len(values)


def test_statistics_of_a_polygon_match_a_direct_computation(http, layers_dir):
    path = layers_dir / "osbs.tif"
    info = http.get("/layers/osbs").json()
    w, s, e, n = info["bounds"]
    # a triangle with a hole, partly outside the map (its area there is "without data")
    outer = [(w - (e - w) * 0.2, s + (n - s) * 0.1), (w + (e - w) * 0.9, s + (n - s) * 0.25),
             (w + (e - w) * 0.45, s + (n - s) * 0.95)]
    hole = [(w + (e - w) * 0.4, s + (n - s) * 0.4), (w + (e - w) * 0.5, s + (n - s) * 0.4),
            (w + (e - w) * 0.45, s + (n - s) * 0.5)]
    geom = shapely.Polygon(outer, [hole])
    body = {"type": "Feature", "properties": {"name": "stand 7"},
            "geometry": shapely.geometry.mapping(geom)}
    r = http.post("/layers/osbs/statistics", json=body)
    assert r.status_code == 200, r.text
    feat = r.json()["features"][0]
    assert feat["properties"] == {"name": "stand 7"}
    with rasterio.open(path) as ds:
        values, shares = _pixel_shares(ds, _to(ds.crs, geom))
        px = abs(ds.transform.a * ds.transform.e)
        utm_area = _to(ds.crs, geom).area
    # the server scales UTM areas to equal-area ones: here (UTM 17N near its centre) they agree
    # with the geodesic area to the grid's scale error
    area = _geodesic_area(geom)
    assert area == pytest.approx(utm_area, rel=2e-3)
    _check(feat, values, shares, px * area / utm_area, area)
    assert feat["nodata_area_m2"] > 0.05 * area


def test_statistics_across_two_utm_zones_of_a_run(http, layers_dir):
    run = layers_dir / "zones"
    geom = box(-48.0009, -23.6009, -47.9992, -23.5994)  # straddles 48° W
    r = http.post("/layers/zones/statistics", json={"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"i": 0}, "geometry": shapely.geometry.mapping(geom)},
        {"type": "Feature", "properties": {"i": 1},
         "geometry": geo_polygon(-48.0009, -23.6009, -48.0001, -23.5994)}]})
    assert r.status_code == 200, r.text
    both, west = r.json()["features"]
    values, shares, eq_px = [], [], []
    for zone, piece in ((32722, geom.intersection(box(-54, -80, -48, 0))),
                        (32723, geom.intersection(box(-48, -80, -42, 0)))):
        native = _to(f"EPSG:{zone}", piece)
        k = _geodesic_area(piece) / native.area
        for cell in sorted((run / "cells").glob(f"{zone}_*.tif")):
            with rasterio.open(cell) as ds:
                if not box(*ds.bounds).intersects(native):
                    continue
                v, sh = _pixel_shares(ds, native)
                values.append(v)
                shares.append(sh)
                eq_px.append(np.full(len(v), abs(ds.transform.a * ds.transform.e) * k))
    values, shares, eq_px = map(np.concatenate, (values, shares, eq_px))
    assert len(values) > 1000
    area = _geodesic_area(geom)
    _check(both, values, shares, float(np.average(eq_px, weights=shares)), area)
    # no area counted twice: the two zones' pieces add up to the polygon, not more
    assert both["valid_area_m2"] <= area * 1.001
    assert 0 < west["valid_area_m2"] < both["valid_area_m2"]


def test_point_is_the_pixel_under_it(http, layers_dir):
    with rasterio.open(layers_dir / "osbs.tif") as ds:
        heights = ds.read(1)
        to_ll = Transformer.from_crs(ds.crs, 4326, always_xy=True)
        for row, col in ((10, 10), (40, 55), (79, 0)):
            x, y = ds.xy(row, col)
            lon, lat = to_ll.transform(x, y)
            r = http.get("/layers/osbs/point", params={"lon": lon, "lat": lat})
            assert r.status_code == 200
            assert r.json()["height"] == pytest.approx(float(heights[row, col]), abs=1e-3)
    # across the zone boundary of a run: each side's own cell answers
    for lon in (-48.0003, -47.9997):
        r = http.get("/layers/zones/point", params={"lon": lon, "lat": -23.6})
        assert r.status_code == 200 and r.json()["height"] is not None
    r = http.get("/layers/osbs/point", params={"lon": 10, "lat": 10})
    assert r.status_code == 404 and "outside" in r.json()["error"]


def _export(http, live_server, layer, geom, fmt="tif"):
    return http.post(f"/layers/{layer}/export", params={"format": fmt},
                     json=shapely.geometry.mapping(geom), headers={"X-API-Key": live_server.key})


def test_export_holds_exactly_the_source_pixels_inside_the_polygon(http, live_server, layers_dir, tmp_path):
    info = http.get("/layers/osbs").json()
    w, s, e, n = info["bounds"]
    geom = shapely.Polygon([(w + (e - w) * 0.1, s + (n - s) * 0.1), (w + (e - w) * 0.8, s + (n - s) * 0.3),
                            (w + (e - w) * 0.3, s + (n - s) * 0.9)])
    r = _export(http, live_server, "osbs", geom)
    assert r.status_code == 200, r.text
    out = tmp_path / "export.tif"
    out.write_bytes(r.content)
    from rio_cogeo.cogeo import cog_validate

    assert cog_validate(str(out))[0]
    with rasterio.open(out) as ex, rasterio.open(layers_dir / "osbs.tif") as src:
        assert ex.crs == src.crs and ex.res == src.res
        assert ex.descriptions == src.descriptions and ex.tags()["CANOPY_MODEL"] == src.tags()["CANOPY_MODEL"]
        a = ex.read(1)
        win = rasterio.windows.from_bounds(*ex.bounds, transform=src.transform).round_offsets().round_lengths()
        b = src.read(1, window=win)
        native = _to(src.crs, geom)
        rows, cols = np.indices(a.shape)
        x0, y0 = ex.transform * (cols, rows)
        x1, y1 = ex.transform * (cols + 1, rows + 1)
        touches = shapely.intersects(shapely.box(x0, y1, x1, y0), native)
        np.testing.assert_array_equal(a[touches], b[touches])  # the same bytes, not resampled
        assert np.isnan(a[~touches]).all() and touches.sum() > 500
    z = _export(http, live_server, "osbs", geom, fmt="zip")
    names = zipfile.ZipFile(io.BytesIO(z.content)).namelist()
    assert sorted(names) == ["osbs_export.qml", "osbs_export.tif"]


def test_export_of_a_run_copies_its_cells(http, live_server, layers_dir, tmp_path):
    geom = box(-47.9998, -23.6008, -47.9990, -23.5996)  # zone 23 only, across several cells
    r = _export(http, live_server, "zones", geom)
    assert r.status_code == 200, r.text
    (tmp_path / "x.tif").write_bytes(r.content)
    with rasterio.open(tmp_path / "x.tif") as ex:
        assert ex.crs.to_epsg() == 32723
        a = ex.read(1)
        checked = 0
        for cell in (layers_dir / "zones" / "cells").glob("32723_*.tif"):
            with rasterio.open(cell) as ds:
                lb = box(*ds.bounds).intersection(box(*ex.bounds))
                if lb.area == 0:
                    continue
                wa = rasterio.windows.from_bounds(*lb.bounds, transform=ex.transform).round_offsets().round_lengths()
                wb = rasterio.windows.from_bounds(*lb.bounds, transform=ds.transform).round_offsets().round_lengths()
                x, y = ex.read(1, window=wa), ds.read(1, window=wb)
                ok = ~np.isnan(x)
                np.testing.assert_array_equal(x[ok], y[ok])
                checked += ok.sum()
        assert checked > 500 and checked == np.isfinite(a).sum()
    across = _export(http, live_server, "zones", box(-48.0005, -23.6005, -47.9995, -23.5995))
    assert across.status_code == 422 and "UTM zones" in across.json()["error"]


def test_export_limits_and_keys(http, live_server):
    info = http.get("/layers/osbs").json()
    geom = box(*info["bounds"])
    assert http.post("/layers/osbs/export", json=shapely.geometry.mapping(geom)).status_code == 401
    bad = http.post("/layers/osbs/export", json=shapely.geometry.mapping(geom),
                    headers={"X-API-Key": "wrong"})
    assert bad.status_code == 401 and "X-API-Key" in bad.json()["error"]
    far = box(-120, 30, -100, 45)
    r = _export(http, live_server, "osbs", far)
    assert r.status_code == 422 and "does not overlap" in r.json()["error"]


def test_export_size_limit(layers_dir):
    from services.config import Limits
    from services.errors import TooLarge
    from services.geojson import parse_polygons
    from services.layers import LayerRegistry
    from services.stats import export

    layer = LayerRegistry(layers_dir).get("osbs")
    w, s, e, n = layer.bounds_ll
    big = parse_polygons(geo_polygon(w - 1, s - 1, e + 1, n + 1), Limits())[0]
    path, _ = export(layer, big, Limits(max_export_pixels=6400), "tif")  # clipped to the map
    with rasterio.open(path) as ds:
        assert ds.width * ds.height <= 6400
    with pytest.raises(TooLarge, match="at most 1,000 px"):
        export(layer, big, Limits(max_export_pixels=1000), "tif")


def test_an_export_that_fails_or_is_orphaned_leaves_no_folder_behind(layers_dir, tmp_path,
                                                                    monkeypatch):
    """A failed write removes its folder at once; folders a killed server left between writing
    and sending are removed at the next start once they are an hour old (fresh ones are a live
    request's)."""
    import os
    import tempfile
    import time

    import services.stats as stats
    from services.config import Limits
    from services.geojson import parse_polygons
    from services.layers import LayerRegistry

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    layer = LayerRegistry(layers_dir).get("osbs")
    w, s, e, n = layer.bounds_ll
    poly = parse_polygons(geo_polygon(w, s, (w + e) / 2, (s + n) / 2), Limits())[0]

    def full_disk(path, *args, **kwargs):
        path.write_bytes(b"half a COG")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stats, "write_cog", full_disk)
    with pytest.raises(OSError, match="No space left"):
        stats.export(layer, poly, Limits(), "zip")
    assert not list(tmp_path.glob(stats.EXPORT_PREFIX + "*"))
    old, fresh = (tmp_path / f"{stats.EXPORT_PREFIX}old", tmp_path / f"{stats.EXPORT_PREFIX}new")
    for folder in (old, fresh):
        folder.mkdir()
        (folder / "osbs_export.tif").write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    assert stats.sweep_stale_exports() == 1
    assert not old.exists() and fresh.exists()
    stats.remove_export(old / "osbs_export.tif")  # a response's cleanup after a sweep: no error
