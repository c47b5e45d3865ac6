"""STAC in and out of the catalog with pystac.

Export writes a self-contained Collection with one Item per asset (projection v2 fields, gsd,
raster bands). Import reads a Catalog, Collection, ItemCollection or single Item of imagery and
adds imagery rows; local files are described from the file itself (the truth), remote ones from
the Item's metadata.

Items whose acquisition date is unknown still need a ``datetime`` in STAC; they get the time the
asset was catalogued and ``canopy:datetime_source = "catalogued"``, which import reads back as
"unknown" so that a round trip does not invent a date.
"""

from __future__ import annotations

import json
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pystac
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from shapely.geometry import mapping, shape

from data_catalog.catalog import Catalog, raster_record
from data_catalog.chm import describe_chm
from data_catalog.errors import CatalogError
from data_catalog.imagery import describe_imagery
from data_catalog.schema import (
    AssetRecord,
    asset_id_for,
    canonical_location,
    crs_to_text,
    is_url,
    iso_utc,
    parse_iso,
)

PREFIX = "canopy"
_MEDIA_TYPES = {
    ".tif": pystac.MediaType.GEOTIFF,
    ".tiff": pystac.MediaType.GEOTIFF,
    ".jp2": pystac.MediaType.JPEG2000,
    ".png": pystac.MediaType.PNG,
    ".jpg": pystac.MediaType.JPEG,
    ".jpeg": pystac.MediaType.JPEG,
    ".vrt": "application/xml",
    ".parquet": pystac.MediaType.VND_APACHE_PARQUET,
    ".laz": "application/vnd.laszip",
    ".las": "application/vnd.las",
    ".h5": pystac.MediaType.HDF5,
}
#: Asset keys tried first when an Item has several assets: the full-resolution image.
_PREFERRED_ASSET_KEYS = ("data", "visual", "image", "analytic", "rgb", "ortho")
_RASTER_KINDS = ("imagery", "chm")


# --- export ------------------------------------------------------------------------------------


def export_stac(catalog: Catalog, out_dir: str | Path, collection_id: str = "canopy-catalog") -> Path:
    """Write ``out_dir/collection.json`` and one Item per asset; returns the collection path.

    Asset hrefs stay absolute (the catalog stores absolute paths), so the STAC folder can move
    without breaking them; the links between collection and items are relative.
    """
    records = catalog.records()
    if not records:
        raise CatalogError(f"{catalog.path}: catalog is empty, nothing to export")
    items = [item_for(record) for record in records]
    collection = pystac.Collection(
        id=collection_id,
        description=f"Assets of the canopy catalog {catalog.path.name}",
        extent=_extent(records),
        license="other",
        summaries=_summaries(records),
    )
    collection.add_items(items)
    out_dir = Path(out_dir).expanduser().resolve()
    collection.normalize_hrefs(str(out_dir))
    collection.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return out_dir / "collection.json"


def item_for(record: AssetRecord) -> pystac.Item:
    """One STAC Item for one catalog row."""
    extra = record.extra_dict
    start, end = parse_iso(record.start_datetime), parse_iso(record.end_datetime)
    properties: dict[str, Any] = {
        f"{PREFIX}:kind": record.kind,
        f"{PREFIX}:asset_id": record.asset_id,
        f"{PREFIX}:checksum": record.checksum,
        f"{PREFIX}:extra": extra,
    }
    if start is None:
        moment, item_start, item_end = record.added, None, None
        properties[f"{PREFIX}:datetime_source"] = "catalogued"
    elif start == end:
        moment, item_start, item_end = start, None, None
    else:  # a multi-day flight: STAC wants the range and a null datetime
        moment, item_start, item_end = None, start, end
    geometry = record.geometry
    item = pystac.Item(
        id=record.asset_id,
        geometry=mapping(geometry),
        bbox=list(geometry.bounds),
        datetime=moment,
        start_datetime=item_start,
        end_datetime=item_end,
        properties=properties,
    )
    if extra.get("gsd_m"):
        item.common_metadata.gsd = float(extra["gsd_m"])
    asset = pystac.Asset(href=record.path, media_type=_media_type(record.path), roles=["data"], title=Path(record.path).name)
    item.add_asset("data", asset)
    _add_projection(item, record, extra)
    if record.kind in _RASTER_KINDS:
        _add_raster_bands(asset, record)
    return item


def _add_projection(item: pystac.Item, record: AssetRecord, extra: dict[str, Any]) -> None:
    if record.crs is None:
        return
    projection = ProjectionExtension.ext(item, add_if_missing=True)
    if record.crs.startswith("EPSG:"):
        projection.code = record.crs
    else:
        projection.code = None
        projection.wkt2 = record.crs
    projection.bbox = list(record.native_bounds)
    if record.width is not None and record.height is not None:
        projection.shape = [record.height, record.width]
    if extra.get("transform"):
        projection.transform = list(extra["transform"])


