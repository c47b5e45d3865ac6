"""The asset catalog: one GeoParquet file, one row per asset, footprints in EPSG:4326.

Answers "which imagery, which CHM, which lidar and which GEDI shots cover this place?" with a
spatial index (geopandas sindex, an STRtree) over the footprints. Every asset keeps its native
CRS, grid and nodata in the row, so readers never guess geometry.

File format: GeoParquet written by geopandas, plus the file-level metadata key
``canopy:catalog`` = ``{"schema_version": N}``. A file with a higher ``schema_version`` is
refused, because its columns may mean things this code does not know.

Checksums (column ``checksum``): files up to 64 MiB get ``sha256:<hex>`` of the whole content.
Larger files get ``sha256-fast:<hex>`` = sha256 over (size, mtime_ns, first MiB, last MiB), so
adding or checking a multi-GB mosaic does not read it all; touching such a file counts as a change.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
import os
import tempfile
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from glob import glob
from pathlib import Path
from typing import Any, Iterable, Sequence

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from rasterio.crs import CRS
from rasterio.warp import transform_geom
from shapely.geometry import Polygon, box, mapping, shape
from shapely.geometry.base import BaseGeometry

from data_catalog.chm import describe_chm
from data_catalog.errors import CatalogError
from data_catalog.imagery import RasterDescription, describe_imagery, ground_sample_distance_m
from data_catalog.schema import (
    COLUMNS,
    KINDS,
    METADATA_KEY,
    SCHEMA_VERSION,
    AssetRecord,
    asset_id_for,
    canonical_location,
    crs_to_text,
    float_or_none,
    int_or_none,
    is_url,
    iso_utc,
    nodata_to_text,
)

FULL_HASH_MAX_BYTES = 64 * 1024 * 1024
_EDGE_BYTES = 1024 * 1024
#: Points per footprint edge before reprojection, as in rasterio's transform_bounds(densify_pts=21):
#: a UTM tile's edges are curves in lon/lat, and the corners alone cut them off.
FOOTPRINT_DENSIFY_PTS = 21
FOOTPRINT_SIMPLIFY_DEG = 1e-7

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img", ".png", ".jpg", ".jpeg")
INPUT_SUFFIXES = {
    "imagery": RASTER_SUFFIXES,
    "chm": RASTER_SUFFIXES,
    "lidar": (".las", ".laz"),
    "gedi": (".h5", ".hdf5", ".he5"),
}

_INT_COLUMNS = ("width", "height", "bands", "size", "mtime_ns", "schema_version")
_RECORD_FIELDS = tuple(f.name for f in fields(AssetRecord))
_FLOAT_COLUMNS = ("res_x", "res_y")


@dataclass(frozen=True)
class Problem:
    """Something ``Catalog.check`` found wrong with one row's file."""

    asset_id: str
    kind: str
    path: str
    problem: str  # 'missing' (moved or deleted) | 'changed' | 'unreadable'
    detail: str

    def __str__(self) -> str:
        return f"{self.problem}: {self.path} ({self.kind} {self.asset_id}): {self.detail}"


