"""GEDI L2A shots: read granules with h5py, filter them for canopy-height work, store as GeoParquet.

Layout of an L2A granule (docs/geo_conventions.md): groups ``BEAM0000`` … ``BEAM1011``, each
with a ``description`` attribute ("Coverage beam" / "Full power beam") and 1-D datasets of one value
per shot, plus ``rh`` of shape (n, 101) — relative heights RH0…RH100 in metres. Releases differ in
details (V001 subsets may miss beams; V002 adds land-cover fields and stores ``rh`` as float32), so
only ``shot_number``, ``lat_lowestmode``, ``lon_lowestmode`` and ``rh`` are required. Every other
column is always present with a fixed dtype and is null (NaN or <NA>) when the granule lacks it; a
filter whose column is null for every shot is skipped and the report says so.

On-disk layout written by :func:`ingest_gedi` (one file per granule × 1°×1° cell)::

    out_dir/lat_cell=-14/lon_cell=-45/GEDI02_A_2019108080338_O01964_T05337_02_001_01_sub.parquet

``lat_cell``/``lon_cell`` are the floor of the shots' latitude/longitude (the cell's south-west
corner). Inside a file rows are sorted by a Hilbert key over the cell and written in row groups of
:data:`ROW_GROUP_SIZE` with a GeoParquet 1.1 ``bbox`` covering column, so a bbox query opens only the
cells it touches and, inside them, only the row groups whose extent intersects it.

Footprints: a shot is compared with a height raster by one measurement, :func:`footprint_percentiles`
(the rule is stated there), used by the synthetic shots, the GEDI correction's samples, ``canopy
evaluate`` and — through :func:`footprint_members`, turned into tensors — the training loss. It
holds because none of them selects footprint pixels or counts partial footprints itself.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

import geopandas as gpd
import h5py
import numpy as np
import pandas as pd

from data_catalog.errors import CatalogError

GEDI_EPOCH = pd.Timestamp("2018-01-01T00:00:00", tz="UTC")  # delta_time counts seconds from here
RH_PERCENTILES = (50, 75, 90, 95, 98, 100)
ROW_GROUP_SIZE = 8192
COVERAGE_BEAMS = frozenset({"BEAM0000", "BEAM0001", "BEAM0010", "BEAM0011"})

_REQUIRED = ("shot_number", "lat_lowestmode", "lon_lowestmode", "rh")
# Optional per-shot datasets: column name -> (path inside the beam group, output dtype).
_FLAGS = {
    "quality_flag": ("quality_flag", "UInt8"),
    "degrade_flag": ("degrade_flag", "UInt8"),
    "surface_flag": ("surface_flag", "UInt8"),
    "selected_algorithm": ("selected_algorithm", "UInt8"),
    "num_detectedmodes": ("num_detectedmodes", "UInt8"),
}
_FLOATS = {
    "sensitivity": ("sensitivity", "float32"),
    "elev_lowestmode": ("elev_lowestmode", "float32"),
    "elev_highestreturn": ("elev_highestreturn", "float32"),
    "digital_elevation_model": ("digital_elevation_model", "float32"),
    "solar_elevation": ("solar_elevation", "float32"),
    "delta_time": ("delta_time", "float64"),
    "landsat_treecover": ("land_cover_data/landsat_treecover", "float32"),
    "landsat_water_persistence": ("land_cover_data/landsat_water_persistence", "float32"),
    "urban_proportion": ("land_cover_data/urban_proportion", "float32"),
    "pft_class": ("land_cover_data/pft_class", "float32"),
}


# ------------------------------------------------------------------------------------------ read


def _attr_text(value) -> str:
    """HDF5 string attributes arrive as bytes, str, or 1-element object arrays."""
    if isinstance(value, np.ndarray):
        value = value.ravel()[0] if value.size else ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value)


def _product_name(h5: h5py.File) -> str | None:
    if "short_name" in h5.attrs:
        return _attr_text(h5.attrs["short_name"])
    ident = h5.get("METADATA/DatasetIdentification")
    if ident is not None and "shortName" in ident.attrs:
        return _attr_text(ident.attrs["shortName"])
    return None


def _beam_groups(h5: h5py.File) -> list[str]:
    return sorted(k for k in h5.keys() if k.startswith("BEAM") and isinstance(h5[k], h5py.Group))


def _beams_with_shots(h5: h5py.File, path) -> list[str]:
    """The BEAM groups holding shots; refuses files that are not L2A or beams missing a core field."""
    product = _product_name(h5)
    if product is not None and product != "GEDI_L2A":
        raise CatalogError(f"{path}: not a GEDI L2A granule (product {product})")
    beams = [name for name in _beam_groups(h5) if "shot_number" in h5[name]]  # subsets may hold empty beams
    if not beams and product is None:
        raise CatalogError(f"{path}: not a GEDI L2A granule (no BEAMxxxx groups with shots)")
    for name in beams:
        missing = [field for field in _REQUIRED if field not in h5[name]]
        if missing:
            raise CatalogError(f"{path}: not a GEDI L2A granule ({name} lacks {', '.join(missing)})")
    return beams


def beam_type(name: str, description: str | None = None) -> str:
    """'power' or 'coverage', from the group's description, else from the beam number."""
    text = (description or "").lower()
    if "power" in text:
        return "power"
    if "coverage" in text:
        return "coverage"
    return "coverage" if name in COVERAGE_BEAMS else "power"


