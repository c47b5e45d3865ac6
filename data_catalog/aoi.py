"""Areas of interest: one function turns whatever a user typed after ``--aoi`` into a polygon.

``resolve_aoi(spec)`` accepts, tried in this order:

1. an :class:`AOI` or a shapely geometry (lon/lat) — passed through, validated;
2. a path to a vector file GDAL reads (GeoJSON, TopoJSON, GeoPackage, Shapefile, …): any CRS is
   reprojected to EPSG:4326; a file without a CRS is read as lon/lat if its coordinates fit
   (TopoJSON carries none), else ``crs=`` is required; all features of the layer are unioned;
   a file with several layers uses ``layer=`` or, by default, its first layer (with a warning);
3. a bbox string ``"minx,miny,maxx,maxy"`` in lon/lat degrees;
4. a WKT string (``POLYGON ((...))``, ``MULTIPOLYGON``, …) or a GeoJSON geometry string, lon/lat;
5. a place name from the bundled boundaries (``boundaries/README.md``): every US state, DC and
   territory by name or USPS code, every Brazilian state by name or sigla. Matching ignores case,
   accents, hyphens and underscores ("são paulo" = "Sao-Paulo" = "SP").

Ambiguous two-letter codes. Seven codes name a state in both countries (AL, MA, MS, MT, PA, PR,
SC). A bare code resolves to the **US** state — the project's primary target — with a warning
naming the Brazilian one. ``US-XX`` and ``BR-XX`` (ISO 3166-2 style) always select one country.

Invalid geometries are repaired with ``shapely.make_valid`` (keeping only polygonal parts), a
:class:`AOIRepairWarning` is issued and ``AOI.repaired`` is True. An empty or non-polygonal
result is a :class:`CatalogError`; so is an unknown place name, whose message lists close matches.

Areas (:func:`area_km2`) are computed in EPSG:6933, the global cylindrical equal-area grid: exact
for areas up to the ellipsoid's authalic approximation, and a lon/lat bbox maps to an exact
rectangle there, so no densification is needed.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import shapely
from pyproj import CRS, Transformer
from shapely.geometry.base import BaseGeometry

from data_catalog.errors import CatalogError

BOUNDARIES_DIR = Path(__file__).with_name("boundaries")
US_STATES_FILE = BOUNDARIES_DIR / "us_states_10m.json"
BRAZIL_STATES_FILE = BOUNDARIES_DIR / "brazil_states.geojson"
EQUAL_AREA_CRS = "EPSG:6933"
VECTOR_SUFFIXES = {".geojson", ".json", ".topojson", ".gpkg", ".shp", ".fgb", ".gml", ".kml", ".zip", ".parquet"}

# FIPS state code (the us-atlas ``id``) -> USPS postal code.
FIPS_TO_USPS = {
    "01": "AL", "02": "AK", "04": "AZ", "05": "AR", "06": "CA", "08": "CO", "09": "CT", "10": "DE",
    "11": "DC", "12": "FL", "13": "GA", "15": "HI", "16": "ID", "17": "IL", "18": "IN", "19": "IA",
    "20": "KS", "21": "KY", "22": "LA", "23": "ME", "24": "MD", "25": "MA", "26": "MI", "27": "MN",
    "28": "MS", "29": "MO", "30": "MT", "31": "NE", "32": "NV", "33": "NH", "34": "NJ", "35": "NM",
    "36": "NY", "37": "NC", "38": "ND", "39": "OH", "40": "OK", "41": "OR", "42": "PA", "44": "RI",
    "45": "SC", "46": "SD", "47": "TN", "48": "TX", "49": "UT", "50": "VT", "51": "VA", "53": "WA",
    "54": "WV", "55": "WI", "56": "WY", "60": "AS", "66": "GU", "69": "MP", "72": "PR", "78": "VI",
}  # fmt: skip


class AOIRepairWarning(UserWarning):
    """An AOI geometry was invalid and has been repaired with make_valid."""


@dataclass(frozen=True)
class AOI:
    """A resolved area of interest: a valid polygonal geometry in EPSG:4326."""

    name: str
    geometry: BaseGeometry
    repaired: bool = False
    source: str = ""  # 'place:US-CA', 'file:/path/x.gpkg', 'bbox', 'wkt', 'geojson', 'geometry'

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return tuple(float(v) for v in self.geometry.bounds)

    def area_km2(self) -> float:
        return area_km2(self.geometry)

    def geometry_in(self, crs) -> BaseGeometry:
        """The geometry reprojected to ``crs`` (anything pyproj accepts)."""
        return reproject_geometry(self.geometry, "EPSG:4326", crs)


# ------------------------------------------------------------------------------------ geometry


def reproject_geometry(geometry: BaseGeometry, src_crs, dst_crs) -> BaseGeometry:
    src, dst = CRS.from_user_input(src_crs), CRS.from_user_input(dst_crs)
    if src == dst:
        return geometry
    transformer = Transformer.from_crs(src, dst, always_xy=True)
    return shapely.transform(geometry, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))


def area_km2(geometry: BaseGeometry, crs="EPSG:4326") -> float:
    """Area in km² of a geometry given in ``crs``, measured in the equal-area EPSG:6933."""
    return float(reproject_geometry(geometry, crs, EQUAL_AREA_CRS).area / 1e6)


def _polygonal_part(geometry: BaseGeometry) -> BaseGeometry:
    """The polygons of a (possibly mixed) geometry, as one Polygon/MultiPolygon; may be empty."""
    if geometry.geom_type in ("Polygon", "MultiPolygon"):
        return geometry
    polygons = [g for g in shapely.get_parts(geometry) if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(polygons) if polygons else shapely.Polygon()


def clean_geometries(geometries, name: str) -> tuple[BaseGeometry, bool]:
    """Repair invalid geometries, union them, keep polygons. Returns (geometry, repaired)."""
    geoms = np.asarray([g for g in geometries if g is not None], dtype=object)
    if geoms.size == 0 or all(g.is_empty for g in geoms):
        raise CatalogError(f"AOI '{name}': the geometry is empty")
    invalid = ~shapely.is_valid(geoms)
    if invalid.any():
        reason = shapely.is_valid_reason(geoms[invalid][0])
        warnings.warn(
            f"AOI '{name}': repaired {int(invalid.sum())} invalid geometr{'y' if invalid.sum() == 1 else 'ies'} "
            f"with make_valid ({reason})",
            AOIRepairWarning,
            stacklevel=4,  # clean_geometries <- _aoi_from_geometries <- resolve_aoi <- caller
        )
        geoms = shapely.make_valid(geoms)
    merged = _polygonal_part(shapely.union_all(geoms) if len(geoms) > 1 else geoms[0])
    if merged.is_empty:
        kinds = sorted({g.geom_type for g in geoms})
        raise CatalogError(f"AOI '{name}': no polygon area (got {', '.join(kinds)})")
    return merged, bool(invalid.any())


def _check_lonlat(geometry: BaseGeometry, name: str) -> None:
    minx, miny, maxx, maxy = geometry.bounds
    if minx < -180.0001 or maxx > 180.0001 or miny < -90.0001 or maxy > 90.0001:
        raise CatalogError(
            f"AOI '{name}': coordinates {tuple(round(v, 3) for v in geometry.bounds)} are not lon/lat degrees "
            "(a file with a missing or wrong CRS needs crs=)"
        )


# ------------------------------------------------------------------------------------ places


def normalize_place(text: str) -> str:
    """Case-, accent- and punctuation-insensitive key: 'São-Paulo' -> 'sao paulo'."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(re.sub(r"[-_.,/]+", " ", stripped.casefold()).split())


