"""STAC export and import with pystac: a round trip, and ItemCollections written by others."""

from __future__ import annotations

import json
import shutil

import pystac
import pytest
from shapely.geometry import box, mapping

from data_catalog.catalog import Catalog
from data_catalog.errors import CatalogError
from data_catalog.imagery import NonSquarePixelWarning
from data_catalog.stac import export_stac, import_stac


@pytest.fixture
def mixed_catalog(shared_data, catalog_path) -> Catalog:
    catalog = Catalog.open(catalog_path)
    with pytest.warns(NonSquarePixelWarning):
        catalog.add("imagery", [shared_data.sjer_rgb])
    catalog.add("chm", [shared_data.osbs_tile_chm])  # flight date range in its tags
    catalog.add("chm", [shared_data.duc_chm], crs="EPSG:31981")  # CRS only in the catalog
    return catalog


def test_export_writes_one_item_per_asset_with_projection_and_raster_fields(mixed_catalog, tmp_path):
    collection_path = export_stac(mixed_catalog, tmp_path / "stac")
    collection = pystac.Collection.from_file(str(collection_path))
    items = {item.id: item for item in collection.get_items(recursive=True)}
    assert set(items) == set(mixed_catalog.frame["asset_id"])

    rows = {r.asset_id: r for r in mixed_catalog.records()}
    osbs = next(i for i in items.values() if "OSBS" in i.assets["data"].href)
    assert osbs.datetime is None
    assert osbs.common_metadata.start_datetime.isoformat() == "2018-09-15T13:00:00+00:00"
    assert osbs.common_metadata.end_datetime.isoformat() == "2018-10-12T15:00:00+00:00"
    assert osbs.properties["proj:code"] == "EPSG:32617"
    assert osbs.properties["proj:shape"] == [1000, 1000]
    assert osbs.properties["proj:transform"] == [1.0, 0.0, 399000.0, 0.0, -1.0, 3285000.0]
    assert osbs.common_metadata.gsd == 1.0
    asset = osbs.assets["data"]
    assert asset.media_type == pystac.MediaType.GEOTIFF
    assert asset.extra_fields["raster:bands"][0]["data_type"] == "float32"
    assert asset.extra_fields["raster:bands"][0]["nodata"] == -9999.0
    assert asset.extra_fields["raster:bands"][0]["unit"] == "m"
    assert osbs.bbox == pytest.approx(list(rows[osbs.id].geometry.bounds))

    duc = next(i for i in items.values() if "DUC" in i.assets["data"].href)
    assert duc.properties["proj:code"] == "EPSG:31981"
    assert duc.properties["canopy:datetime_source"] == "catalogued"  # no date known
    assert duc.assets["data"].extra_fields["raster:bands"][0]["nodata"] == "nan"
    summaries = collection.summaries.to_dict()
    assert summaries["canopy:kind"] == ["chm", "imagery"]
    assert summaries["proj:code"] == ["EPSG:31981", "EPSG:32611", "EPSG:32617"]
    assert summaries["gsd"] == [0.1, 1.0]
    extent = collection.extent.temporal.intervals[0]
    assert [t.isoformat() for t in extent] == ["2018-09-15T13:00:00+00:00", "2018-10-12T15:00:00+00:00"]


def test_round_trip_keeps_ids_kinds_crs_dates_and_footprints(mixed_catalog, tmp_path):
    collection_path = export_stac(mixed_catalog, tmp_path / "stac")
    imported = Catalog.open(tmp_path / "imported.parquet")
    with pytest.warns(NonSquarePixelWarning):
        written = import_stac(collection_path, imported)
    assert len(written) == len(mixed_catalog) == 3

    before = {r.asset_id: r for r in mixed_catalog.records()}
    for after in imported.records():
        original = before[after.asset_id]
        assert (after.kind, after.path, after.crs, after.checksum) == (original.kind, original.path, original.crs, original.checksum)
        assert (after.datetime, after.start_datetime, after.end_datetime) == (
            original.datetime, original.start_datetime, original.end_datetime,
        )
        assert after.geometry.equals_exact(original.geometry, 1e-9)
        assert after.extra_dict["stac_item"] == after.asset_id
    with pytest.warns(NonSquarePixelWarning):
        assert import_stac(collection_path, imported) == []  # importing again changes nothing