def _null_column(n: int, dtype: str):
    return pd.array([pd.NA] * n, dtype="UInt8") if dtype == "UInt8" else np.full(n, np.nan, dtype=dtype)


def _optional(group: h5py.Group, inner: str, n: int, dtype: str):
    """The dataset as ``dtype``, or a null column when this release/subset lacks it."""
    if inner in group:
        values = group[inner][()]
        if values.shape[:1] == (n,):
            return pd.array(values, dtype=dtype) if dtype == "UInt8" else values.astype(dtype)
    return _null_column(n, dtype)


def _read_beam(group: h5py.Group, name: str) -> pd.DataFrame:
    shot_number = group["shot_number"][()].astype(np.uint64)
    n = shot_number.shape[0]
    rh = np.asarray(group["rh"][()], dtype=np.float32)
    if rh.shape != (n, 101):
        raise ValueError(f"{name}/rh has shape {rh.shape}, expected ({n}, 101)")
    description = _attr_text(group.attrs["description"]) if "description" in group.attrs else None
    columns: dict[str, object] = {
        "shot_number": shot_number,
        "beam": np.full(n, name, dtype=object),
        "beam_type": np.full(n, beam_type(name, description), dtype=object),
        "lat_lowestmode": group["lat_lowestmode"][()].astype(np.float64),
        "lon_lowestmode": group["lon_lowestmode"][()].astype(np.float64),
    }
    for column, (inner, dtype) in {**_FLAGS, **_FLOATS}.items():
        columns[column] = _optional(group, inner, n, dtype)
    for p in RH_PERCENTILES:
        columns[f"rh{p}"] = rh[:, p]
    columns["rh"] = list(rh)  # the full profile, one float32 array per shot
    return pd.DataFrame(columns)


