"""After the cells: one mosaic layer, a low-resolution overview COG, a STAC collection, the style.

* ``mosaic.vrt`` when every cell shares one CRS, else ``mosaic.gti.gpkg`` (GDAL's GTI tile index,
  which reprojects cells of other UTM zones on the fly); per-zone ``mosaic_{epsg}.vrt`` always.
* ``overview.tif``: the whole run averaged to a coarse GSD (a power-of-two multiple of the model
  GSD, at most ~16k px on a side) in the CRS of the zone holding most cells. A mosaic of
  thousands of cells without it is several times slower to draw zoomed out (docs/geo_conventions.md); the
  VRT/GTI point to it as their overview.
* ``stac/collection.json`` with one item per cell (pystac).

The VRTs carry the run's model tags and its model-tile lattice (:mod:`canopy.io.outputs`: the
zone's lattice continues across cells, so a mosaic has origins and no counts), so
``canopy evaluate`` measures the edge error of a mosaic as of one raster.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform_bounds

from canopy.io import outputs
from canopy.io.cog import write_cog
from canopy.io.qml import write_qml
from canopy.predict.manifest import ood_unlike_share

OVERVIEW_MAX_PX = 16384


def _done(manifest) -> list[dict]:
    return sorted((r for r in manifest.records.values() if r.get("status") == "done"),
                  key=lambda r: r["id"])


def _cell_grid(out_dir: Path, records: list[dict], clip=None):
    """Union bounds and profile of a list of same-CRS cells; with ``clip`` (bounds on the same
    pixel lattice) the union is cut to it, so an AOI far smaller than a cell gives a mosaic of
    the AOI, not of 4096² px of nodata."""
    bounds = []
    for r in records:
        with rasterio.open(out_dir / r["path"]) as ds:
            bounds.append(ds.bounds)
            profile = ds.profile
            descriptions = ds.descriptions
    left = min(b.left for b in bounds)
    bottom = min(b.bottom for b in bounds)
    right = max(b.right for b in bounds)
    top = max(b.top for b in bounds)
    if clip is not None:
        cl, cb, cr, ct = clip
        if max(left, cl) < min(right, cr) and max(bottom, cb) < min(top, ct):
            left, bottom, right, top = max(left, cl), max(bottom, cb), min(right, cr), min(top, ct)
    return (left, bottom, right, top), profile, descriptions


def aoi_extent(area, epsg: int, gsd: float) -> tuple[float, float, float, float]:
    """The AOI's bounds in UTM ``epsg``, snapped outward to the ``gsd`` pixel lattice."""
    from canopy.predict.grid import project_geometry

    left, bottom, right, top = project_geometry(area.geometry, epsg).bounds
    return (_snap(left, gsd, False), _snap(bottom, gsd, False), _snap(right, gsd, True),
            _snap(top, gsd, True))


def _nodata_xml(nodata) -> str:
    if nodata is None:
        return ""
    return "nan" if isinstance(nodata, float) and math.isnan(nodata) else f"{nodata:g}"


# tags that describe the whole run; the others (sources, dates, cell, tile counts) are per cell
RUN_TAGS = (outputs.SOFTWARE, outputs.MODEL, outputs.MODEL_VERSION, outputs.MODEL_SOURCE,
            outputs.MODEL_LICENCE, outputs.MODEL_TRAINED, outputs.GSD, outputs.PRECISION, outputs.GEDI_CORRECTION)


def mosaic_tags(out_dir: Path, records: list[dict], left: float, top: float) -> dict[str, str]:
    """The run's model tags and the tile lattice in the pixels of a mosaic whose upper-left
    corner is (left, top): tiles start at multiples of the stride in the zone's global grid."""
    with rasterio.open(out_dir / records[0]["path"]) as ds:
        tags, res = ds.tags(), ds.transform.a
    meta = {k: tags[k] for k in RUN_TAGS if k in tags}
    cell = outputs.TileLattice.from_tags(tags)
    if cell is not None:
        row0, col0 = int(round(-top / res)), int(round(left / res))
        meta.update(outputs.TileLattice(cell.size, cell.stride, origin_col=(-col0) % cell.stride,
                                        origin_row=(-row0) % cell.stride).tags())
    return meta


