"""Polygons from request bodies: GeoJSON Polygon, MultiPolygon, Feature or FeatureCollection in
lon/lat (RFC 7946), checked against the server's limits and repaired when invalid.

Every way a body can be wrong ends here as a :class:`~services.errors.BadRequest` (422) naming
what is wrong, or :class:`~services.errors.TooLarge` (413) for a limit, so the endpoints that
take polygons never see a geometry shapely would choke on. A self-intersecting ring is repaired
with ``shapely.make_valid`` (its polygonal part kept) and the response says ``repaired``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import shapely
from shapely.geometry import shape

from data_catalog.aoi import area_km2
from services.config import Limits
from services.errors import BadRequest, TooLarge

POLYGONAL = ("Polygon", "MultiPolygon")


@dataclass(frozen=True)
class Feature:
    geometry: object  # shapely Polygon/MultiPolygon, lon/lat, valid
    properties: dict
    repaired: bool
    area_km2: float


def _geometry(obj, where: str):
    if not isinstance(obj, dict) or obj.get("type") not in POLYGONAL:
        kind = obj.get("type") if isinstance(obj, dict) else type(obj).__name__
        raise BadRequest(f"{where}: expected a Polygon or MultiPolygon geometry, got {kind!r}",
                         field=where)
    coords = obj.get("coordinates")
    if not isinstance(coords, (list, tuple)) or not coords:
        raise BadRequest(f"{where}: coordinates are missing or empty", field=where)
    try:
        geom = shape(obj)
    except (ValueError, TypeError, AttributeError, IndexError, shapely.errors.ShapelyError) as exc:
        raise BadRequest(f"{where}: not a valid {obj['type']} ({exc})", field=where) from None
    if geom.is_empty:
        raise BadRequest(f"{where}: the geometry is empty", field=where)
    xy = shapely.get_coordinates(geom)
    if not all(math.isfinite(v) for v in xy.ravel()):
        raise BadRequest(f"{where}: coordinates must be finite numbers", field=where)
    if (abs(xy[:, 0]) > 180).any() or (abs(xy[:, 1]) > 90).any():
        raise BadRequest(f"{where}: coordinates must be longitude, latitude in degrees (EPSG:4326)",
                         field=where)
    return geom


def parse_polygons(body, limits: Limits) -> list[Feature]:
    """The polygons of a GeoJSON body, in order (a FeatureCollection's features)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a GeoJSON object (Polygon, MultiPolygon, Feature or "
                         "FeatureCollection)", field="body")
    kind = body.get("type")
    if kind == "FeatureCollection":
        items = body.get("features")
        if not isinstance(items, list) or not items:
            raise BadRequest("the FeatureCollection has no features", field="features")
        if len(items) > limits.max_features:
            raise TooLarge(f"{len(items)} features; at most {limits.max_features} per request",
                           field="features")
        raw = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or item.get("type") != "Feature":
                raise BadRequest(f"features[{i}] is not a GeoJSON Feature", field=f"features[{i}]")
            raw.append((_geometry(item.get("geometry"), f"features[{i}].geometry"),
                        item.get("properties") or {}))
    elif kind == "Feature":
        raw = [(_geometry(body.get("geometry"), "geometry"), body.get("properties") or {})]
    elif kind in POLYGONAL:
        raw = [(_geometry(body, "body"), {})]
    else:
        raise BadRequest(f"expected a GeoJSON Polygon, MultiPolygon, Feature or "
                         f"FeatureCollection, got type {kind!r}", field="type")
    vertices = sum(int(shapely.get_num_coordinates(g)) for g, _ in raw)
    if vertices > limits.max_vertices:
        raise TooLarge(f"{vertices} vertices; at most {limits.max_vertices} per request",
                       field="coordinates")
    out = []
    for geom, props in raw:
        repaired = not geom.is_valid
        if repaired:
            fixed = shapely.make_valid(geom)
            polys = [g for g in shapely.get_parts(fixed) if g.geom_type in POLYGONAL]
            geom = shapely.union_all(polys) if polys else shapely.Polygon()
            if geom.is_empty or geom.area == 0:
                raise BadRequest("the polygon has no area once its self-intersections are "
                                 "repaired", field="coordinates")
        if not isinstance(props, dict):
            props = {}
        out.append(Feature(geom, props, repaired, area_km2(geom)))
    return out