@dataclass(frozen=True)
class Place:
    country: str  # 'US' or 'BR'
    code: str  # USPS or sigla
    name: str
    geometry: BaseGeometry  # as bundled (may be invalid)


@functools.lru_cache(maxsize=1)
def bundled_places() -> tuple[Place, ...]:
    """Every bundled state, US first. Read once per process (~0.1 s)."""
    for path in (US_STATES_FILE, BRAZIL_STATES_FILE):
        if not path.is_file():  # a broken install: say which file, not a GDAL traceback
            raise CatalogError(f"the bundled state boundaries '{path}' are missing; reinstall "
                               "canopy-height, or pass the AOI as a vector file or a bbox")
    us = gpd.read_file(US_STATES_FILE, layer="states")
    brazil = gpd.read_file(BRAZIL_STATES_FILE)
    places = [
        Place("US", FIPS_TO_USPS.get(str(fips).zfill(2), ""), name, geom)
        for fips, name, geom in zip(us["id"], us["name"], us.geometry)
    ]
    places += [Place("BR", sigla, estado, geom) for sigla, estado, geom in zip(brazil["SIGLA"], brazil["Estado"], brazil.geometry)]
    return tuple(places)


def _place_keys() -> tuple[dict[str, list[Place]], dict[str, Place]]:
    """(bare key -> places, qualified 'us ca'/'br sp' key -> place)."""
    bare: dict[str, list[Place]] = {}
    qualified: dict[str, Place] = {}
    for place in bundled_places():
        keys = {normalize_place(place.name)} | ({normalize_place(place.code)} if place.code else set())
        for key in keys:
            bare.setdefault(key, []).append(place)
            qualified[f"{place.country.lower()} {key}"] = place
    return bare, qualified


