"""Imagery where it lives: STAC API searches, static STAC files and saved ItemCollections whose
assets are COGs read over HTTP range requests (GDAL's ``/vsicurl/``), never downloaded whole.

``--imagery`` takes ``stac+https://host/api?collections=naip&datetime=2020/2022`` (the query is
the search; ``asset=KEY`` picks the asset, else the first of ``data``, ``visual``, ``image``, …
or a ``data``-role raster) or a STAC JSON file. :func:`remote_items` returns, per Item, what
planning needs, from the Item's own metadata where the projection extension gives it (no request
per scene to plan cells), and a version string (``ETag`` or ``Last-Modified`` + length, from one
``HEAD``) so that a scene changed between planning and reading is noticed, never mixed in.

Invariants: credentials are never written anywhere — GDAL and the HEAD requests take them from
the environment, and a URL-signing hook (:func:`signed`, ``CANOPY_STAC_SIGNER=module:function``)
is applied only at the moment of a request, so run files and STAC outputs hold unsigned URLs.
The GDAL options for remote reads (:data:`REMOTE_GDAL_OPTIONS`: merged range requests, no
directory listing on open, HTTP/2 where offered, retries with back-off on 429/5xx and timeouts,
a bounded block cache) are process environment defaults an operator's own settings override.
"""

from __future__ import annotations

import importlib
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from data_catalog.errors import CatalogError

PREFIX = "stac+"
REMOTE_GDAL_OPTIONS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_HTTP_VERSION": "2TLS",  # HTTP/2 over TLS (ALPN); plain http stays 1.1 (no h2c upgrades)
    "GDAL_HTTP_MAX_RETRY": "6",
    "GDAL_HTTP_RETRY_DELAY": "0.5",  # GDAL doubles it per try and adds jitter (GDAL ≥ 3.7)
    "GDAL_HTTP_TIMEOUT": "60",
    "GDAL_HTTP_CONNECTTIMEOUT": "15",
    "CPL_VSIL_CURL_CACHE_SIZE": str(64 * 1024 * 1024),
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(32 * 1024 * 1024),
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF,.jp2,.vrt",
}
HEAD_TRIES = 5


def use_remote_defaults() -> None:
    """Set :data:`REMOTE_GDAL_OPTIONS` in this process's environment where not set already
    (idempotent; the engine calls it in the driver and in each worker before reading)."""
    for key, value in REMOTE_GDAL_OPTIONS.items():
        os.environ.setdefault(key, value)


def forget_remote(url: str) -> None:
    """Drop what GDAL's ``/vsicurl/`` layer cached about ``url`` (its size, its fetched ranges).

    Needed after a failed read: GDAL keeps a transfer cut short (a connection dropped mid-body)
    in its process-wide cache, and every later open of the URL fails with "Cannot read TIFF
    header" (measured with tests/stac_fixture_server.py). rasterio does not expose GDAL's
    ``VSICurlPartialClearCache``, so it is called through ctypes on the GDAL library rasterio
    loaded; where that library cannot be found this does nothing (the cell then fails and the
    next run redoes it)."""
    fn = _partial_clear_cache()
    if fn is not None:
        fn(("/vsicurl/" + signed(url)).encode())


_CLEAR: list = []


def _partial_clear_cache():
    if not _CLEAR:
        import ctypes
        import ctypes.util
        import glob

        import rasterio

        fn = None
        libs = glob.glob(str(Path(rasterio.__file__).parents[1] / "rasterio.libs" / "libgdal*"))
        libs += [p for p in [ctypes.util.find_library("gdal")] if p]
        for path in libs:
            try:
                fn = ctypes.CDLL(path).VSICurlPartialClearCache
                fn.argtypes, fn.restype = [ctypes.c_char_p], None
                break
            except (OSError, AttributeError):
                continue
        _CLEAR.append(fn)
    return _CLEAR[0]


def is_stac_search(spec) -> bool:
    return str(spec).startswith(PREFIX + "http")


def is_remote(path: str) -> bool:
    return str(path).startswith(("http://", "https://"))