def read_gedi_l2a(path: str | os.PathLike) -> gpd.GeoDataFrame:
    """All shots of all beams of one L2A granule, as points (EPSG:4326) at the lowest mode.

    Columns: shot_number (uint64), beam, beam_type ('power'|'coverage'), lat_lowestmode,
    lon_lowestmode, quality_flag, degrade_flag, surface_flag, selected_algorithm,
    num_detectedmodes (UInt8), sensitivity, elev_lowestmode, elev_highestreturn,
    digital_elevation_model, solar_elevation, delta_time, landsat_treecover,
    landsat_water_persistence, urban_proportion, pft_class, rh50 … rh100 (float32 metres),
    rh (the 101-value profile), acquisition_time (UTC), granule, geometry.
    Shots without a valid position (NaN or the fill values outside ±90/±180) are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"{path}: no such file")
    try:
        h5 = h5py.File(path, "r")
    except OSError:
        raise CatalogError(f"{path}: not an HDF5 file, so not a GEDI L2A granule") from None
    with h5:
        frames = []
        for name in _beams_with_shots(h5, path):
            try:
                frames.append(_read_beam(h5[name], name))
            except (KeyError, ValueError) as exc:
                raise CatalogError(f"{path}: malformed GEDI L2A beam ({exc})") from None
    frame = pd.concat(frames, ignore_index=True) if frames else _read_empty()
    valid = frame["lat_lowestmode"].between(-90, 90) & frame["lon_lowestmode"].between(-180, 180)
    frame = frame.loc[valid].reset_index(drop=True)
    frame["acquisition_time"] = GEDI_EPOCH + pd.to_timedelta(frame["delta_time"], unit="s")
    frame["granule"] = path.stem
    geometry = gpd.points_from_xy(frame["lon_lowestmode"], frame["lat_lowestmode"], crs="EPSG:4326")
    return gpd.GeoDataFrame(frame, geometry=geometry, crs="EPSG:4326")


def _read_empty() -> pd.DataFrame:
    """The schema of :func:`read_gedi_l2a` with no rows (a granule whose beams are all empty)."""
    frame = pd.DataFrame(
        {
            "shot_number": np.zeros(0, np.uint64),
            "beam": np.zeros(0, object),
            "beam_type": np.zeros(0, object),
            "lat_lowestmode": np.zeros(0),
            "lon_lowestmode": np.zeros(0),
        }
    )
    for column, (_, dtype) in {**_FLAGS, **_FLOATS}.items():
        frame[column] = _null_column(0, dtype)
    for p in RH_PERCENTILES:
        frame[f"rh{p}"] = np.zeros(0, np.float32)
    frame["rh"] = pd.Series([], dtype=object)
    return frame


# ---------------------------------------------------------------------------------------- filter


@dataclass(frozen=True)
class GediFilters:
    """Shot filters for canopy-height work; each is switched off with False/None.

    Defaults follow common practice (gediDB; docs/geo_conventions.md):

    * ``quality_flag``: keep ``quality_flag == 1``.
    * ``degrade_flag``: keep ``degrade_flag == 0`` (no degraded pointing/positioning).
    * ``surface_flag``: keep ``surface_flag == 1`` (elev_lowestmode within 300 m of the DEM / MSS).
    * ``min_sensitivity``: keep ``min_sensitivity <= sensitivity <= 1``. 0.9 is the usual floor;
      0.95 is stricter (:meth:`strict`), 0.98 is recommended under dense tropical canopy
      (:meth:`tropics`). Coverage beams fail high thresholds far more often than power beams.
    * ``max_elev_dem_diff_m``: keep ``|elev_lowestmode − digital_elevation_model| < 150`` m.
    * ``power_beams_only``: keep only full-power beams (off by default).
    * ``night_only``: keep ``solar_elevation < 0`` (off by default; night shots have less noise).
    """

    quality_flag: bool = True
    degrade_flag: bool = True
    surface_flag: bool = True
    min_sensitivity: float | None = 0.9
    max_elev_dem_diff_m: float | None = 150.0
    power_beams_only: bool = False
    night_only: bool = False

    @classmethod
    def strict(cls, **overrides) -> "GediFilters":
        return cls(**{"min_sensitivity": 0.95, **overrides})

    @classmethod
    def tropics(cls, **overrides) -> "GediFilters":
        return cls(**{"min_sensitivity": 0.98, **overrides})

    @classmethod
    def none(cls) -> "GediFilters":
        return cls(False, False, False, None, None, False, False)


@dataclass
class FilterReport:
    """How many shots each filter removed, in the order the filters ran."""

    n_input: int
    removed: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # filter -> why it could not run
    n_remaining: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def __add__(self, other: "FilterReport") -> "FilterReport":
        removed = dict(self.removed)
        for name, count in other.removed.items():
            removed[name] = removed.get(name, 0) + count
        return FilterReport(
            self.n_input + other.n_input, removed, {**self.skipped, **other.skipped}, self.n_remaining + other.n_remaining
        )


def _filter_steps(gdf: pd.DataFrame, f: GediFilters) -> list[tuple[str, str, pd.Series]]:
    """(name, column it needs, keep-mask) per active filter. A null value never passes."""
    steps = []
    if f.quality_flag:
        steps.append(("quality_flag == 1", "quality_flag", gdf["quality_flag"] == 1))
    if f.degrade_flag:
        steps.append(("degrade_flag == 0", "degrade_flag", gdf["degrade_flag"] == 0))
    if f.surface_flag:
        steps.append(("surface_flag == 1", "surface_flag", gdf["surface_flag"] == 1))
    if f.min_sensitivity is not None:
        s = gdf["sensitivity"]
        steps.append((f"{f.min_sensitivity} <= sensitivity <= 1", "sensitivity", (s >= f.min_sensitivity) & (s <= 1.0)))
    if f.max_elev_dem_diff_m is not None:
        diff = (gdf["elev_lowestmode"] - gdf["digital_elevation_model"]).abs()
        steps.append((f"|elev_lowestmode - dem| < {f.max_elev_dem_diff_m:g} m", "digital_elevation_model", diff < f.max_elev_dem_diff_m))
    if f.power_beams_only:
        steps.append(("power beams only", "beam_type", gdf["beam_type"] == "power"))
    if f.night_only:
        steps.append(("night only (solar_elevation < 0)", "solar_elevation", gdf["solar_elevation"] < 0))
    return steps


def filter_shots(gdf: gpd.GeoDataFrame, filters: GediFilters = GediFilters()) -> tuple[gpd.GeoDataFrame, FilterReport]:
    """Apply ``filters`` one after another; the report counts what each removed from what was left.

    A filter whose column is null for every shot (the granule lacks that dataset) is skipped and
    named in ``report.skipped`` rather than silently removing every shot.
    """
    report = FilterReport(n_input=len(gdf))
    keep = np.ones(len(gdf), dtype=bool)
    for name, column, mask in _filter_steps(gdf, filters):
        if len(gdf) and gdf[column].isna().all():
            report.skipped[name] = f"{column} absent from the granule"
            continue
        passed = np.asarray(pd.array(mask, dtype="boolean").fillna(False), dtype=bool)
        report.removed[name] = int((keep & ~passed).sum())
        keep &= passed
    report.n_remaining = int(keep.sum())
    return gdf.loc[keep].reset_index(drop=True), report


# ---------------------------------------------------------------------------------------- ingest


def _cell_dir(out_dir: Path, lat_cell: int, lon_cell: int) -> Path:
    return out_dir / f"lat_cell={lat_cell}" / f"lon_cell={lon_cell}"


_CELL_RE = re.compile(r"lat_cell=(-?\d+)[/\\]lon_cell=(-?\d+)")


def _parse_cell(path: Path) -> tuple[int, int] | None:
    match = _CELL_RE.search(path.as_posix())
    return (int(match.group(1)), int(match.group(2))) if match else None


def _write_parquet_atomically(gdf: gpd.GeoDataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        gdf.to_parquet(tmp, index=False, write_covering_bbox=True, row_group_size=ROW_GROUP_SIZE)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _sorted_by_hilbert(cell: gpd.GeoDataFrame, lat_cell: int, lon_cell: int) -> gpd.GeoDataFrame:
    # A fixed extent (the cell) keeps keys comparable between granules of the same cell.
    key = cell.geometry.hilbert_distance(total_bounds=(lon_cell, lat_cell, lon_cell + 1, lat_cell + 1), level=16)
    return cell.iloc[np.argsort(key.to_numpy(), kind="stable")].reset_index(drop=True)


def _to_datetime(value, rounding: str) -> datetime:
    # Python datetimes stop at microseconds; round outwards so [start, end] still holds every shot.
    stamp = pd.Timestamp(value)
    return (stamp.floor("us") if rounding == "floor" else stamp.ceil("us")).to_pydatetime()


def ingest_gedi(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    filters: GediFilters = GediFilters(),
) -> list[dict]:
    """Read, filter and write granules as GeoParquet partitions (layout in the module docstring).

    Returns one dict per written partition: ``path``, ``bbox`` (minx, miny, maxx, maxy of its shots
    in EPSG:4326), ``n_shots``, ``datetime_start``/``datetime_end`` (UTC datetimes),
    ``filter_report`` (the granule's :class:`FilterReport` as a dict; the same for every partition
    of one granule), ``granule`` and ``cell`` (lat_cell, lon_cell). Re-ingesting a granule replaces
    its partitions, including ones it no longer has shots for, so the call is idempotent.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out_dir = Path(out_dir)
    written: list[dict] = []
    for path in paths:
        shots, report = filter_shots(read_gedi_l2a(path), filters)
        granule = Path(path).stem
        stale = {p for p in out_dir.glob(f"lat_cell=*/lon_cell=*/{granule}.parquet")}
        lat_cell = np.floor(shots["lat_lowestmode"].to_numpy()).astype(int)
        lon_cell = np.floor(shots["lon_lowestmode"].to_numpy()).astype(int)
        for (la, lo), index in shots.groupby([lat_cell, lon_cell]).groups.items():
            cell = _sorted_by_hilbert(shots.loc[index], int(la), int(lo))
            target = _cell_dir(out_dir, int(la), int(lo)) / f"{granule}.parquet"
            _write_parquet_atomically(cell, target)
            stale.discard(target)
            times = cell["acquisition_time"]
            written.append(
                {
                    "path": str(target),
                    "bbox": tuple(float(v) for v in cell.total_bounds),
                    "n_shots": len(cell),
                    "datetime_start": _to_datetime(times.min(), "floor"),
                    "datetime_end": _to_datetime(times.max(), "ceil"),
                    "filter_report": report.to_dict(),
                    "granule": granule,
                    "cell": (int(la), int(lo)),
                }
            )
        for old in stale:
            old.unlink()
    return written


