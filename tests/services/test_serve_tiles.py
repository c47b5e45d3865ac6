"""Map tiles, TileJSON and WMTS from a real uvicorn server: the pixels of a tile are the layer's
heights drawn in the legend's colours, nodata is transparent, and a run layer is drawn from its
cells up close and from its overview far out."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import morecantile
import numpy as np
import pytest
import rasterio
from PIL import Image
from pyproj import Transformer

from services import tiles as tiles_mod

TMS = morecantile.tms.get("WebMercatorQuad")


def _image(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.asarray(Image.open(io.BytesIO(resp.content)).convert("RGBA"))


def _expected_rgba(path, z, x, y, size, lo=0.0, hi=40.0, cmap="canopy"):
    """What each tile pixel must be: the source pixel under the tile pixel's centre (nearest),
    coloured by the ramp — computed here from rasterio and pyproj, not by the server's code path."""
    b = TMS.xy_bounds(x, y, z)
    px = (b.right - b.left) / size
    cx = b.left + (np.arange(size) + 0.5) * px
    cy = b.top - (np.arange(size) + 0.5) * px
    gx, gy = np.meshgrid(cx, cy)
    with rasterio.open(path) as ds:
        heights = ds.read(1, masked=True).filled(np.nan)
        t = Transformer.from_crs(3857, ds.crs, always_xy=True)
        ux, uy = t.transform(gx, gy)
        rows, cols = rasterio.transform.rowcol(ds.transform, ux.ravel(), uy.ravel())
    rows, cols = np.asarray(rows).reshape(size, size), np.asarray(cols).reshape(size, size)
    inside = (rows >= 0) & (rows < heights.shape[0]) & (cols >= 0) & (cols < heights.shape[1])
    h = np.full((size, size), np.nan, np.float32)
    h[inside] = heights[rows[inside], cols[inside]]
    table = tiles_mod.palette(cmap)
    scaled = np.clip(np.nan_to_num((h - lo) / (hi - lo) * 254 + 0.5, nan=-1), -1, 254)
    idx = np.where(np.isnan(h), 255, scaled.astype(int)).astype(np.uint8)
    return table[idx], h


def _native_tile(http, layer_id):
    info = http.get(f"/layers/{layer_id}").json()
    w, s, e, n = info["bounds"]
    t = TMS.tile((w + e) / 2, (s + n) / 2, info["maxzoom"])
    return info, t


def test_a_tile_shows_the_layers_heights_in_the_ramps_colours(http, layers_dir):
    info, t = _native_tile(http, "osbs")
    img = _image(http.get(f"/layers/osbs/tiles/{t.z}/{t.x}/{t.y}.png"))
    assert img.shape == (256, 256, 4)
    want, h = _expected_rgba(layers_dir / "osbs.tif", t.z, t.x, t.y, 256)
    valid = ~np.isnan(h)
    assert valid.sum() > 1000 and (~valid).sum() > 1000  # the layer covers part of this tile
    # outside the layer: fully transparent
    assert (img[~valid][:, 3] == 0).mean() > 0.99
    # inside: the colour of the height under each pixel (nearest), off by one step at most
    # where pyproj and GDAL's warp disagree on a pixel's centre by a hair
    diff = np.abs(img[valid][:, :3].astype(int) - want[valid][:, :3].astype(int)).max(axis=1)
    assert (img[valid][:, 3] == 255).all()
    assert (diff <= 3).mean() > 0.97, f"{(diff <= 3).mean():.3f} of pixels have the right colour"


def test_rescale_and_colormap_change_the_colours(http, layers_dir):
    _, t = _native_tile(http, "osbs")
    url = f"/layers/osbs/tiles/{t.z}/{t.x}/{t.y}.png"
    img = _image(http.get(url, params={"rescale": "0,10", "colormap": "magma"}))
    want, h = _expected_rgba(layers_dir / "osbs.tif", t.z, t.x, t.y, 256, 0, 10, "magma")
    valid = ~np.isnan(h)
    diff = np.abs(img[valid][:, :3].astype(int) - want[valid][:, :3].astype(int)).max(axis=1)
    assert (diff <= 3).mean() > 0.97
    assert not np.array_equal(img, _image(http.get(url)))


def test_2x_and_webp_tiles(http):
    _, t = _native_tile(http, "osbs")
    big = _image(http.get(f"/layers/osbs/tiles/{t.z}/{t.x}/{t.y}@2x.png"))
    assert big.shape == (512, 512, 4)
    r = http.get(f"/layers/osbs/tiles/{t.z}/{t.x}/{t.y}.webp")
    assert r.headers["content-type"] == "image/webp"
    webp = _image(r)
    png = _image(http.get(f"/layers/osbs/tiles/{t.z}/{t.x}/{t.y}.png"))
    assert webp.shape == (256, 256, 4)
    assert ((webp[..., 3] > 127) == (png[..., 3] > 127)).mean() > 0.98  # same footprint
    assert "max-age" in r.headers["cache-control"]


