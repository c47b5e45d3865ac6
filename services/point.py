"""Height (and spread) of a layer at one lon/lat point, read from the full-resolution pixel."""

from __future__ import annotations

import math

from pyproj import Transformer
from rasterio.windows import Window
from shapely.geometry import Point

from canopy.io import outputs
from services.errors import NotFound
from services.layers import Layer, open_dataset


def _value(v, nodata) -> float | None:
    v = float(v)
    if math.isnan(v) or (nodata is not None and not math.isnan(float(nodata)) and v == float(nodata)):
        return None
    return round(v, 3)


def height_at(layer: Layer, lon: float, lat: float) -> dict:
    out = {"lon": lon, "lat": lat, "height": None, "spread": None, "units": outputs.UNITS}
    for part in layer.parts_touching(Point(lon, lat)):
        x, y = Transformer.from_crs("EPSG:4326", part.crs, always_xy=True).transform(lon, lat)
        ds = open_dataset(part.path)
        row, col = ds.index(x, y)
        if not (0 <= row < ds.height and 0 <= col < ds.width):
            continue
        px = ds.read(window=Window(col, row, 1, 1))[:, 0, 0]
        height = _value(px[0], ds.nodata)
        if height is None and len(layer.parts) > 1:
            continue  # a run: a neighbouring zone's cell may hold this point
        out["height"] = height
        if layer.has_spread:
            out["spread"] = _value(px[1], ds.nodata)
        return out
    if out["height"] is None and not _inside(layer, lon, lat):
        raise NotFound(f"({lon}, {lat}) is outside layer '{layer.id}'", field="lon")
    return out


def _inside(layer: Layer, lon: float, lat: float) -> bool:
    w, s, e, n = layer.bounds_ll
    return w <= lon <= e and s <= lat <= n