# ----------------------------------------------------------------------------------------- query


def _bbox_parts(bbox: Sequence[float]) -> list[tuple[float, float, float, float]]:
    minx, miny, maxx, maxy = (float(v) for v in bbox)
    if miny > maxy:
        raise CatalogError(f"bbox={tuple(bbox)}: miny > maxy")
    if minx > maxx:  # crosses the antimeridian
        return [(minx, miny, 180.0, maxy), (-180.0, miny, maxx, maxy)]
    return [(minx, miny, maxx, maxy)]


def _cell_touches(cell: tuple[int, int], part: tuple[float, float, float, float]) -> bool:
    la, lo = cell
    minx, miny, maxx, maxy = part
    return lo <= maxx and lo + 1 >= minx and la <= maxy and la + 1 >= miny


def shots_in_bbox(
    dir_or_paths: str | os.PathLike | Iterable[str | os.PathLike], bbox: Sequence[float]
) -> gpd.GeoDataFrame:
    """Shots (EPSG:4326) inside ``bbox`` = (minx, miny, maxx, maxy) lon/lat, edges included.

    ``dir_or_paths`` is an :func:`ingest_gedi` output folder (only the cells the bbox touches are
    opened) or explicit partition files. A bbox with minx > maxx crosses the antimeridian.
    """
    parts = _bbox_parts(bbox)
    if isinstance(dir_or_paths, (str, os.PathLike)) and Path(dir_or_paths).is_dir():
        files = sorted(Path(dir_or_paths).glob("lat_cell=*/lon_cell=*/*.parquet"))
    elif isinstance(dir_or_paths, (str, os.PathLike)):
        files = [Path(dir_or_paths)]
    else:
        files = [Path(p) for p in dir_or_paths]
    frames = []
    schema_source = None
    for file in files:
        if not file.is_file():
            raise CatalogError(f"{file}: no such GEDI partition")
        schema_source = schema_source or file
        cell = _parse_cell(file)
        for part in parts:
            if cell is not None and not _cell_touches(cell, part):
                continue
            got = gpd.read_parquet(file, bbox=part)
            x, y = got.geometry.x, got.geometry.y
            inside = (x >= part[0]) & (x <= part[2]) & (y >= part[1]) & (y <= part[3])
            frames.append(got.loc[inside])
    if frames:
        result = pd.concat(frames, ignore_index=True)
        return gpd.GeoDataFrame(result, geometry="geometry", crs="EPSG:4326")
    if schema_source is not None:  # keep the columns so callers can rely on them
        return gpd.read_parquet(schema_source).iloc[0:0]
    return gpd.GeoDataFrame({"shot_number": np.zeros(0, np.uint64)}, geometry=gpd.GeoSeries([], crs="EPSG:4326"))