def test_a_tile_outside_the_layer_is_transparent(http):
    img = _image(http.get("/layers/osbs/tiles/10/100/100.png"))
    assert img.shape == (256, 256, 4) and (img[..., 3] == 0).all()


def test_run_layer_reads_cells_up_close_and_the_overview_far_out(http, layers_dir):
    from services.layers import LayerRegistry

    layer = LayerRegistry(layers_dir).get("zones")
    info, t = _native_tile(http, "zones")
    near = tiles_mod.tile_sources(layer, t.z, t.x, t.y)
    assert near and all(p.path.parent.name == "cells" for p in near)
    assert {p.crs for p in near} == {"EPSG:32722", "EPSG:32723"}  # the tile spans the meridian
    far = TMS.tile(-48.0, -23.6, info["minzoom"])
    assert [p.path.name for p in tiles_mod.tile_sources(layer, far.z, far.x, far.y)] == ["overview.tif"]
    for z in range(info["minzoom"], info["maxzoom"] + 1):
        tt = TMS.tile(-48.0, -23.6, z)
        img = _image(http.get(f"/layers/zones/tiles/{z}/{tt.x}/{tt.y}.png"))
        assert (img[..., 3] == 255).sum() > 50, f"zoom {z} shows no heights"
    # both zones' cells are drawn side by side, without a gap at the meridian
    img = _image(http.get(f"/layers/zones/tiles/{t.z}/{t.x}/{t.y}.png"))
    b = TMS.xy_bounds(t.x, t.y, t.z)
    x_merid, _ = Transformer.from_crs(4326, 3857, always_xy=True).transform(-48.0, -23.6)
    col = int((x_merid - b.left) / (b.right - b.left) * 256)
    rows = np.where(img[:, col, 3] == 255)[0]
    assert len(rows) > 20 and (img[rows, col - 3, 3] == 255).all() and (img[rows, col + 3, 3] == 255).all()


def test_tilejson_and_wmts_describe_the_layer(http, live_server):
    tj = http.get("/layers/osbs/tilejson.json", params={"rescale": "0,20"}).json()
    assert tj["tilejson"] == "3.0.0" and tj["minzoom"] <= tj["maxzoom"]
    assert tj["tiles"][0].startswith(live_server.url + "/layers/osbs/tiles/{z}/{x}/{y}.png")
    assert "rescale=0%2C20" in tj["tiles"][0]
    tile_url = tj["tiles"][0].format(z=18, x=71368, y=108412)
    assert http.get(tile_url).status_code == 200

    r = http.get("/layers/osbs/WMTSCapabilities.xml")
    assert r.status_code == 200 and "xml" in r.headers["content-type"]
    ns = {"w": "http://www.opengis.net/wmts/1.0", "ows": "http://www.opengis.net/ows/1.1"}
    root = ET.fromstring(r.content)
    layer = root.find("w:Contents/w:Layer", ns)
    assert layer.find("ows:Identifier", ns).text == "osbs"
    template = layer.find("w:ResourceURL", ns).get("template")
    assert template == f"{live_server.url}/layers/osbs/tiles/{{TileMatrix}}/{{TileCol}}/{{TileRow}}.png"
    matrices = root.findall("w:Contents/w:TileMatrixSet/w:TileMatrix", ns)
    m18 = [m for m in matrices if m.find("ows:Identifier", ns).text == "18"][0]
    # the OGC GoogleMapsCompatible scale at zoom 18 (2-D tile matrix set standard, annex)
    assert float(m18.find("w:ScaleDenominator", ns).text) == pytest.approx(2132.729583849784)
    limits = layer.findall("w:TileMatrixSetLink/w:TileMatrixSetLimits/w:TileMatrixLimits", ns)
    lim = [l for l in limits if l.find("w:TileMatrix", ns).text == "18"][0]
    assert int(lim.find("w:MinTileCol", ns).text) <= 71368 <= int(lim.find("w:MaxTileCol", ns).text)
    url = template.replace("{TileMatrix}", "18").replace("{TileCol}", "71368").replace("{TileRow}", "108412")
    assert http.get(url).status_code == 200


def test_rendered_tiles_are_cached_and_the_cache_is_bounded(layers_dir):
    from services.layers import LayerRegistry

    layer = LayerRegistry(layers_dir).get("osbs")
    info = layer.info()
    t = TMS.tile(info["center"][0], info["center"][1], layer.maxzoom)
    cache = tiles_mod.TileCache(max_bytes=20_000)
    a = tiles_mod.render(layer, t.z, t.x, t.y, scale=1, fmt="png", colormap="canopy",
                         rescale=(0, 40), cache=cache)
    b = tiles_mod.render(layer, t.z, t.x, t.y, scale=1, fmt="png", colormap="canopy",
                         rescale=(0, 40), cache=cache)
    assert a == b and cache.hits == 1
    for z in range(8, 18):  # other tiles push it out: never more than its bytes
        tt = TMS.tile(info["center"][0], info["center"][1], z)
        tiles_mod.render(layer, z, tt.x, tt.y, scale=2, fmt="png", colormap="canopy",
                         rescale=(0, 40), cache=cache)
        assert cache.bytes <= 20_000