def write_vrt(out_dir: Path, records: list[dict], vrt_path: Path, overview: Path | None = None,
              clip=None) -> Path:
    """A VRT over same-CRS cells (written by hand: rasterio has no buildvrt and the cells sit on
    one pixel lattice, so each source is a plain offset copy), cut to ``clip`` when given."""
    (left, bottom, right, top), profile, descriptions = _cell_grid(out_dir, records, clip)
    res = profile["transform"].a
    metadata = "".join(f'<MDI key="{escape(k)}">{escape(v)}</MDI>'
                       for k, v in mosaic_tags(out_dir, records, left, top).items())
    width = int(round((right - left) / res))
    height = int(round((top - bottom) / res))
    crs = CRS.from_user_input(profile["crs"])
    nod = _nodata_xml(profile["nodata"])
    bands = []
    for b in range(1, profile["count"] + 1):
        sources = []
        for r in records:
            with rasterio.open(out_dir / r["path"]) as ds:
                xoff = int(round((ds.bounds.left - left) / res))
                yoff = int(round((top - ds.bounds.top) / res))
                w, h = ds.width, ds.height
            # the part of the cell inside the mosaic's extent
            sx, sy = max(0, -xoff), max(0, -yoff)
            dx, dy = max(0, xoff), max(0, yoff)
            cw, ch = min(w - sx, width - dx), min(h - sy, height - dy)
            if cw <= 0 or ch <= 0:
                continue
            rel = os.path.relpath(out_dir / r["path"], vrt_path.parent)
            sources.append(
                f'    <ComplexSource><SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>'
                f"<SourceBand>{b}</SourceBand>"
                f'<SrcRect xOff="{sx}" yOff="{sy}" xSize="{cw}" ySize="{ch}"/>'
                f'<DstRect xOff="{dx}" yOff="{dy}" xSize="{cw}" ySize="{ch}"/>'
                f"<NODATA>{nod}</NODATA></ComplexSource>"
            )
        ov = ""
        if overview is not None:
            rel_ov = os.path.relpath(overview, vrt_path.parent)
            ov = (f'    <Overview><SourceFilename relativeToVRT="1">{escape(rel_ov)}</SourceFilename>'
                  f"<SourceBand>{b}</SourceBand></Overview>\n")
        bands.append(
            f'  <VRTRasterBand dataType="{_gdal_type(profile["dtype"])}" band="{b}">\n'
            f"    <NoDataValue>{nod}</NoDataValue>\n"
            f"    <Description>{escape(descriptions[b - 1] or '')}</Description>\n"
            f"    <UnitType>{outputs.band_units([descriptions[b - 1]])[0]}</UnitType>\n{ov}" + "\n".join(sources) + "\n  </VRTRasterBand>"
        )
    xml = (
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">\n'
        f"  <SRS>{escape(crs.to_wkt())}</SRS>\n"
        f"  <GeoTransform>{left!r}, {res!r}, 0, {top!r}, 0, {-res!r}</GeoTransform>\n"
        f"  <Metadata>{metadata}</Metadata>\n"
        + "\n".join(bands) + "\n</VRTDataset>\n"
    )
    tmp = vrt_path.with_name(f".{vrt_path.name}.partial")
    tmp.write_text(xml)
    os.replace(tmp, vrt_path)
    return vrt_path


def _gdal_type(dtype: str) -> str:
    return {"float32": "Float32", "uint8": "Byte"}[dtype]


def _snap(value: float, step: float, up: bool) -> float:
    """Floor/ceil ``value`` to a multiple of ``step``, forgiving float noise (1e-6 step)."""
    q = value / step
    return (math.ceil(q - 1e-6) if up else math.floor(q + 1e-6)) * step