def signed(url: str) -> str:
    """``url`` as the signing hook returns it (``CANOPY_STAC_SIGNER=module:function``), or as is."""
    hook = os.environ.get("CANOPY_STAC_SIGNER")
    if not hook or not is_remote(url):
        return url
    module, _, name = hook.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise CatalogError(f"CANOPY_STAC_SIGNER '{hook}' cannot be loaded ({exc})") from None
    return fn(url)


def remote_version(url: str, *, need_ranges: bool = False) -> str:
    """``ETag``, else ``Last-Modified`` and length, of a remote file (one HEAD, retried with
    back-off on 429/5xx and connection faults); :class:`CatalogError` naming the URL if it is
    gone, or with ``need_ranges`` if its server says it serves no byte ranges (every window
    would download the whole file)."""
    import random
    import time

    last = None
    for attempt in range(HEAD_TRIES):
        req = urllib.request.Request(signed(url), method="HEAD")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                h = resp.headers
                if need_ranges and (h.get("Accept-Ranges") or "").lower() != "bytes":
                    raise CatalogError(
                        f"{url}: the server does not serve byte ranges (no 'Accept-Ranges: "
                        "bytes'), so every read would download the whole file; copy the "
                        "imagery to local disk or serve it from a range-capable server")
                return h.get("ETag") or f"{h.get('Last-Modified')}|{h.get('Content-Length')}"
        except urllib.error.HTTPError as exc:
            if exc.code not in (408, 429, 500, 502, 503, 504):
                raise CatalogError(f"{url}: HTTP {exc.code} ({exc.reason})") from None
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(min(8.0, 0.25 * 2 ** attempt) * (0.5 + random.random()))
    raise CatalogError(f"{url}: no answer after {HEAD_TRIES} tries ({last})")


@dataclass(frozen=True)
class RemoteItem:
    """What planning needs of one STAC Item's imagery asset."""

    item_id: str
    href: str
    crs: str | None  # from the projection extension, when given
    bounds: tuple[float, float, float, float] | None  # native, from proj:bbox/transform
    footprint: object  # shapely geometry, lon/lat
    res: float | None
    datetime: str | None  # ISO, or start/end
    count: int | None
    dtype: str | None
    media_type: str | None = None  # the asset's "type" ("… profile=cloud-optimized" for a COG)


def parse_search(spec: str) -> tuple[str, dict, str | None]:
    """(API root URL, search parameters, asset key) of a ``stac+https://…`` spec."""
    url = urllib.parse.urlsplit(str(spec)[len(PREFIX):])
    params = dict(urllib.parse.parse_qsl(url.query))
    asset = params.pop("asset", None)
    root = urllib.parse.urlunsplit((url.scheme, url.netloc, url.path, "", ""))
    out: dict = {}
    for key, value in params.items():
        if key in ("collections", "ids"):
            out[key] = value.split(",")
        elif key in ("datetime", "limit", "max_items"):
            out[key] = int(value) if key in ("limit", "max_items") else value
        elif key == "query":
            out[key] = json.loads(value)
        elif key == "bbox":
            try:
                out[key] = [float(v) for v in value.split(",")]
            except ValueError:
                raise CatalogError(f"bbox must be minx,miny,maxx,maxy in degrees, got '{value}'") from None
        else:
            raise CatalogError(f"STAC search parameter '{key}' is not supported (collections, "
                               "ids, datetime, query, bbox, limit, max_items, asset)")
    return root, out, asset