def _add_raster_bands(asset: pystac.Asset, record: AssetRecord) -> None:
    bands = []
    for band in json.loads(record.band_info):
        nodata = band.get("nodata")
        bands.append(
            RasterBand.create(
                nodata=("nan" if nodata == "nan" else float(nodata)) if nodata is not None else None,
                data_type=DataType(band["dtype"]) if band.get("dtype") in {d.value for d in DataType} else None,
                spatial_resolution=record.res_x,
                unit=band.get("unit") or ("m" if record.kind == "chm" else None),
                scale=band.get("scale"),
                offset=band.get("offset"),
            )
        )
    RasterExtension.ext(asset, add_if_missing=True).bands = bands


def _extent(records: list[AssetRecord]) -> pystac.Extent:
    minx = min(r.geometry.bounds[0] for r in records)
    miny = min(r.geometry.bounds[1] for r in records)
    maxx = max(r.geometry.bounds[2] for r in records)
    maxy = max(r.geometry.bounds[3] for r in records)
    starts = [parse_iso(r.start_datetime) for r in records if r.start_datetime]
    ends = [parse_iso(r.end_datetime) for r in records if r.end_datetime]
    interval = [min(starts) if starts else None, max(ends) if ends else None]
    return pystac.Extent(pystac.SpatialExtent([[minx, miny, maxx, maxy]]), pystac.TemporalExtent([interval]))


def _summaries(records: list[AssetRecord]) -> pystac.Summaries:
    """What a client filters on before opening Items: kinds, ground sample distances, CRSs."""
    gsds = {round(r.extra_dict["gsd_m"], 4) for r in records if r.extra_dict.get("gsd_m")}
    codes = {r.crs for r in records if r.crs and r.crs.startswith("EPSG:")}
    return pystac.Summaries(
        {f"{PREFIX}:kind": sorted({r.kind for r in records}), "gsd": sorted(gsds), "proj:code": sorted(codes)}
    )


def _media_type(path: str) -> str | None:
    return _MEDIA_TYPES.get(Path(path.split("?")[0]).suffix.lower())


# --- import ------------------------------------------------------------------------------------


def import_stac(stac_path: str | Path, catalog: Catalog) -> list[AssetRecord]:
    """Add the imagery Items of a STAC JSON to ``catalog``; returns the rows added or updated
    (a STAC API search: :func:`data_catalog.stac_remote.import_search`).

    Relative asset hrefs are resolved against the JSON that holds the Item. Items without a
    raster asset are skipped with a warning. Rows exported by this package keep their kind
    ('chm' stays 'chm'); anything else is 'imagery'.
    """
    stac_path = Path(stac_path).expanduser().resolve()
    records = [record for item in read_stac_items(stac_path) if (record := record_for_item(item, stac_path)) is not None]
    if not records:
        raise CatalogError(f"{stac_path}: no Items with a raster asset")
    return catalog.add_records(records)