def cell_of(lon: float, lat: float) -> tuple[int, int]:
    """The (lat_cell, lon_cell) partition a point belongs to."""
    return int(math.floor(lat)), int(math.floor(lon))


# ------------------------------------------------------------------------------- shot files


def flagged_usable(shots: pd.DataFrame) -> np.ndarray:
    """Which shots a canopy-height comparison may use by their own flags: ``quality_flag == 1``
    and ``degrade_flag == 0`` where the columns exist (a shot file of points with only RH columns
    passes; the full ingest filters are :class:`GediFilters`). A null flag does not pass."""
    keep = np.ones(len(shots), bool)
    if "quality_flag" in shots.columns:
        keep &= shots["quality_flag"].fillna(0).to_numpy(dtype=np.float64) == 1
    if "degrade_flag" in shots.columns:
        keep &= shots["degrade_flag"].fillna(1).to_numpy(dtype=np.float64) == 0
    return keep


def read_shots(path: str | os.PathLike, bbox: Sequence[float] | None = None) -> gpd.GeoDataFrame:
    """GEDI shots (points) from a GeoParquet or any vector file OGR reads (GeoJSON, GPKG...), or
    from an :func:`ingest_gedi` folder, optionally only those inside ``bbox`` (lon/lat, edges
    included).

    GEDI positions are lon/lat: a file without a CRS is taken as EPSG:4326, and the frame says so
    in ``attrs["crs_assumed"]``.
    """
    p = Path(path)
    if not p.exists():
        raise CatalogError(f"{path}: no such GEDI shots file or folder")
    if p.is_dir():
        return shots_in_bbox(p, bbox if bbox is not None else (-180.0, -90.0, 180.0, 90.0))
    try:
        shots = gpd.read_parquet(p) if p.suffix.lower() in (".parquet", ".geoparquet") else gpd.read_file(p)
    except Exception as exc:  # any reader failure is a bad input file
        raise CatalogError(f"{path}: cannot read GEDI shots ({str(exc).splitlines()[0]})") from None
    kinds = set(shots.geometry.geom_type.dropna().unique())
    if not kinds <= {"Point"}:
        raise CatalogError(f"{path}: GEDI shots must be points, found {sorted(kinds)}")
    assumed = shots.crs is None
    if assumed:
        shots = shots.set_crs("EPSG:4326")
    if bbox is not None and len(shots):
        lonlat = shots.geometry.to_crs("EPSG:4326")
        x, y = lonlat.x.to_numpy(), lonlat.y.to_numpy()
        inside = np.zeros(len(shots), bool)
        for minx, miny, maxx, maxy in _bbox_parts(bbox):
            inside |= (x >= minx) & (x <= maxx) & (y >= miny) & (y <= maxy)
        shots = shots.loc[inside]
    shots.attrs["crs_assumed"] = "EPSG:4326" if assumed else None
    return shots