def overview_grid(out_dir: Path, records: list[dict], epsg: int, gsd: float,
                  extent: tuple[float, float, float, float] | None = None):
    """(transform, width, height, factor) of the overview. With ``extent`` (a VRT's own bounds)
    the overview covers exactly that extent, as GDAL assumes of an overview; otherwise the union
    of the cells in EPSG ``epsg`` snapped outward to the model's pixel lattice."""
    if extent is None:
        boxes = []
        for r in records:
            with rasterio.open(out_dir / r["path"]) as ds:
                boxes.append(transform_bounds(ds.crs, f"EPSG:{epsg}", *ds.bounds, densify_pts=21))
        extent = (_snap(min(b[0] for b in boxes), gsd, False), _snap(min(b[1] for b in boxes), gsd, False),
                  _snap(max(b[2] for b in boxes), gsd, True), _snap(max(b[3] for b in boxes), gsd, True))
    left, bottom, right, top = extent
    factor = 16
    while max(right - left, top - bottom) / (gsd * factor) > OVERVIEW_MAX_PX:
        factor *= 2
    width = max(1, round((right - left) / (gsd * factor)))
    height = max(1, round((top - bottom) / (gsd * factor)))
    # pixel size chosen so the overview spans the extent exactly (≈ gsd × factor)
    transform = Affine((right - left) / width, 0, left, 0, -(top - bottom) / height, top)
    return transform, width, height, factor