def read_stac_items(stac_path: Path) -> list[pystac.Item]:
    """The Items in a STAC Catalog/Collection (recursively), ItemCollection or single Item file."""
    try:
        document = json.loads(stac_path.read_text())
    except FileNotFoundError:
        raise CatalogError(f"{stac_path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise CatalogError(f"{stac_path}: not readable JSON ({exc})") from None
    kind = document.get("type") if isinstance(document, dict) else None
    try:
        if kind == "FeatureCollection":
            return list(pystac.ItemCollection.from_dict(document, preserve_dict=False).items)
        if kind == "Feature":
            return [pystac.Item.from_file(str(stac_path))]
        if kind in ("Catalog", "Collection"):
            root = pystac.read_file(str(stac_path))
            return list(root.get_items(recursive=True))
    except pystac.STACError as exc:
        raise CatalogError(f"{stac_path}: invalid STAC ({str(exc).splitlines()[0]})") from None
    raise CatalogError(f"{stac_path}: not a STAC Catalog, Collection, ItemCollection or Item (type={kind!r})")


def record_for_item(item: pystac.Item, stac_path: Path, source: str | None = None) -> AssetRecord | None:
    asset = _pick_raster_asset(item)
    if asset is None:
        warnings.warn(f"{stac_path}: item {item.id!r} has no raster asset; skipped", stacklevel=3)
        return None
    location = _resolve_href(asset.href, item, stac_path)
    kind = item.properties.get(f"{PREFIX}:kind")
    kind = kind if kind in _RASTER_KINDS else "imagery"
    fields = _extension_fields(item, asset)
    stac_crs = _projection_crs(fields)
    start, end = _item_time(item)
    if not is_url(location) and Path(location).is_file():
        describe = describe_chm if kind == "chm" else describe_imagery
        description = describe(location, stac_crs)  # the STAC CRS fills in for files without one
        extra = {"stac_item": item.id, "stac_source": source or str(stac_path)}
        record = raster_record(kind, location, description, extra=extra)
    else:
        if not is_url(location):
            warnings.warn(f"{location}: not found; row made from STAC metadata of item {item.id!r}", stacklevel=3)
        record = _record_from_metadata(kind, location, item, fields, stac_crs, stac_path, source)
    if start is not None:  # a date stated in STAC beats one guessed from TIFF tags
        record.datetime, record.start_datetime, record.end_datetime = iso_utc(start), iso_utc(start), iso_utc(end)
    return record


def _extension_fields(item: pystac.Item, asset: pystac.Asset) -> dict[str, Any]:
    """proj:* and raster:* fields from the Item and the asset (the asset's win), read as plain keys.

    Read whether or not the Item declares the extension: many producers forget to, and rio-stac
    writes projection v1.1 (``proj:epsg``) where pystac expects v2 (``proj:code``).
    """
    merged = {k: v for k, v in item.properties.items() if k.startswith(("proj:", "raster:"))}
    merged.update({k: v for k, v in asset.extra_fields.items() if k.startswith(("proj:", "raster:"))})
    return merged


def _record_from_metadata(
    kind: str, location: str, item: pystac.Item, fields: dict[str, Any], crs: str | None, stac_path: Path,
    source: str | None = None,
) -> AssetRecord:
    if item.geometry is None:
        raise CatalogError(f"{stac_path}: item {item.id!r} has no geometry and its file is not local")
    geometry = shape(item.geometry)
    shape_hw = fields.get("proj:shape")
    transform = fields.get("proj:transform")
    native_bounds = fields.get("proj:bbox") or list(geometry.bounds)
    bands = fields.get("raster:bands") or []
    gsd = item.common_metadata.gsd
    res_x = abs(float(transform[0])) if transform else gsd
    res_y = abs(float(transform[4])) if transform else gsd
    first_band = bands[0] if bands else {}
    nodata = first_band.get("nodata")
    extra: dict[str, Any] = {"stac_item": item.id, "stac_source": source or str(stac_path), "gsd_m": gsd}
    if transform:
        extra["transform"] = [float(v) for v in transform[:6]]
    return AssetRecord(
        asset_id=asset_id_for(location),
        kind=kind,
        path=location,
        geometry=geometry,
        crs=crs,
        native_bounds=tuple(float(v) for v in native_bounds[:2] + native_bounds[-2:]),
        res_x=res_x,
        res_y=res_y,
        width=int(shape_hw[1]) if shape_hw else None,
        height=int(shape_hw[0]) if shape_hw else None,
        bands=len(bands) or None,
        band_info=json.dumps([{"index": i + 1, "dtype": b.get("data_type"), "nodata": b.get("nodata")} for i, b in enumerate(bands)]),
        dtype=first_band.get("data_type"),
        nodata=None if nodata is None else str(nodata),
        checksum=None,
        extra=json.dumps(extra, sort_keys=True),
    )


def _pick_raster_asset(item: pystac.Item) -> pystac.Asset | None:
    def is_raster(asset: pystac.Asset) -> bool:
        media = (asset.media_type or "").lower()
        if media:
            return "tiff" in media or "jp2" in media or media.startswith("image/")
        return Path(asset.href.split("?")[0]).suffix.lower() in (".tif", ".tiff", ".jp2", ".vrt", ".img")

    rasters = {key: asset for key, asset in item.assets.items() if is_raster(asset)}
    for key in _PREFERRED_ASSET_KEYS:
        if key in rasters:
            return rasters[key]
    for asset in rasters.values():
        if "data" in (asset.roles or []):
            return asset
    non_thumbnails = [a for a in rasters.values() if not {"thumbnail", "overview"} & set(a.roles or [])]
    return non_thumbnails[0] if non_thumbnails else None


def _resolve_href(href: str, item: pystac.Item, stac_path: Path) -> str:
    if is_url(href) or Path(href).is_absolute():
        return canonical_location(href)
    self_href = item.get_self_href()
    base = Path(self_href).parent if self_href and not is_url(self_href) else stac_path.parent
    return canonical_location(base / href)


def _projection_crs(fields: dict[str, Any]) -> str | None:
    if fields.get("proj:code"):
        return crs_to_text(fields["proj:code"])
    if fields.get("proj:epsg"):
        return crs_to_text(f"EPSG:{fields['proj:epsg']}")
    if fields.get("proj:wkt2"):
        return crs_to_text(fields["proj:wkt2"])
    if fields.get("proj:projjson"):
        return crs_to_text(json.dumps(fields["proj:projjson"]))
    return None


def _item_time(item: pystac.Item) -> tuple[datetime | None, datetime | None]:
    if item.properties.get(f"{PREFIX}:datetime_source") == "catalogued":
        return None, None
    start = item.common_metadata.start_datetime or item.datetime
    end = item.common_metadata.end_datetime or item.datetime
    if start is None:
        return None, None
    return _utc(start), _utc(end or start)


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)

