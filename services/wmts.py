"""OGC WMTS 1.0.0 GetCapabilities (RESTful) of a layer on WebMercatorQuad, which QGIS and
ArcGIS read to add the layer as a tiled map. The tile matrices come from morecantile."""

from __future__ import annotations

from xml.sax.saxutils import escape, quoteattr

from services.layers import WEB_MERCATOR, Layer


def capabilities(layer: Layer, base: str, query: str) -> str:
    west, south, east, north = layer.bounds_ll
    matrices = []
    for z in range(0, layer.maxzoom + 1):
        m = WEB_MERCATOR.matrix(z)
        x0, y0 = m.pointOfOrigin
        matrices.append(
            f"<TileMatrix><ows:Identifier>{z}</ows:Identifier>"
            f"<ScaleDenominator>{m.scaleDenominator!r}</ScaleDenominator>"
            f"<TopLeftCorner>{x0!r} {y0!r}</TopLeftCorner>"
            f"<TileWidth>{m.tileWidth}</TileWidth><TileHeight>{m.tileHeight}</TileHeight>"
            f"<MatrixWidth>{m.matrixWidth}</MatrixWidth><MatrixHeight>{m.matrixHeight}</MatrixHeight>"
            f"</TileMatrix>")
    limits = []
    for z in range(layer.minzoom, layer.maxzoom + 1):
        tiles = list(WEB_MERCATOR.tiles(west, south, east, north, [z])) if z <= 12 else None
        if tiles:
            xs, ys = [t.x for t in tiles], [t.y for t in tiles]
        else:
            ul, lr = WEB_MERCATOR.tile(west, north, z), WEB_MERCATOR.tile(east, south, z)
            xs, ys = [ul.x, lr.x], [ul.y, lr.y]
        limits.append(
            f"<TileMatrixLimits><TileMatrix>{z}</TileMatrix><MinTileRow>{min(ys)}</MinTileRow>"
            f"<MaxTileRow>{max(ys)}</MaxTileRow><MinTileCol>{min(xs)}</MinTileCol>"
            f"<MaxTileCol>{max(xs)}</MaxTileCol></TileMatrixLimits>")
    template = f"{base}/layers/{layer.id}/tiles/{{TileMatrix}}/{{TileCol}}/{{TileRow}}.png{query}"
    title = escape(f"canopy height (m): {layer.id}")
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Capabilities xmlns="http://www.opengis.net/wmts/1.0" xmlns:ows="http://www.opengis.net/ows/1.1"
 xmlns:xlink="http://www.w3.org/1999/xlink" version="1.0.0">
<ows:ServiceIdentification><ows:Title>canopy-height server</ows:Title>
<ows:ServiceType>OGC WMTS</ows:ServiceType><ows:ServiceTypeVersion>1.0.0</ows:ServiceTypeVersion>
</ows:ServiceIdentification>
<Contents>
<Layer><ows:Title>{title}</ows:Title><ows:Identifier>{escape(layer.id)}</ows:Identifier>
<ows:WGS84BoundingBox crs="urn:ogc:def:crs:OGC:2:84"><ows:LowerCorner>{west!r} {south!r}</ows:LowerCorner>
<ows:UpperCorner>{east!r} {north!r}</ows:UpperCorner></ows:WGS84BoundingBox>
<Style isDefault="true"><ows:Identifier>default</ows:Identifier></Style>
<Format>image/png</Format>
<TileMatrixSetLink><TileMatrixSet>WebMercatorQuad</TileMatrixSet><TileMatrixSetLimits>{"".join(limits)}</TileMatrixSetLimits></TileMatrixSetLink>
<ResourceURL format="image/png" resourceType="tile" template={quoteattr(template)}/>
</Layer>
<TileMatrixSet><ows:Identifier>WebMercatorQuad</ows:Identifier>
<ows:SupportedCRS>urn:ogc:def:crs:EPSG::3857</ows:SupportedCRS>
<WellKnownScaleSet>urn:ogc:def:wkss:OGC:1.0:GoogleMapsCompatible</WellKnownScaleSet>
{"".join(matrices)}
</TileMatrixSet>
</Contents>
<ServiceMetadataURL xlink:href={quoteattr(f"{base}/layers/{layer.id}/WMTSCapabilities.xml")}/>
</Capabilities>
"""