# ------------------------------------------------------------------------------- footprints

#: GEDI's nominal footprint diameter (metres).
FOOTPRINT_DIAMETER_M = 25.0


def footprint_members(cols, rows, transform, radius: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels of footprints centred at continuous pixel coordinates (``cols``, ``rows``).

    Pixel (r, c) covers [c, c+1) × [r, r+1) and its centre is (c + ½, r + ½). A pixel belongs to a
    footprint when its centre lies within ``radius`` (CRS units, through ``transform``'s linear
    part, so rotated or non-square pixels are measured on the ground) of the shot; a relative
    1e-9 slack on radius² keeps pixel-unit and map-unit callers from disagreeing by rounding. When
    no pixel centre is that close (pixels wider than ≈ 1.4 × ``radius``) the footprint is the one
    pixel that holds the shot, so coarse maps can still be compared with GEDI.

    Returns (pixel rows, pixel cols, member), each (n, m, m) over a window of m × m pixels around
    each shot; the pixels are on the unbounded lattice (a caller decides what is off its raster).
    """
    cols = np.atleast_1d(np.asarray(cols, np.float64))
    rows = np.atleast_1d(np.asarray(rows, np.float64))
    a, b, d, e = transform.a, transform.b, transform.d, transform.e
    side = min(math.hypot(a, d), math.hypot(b, e))
    half = int(math.ceil(radius / side)) + 1
    off = np.arange(-half, half + 1)
    cc = np.floor(cols).astype(np.int64)[:, None] + off  # (n, m)
    rr = np.floor(rows).astype(np.int64)[:, None] + off
    dc = (cc + 0.5 - cols[:, None])[:, None, :]  # (n, 1, m): pixel-centre offsets from the shot
    dr = (rr + 0.5 - rows[:, None])[:, :, None]  # (n, m, 1)
    if b == 0 and d == 0:  # north-up: separable, one (n, m, m) sum instead of six
        dist2 = (a * dc) ** 2 + (e * dr) ** 2
    else:
        dist2 = (a * dc + b * dr) ** 2 + (d * dc + e * dr) ** 2
    member = dist2 <= radius * radius * (1.0 + 1e-9)
    empty = ~member.any(axis=(1, 2))
    member[empty, half, half] = True  # the pixel holding the shot
    m = off.size
    return (np.broadcast_to(rr[:, :, None], (len(rows), m, m)),
            np.broadcast_to(cc[:, None, :], (len(cols), m, m)), member)


def footprint_percentiles(height: np.ndarray, transform, x, y, percentiles, *,
                          diameter_m: float = FOOTPRINT_DIAMETER_M,
                          min_valid_share: float = 1.0) -> np.ndarray:
    """The percentile(s) of a height raster inside the footprint of each shot at map (x, y).

    The rule, the only one in the project:

    * the footprint is the pixels whose centres lie within ``diameter_m``/2 of the shot
      (:func:`footprint_members`; the pixel holding the shot when pixels are larger than that);
    * pixels off the raster and nodata (NaN) pixels are missing;
    * a footprint counts when its valid pixels are at least ``min_valid_share`` of its pixels
      (and at least one); otherwise its value is NaN. 1.0 asks for the whole footprint;
    * the value is numpy's linear-interpolation percentile of the valid pixels, in the raster's
      dtype.

    ``height`` (H×W, NaN = nodata) lies on ``transform`` (any affine, map units = metres);
    ``x``/``y`` are in the same CRS. Returns (n,) for one percentile, (n, k) for a sequence.
    """
    one = np.ndim(percentiles) == 0
    pcts = np.atleast_1d(np.asarray(percentiles, np.float64))
    x, y = np.atleast_1d(np.asarray(x, np.float64)), np.atleast_1d(np.asarray(y, np.float64))
    if not 0.0 < min_valid_share <= 1.0:
        raise CatalogError(f"min_valid_share={min_valid_share}: must be in (0, 1]")
    inv = ~transform
    cols = inv.a * x + inv.b * y + inv.c
    rows = inv.d * x + inv.e * y + inv.f
    h, w = height.shape
    out = np.full((len(x), len(pcts)), np.nan)
    radius = diameter_m / 2.0
    side = min(math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e))
    per_shot = (2 * int(math.ceil(radius / side)) + 3) ** 2
    chunk = max(1, 4_000_000 // per_shot)  # shots per pass: ~32 MB per temporary
    for s in range(0, len(x), chunk):
        rr, cc, member = footprint_members(cols[s:s + chunk], rows[s:s + chunk], transform, radius)
        on = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        vals = height[np.clip(rr, 0, h - 1), np.clip(cc, 0, w - 1)]
        ok = member & on & np.isfinite(vals)
        n_ok = ok.sum(axis=(1, 2))
        counts = (n_ok > 0) & (n_ok >= min_valid_share * member.sum(axis=(1, 2)) - 1e-9)
        if not counts.any():
            continue
        vals = np.where(ok, vals, np.nan)[counts].reshape(int(counts.sum()), -1)
        pct = np.nanpercentile(vals, pcts, axis=1).T  # linear interpolation, as np.percentile
        out[np.flatnonzero(counts) + s] = pct
    return out[:, 0] if one else out