class Catalog:
    """An in-memory catalog bound to its GeoParquet path; ``save()`` writes it atomically."""

    def __init__(self, path: str | Path, frame: gpd.GeoDataFrame | None = None):
        self.path = Path(path).expanduser().resolve()
        self._frame = empty_frame() if frame is None else normalise_frame(frame)

    # --- lifecycle ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, must_exist: bool = False) -> Catalog:
        """Load the catalog at ``path``; a missing file gives an empty catalog unless ``must_exist``."""
        path = Path(path).expanduser()
        if not path.exists():
            if must_exist:
                raise CatalogError(f"{path}: catalog not found")
            return cls(path)
        return cls(path, read_catalog_file(path))

    def save(self) -> Path:
        """Write to a temporary file next to the catalog, then rename over it (atomic on POSIX)."""
        write_catalog_file(self._frame, self.path)
        return self.path

    @property
    def frame(self) -> gpd.GeoDataFrame:
        """All rows as a GeoDataFrame (EPSG:4326 footprints). Treat as read-only."""
        return self._frame

    def __len__(self) -> int:
        return len(self._frame)

    def get(self, asset_id: str) -> AssetRecord | None:
        matches = np.flatnonzero(self._frame["asset_id"].to_numpy() == asset_id)
        return record_from_row(self._frame.iloc[matches[0]]) if len(matches) else None

    def records(self) -> list[AssetRecord]:
        return records_from_frame(self._frame)

    # --- adding -------------------------------------------------------------------------------

    def add(
        self,
        kind: str,
        paths: Iterable[str | Path],
        crs: str | None = None,
        *,
        chm_resolution: float = 1.0,
        chm_dir: str | Path | None = None,
        gedi_dir: str | Path | None = None,
        gedi_filters: Any = None,
    ) -> list[AssetRecord]:
        """Add or refresh assets; returns the rows that were added or updated (unchanged ones are not).

        ``paths`` may hold files, directories (their files of that kind, not recursive), glob
        patterns and URLs. ``crs`` is used for files without a CRS. Kind 'lidar' derives a CHM
        per cloud at ``chm_resolution`` into ``chm_dir`` (default: ``derived_chm/`` next to the
        catalog); kind 'gedi' writes filtered shots into ``gedi_dir`` (default ``gedi/`` next to
        the catalog). Nothing in the catalog changes unless every input succeeds.
        """
        if kind not in KINDS:
            raise CatalogError(f"kind {kind!r}: must be one of {', '.join(KINDS)}")
        inputs = expand_inputs(paths, kind)
        if kind == "lidar":
            if not chm_resolution or chm_resolution <= 0:
                raise CatalogError(f"--chm-resolution {chm_resolution}: must be a positive number of CRS units")
            out_dir = Path(chm_dir) if chm_dir is not None else self.path.parent / "derived_chm"
            records = self._lidar_records(inputs, crs, float(chm_resolution), out_dir)
        elif kind == "gedi":
            out_dir = Path(gedi_dir) if gedi_dir is not None else self.path.parent / "gedi"
            records = gedi_records(inputs, out_dir, gedi_filters)
            self.remove(stale_gedi_rows(self._frame, records))
        else:
            records = [self._raster_record(kind, location, crs) for location in inputs]
        return self.add_records(records)

    def add_records(self, records: Sequence[AssetRecord]) -> list[AssetRecord]:
        """Insert new rows and replace changed ones (matched by asset_id); returns those written."""
        positions = {asset_id: i for i, asset_id in enumerate(self._frame["asset_id"])}
        changed: dict[str, AssetRecord] = {}
        touched: dict[str, AssetRecord] = {}  # same content, new mtime: refresh the row quietly
        for record in records:
            if record.kind not in KINDS:
                raise CatalogError(f"kind {record.kind!r}: must be one of {', '.join(KINDS)}")
            if record.asset_id in changed:
                changed[record.asset_id] = record
                continue
            previous = record_from_row(self._frame.iloc[positions[record.asset_id]]) if record.asset_id in positions else None
            if previous is None or not previous.same_content(record):
                changed[record.asset_id] = record
            elif previous.mtime_ns != record.mtime_ns:
                record.added = previous.added
                touched[record.asset_id] = record
        replacements = {**touched, **changed}
        if replacements:
            kept = self._frame[~self._frame["asset_id"].isin(list(replacements))]
            fresh = frame_from_records(list(replacements.values()))
            self._frame = fresh if kept.empty else normalise_frame(pd.concat([kept, fresh], ignore_index=True))
        return list(changed.values())

    def remove(self, asset_ids: Iterable[str]) -> int:
        """Drop rows by id (e.g. after ``check`` reported them missing); returns how many went."""
        ids = set(asset_ids)
        before = len(self._frame)
        self._frame = self._frame[~self._frame["asset_id"].isin(ids)].reset_index(drop=True)
        return before - len(self._frame)

    def _previous(self, location: str) -> AssetRecord | None:
        return self.get(asset_id_for(location))

    def _raster_record(self, kind: str, location: str, crs: str | None) -> AssetRecord:
        describe = describe_chm if kind == "chm" else describe_imagery
        description = describe(location, crs)
        return raster_record(kind, location, description, previous=self._previous(location))

    def _lidar_records(self, inputs: list[str], crs: str | None, resolution: float, chm_dir: Path) -> list[AssetRecord]:
        """A 'lidar' row per cloud plus a 'chm' row for the raster derived from it.

        Derived rasters are written to temporary names and renamed only when every cloud has
        succeeded, so a failure leaves no new files and the catalog untouched.
        """
        from data_catalog import lidar  # the point-cloud code, loaded only for this kind

        chm_dir = chm_dir.expanduser().resolve()
        chm_dir.mkdir(parents=True, exist_ok=True)
        records: list[AssetRecord] = []
        pending: list[tuple[Path, Path]] = []  # (temporary, final)
        try:
            for location in inputs:
                chm_location = chm_dir / derived_chm_name(location, resolution)
                cloud = lidar_record(location, crs, resolution, str(chm_location), previous=self._previous(location))
                if self._derived_chm_is_current(cloud, chm_location):
                    continue
                # The cloud's own CRS wins (as for rasters): --crs only fills in a missing one.
                override = cloud.crs if cloud.extra_dict["crs_source"] == "override" else None
                array, transform, chm_crs = lidar.chm_from_las(location, resolution, crs=override)
                temporary = chm_dir / f".{chm_location.stem}.{os.getpid()}.tmp.tif"
                lidar.write_chm_geotiff(str(temporary), array, transform, chm_crs)
                pending.append((temporary, chm_location))
                description = describe_chm(str(temporary))
                extra = {"source": location, "source_asset_id": cloud.asset_id, "chm_resolution": resolution}
                chm = raster_record("chm", str(chm_location), description, extra=extra, content_path=str(temporary))
                records += [cloud, chm]
        except BaseException:
            for temporary, _ in pending:
                temporary.unlink(missing_ok=True)
            raise
        for temporary, final in pending:
            os.replace(temporary, final)  # keeps mtime, so the recorded size/mtime stay valid
        return records

    def _derived_chm_is_current(self, cloud: AssetRecord, chm_location: Path) -> bool:
        previous_cloud = self.get(cloud.asset_id)
        previous_chm = self.get(asset_id_for(str(chm_location)))
        if previous_cloud is None or previous_chm is None or not previous_cloud.same_content(cloud):
            return False
        try:
            stat = chm_location.stat()
        except OSError:
            return False
        return stat.st_size == previous_chm.size and stat.st_mtime_ns == previous_chm.mtime_ns

    # --- querying -----------------------------------------------------------------------------

    def query(
        self,
        geometry: BaseGeometry | dict | Any | None = None,
        bbox: Sequence[float] | None = None,
        kinds: Iterable[str] | str | None = None,
    ) -> gpd.GeoDataFrame:
        """Rows whose footprint intersects ``geometry`` and ``bbox`` (both EPSG:4326 lon/lat) and
        whose kind is in ``kinds``. ``geometry`` may be shapely, GeoJSON, or an object with
        ``.geometry`` (an AOI). Uses the frame's spatial index, built once and kept until rows change.
        """
        region = _region(geometry, bbox)
        frame = self._frame
        if region is not None:
            hits = frame.sindex.query(region, predicate="intersects")
            frame = frame.iloc[np.sort(hits)]
        if kinds is not None:
            wanted = [kinds] if isinstance(kinds, str) else list(kinds)
            unknown = sorted(set(wanted) - set(KINDS))
            if unknown:
                raise CatalogError(f"kind {unknown[0]!r}: must be one of {', '.join(KINDS)}")
            frame = frame[frame["kind"].isin(wanted)]
        return frame.copy()

    # --- checking -----------------------------------------------------------------------------

    def check(self, full: bool = False) -> list[Problem]:
        """Report files that were moved, deleted or changed since they were added.

        A file whose size and mtime match the row is taken as unchanged (rehashed when ``full``).
        URLs are skipped: they cannot be checked without fetching them.
        """
        columns = ("asset_id", "kind", "path", "checksum", "size", "mtime_ns")
        problems = []
        # Column-wise: building full records for 100k rows would cost seconds.
        for asset_id, kind, path, checksum, size, mtime_ns in zip(*(self._frame[c].tolist() for c in columns)):
            if is_url(path):
                continue
            expected = _FileState(asset_id, kind, path, _text_or_none(checksum), int_or_none(size), int_or_none(mtime_ns))
            problem = _problem_with(expected, full)
            if problem is not None:
                problems.append(problem)
        return problems


