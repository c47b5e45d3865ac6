"""Map tiles of a layer: read with rio-tiler on morecantile's WebMercatorQuad, drawn through a
colour lookup table, encoded as palette PNG or WebP, kept in a bounded cache.

Where a TiTiler tile's time goes (docs/performance.md): about a third reading and warping, over
half rescaling, colouring and PNG-encoding RGBA. Here the read is rio-tiler's (no tile math of our
own), and the rest is cheap by construction: heights become one byte per pixel (254 colour steps
and one transparent index) with one ``np.take`` into a table built once per (colormap, rescale);
a PNG is written in palette mode (a quarter of the bytes of RGBA, so zlib has a quarter of the
work) at a fast compression level. A rendered tile's bytes depend only on the layer's files and
the request, so they are cached (LRU, bounded in bytes) and marked cacheable for clients.

Which pixels: a run layer is read from its overview COG once a tile's pixels are at least half
the overview's (reading the cells instead would open one file per cell, each from its own
overviews), else from the cells the tile touches; a COG layer is read from itself (its internal
overviews serve the low zooms).
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from collections import OrderedDict
from functools import lru_cache

import numpy as np
from PIL import Image
from shapely.geometry import box

from canopy.io.qml import RAMP, RAMP_RANGE
from services.errors import BadRequest
from services.layers import WEB_MERCATOR, Layer, Part, open_dataset

TRANSPARENT = 255  # palette index of nodata; heights use 0..254
MAX_ZOOM = 24
MAX_CELLS_PER_TILE = 16
PNG_LEVEL = 1  # zlib level: 6 is ~3x slower for ~15 % fewer bytes on height tiles


# ---------------------------------------------------------------------------------- colours


def colormap_names() -> list[str]:
    import matplotlib

    return ["canopy"] + sorted(n for n in matplotlib.colormaps if not n.endswith("_r")) + \
        sorted(n for n in matplotlib.colormaps if n.endswith("_r"))


@lru_cache(maxsize=None)
def _mpl_names() -> dict[str, str]:
    import matplotlib

    return {n.lower(): n for n in matplotlib.colormaps}


def check_colormap(name: str) -> str:
    if name == "canopy" or name.lower() in _mpl_names():
        return name
    raise BadRequest(f"unknown colormap '{name}' (canopy, viridis, magma, greens, … — "
                     f"GET /colormaps lists them)", field="colormap")


def parse_rescale(text: str | None) -> tuple[float, float]:
    if text is None:
        return RAMP_RANGE
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise BadRequest(f"rescale must be 'min,max' in metres, got '{text}'", field="rescale") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise BadRequest(f"rescale needs finite min < max, got '{text}'", field="rescale")
    return lo, hi


@lru_cache(maxsize=64)
def palette(name: str) -> np.ndarray:
    """(256, 4) uint8 RGBA: 255 colour steps low → high, index 255 transparent."""
    steps = np.linspace(0.0, 1.0, TRANSPARENT)
    if name == "canopy":  # the ramp of the .qml style every output carries
        rgb = np.array([[int(c[k:k + 2], 16) for k in (1, 3, 5)] for c in RAMP], np.float64)
        knots = np.linspace(0.0, 1.0, len(RAMP))
        cols = np.stack([np.interp(steps, knots, rgb[:, k]) for k in range(3)], axis=1)
    else:
        import matplotlib

        cols = matplotlib.colormaps[_mpl_names()[name.lower()]](steps)[:, :3] * 255
    table = np.zeros((256, 4), np.uint8)
    table[:TRANSPARENT, :3] = np.rint(cols)
    table[:TRANSPARENT, 3] = 255
    return table


def legend(name: str, lo: float, hi: float, n: int = 5) -> list[tuple[float, str]]:
    table = palette(check_colormap(name))
    out = []
    for i in range(n):
        idx = round(i * (TRANSPARENT - 1) / (n - 1))
        r, g, b, _ = table[idx]
        out.append((lo + (hi - lo) * i / (n - 1), f"#{r:02x}{g:02x}{b:02x}"))
    return out


def to_index(height: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint8 palette indices of heights (NaN → transparent), clipped to [lo, hi]."""
    scaled = (height - lo) * ((TRANSPARENT - 1) / (hi - lo)) + 0.5
    with np.errstate(invalid="ignore"):
        idx = np.clip(scaled, 0, TRANSPARENT - 1)
    idx = np.nan_to_num(idx, nan=TRANSPARENT).astype(np.uint8)
    return idx