def search(spec: str, bbox: tuple[float, float, float, float] | None = None
           ) -> tuple[list, str | None]:
    """Items of a STAC API search over ``bbox`` (lon/lat; an area of interest's bounds win over
    a ``bbox`` in the spec), and the asset key asked for."""
    from pystac_client import Client
    from pystac_client.exceptions import APIError

    root, params, asset = parse_search(spec)
    if bbox is not None:
        params["bbox"] = list(bbox)
    if "bbox" not in params and "ids" not in params:
        raise CatalogError(f"a search of {root} needs bbox=minx,miny,maxx,maxy (or ids=…)")
    try:
        client = Client.open(root)
        items = list(client.search(**params).items())
    except APIError as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if any(w in text for w in ("Max retries", "Connection", "timed out", "Name or service")):
            raise CatalogError(f"STAC API {root} did not answer (connection failed)") from None
        raise CatalogError(f"STAC API {root}: {text[:200]}") from None
    except (OSError, ValueError) as exc:  # requests' connection errors are OSErrors
        raise CatalogError(f"STAC API {root} did not answer ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:160]})") from None
    if not items:
        raise CatalogError(f"STAC API {root}: no items over the area of interest for "
                           f"{params or 'this search'}")
    return items, asset


def import_search(spec: str, catalog) -> list:
    """Add the imagery Items of a STAC API search (``stac+https://…?bbox=…``) to ``catalog``;
    remote assets are described from the items' metadata."""
    from data_catalog.stac import record_for_item

    items, _ = search(spec)
    records = [r for item in items if (r := record_for_item(item, Path.cwd(), source=spec)) is not None]
    if not records:
        raise CatalogError(f"{spec}: no Items with a raster asset")
    return catalog.add_records(records)


def items_from_file(path: Path) -> list:
    from data_catalog.stac import read_stac_items

    return read_stac_items(Path(path).expanduser().resolve())


def is_stac_file(path: Path) -> bool:
    if Path(path).suffix.lower() != ".json" or not Path(path).is_file():
        return False
    try:
        kind = json.loads(Path(path).read_text()).get("type")
    except (OSError, ValueError, AttributeError):
        return False
    return kind in ("FeatureCollection", "Feature", "Catalog", "Collection")


def remote_item(item, asset_key: str | None, source: str) -> RemoteItem:
    """The imagery asset of ``item`` and its planning metadata."""
    from shapely.geometry import box, shape

    from data_catalog.stac import (
        _extension_fields, _item_time, _pick_raster_asset, _projection_crs, _resolve_href)

    if asset_key:
        asset = item.assets.get(asset_key)
        if asset is None:
            raise CatalogError(f"{source}: item {item.id!r} has no asset {asset_key!r} "
                               f"(it has {', '.join(item.assets) or 'none'})")
    else:
        asset = _pick_raster_asset(item)
        if asset is None:
            raise CatalogError(f"{source}: item {item.id!r} has no raster asset; name one "
                               "with asset=KEY")
    href = _resolve_href(asset.href, item, Path(source) if not is_stac_search(source)
                         else Path("."))
    fields = _extension_fields(item, asset)
    crs = _projection_crs(fields)
    transform, shape_hw = fields.get("proj:transform"), fields.get("proj:shape")
    bounds = None
    if fields.get("proj:bbox"):
        b = [float(v) for v in fields["proj:bbox"]]
        bounds = (b[0], b[1], b[-2], b[-1])
    elif transform and shape_hw:
        a, _, c, _, e, f = (float(v) for v in transform[:6])
        h, w = int(shape_hw[0]), int(shape_hw[1])
        bounds = (c, f + e * h, c + a * w, f)
    res = abs(float(transform[0])) if transform else item.common_metadata.gsd
    bands = fields.get("raster:bands") or asset.extra_fields.get("eo:bands") or []
    dtypes = {b.get("data_type") for b in bands if isinstance(b, dict) and b.get("data_type")}
    start, end = _item_time(item)
    when = None
    if start is not None:
        s, e_ = (f"{d:%Y-%m-%dT%H:%M:%SZ}" for d in (start, end or start))
        when = s if s == e_ else f"{s}/{e_}"
    footprint = shape(item.geometry) if item.geometry else (box(*item.bbox) if item.bbox else None)
    if footprint is None:
        raise CatalogError(f"{source}: item {item.id!r} has neither geometry nor bbox")
    return RemoteItem(item.id, href, crs, bounds, footprint, res, when, len(bands) or None,
                      dtypes.pop() if len(dtypes) == 1 else None, asset.media_type)