# --- records ----------------------------------------------------------------------------------


def raster_record(
    kind: str,
    location: str,
    description: RasterDescription,
    *,
    extra: dict[str, Any] | None = None,
    previous: AssetRecord | None = None,
    content_path: str | None = None,
) -> AssetRecord:
    """The row for a raster already described (and validated) by imagery/chm."""
    crs = description.crs_text
    footprint = footprint_wgs84(description.native_polygon, description.crs)
    acquisition = description.acquisition
    extra = {
        **(extra or {}),
        "transform": list(description.transform)[:6],
        "gsd_m": ground_sample_distance_m(description),
        "driver": description.driver,
        "crs_source": "override" if description.crs_from_override else "file",
    }
    checksum, size, mtime_ns = file_fingerprint(content_path or location, previous)
    return AssetRecord(
        asset_id=asset_id_for(location),
        kind=kind,
        path=location,
        geometry=footprint,
        crs=crs,
        native_bounds=tuple(float(v) for v in description.native_polygon.bounds),
        res_x=description.res_x,
        res_y=description.res_y,
        width=description.width,
        height=description.height,
        datetime=iso_utc(acquisition.start) if acquisition else None,
        start_datetime=iso_utc(acquisition.start) if acquisition else None,
        end_datetime=iso_utc(acquisition.end) if acquisition else None,
        bands=description.count,
        band_info=json.dumps(list(description.band_info)),
        dtype=description.dtypes[0],
        nodata=nodata_to_text(description.nodata),
        checksum=checksum,
        size=size,
        mtime_ns=mtime_ns,
        extra=json.dumps(extra, sort_keys=True),
    )


