"""The catalog's row layout, its version, and the small value helpers every reader shares.

Ground floor of ``data_catalog``: imports nothing from the package except ``errors``, so the
readers (imagery, chm) and the catalog can all depend on it without cycles.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from shapely.geometry.base import BaseGeometry

from data_catalog.errors import CatalogError

#: Bump when a column is added, removed or changes meaning. A reader refuses files with a
#: higher number (it cannot know what the new columns mean) and migrates lower ones.
SCHEMA_VERSION = 1

#: File-level Parquet metadata key holding ``{"schema_version": N, ...}`` as JSON.
METADATA_KEY = b"canopy:catalog"

KINDS = ("imagery", "chm", "lidar", "gedi")

#: Column order of the GeoParquet file (``geometry`` is the footprint in EPSG:4326).
COLUMNS = (
    "asset_id",
    "kind",
    "path",
    "geometry",
    "crs",
    "native_bounds",
    "res_x",
    "res_y",
    "width",
    "height",
    "datetime",
    "start_datetime",
    "end_datetime",
    "bands",
    "band_info",
    "dtype",
    "nodata",
    "checksum",
    "size",
    "mtime_ns",
    "schema_version",
    "added",
    "extra",
)

_URL_RE = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*://|/vsi[a-z0-9_]+/)")


@dataclass
class AssetRecord:
    """One catalog row. Optional numbers are ``None`` (not NaN) so records compare equal."""

    asset_id: str
    kind: str
    path: str
    geometry: BaseGeometry
    crs: str | None
    native_bounds: tuple[float, float, float, float]
    res_x: float | None = None
    res_y: float | None = None
    width: int | None = None
    height: int | None = None
    datetime: str | None = None
    start_datetime: str | None = None
    end_datetime: str | None = None
    bands: int | None = None
    band_info: str = "[]"
    dtype: str | None = None
    nodata: str | None = None
    checksum: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    schema_version: int = SCHEMA_VERSION
    added: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    extra: str = "{}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def extra_dict(self) -> dict[str, Any]:
        return json.loads(self.extra)

    def same_content(self, other: AssetRecord) -> bool:
        """Equal but for ``added`` and ``mtime_ns``: what makes a re-add a no-op.

        The mtime is only a cache key for the checksum; a file rewritten with identical bytes
        (e.g. a re-ingested GEDI partition) is the same asset.
        """
        return _comparable(self) == _comparable(other)


_NOT_CONTENT = ("added", "mtime_ns")


def _comparable(record: AssetRecord) -> tuple:
    values = []
    for f in fields(record):
        if f.name in _NOT_CONTENT:
            continue
        value = getattr(record, f.name)
        if isinstance(value, BaseGeometry):
            value = value.wkb
        elif isinstance(value, (list, tuple)):
            value = tuple(float(v) for v in value)
        values.append(value)
    return tuple(values)


def is_url(path: str) -> bool:
    """True for ``https://``, ``s3://`` and GDAL ``/vsi…/`` paths: these are never resolved locally."""
    return bool(_URL_RE.match(str(path)))


def canonical_location(path: str | Path) -> str:
    """The string an asset is identified by: the resolved absolute path, or the URL unchanged."""
    text = str(path)
    if is_url(text):
        return text
    return str(Path(text).expanduser().resolve())


def asset_id_for(location: str) -> str:
    """Stable id: the first 16 hex digits of sha256(resolved path or URL).

    Depends only on where the file is, so re-adding a file finds its row even if its content changed.
    """
    return hashlib.sha256(location.encode("utf-8")).hexdigest()[:16]


def crs_to_text(crs: Any) -> str | None:
    """'EPSG:xxxx' when the CRS has an authority code, otherwise its WKT (None stays None).

    Accepts rasterio or pyproj CRS objects and any string either understands. A pyproj BoundCRS
    (LAS WKT with TOWGS84) is reduced to its source CRS, whose EPSG code is the useful one.
    """
    if crs is None:
        return None
    from pyproj import CRS as ProjCRS  # local: keeps import of this module cheap

    try:
        proj = ProjCRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    except Exception as exc:  # pyproj raises CRSError, but wrapped objects may raise others
        raise CatalogError(f"unrecognised CRS {str(crs)[:80]!r}: {exc}") from None
    if proj.is_bound:
        proj = proj.source_crs
    code = proj.to_epsg(min_confidence=90)
    if code is not None:
        return f"EPSG:{code}"
    return proj.to_wkt()


def float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def int_or_none(value: Any) -> int | None:
    """Ints stay exact (nanosecond mtimes do not survive a trip through float64)."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    number = float_or_none(value)
    return None if number is None else int(number)



def nodata_to_text(nodata: float | None) -> str | None:
    """Nodata as text: 'nan', '-9999.0', … or None. Text, because Parquet→pandas turns a float
    NaN and a missing value into the same NaN, and 'no nodata' differs from 'nodata is NaN'."""
    if nodata is None:
        return None
    return "nan" if math.isnan(nodata) else repr(float(nodata))


def nodata_from_text(text: str | None) -> float | None:
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    return float(text)


def iso_utc(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC with a trailing Z; naive datetimes are taken to be UTC already."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
