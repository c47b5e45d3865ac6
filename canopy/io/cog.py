"""The one Cloud Optimized GeoTIFF writer every output of the project goes through.

Profile (docs/geo_conventions.md): GDAL's COG driver via ``rasterio.shutil.copy``, 512-pixel
internal tiles, DEFLATE with predictor 3 for floats (2 for integers), overviews resampled with
AVERAGE (the driver's default, CUBIC, rings below zero on height edges), embedded statistics,
band description and unit, and a QGIS ``.qml`` style next to the file. Files are written under a
temporary name in the destination folder and renamed, so a killed run never leaves a file that
looks finished.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.io import MemoryFile

from canopy.errors import OutputError, OutputExistsError
from canopy.io.qml import write_qml

COG_BLOCKSIZE = 512


def _tmp_name(path: Path) -> Path:
    # Same folder so os.replace is an atomic rename; a dot-prefix keeps it out of globs like *.tif.
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")


def check_output_path(path: str | os.PathLike, overwrite: bool, create: bool = True) -> Path:
    """Refuse an existing output unless ``overwrite``; make sure its folder exists (``create``)."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise OutputError(f"output '{path}' is a folder, expected a file name ending in .tif")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output '{path}' already exists")
    if not create:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder '{path.parent}': {exc.strerror}") from None
    return path


def write_cog(
    path: str | os.PathLike,
    data: np.ndarray,
    *,
    crs,
    transform,
    nodata: float | int | None,
    descriptions: Sequence[str] = ("canopy_height",),
    units: Sequence[str] | str = "m",
    tags: Mapping[str, str] | None = None,
    compress: str = "DEFLATE",
    overwrite: bool = False,
    qml: bool = True,
    qml_range: tuple[float, float] = (0.0, 40.0),
) -> Path:
    """Write ``data`` (H×W or C×H×W) as a COG at ``path``; returns the path.

    The array's dtype is kept (float32 or uint8 in practice). Band 1 gets the first description,
    and so on. ``units`` is one unit for all bands or one per band.
    """
    path = check_output_path(path, overwrite)
    arr = np.asarray(data)
    if arr.ndim == 2:
        arr = arr[None]
    count, height, width = arr.shape
    if isinstance(units, str):
        units = [units] * count
    if len(descriptions) != count or len(units) != count:
        raise ValueError("one description and one unit per band")
    is_float = np.issubdtype(arr.dtype, np.floating)
    predictor = 3 if is_float else 2

    tmp = _tmp_name(path)
    profile = dict(
        driver="GTiff", width=width, height=height, count=count, dtype=arr.dtype.name,
        crs=crs, transform=transform, nodata=nodata,
    )
    try:
        with MemoryFile() as mem:
            with mem.open(**profile) as src:
                src.write(arr)
                for i in range(count):
                    src.set_band_description(i + 1, descriptions[i])
                src.units = tuple(units)
                src.update_tags(AREA_OR_POINT="Area", **dict(tags or {}))
            with mem.open() as src:
                rasterio.shutil.copy(
                    src, tmp, driver="COG",
                    BLOCKSIZE=COG_BLOCKSIZE, COMPRESS=compress, PREDICTOR=predictor,
                    OVERVIEWS="AUTO", OVERVIEW_RESAMPLING="AVERAGE", RESAMPLING="AVERAGE",
                    STATISTICS="YES", BIGTIFF="IF_SAFER", NUM_THREADS="1",
                )
        if qml:
            write_qml(path.with_suffix(".qml"), vmin=qml_range[0], vmax=qml_range[1],
                      nodata=nodata, dtype=arr.dtype.name)
        with open(tmp, "rb") as f:  # on disk before the name says it is finished
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def cog_problems(path: str | os.PathLike) -> list[str]:
    """Errors ``rio cogeo validate`` reports for ``path`` (empty list = valid COG)."""
    from rio_cogeo.cogeo import cog_validate

    valid, errors, _warnings = cog_validate(str(path), quiet=True)
    return [] if valid else list(errors)
