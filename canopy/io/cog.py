"""The one Cloud Optimized GeoTIFF writer every output of the project goes through.

Profile (docs/geo_conventions.md): GDAL's COG driver via ``rasterio.shutil.copy``, 512-pixel
internal tiles, DEFLATE with predictor 3 for floats (2 for integers), overviews resampled with
AVERAGE (the driver's default, CUBIC, rings below zero on height edges), embedded statistics,
band description and unit, and a QGIS ``.qml`` style next to the file. Files are written under a
temporary name in the destination folder and renamed, so a killed run never leaves a file that
looks finished.
"""

from __future__ import annotations

import contextlib
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


#: bytes per output pixel and band of a height COG with its overviews, a little above what was
#: measured (float32 DEFLATE p3: 3.8 B/px on ViT-like output, 2.2–2.6 on NEON CHMs; uint8 0.4–0.6)
COG_BYTES_PER_PIXEL = {"float32": 4.0, "uint8": 0.6}


def estimated_cog_bytes(pixels: int, dtype: str, bands: int = 1) -> int:
    """What a prediction COG of ``pixels`` px takes on disk (for the free-space check)."""
    return int(pixels * bands * COG_BYTES_PER_PIXEL[dtype])


def check_output_path(path: str | os.PathLike, overwrite: bool, create: bool = True) -> Path:
    """Refuse an existing output unless ``overwrite`` and a folder that cannot be written; make
    sure the folder exists (``create``). Checked before any work, so an unwritable place is one
    line at the start, not a traceback after hours of prediction."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise OutputError(f"output '{path}' is a folder, expected a file name ending in .tif")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output '{path}' already exists")
    check_writable(path.parent)
    if not create:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder '{path.parent}': {exc.strerror}") from None
    return path


def _nearest_existing(folder: Path) -> Path:
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable(folder: str | os.PathLike) -> None:
    """Refuse a folder (or, when it does not exist yet, the folder it would be made in) that
    cannot be written: a probe file is created and removed (permissions alone do not tell, e.g.
    on a read-only mount or for root)."""
    where = _nearest_existing(Path(folder))
    if not where.is_dir():
        raise OutputError(f"output folder '{folder}': '{where}' is a file")
    probe = where / f".canopy-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
    except OSError as exc:
        raise OutputError(f"cannot write to '{where}': {exc.strerror or exc}") from None
    probe.unlink(missing_ok=True)


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse to start ``what`` when the disk holding ``folder`` has less than ``needed`` bytes."""
    import shutil

    where = _nearest_existing(Path(folder))
    free = shutil.disk_usage(where).free
    if free < needed:
        raise OutputError(f"{what} needs about {_gb(needed)} on disk, but only {_gb(free)} are "
                          f"free at '{where}'")


def _gb(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size / 10:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


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
    arr = np.asarray(data)
    if arr.ndim == 2:
        arr = arr[None]
    count, height, width = arr.shape
    with cog_writer(path, width=width, height=height, count=count, dtype=arr.dtype.name,
                    crs=crs, transform=transform, nodata=nodata, descriptions=descriptions,
                    units=units, tags=tags, compress=compress, overwrite=overwrite, qml=qml,
                    qml_range=qml_range) as dst:
        dst.write(arr)
    return Path(path)


@contextlib.contextmanager
def cog_writer(path: str | os.PathLike, *, width: int, height: int, count: int, dtype: str,
               crs, transform, nodata: float | int | None, descriptions: Sequence[str],
               units: Sequence[str] | str = "m", tags: Mapping[str, str] | None = None,
               compress: str = "DEFLATE", overwrite: bool = False, qml: bool = True,
               qml_range: tuple[float, float] = (0.0, 40.0), stage_on_disk: bool = False,
               threads: int | str = 1):
    """A writable raster (rasterio dataset) that becomes a COG at ``path`` when the block ends
    without an error; windows may be written in any order (``dst.write(arr, window=...)``).

    The pixels go first to a plain GTiff — in memory, or with ``stage_on_disk`` to a hidden
    file beside the output (for rasters larger than memory: a one-raster map is written window
    by window) — from which GDAL's COG driver builds the tiled, compressed file with overviews.
    The stage holds the same pixels either way, so the COG holds the same pixels (its
    STATISTICS_MEAN tag can differ in the 14th digit: GDAL sums the blocks in another order). Nothing that looks
    finished is left if the block fails or is interrupted.

    ``threads`` is GDAL's ``NUM_THREADS`` for compressing (an int or ``ALL_CPUS``): the bytes
    do not depend on it. One by default, for callers that write many files at once.
    """
    path = check_output_path(path, overwrite)
    if isinstance(units, str):
        units = [units] * count
    if len(descriptions) != count or len(units) != count:
        raise ValueError("one description and one unit per band")
    predictor = 3 if np.issubdtype(np.dtype(dtype), np.floating) else 2
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=dtype,
                   crs=crs, transform=transform, nodata=nodata)
    tmp = _tmp_name(path)
    stage = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.stage.tif")
    mem = None
    try:
        if stage_on_disk:
            # tiled so windows land without rewriting strips; light compression: it is read once
            dst = rasterio.open(stage, "w", **profile, tiled=True, blockxsize=COG_BLOCKSIZE,
                                blockysize=COG_BLOCKSIZE, compress="DEFLATE", zlevel=1,
                                predictor=predictor, BIGTIFF="IF_SAFER", NUM_THREADS=str(threads))
        else:
            mem = MemoryFile()
            dst = mem.open(**profile)
        with dst:
            for i in range(count):
                dst.set_band_description(i + 1, descriptions[i])
            dst.units = tuple(units)
            dst.update_tags(AREA_OR_POINT="Area", **dict(tags or {}))
            yield dst
        with (rasterio.open(stage) if stage_on_disk else mem.open()) as src:
            rasterio.shutil.copy(
                src, tmp, driver="COG",
                BLOCKSIZE=COG_BLOCKSIZE, COMPRESS=compress, PREDICTOR=predictor,
                OVERVIEWS="AUTO", OVERVIEW_RESAMPLING="AVERAGE", RESAMPLING="AVERAGE",
                STATISTICS="YES", BIGTIFF="IF_SAFER", NUM_THREADS=str(threads),
            )
        if qml:
            write_qml(path.with_suffix(".qml"), vmin=qml_range[0], vmax=qml_range[1],
                      nodata=nodata, dtype=dtype)
        with open(tmp, "rb") as f:  # on disk before the name says it is finished
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        stage.unlink(missing_ok=True)
        if mem is not None:
            mem.close()


def cog_problems(path: str | os.PathLike) -> list[str]:
    """Errors ``rio cogeo validate`` reports for ``path`` (empty list = valid COG)."""
    from rio_cogeo.cogeo import cog_validate

    valid, errors, _warnings = cog_validate(str(path), quiet=True)
    return [] if valid else list(errors)