def lidar_record(
    location: str, crs: str | None, resolution: float, chm_location: str, previous: AssetRecord | None = None
) -> AssetRecord:
    """The row for a LAS/LAZ cloud, from its header only (bounds, count, CRS): no points are read."""
    from data_catalog.lidar import read_las_info

    info = read_las_info(location)  # without crs: we need to know whether the file has its own
    crs_text = crs_to_text(info.crs)
    if crs_text is None:
        if crs is None:
            raise CatalogError(f"{location}: point cloud has no CRS; pass --crs EPSG:xxxx")
        crs_text = crs_to_text(crs)
    elif crs is not None and crs_to_text(crs) != crs_text:
        warnings.warn(f"{location}: has CRS {crs_text}; --crs {crs} applies only to files without one", stacklevel=4)
    native = box(*info.bounds)
    checksum, size, mtime_ns = file_fingerprint(location, previous)
    extra = {
        "point_count": info.point_count,
        "point_format": info.point_format,
        "las_version": info.version,
        "z_range": list(info.z_range),
        "derived_chm": chm_location,
        "chm_resolution": resolution,
        "crs_source": "file" if info.crs is not None else "override",
    }
    return AssetRecord(
        asset_id=asset_id_for(location),
        kind="lidar",
        path=location,
        geometry=footprint_wgs84(native, CRS.from_user_input(crs_text)),
        crs=crs_text,
        native_bounds=tuple(float(v) for v in native.bounds),
        checksum=checksum,
        size=size,
        mtime_ns=mtime_ns,
        extra=json.dumps(extra, sort_keys=True),
    )


def gedi_records(inputs: list[str], out_dir: Path, filters: Any) -> list[AssetRecord]:
    """Filter GEDI granules into GeoParquet partitions (data_catalog.gedi) and make one row each."""
    from data_catalog import gedi  # h5py and the shot filters, loaded only for this kind

    out_dir = out_dir.expanduser().resolve()
    partitions = gedi.ingest_gedi(inputs, out_dir) if filters is None else gedi.ingest_gedi(inputs, out_dir, filters)
    source_of = {Path(location).stem: location for location in inputs}
    return [gedi_record(partition, source_of) for partition in partitions]