def test_item_collection_with_relative_and_remote_hrefs(shared_data, tmp_path, catalog_path):
    local = tmp_path / "scenes" / "plot.tif"
    local.parent.mkdir()
    shutil.copy(shared_data.osbs_plot_rgb, local)
    footprint = box(-81.9901, 29.6923, -81.9897, 29.6927)

    def item(item_id, assets, **properties):
        return {
            "type": "Feature", "stac_version": "1.1.0", "id": item_id, "geometry": mapping(footprint),
            "bbox": list(footprint.bounds), "properties": {"datetime": "2018-05-01T15:30:00Z", **properties},
            "links": [], "assets": assets,
        }

    document = {
        "type": "FeatureCollection",
        "features": [
            item("local", {"thumbnail": {"href": "scenes/plot.png", "type": "image/png", "roles": ["thumbnail"]},
                           "visual": {"href": "scenes/plot.tif", "type": "image/tiff; application=geotiff"}}),
            item("remote", {"data": {"href": "https://example.com/scene.tif", "type": "image/tiff; application=geotiff",
                                     "raster:bands": [{"data_type": "uint8", "nodata": 0}] * 3}},
                 **{"proj:code": "EPSG:32617", "proj:shape": [400, 400], "gsd": 0.1,
                    "proj:transform": [0.1, 0, 404211.9, 0, -0.1, 3285142.9]}),
            item("rio-stac-style", {"data": {"href": "https://example.com/legacy.tif", "type": "image/tiff"}},
                 **{"proj:epsg": 32611}),  # projection extension v1.1, as rio-stac writes it
            item("metadata-only", {"meta": {"href": "scenes/plot.json", "type": "application/json"}}),
        ],
    }
    stac_json = tmp_path / "items.json"
    stac_json.write_text(json.dumps(document))

    catalog = Catalog.open(catalog_path)
    with pytest.warns(UserWarning, match="'metadata-only' has no raster asset"):
        rows = {r.extra_dict["stac_item"]: r for r in import_stac(stac_json, catalog)}
    assert set(rows) == {"local", "remote", "rio-stac-style"}
    assert rows["rio-stac-style"].crs == "EPSG:32611"

    plot = rows["local"]
    assert plot.path == str(local.resolve())  # resolved against the JSON's folder
    assert plot.crs == "EPSG:32617" and plot.width == 400  # described from the file itself
    assert plot.datetime == "2018-05-01T15:30:00Z"  # STAC's date
    assert plot.checksum.startswith("sha256:")

    remote = rows["remote"]
    assert remote.path == "https://example.com/scene.tif"
    assert remote.checksum is None
    assert (remote.crs, remote.width, remote.height, remote.bands, remote.dtype) == ("EPSG:32617", 400, 400, 3, "uint8")
    assert remote.res_x == pytest.approx(0.1)
    assert remote.geometry.equals(footprint)
    assert catalog.check() == []  # URLs are not checked, the local file is fine


def test_bad_stac_inputs_are_one_line_errors(tmp_path, catalog_path):
    with pytest.raises(CatalogError, match="nothing to export"):
        export_stac(Catalog.open(catalog_path), tmp_path / "out")
    not_stac = tmp_path / "x.json"
    not_stac.write_text(json.dumps({"type": "Topology"}))
    with pytest.raises(CatalogError, match="not a STAC"):
        import_stac(not_stac, Catalog.open(catalog_path))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(CatalogError, match="not readable JSON"):
        import_stac(broken, Catalog.open(catalog_path))
    with pytest.raises(CatalogError, match="no such file"):
        import_stac(tmp_path / "missing.json", Catalog.open(catalog_path))