def write_overview(out_dir: Path, records: list[dict], epsg: int, gsd: float,
                   extent: tuple[float, float, float, float] | None = None) -> Path:
    """Average every cell into one coarse COG in EPSG ``epsg`` (cells of other zones reprojected).

    Each cell is read from its own overviews at about the target resolution and reprojected into
    its own window of the overview grid only: the cost grows with the number of cells, not with
    cells × overview size.
    """
    transform, width, height, factor = overview_grid(out_dir, records, epsg, gsd, extent)
    with rasterio.open(out_dir / records[0]["path"]) as ds:
        dtype, nodata, count, descriptions = ds.dtypes[0], ds.nodata, ds.count, ds.descriptions
    acc = np.zeros((count, height, width), np.float64)
    wsum = np.zeros((count, height, width), np.float64)
    inv = ~transform
    for r in records:
        with rasterio.open(out_dir / r["path"]) as ds:
            b = transform_bounds(ds.crs, f"EPSG:{epsg}", *ds.bounds, densify_pts=21)
            c0, r0 = inv * (b[0], b[3])
            c1, r1 = inv * (b[2], b[1])
            c0, r0 = max(0, int(math.floor(c0)) - 1), max(0, int(math.floor(r0)) - 1)
            c1, r1 = min(width, int(math.ceil(c1)) + 1), min(height, int(math.ceil(r1)) + 1)
            if c1 <= c0 or r1 <= r0:
                continue
            win_t = transform @ Affine.translation(c0, r0)
            shape = (max(1, ds.height // factor), max(1, ds.width // factor))
            src = ds.read(out_shape=(count, *shape), resampling=Resampling.average, masked=True)
            src = src.astype(np.float32)  # uint8 cells: NaN marks nodata while averaging
            src_t = ds.transform @ Affine.scale(ds.width / shape[1], ds.height / shape[0])
            for band in range(count):
                dst = np.full((r1 - r0, c1 - c0), np.nan, np.float32)
                reproject(src[band].filled(np.nan), dst, src_transform=src_t, src_crs=ds.crs,
                          dst_transform=win_t, dst_crs=f"EPSG:{epsg}", src_nodata=np.nan,
                          dst_nodata=np.nan, resampling=Resampling.average)
                ok = np.isfinite(dst)
                acc[band, r0:r1, c0:c1][ok] += dst[ok]
                wsum[band, r0:r1, c0:c1][ok] += 1
    with np.errstate(invalid="ignore"):
        mean = np.where(wsum > 0, acc / np.maximum(wsum, 1), np.nan)
    if dtype == "uint8":
        data = np.where(np.isfinite(mean), np.clip(np.rint(mean), 0, 254), nodata).astype(np.uint8)
    else:
        data = mean.astype(np.float32)
    names = [d or outputs.HEIGHT_BAND for d in descriptions]
    return write_cog(out_dir / "overview.tif", data, crs=f"EPSG:{epsg}", transform=transform,
                     nodata=nodata, descriptions=names, units=outputs.band_units(names), tags={outputs.OVERVIEW_FACTOR: str(factor)},
                     overwrite=True)


def write_gti(out_dir: Path, records: list[dict], epsg: int, gsd: float, overview: Path) -> Path:
    """GDAL tile index (GPKG) over cells of any CRS, in EPSG ``epsg``, with the overview COG."""
    import geopandas as gpd
    from shapely.geometry import box

    rows = []
    for r in records:
        with rasterio.open(out_dir / r["path"]) as ds:
            b = transform_bounds(ds.crs, f"EPSG:{epsg}", *ds.bounds, densify_pts=21)
            dtype, nodata, count = ds.dtypes[0], ds.nodata, ds.count
        rows.append({"location": r["path"], "cell": r["id"], "geometry": box(*b)})
    # the index's own pixel grid must sit on the main zone's pixel lattice, or every pixel of
    # the layer is resampled; GTI derives it from MINX..MAXY
    minx = _snap(min(row["geometry"].bounds[0] for row in rows), gsd, False)
    miny = _snap(min(row["geometry"].bounds[1] for row in rows), gsd, False)
    maxx = _snap(max(row["geometry"].bounds[2] for row in rows), gsd, True)
    maxy = _snap(max(row["geometry"].bounds[3] for row in rows), gsd, True)
    frame = gpd.GeoDataFrame(rows, crs=f"EPSG:{epsg}")
    path = out_dir / "mosaic.gti.gpkg"
    tmp = out_dir / ".mosaic.partial.gti.gpkg"
    tmp.unlink(missing_ok=True)
    meta = {"LOCATION_FIELD": "location", "RESX": repr(gsd), "RESY": repr(gsd),
            "BAND_COUNT": str(count), "DATA_TYPE": _gdal_type(dtype),
            "NODATA": _nodata_xml(nodata), "SRS": f"EPSG:{epsg}",
            "MINX": repr(minx), "MINY": repr(miny), "MAXX": repr(maxx), "MAXY": repr(maxy),
            # GDAL resolves a relative overview path against the working folder, not the index:
            # an absolute path keeps the overview when QGIS opens the index from anywhere
            "OVERVIEW_0_DATASET": str(overview.resolve())}
    frame.to_file(tmp, layer="tiles", driver="GPKG", layer_metadata=meta)
    os.replace(tmp, path)
    return path


def write_stac(out_dir: Path, records: list[dict], run: dict, area) -> Path:
    import datetime as dt

    import pystac
    from shapely.geometry import box, mapping

    stac_dir = out_dir / "stac"
    collection = pystac.Collection(
        id=f"canopy-height-{run['aoi_sha256'][:12]}",
        description=f"Canopy height (m) over {area.name}, model {run['model']}, "
                    f"{run['gsd']} m GSD, {run['dtype']}",
        extent=pystac.Extent(pystac.SpatialExtent([list(area.geometry.bounds)]),
                             pystac.TemporalExtent([[None, None]])),
        # the map inherits the imagery's terms, which we cannot know (Maxar is commercial)
        license="other",
    )
    dates = []
    for r in records:
        with rasterio.open(out_dir / r["path"]) as ds:
            west, south, east, north = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)
            shape, transform, bounds = [ds.height, ds.width], list(ds.transform)[:6], list(ds.bounds)
        start, end = r.get("datetime_start"), r.get("datetime_end")
        props = {
            "gsd": run["gsd"], "proj:code": f"EPSG:{r['epsg']}", "proj:shape": shape,
            "proj:transform": transform, "proj:bbox": bounds,
            "canopy:model": run["model"], "canopy:model_version": run.get("model_version"),
            "canopy:model_sha256": run["model_sha256"],
            "canopy:cell": r["id"], "canopy:software": run["software"],
            "canopy:source_scenes": [Path(s).name for s in r.get("sources", [])],
            # remote imagery: the STAC items each cell was made from (provenance per cell)
            **({"canopy:source_items": r["items"]} if r.get("items") else {}),
        }
        created = _parse_date(run.get("created")) or dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
        props["created"] = created.isoformat()  # when the map was made (STAC common metadata)
        parsed = [_parse_date(d) for d in (start, end)]
        if all(parsed):
            # the time of the map is the imagery's: its acquisition dates (tags, catalog or file
            # name, canopy.predict.sources.acquisition_text), as users of released maps ask for
            props["start_datetime"] = parsed[0].isoformat()
            props["end_datetime"] = max(parsed[1], parsed[0]).isoformat()
            dates += parsed
            when = None
        else:  # STAC needs a time: the run's, said to be no acquisition date
            when = created
            props["canopy:acquisition_date"] = "unknown"
        item = pystac.Item(id=r["id"], geometry=mapping(box(west, south, east, north)),
                           bbox=[west, south, east, north], datetime=when, properties=props)
        item.add_asset("data", pystac.Asset(
            href=os.path.relpath(out_dir / r["path"], stac_dir / r["id"]),
            media_type=pystac.MediaType.COG, roles=["data"], title="canopy height (m)"))
        collection.add_item(item)
    if dates:
        collection.extent.temporal = pystac.TemporalExtent([[min(dates), max(dates)]])
    collection.normalize_hrefs(str(stac_dir))
    collection.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return stac_dir / "collection.json"


def _parse_date(text):
    import datetime as dt

    if not text:
        return None
    for fmt in ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d",
                "%Y:%m:%d %H:%M:%S"):
        try:
            d = dt.datetime.strptime(text, fmt)
            return d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)
        except ValueError:
            continue
    return None