def gedi_record(partition: dict[str, Any], source_of: dict[str, str]) -> AssetRecord:
    """One row for one shot partition as reported by ``gedi.ingest_gedi``."""
    location = canonical_location(partition["path"])
    minx, miny, maxx, maxy = (float(v) for v in partition["bbox"])
    if minx < maxx and miny < maxy:
        geometry = box(minx, miny, maxx, maxy)
    else:  # one shot, or shots on one meridian: a degenerate box would not intersect anything
        geometry = box(minx, miny, maxx, maxy).buffer(1e-6)
    checksum, size, mtime_ns = file_fingerprint(location, None)
    start, end = partition.get("datetime_start"), partition.get("datetime_end")
    granule = partition.get("granule")
    extra = {
        "n_shots": int(partition["n_shots"]),
        "filter_report": partition.get("filter_report"),
        "granule": granule,
        "source": source_of.get(granule) if granule else None,
        "cell": list(partition["cell"]) if partition.get("cell") is not None else None,
    }
    return AssetRecord(
        asset_id=asset_id_for(location),
        kind="gedi",
        path=location,
        geometry=geometry,
        crs="EPSG:4326",
        native_bounds=(minx, miny, maxx, maxy),
        datetime=_iso_or_none(start),
        start_datetime=_iso_or_none(start),
        end_datetime=_iso_or_none(end),
        checksum=checksum,
        size=size,
        mtime_ns=mtime_ns,
        extra=json.dumps(extra, sort_keys=True, default=str),
    )


def stale_gedi_rows(frame: gpd.GeoDataFrame, fresh: Sequence[AssetRecord]) -> list[str]:
    """Ids of 'gedi' rows of re-ingested granules whose partition was not written again.

    ingest_gedi deletes such partitions (the granule no longer has shots there, e.g. after
    stricter filters), so their rows would otherwise point at missing files.
    """
    granules = {record.extra_dict.get("granule") for record in fresh} - {None}
    fresh_ids = {record.asset_id for record in fresh}
    stale = []
    for asset_id, extra in frame.loc[frame["kind"] == "gedi", ["asset_id", "extra"]].itertuples(index=False):
        if asset_id not in fresh_ids and json.loads(extra).get("granule") in granules:
            stale.append(asset_id)
    return stale


def derived_chm_name(location: str, resolution: float) -> str:
    """'<cloud stem>_<8 hex of its id>_chm<res>.tif': two clouds with the same name never collide."""
    stem = Path(location).stem
    return f"{stem}_{asset_id_for(location)[:8]}_chm{resolution:g}.tif"


def _iso_or_none(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, str):
        return iso_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    if isinstance(value, (pd.Timestamp, datetime)):
        return iso_utc(pd.Timestamp(value).to_pydatetime())
    if isinstance(value, np.datetime64):
        return iso_utc(pd.Timestamp(value).to_pydatetime())
    return str(value)


# --- inputs, checksums, footprints -------------------------------------------------------------