def find_place(text: str) -> Place:
    """The bundled state named ``text`` (rules in the module docstring)."""
    key = normalize_place(text)
    bare, qualified = _place_keys()
    if key in qualified:
        return qualified[key]
    matches = bare.get(key, [])
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        us = next(p for p in matches if p.country == "US")
        others = " or ".join(f"{p.country}-{p.code} for {p.name}" for p in matches if p is not us)
        warnings.warn(
            f"AOI '{text}' is ambiguous: using US-{us.code} ({us.name}); write {others}",
            UserWarning,
            stacklevel=3,
        )
        return us
    labels = sorted({p.name for p in bundled_places()} | {f"{p.country}-{p.code}" for p in bundled_places() if p.code})
    by_key = {normalize_place(label): label for label in labels}
    close = [by_key[k] for k in difflib.get_close_matches(key, list(by_key), n=4, cutoff=0.6)]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise CatalogError(
        f"AOI '{text}': not a file, bbox, WKT or known place (US/Brazil state name or code){hint}"
    )


# ------------------------------------------------------------------------------------ parsing

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BBOX_RE = re.compile(rf"^\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*$")
_WKT_RE = re.compile(r"^\s*(MULTI)?(POLYGON|POINT|LINESTRING)|^\s*GEOMETRYCOLLECTION", re.IGNORECASE)


def _bbox_geometry(text: str) -> BaseGeometry:
    minx, miny, maxx, maxy = (float(v) for v in _BBOX_RE.match(text).groups())
    if not (-180 <= minx < maxx <= 180 and -90 <= miny < maxy <= 90):
        raise CatalogError(f"AOI bbox '{text}': need minx<maxx in [-180,180] and miny<maxy in [-90,90] (lon/lat)")
    return shapely.box(minx, miny, maxx, maxy)