def finish_outputs(out_dir: Path, manifest, run: dict, area, skipped_scenes=()) -> Path | None:
    """Mosaic, overview, STAC and style for the finished cells; returns the main mosaic path.
    ``skipped_scenes`` (imagery left out by ``--skip-bad-scenes``) go into summary.json."""
    records = _done(manifest)
    if not records:
        return None
    by_zone = Counter(r["epsg"] for r in records)
    main_epsg = by_zone.most_common(1)[0][0]
    # mosaics cover the AOI's bounds, not whole cells beyond it
    clip = {epsg: aoi_extent(area, epsg, run["gsd"]) for epsg in by_zone}
    if len(by_zone) == 1:
        # one zone: the overview spans exactly the VRT's extent, as GDAL assumes of an overview
        extent, _, _ = _cell_grid(out_dir, records, clip[main_epsg])
        overview = write_overview(out_dir, records, main_epsg, run["gsd"], extent)
        write_vrt(out_dir, records, out_dir / f"mosaic_{main_epsg}.vrt", overview, clip[main_epsg])
        main = write_vrt(out_dir, records, out_dir / "mosaic.vrt", overview, clip[main_epsg])
    else:
        # several zones: the overview (main zone's CRS, all cells) belongs to the GTI only; the
        # per-zone VRTs cover other extents and get none rather than a misregistered one
        overview = write_overview(out_dir, records, main_epsg, run["gsd"])
        for epsg in by_zone:
            write_vrt(out_dir, [r for r in records if r["epsg"] == epsg],
                      out_dir / f"mosaic_{epsg}.vrt", clip=clip[epsg])
        main = write_gti(out_dir, records, main_epsg, run["gsd"], overview)
    nodata = outputs.nodata_for(run["dtype"])
    for target in (main, overview, *(out_dir / f"mosaic_{e}.vrt" for e in by_zone)):
        write_qml(_qml_path(target), nodata=nodata, dtype=run["dtype"])
    write_stac(out_dir, records, run, area)
    summary = {"cells_done": len(records), "zones": sorted(by_zone), "mosaic": main.name,
               "skipped_scenes": list(skipped_scenes),
               # share of the mapped pixels unlike the model's training data (canopy.model.ood)
               "ood_unlike_share": ood_unlike_share(records),
               "overview": overview.name}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return main


def _qml_path(p: Path) -> Path:
    # QGIS looks for the layer's file name with its last suffix replaced by .qml
    return p.with_suffix(".qml")