def expand_inputs(paths: Iterable[str | Path], kind: str) -> list[str]:
    """Resolve the user's inputs to canonical file locations (sorted within each input).

    Directories give their files with the kind's suffixes; unexpanded glob patterns (quoted on
    the command line) are expanded here; URLs pass through.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    suffixes = INPUT_SUFFIXES[kind]
    found: list[str] = []
    for raw in paths:
        text = str(raw)
        if is_url(text):
            found.append(text)
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
            if not inside:
                raise CatalogError(f"{path}: directory has no {'/'.join(suffixes)} files for kind {kind!r}")
            found += [canonical_location(p) for p in inside]
        elif path.is_file():
            found.append(canonical_location(path))
        elif any(char in text for char in "*?["):
            matches = sorted(glob(str(path), recursive=True))  # "**" reaches subfolders
            # like a folder, a pattern gives the files of this kind (not the .aux.xml beside them)
            files = [m for m in matches if Path(m).is_file() and Path(m).suffix.lower() in suffixes]
            if not files:
                raise CatalogError(f"{text}: pattern matches no {'/'.join(suffixes)} files")
            found += [canonical_location(m) for m in files]
        else:
            raise CatalogError(f"{text}: no such file or directory")
    if not found:
        raise CatalogError(f"no input files given for kind {kind!r}")
    return list(dict.fromkeys(found))  # the same file named twice is one input


def file_fingerprint(location: str, previous: AssetRecord | None = None) -> tuple[str | None, int | None, int | None]:
    """(checksum, size, mtime_ns) of a local file; URLs get (None, None, None).

    Reuses ``previous.checksum`` when size and mtime are unchanged, so re-adding a large,
    unchanged file costs a stat instead of a hash.
    """
    if is_url(location):
        return None, None, None
    try:
        stat = os.stat(location)
    except OSError as exc:
        raise CatalogError(f"{location}: cannot read ({exc.strerror})") from None
    if previous is not None and previous.checksum and previous.size == stat.st_size and previous.mtime_ns == stat.st_mtime_ns:
        return previous.checksum, stat.st_size, stat.st_mtime_ns
    return file_checksum(location, stat.st_size, stat.st_mtime_ns), stat.st_size, stat.st_mtime_ns


def file_checksum(location: str, size: int, mtime_ns: int) -> str:
    """sha256 of the whole file up to 64 MiB; above that the fast form (see module docstring)."""
    digest = hashlib.sha256()
    with open(location, "rb") as handle:
        if size <= FULL_HASH_MAX_BYTES:
            for block in iter(lambda: handle.read(_EDGE_BYTES), b""):
                digest.update(block)
            return f"sha256:{digest.hexdigest()}"
        digest.update(f"{size}:{mtime_ns}:".encode())
        digest.update(handle.read(_EDGE_BYTES))
        handle.seek(size - _EDGE_BYTES)
        digest.update(handle.read(_EDGE_BYTES))
        return f"sha256-fast:{digest.hexdigest()}"


def footprint_wgs84(native: Polygon, crs: CRS, densify_pts: int = FOOTPRINT_DENSIFY_PTS) -> BaseGeometry:
    """Reproject a native outline to EPSG:4326 lon/lat with ``densify_pts`` points per edge.

    GDAL cuts outlines that cross the antimeridian into a MultiPolygon, so queries on either
    side find them.
    """
    ring = np.asarray(native.exterior.coords)
    dense = [
        point
        for start, end in zip(ring[:-1], ring[1:])
        for point in np.linspace(start, end, densify_pts, endpoint=False)
    ]
    dense.append(dense[0])
    try:
        projected = shape(transform_geom(crs, "EPSG:4326", mapping(Polygon(dense)), antimeridian_cutting=True))
    except Exception as exc:
        raise CatalogError(f"footprint cannot be reprojected from {crs_to_text(crs)} to EPSG:4326 ({exc})") from None
    coordinates = shapely.get_coordinates(projected)
    if not np.isfinite(coordinates).all() or np.abs(coordinates[:, 1]).max() > 90.0001:
        raise CatalogError(f"footprint in {crs_to_text(crs)} does not map to valid lon/lat (wrong --crs?)")
    if not projected.is_valid:
        projected = shapely.make_valid(projected)
    # Drop the vertices that curvature did not need (1e-7 degrees is about 1 cm): a 1 km UTM tile
    # keeps its 4 corners, a 100 km scene keeps the bends of its edges.
    return shapely.normalize(projected.simplify(FOOTPRINT_SIMPLIFY_DEG, preserve_topology=True))


def _region(geometry: Any, bbox: Sequence[float] | None) -> BaseGeometry | None:
    region = None
    if geometry is not None:
        if hasattr(geometry, "geometry") and not isinstance(geometry, BaseGeometry):
            geometry = geometry.geometry
        if isinstance(geometry, dict):
            geometry = shape(geometry.get("geometry", geometry))
        if not isinstance(geometry, BaseGeometry):
            raise CatalogError(f"query geometry: expected a shapely geometry or GeoJSON, got {type(geometry).__name__}")
        region = geometry
    if bbox is not None:
        values = [float(v) for v in bbox]
        if len(values) != 4 or not (values[0] <= values[2] and values[1] <= values[3]):
            raise CatalogError(f"bbox {list(bbox)}: expected minx,miny,maxx,maxy with min <= max (lon/lat)")
        bbox_polygon = box(*values)
        region = bbox_polygon if region is None else region.intersection(bbox_polygon)
    return region


@dataclass(frozen=True)
class _FileState:
    """What a row remembers about its file: enough to tell whether it moved or changed."""

    asset_id: str
    kind: str
    path: str
    checksum: str | None
    size: int | None
    mtime_ns: int | None


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _problem_with(record: _FileState, full: bool) -> Problem | None:
    def problem(kind: str, detail: str) -> Problem:
        return Problem(record.asset_id, record.kind, record.path, kind, detail)

    try:
        stat = os.stat(record.path)
    except FileNotFoundError:
        return problem("missing", "file not found (moved or deleted)")
    except OSError as exc:
        return problem("unreadable", exc.strerror or str(exc))
    if record.checksum is None:
        return None
    if not full and stat.st_size == record.size and stat.st_mtime_ns == record.mtime_ns:
        return None
    if stat.st_size != record.size:
        return problem("changed", f"size {record.size} -> {stat.st_size} bytes")
    try:
        checksum = file_checksum(record.path, stat.st_size, stat.st_mtime_ns)
    except OSError as exc:
        return problem("unreadable", exc.strerror or str(exc))
    if checksum != record.checksum:
        return problem("changed", "content differs from when it was added")
    return None


# --- frames and files -------------------------------------------------------------------------


def empty_frame() -> gpd.GeoDataFrame:
    return frame_from_records([])


def frame_from_records(records: Sequence[AssetRecord]) -> gpd.GeoDataFrame:
    columns: dict[str, list] = {name: [] for name in COLUMNS}
    for record in records:
        for name in COLUMNS:
            value = getattr(record, name)
            columns[name].append(list(value) if name == "native_bounds" else value)
    geometry = columns.pop("geometry")
    frame = gpd.GeoDataFrame(pd.DataFrame(columns), geometry=gpd.GeoSeries(geometry, crs="EPSG:4326"), crs="EPSG:4326")
    return normalise_frame(frame)


def normalise_frame(frame: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Column order and dtypes as the schema says (nullable ints, UTC timestamps)."""
    missing = [name for name in COLUMNS if name not in frame.columns]
    if missing:
        raise CatalogError(f"catalog is missing columns: {', '.join(missing)}")
    frame = frame[list(COLUMNS)].reset_index(drop=True)
    for name in _INT_COLUMNS:
        frame[name] = pd.array(frame[name], dtype="Int64")
    for name in _FLOAT_COLUMNS:
        frame[name] = frame[name].astype("float64")
    frame["added"] = pd.to_datetime(frame["added"], utc=True)
    if frame.crs is None or not frame.crs.equals("EPSG:4326"):
        frame = frame.set_crs("EPSG:4326", allow_override=True)
    return gpd.GeoDataFrame(frame, geometry="geometry", crs="EPSG:4326")