def encode(idx: np.ndarray, colormap: str, fmt: str) -> bytes:
    table = palette(colormap)
    buf = io.BytesIO()
    if fmt == "png":
        img = Image.frombuffer("P", (idx.shape[1], idx.shape[0]), np.ascontiguousarray(idx), "raw", "P", 0, 1)
        img.putpalette(table[:, :3].tobytes(), rawmode="RGB")
        img.save(buf, format="PNG", compress_level=PNG_LEVEL, transparency=TRANSPARENT)
    else:
        rgba = np.take(table, idx, axis=0)
        Image.fromarray(rgba, "RGBA").save(buf, format="WEBP", quality=85, method=0)
    return buf.getvalue()


@lru_cache(maxsize=8)
def empty_tile(size: int, fmt: str) -> bytes:
    return encode(np.full((size, size), TRANSPARENT, np.uint8), "canopy", fmt)


# ---------------------------------------------------------------------------------- reading

_local = threading.local()


def _reader(part: Part):
    from rio_tiler.io import Reader

    cache = getattr(_local, "readers", None)
    if cache is None:
        cache = _local.readers = {}
    key = str(part.path)
    ds = open_dataset(part.path)
    r = cache.get(key)
    if r is None or r.dataset is not ds:
        r = cache[key] = Reader(key, dataset=ds, tms=WEB_MERCATOR)
    return r


def check_tile(z: int, x: int, y: int) -> None:
    if not 0 <= z <= MAX_ZOOM:
        raise BadRequest(f"zoom {z} is outside 0–{MAX_ZOOM}", field="z")
    n = 1 << z
    if not (0 <= x < n and 0 <= y < n):
        raise BadRequest(f"tile {z}/{x}/{y} does not exist: x and y run 0–{n - 1} at zoom {z}",
                         field="x" if not 0 <= x < n else "y")


def tile_sources(layer: Layer, z: int, x: int, y: int, scale: int = 1) -> list[Part]:
    """The COGs a tile of ``256·scale`` px is read from (empty: the tile is outside the layer)."""
    west, south, east, north = WEB_MERCATOR.bounds(x, y, z)
    tile_ll = box(west, south, east, north)
    if not tile_ll.intersects(box(*layer.bounds_ll)):
        return []
    if layer.overview is not None:
        lat = math.radians(max(-85.0, min(85.0, (south + north) / 2)))
        ground = WEB_MERCATOR.matrix(z).cellSize * math.cos(lat) / scale  # metres per tile pixel
        if ground >= layer.overview_res / 2:
            return [layer.overview]
        parts = layer.parts_touching(tile_ll)
        return parts if len(parts) <= MAX_CELLS_PER_TILE else [layer.overview]
    return layer.parts_touching(tile_ll)


def read_tile(layer: Layer, z: int, x: int, y: int, size: int) -> np.ndarray | None:
    """Heights (float32, NaN = no data) of tile z/x/y at ``size`` px, or None outside the layer."""
    from rio_tiler.errors import TileOutsideBounds

    out = None
    for part in tile_sources(layer, z, x, y, max(1, size // 256)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NoOverviewWarning on small cells
                img = _reader(part).tile(x, y, z, tilesize=size, indexes=1)
        except TileOutsideBounds:
            continue
        band = img.array[0]
        data = np.where(np.ma.getmaskarray(band), np.nan, np.ma.getdata(band)).astype(np.float32)
        if out is None:
            out = data
        else:
            hole = np.isnan(out)
            out[hole] = data[hole]
        if not np.isnan(out).any():
            break
    return out


# ---------------------------------------------------------------------------------- cache


class TileCache:
    """Rendered tiles by request key, least recently used dropped beyond ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= len(old)
            self._items[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)


def render(layer: Layer, z: int, x: int, y: int, *, scale: int, fmt: str, colormap: str,
           rescale: tuple[float, float], cache: TileCache | None) -> bytes:
    size = 256 * scale
    key = (layer.id, layer.stamp, z, x, y, size, fmt, colormap, rescale)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit
    heights = read_tile(layer, z, x, y, size)
    data = empty_tile(size, fmt) if heights is None else encode(to_index(heights, *rescale), colormap, fmt)
    if cache is not None:
        cache.put(key, data)
    return data