def _read_vector_file(path: Path, layer: str | int | None, crs) -> tuple[list[BaseGeometry], CRS]:
    """All geometries of one layer and their CRS."""
    try:
        layers = pyogrio.list_layers(path)
    except Exception as exc:
        raise CatalogError(f"{path}: not a vector file GDAL can read ({str(exc).splitlines()[0]})") from None
    if layer is None and len(layers) > 1:
        layer = str(layers[0][0])
        others = ", ".join(str(n) for n in layers[1:, 0])
        warnings.warn(f"{path}: has layers {layer}, {others}; using '{layer}' (pass layer= to choose)", stacklevel=4)
    try:
        frame = gpd.read_file(path, layer=layer)
    except Exception as exc:
        raise CatalogError(f"{path}: cannot read layer {layer!r} ({str(exc).splitlines()[0]})") from None
    if len(frame) == 0:
        raise CatalogError(f"{path}: the layer has no features")
    if crs is not None:
        return list(frame.geometry.values), CRS.from_user_input(crs)
    if frame.crs is None:
        minx, miny, maxx, maxy = frame.total_bounds
        if not (-180.0001 <= minx and maxx <= 180.0001 and -90.0001 <= miny and maxy <= 90.0001):
            raise CatalogError(f"{path}: has no CRS and its coordinates are not lon/lat; pass crs=")
        return list(frame.geometry.values), CRS.from_epsg(4326)  # TopoJSON carries none: lon/lat
    return list(frame.geometry.values), CRS.from_user_input(frame.crs)


def _aoi_from_geometries(geoms, name: str, source: str, crs=None) -> AOI:
    # Repair and union in the source CRS (that is where the rings are invalid), then reproject.
    geometry, repaired = clean_geometries(geoms, name)
    if crs is not None and CRS.from_user_input(crs) != CRS.from_epsg(4326):
        geometry = reproject_geometry(geometry, crs, "EPSG:4326")
        if not geometry.is_valid:  # reprojection can fold a ring that was valid before
            geometry, _ = clean_geometries([geometry], name)
            repaired = True
    _check_lonlat(geometry, name)
    return AOI(name=name, geometry=geometry, repaired=repaired, source=source)


def resolve_aoi(spec, *, layer: str | int | None = None, crs=None, files: bool = True) -> AOI:
    """Turn a file path, bbox string, WKT/GeoJSON string, place name or geometry into an AOI.

    ``layer`` picks the layer of a multi-layer file; ``crs`` supplies the CRS of a file that has
    none (or overrides a wrong one). ``files=False`` (a server resolving what a client typed)
    never touches the filesystem: a text that could be a path is refused. See the module
    docstring for the rules.
    """
    if isinstance(spec, AOI):
        return spec
    if isinstance(spec, BaseGeometry):
        return _aoi_from_geometries([spec], "geometry", "geometry")
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise CatalogError(f"AOI {spec!r}: expected a file path, bbox, WKT or place name")
    text = spec.strip()
    if not files and (any(c in text for c in "/\\~") or text.startswith(".")
                      or Path(text).suffix.lower() in VECTOR_SUFFIXES):
        raise CatalogError(f"AOI '{text[:60]}': files cannot be named here; give GeoJSON, a bbox, "
                           "WKT or a place name")
    path = Path(text).expanduser()
    if files and path.is_file():
        geoms, file_crs = _read_vector_file(path, layer, crs)
        return _aoi_from_geometries(geoms, path.stem, f"file:{path}", crs=file_crs)
    if path.suffix.lower() in VECTOR_SUFFIXES:  # no place name ends in .gpkg: a mistyped path
        raise CatalogError(f"AOI file '{text}': no such file")
    if _BBOX_RE.match(text):
        return _aoi_from_geometries([_bbox_geometry(text)], f"bbox({text})", "bbox")
    if _WKT_RE.match(text):
        try:
            geometry = shapely.from_wkt(text)
        except Exception as exc:
            raise CatalogError(f"AOI WKT: cannot parse ({str(exc).splitlines()[0]})") from None
        return _aoi_from_geometries([geometry], "wkt", "wkt")
    if text.startswith("{"):
        try:
            geometry = shapely.from_geojson(text)
        except Exception as exc:
            raise CatalogError(f"AOI GeoJSON: cannot parse ({str(exc).splitlines()[0]})") from None
        return _aoi_from_geometries([geometry], "geojson", "geojson")
    place = find_place(text)
    return _aoi_from_geometries([place.geometry], place.name, f"place:{place.country}-{place.code}")