def record_from_row(row: pd.Series | dict[str, Any]) -> AssetRecord:
    """A frame row (Series or dict) back to a record: NaN/NA become None, ints stay exact."""
    values: dict[str, Any] = {}
    for name in _RECORD_FIELDS:
        value = row[name]
        if name == "native_bounds":
            value = tuple(float(v) for v in value)
        elif name in _INT_COLUMNS:
            value = int_or_none(value)
        elif name in _FLOAT_COLUMNS:
            value = float_or_none(value)
        elif name == "added":
            value = pd.Timestamp(value).to_pydatetime()
        elif value is not None and not isinstance(value, (str, BaseGeometry)) and pd.isna(value):
            value = None
        values[name] = value
    return AssetRecord(**values)


def records_from_frame(frame: gpd.GeoDataFrame) -> list[AssetRecord]:
    """All rows as records, column-wise (DataFrame.iterrows builds a Series per row: 50x slower)."""
    columns = {name: frame[name].tolist() for name in _RECORD_FIELDS}
    return [record_from_row({name: columns[name][i] for name in _RECORD_FIELDS}) for i in range(len(frame))]


def read_catalog_file(path: Path) -> gpd.GeoDataFrame:
    """Read and version-check a catalog file; the version is checked before any column is parsed."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as exc:
        raise CatalogError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    if METADATA_KEY not in metadata:
        raise CatalogError(f"{path}: not a canopy catalog (no '{METADATA_KEY.decode()}' metadata)")
    try:
        version = int(json.loads(metadata[METADATA_KEY])["schema_version"])
    except (ValueError, KeyError, TypeError):
        raise CatalogError(f"{path}: unreadable '{METADATA_KEY.decode()}' metadata") from None
    if version > SCHEMA_VERSION:
        raise CatalogError(
            f"{path}: written with catalog schema version {version}, this version of canopy reads up to "
            f"{SCHEMA_VERSION}; upgrade canopy"
        )
    frame = gpd.read_parquet(path)
    return normalise_frame(frame)  # versions below 1 do not exist yet; migrations will go here


def write_catalog_file(frame: gpd.GeoDataFrame, path: Path) -> None:
    """GeoParquet via geopandas (it owns the 'geo' metadata), plus our schema key, written atomically."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    buffer.seek(0)
    table = pq.read_table(buffer)
    ours = json.dumps({"schema_version": SCHEMA_VERSION, "written": iso_utc(datetime.now(timezone.utc))})
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: ours.encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        pq.write_table(table, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
