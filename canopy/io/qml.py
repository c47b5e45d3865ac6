"""QGIS style sidecar (``name.qml``): QGIS loads a same-basename .qml as the layer's default style,
so a canopy-height COG opens with a height colour ramp instead of a grey stretch.

A float raster cannot embed a colour table, hence the sidecar (docs/geo_conventions.md).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from xml.sax.saxutils import escape

#: the one colour ramp of canopy height, low (bare ground) to high (tall canopy), viridis-like;
#: the server's ``canopy`` colormap draws tiles with it
RAMP = ("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725")
#: heights (m) at the ends of the ramp by default
RAMP_RANGE = (0.0, 40.0)


def qml_text(vmin: float = 0.0, vmax: float = 40.0, nodata=None, dtype: str = "float32",
             band: int = 1, label: str = "canopy height (m)") -> str:
    stops = []
    n = len(RAMP)
    for i, colour in enumerate(RAMP):
        value = vmin + (vmax - vmin) * i / (n - 1)
        r, g, b = (int(colour[k:k + 2], 16) for k in (1, 3, 5))
        stops.append(
            f'            <item alpha="255" value="{value:g}" label="{value:g} m" '
            f'color="#{r:02x}{g:02x}{b:02x}"/>'
        )
    nodata_xml = ""
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        nodata_xml = (f'    <noData><noDataList bandNo="{band}" useSrcNoData="1"/></noData>\n')
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.28.0" styleCategories="AllStyleCategories">
  <pipe>
    <provider>
      <resampling enabled="false" zoomedInResamplingMethod="nearestNeighbour" zoomedOutResamplingMethod="nearestNeighbour" maxOversampling="2"/>
    </provider>
    <rasterrenderer type="singlebandpseudocolor" band="{band}" opacity="1" alphaBand="-1" classificationMin="{vmin:g}" classificationMax="{vmax:g}" nodataColor="">
      <rasterTransparency/>
      <minMaxOrigin><limits>None</limits><extent>WholeRaster</extent><statAccuracy>Estimated</statAccuracy></minMaxOrigin>
      <rastershader>
        <colorrampshader colorRampType="INTERPOLATED" classificationMode="1" clip="0" minimumValue="{vmin:g}" maximumValue="{vmax:g}" labelPrecision="0">
          <colorramp type="gradient" name="[source]">
            <Option type="Map">
              <Option name="color1" type="QString" value="{RAMP[0]}"/>
              <Option name="color2" type="QString" value="{RAMP[-1]}"/>
            </Option>
          </colorramp>
{chr(10).join(stops)}
        </colorrampshader>
      </rastershader>
    </rasterrenderer>
{nodata_xml}  </pipe>
  <customproperties><Option type="Map"><Option name="canopy:legend" type="QString" value="{escape(label)}"/><Option name="canopy:dtype" type="QString" value="{dtype}"/></Option></customproperties>
  <blendMode>0</blendMode>
</qgis>
"""


def write_qml(path: str | os.PathLike, **kwargs) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(qml_text(**kwargs))
    os.replace(tmp, path)
    return path
