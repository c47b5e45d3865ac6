"""``canopy predict`` for one raster: read → model grid → blended tiles → COG."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import canopy
from canopy.errors import InputError, OutputError
from canopy.io.cog import check_output_path, write_cog
from canopy.io.imagery import read_rgb_on_grid
from canopy.predict.blend import count_tiles, default_stride, predict_array, tile_starts

DTYPES = ("float32", "uint8")
UINT8_NODATA = 255


@dataclass
class PredictOptions:
    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int = 8
    dtype: str = "float32"
    uncertainty: bool = False
    overwrite: bool = False
    bands: str | None = None
    crs: str | None = None
    scale: tuple[float, float] | None = None
    stride: int | None = None
    progress: bool = True
    gedi_correction: str | None = None  # folder of a fitted GEDI correction model
    lanes: int | None = None  # CPU batches run at once (blend.lane_plan; None: auto)


def resolve_device(device: str) -> torch.device:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"--device must be cpu or cuda, got '{device}'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available on this machine")
    if device.startswith("cuda:"):
        try:
            index = int(device.split(":", 1)[1])
        except ValueError:
            raise InputError(f"--device '{device}': expected cuda:N") from None
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(device)


def to_output_dtype(height: np.ndarray, dtype: str) -> tuple[np.ndarray, float | int]:
    """float32 metres with NaN nodata, or uint8 whole metres with nodata 255 (as the Meta maps)."""
    if dtype == "float32":
        return height.astype(np.float32), float("nan")
    if dtype == "uint8":
        out = np.full(height.shape, UINT8_NODATA, np.uint8)
        ok = np.isfinite(height)
        out[ok] = np.clip(np.rint(height[ok]), 0, UINT8_NODATA - 1).astype(np.uint8)
        return out, UINT8_NODATA
    raise InputError(f"--dtype must be one of {DTYPES}, got '{dtype}'")


def output_tags(model, opts: PredictOptions, source: str, resampling: str, stride: int,
                shape: tuple[int, int]) -> dict[str, str]:
    cfg = model.cfg
    return {
        "CANOPY_SOFTWARE": f"canopy-height {canopy.__version__}",
        "CANOPY_MODEL": cfg.name,
        "CANOPY_MODEL_VERSION": cfg.version,
        "CANOPY_MODEL_SOURCE": cfg.source,
        "CANOPY_MODEL_TRAINED": str(cfg.trained).lower(),
        "CANOPY_GSD": f"{cfg.gsd:g}",
        "CANOPY_PRECISION": opts.precision,
        "CANOPY_SOURCE_IMAGE": source,
        "CANOPY_RESAMPLING": resampling,
        "CANOPY_TILE_SIZE": str(cfg.tile_size),
        "CANOPY_TILE_STRIDE": str(stride),
        # tiles start at 0, stride, ... (count of them per axis), as blend.tile_starts cuts them
        "CANOPY_TILE_ORIGIN_ROW": "0",
        "CANOPY_TILE_ORIGIN_COL": "0",
        "CANOPY_TILE_COUNT_ROW": str(len(tile_starts(shape[0], cfg.tile_size, stride))),
        "CANOPY_TILE_COUNT_COL": str(len(tile_starts(shape[1], cfg.tile_size, stride))),
    }


def correct_heights(correction, height, spread, rgb, valid, transform, crs, device="cpu",
                    rgb_transform=None):
    """Multiply heights (and their spread) by the GEDI correction's smooth factor field.

    ``correction`` is a path or an already loaded model; ``rgb``/``valid`` may cover a larger
    window (``rgb_transform``) so that cells of a state run get the values a whole-area call would.
    """
    from canopy.predict.correction import factor_field, load_correction

    corr = load_correction(correction, device=device) if isinstance(correction, (str, Path)) else correction
    field = factor_field(transform, height.shape, rgb, crs, corr, valid=valid,
                         rgb_transform=rgb_transform)
    height = (height.astype(np.float64) * field).astype(np.float32)
    if spread is not None:
        spread = (spread.astype(np.float64) * field).astype(np.float32)
    return height, spread


def predict_raster(input_path, output_path, model, opts: PredictOptions | None = None) -> Path:
    """Predict canopy height for one GDAL-readable RGB raster and write a COG (+ .qml)."""
    opts = opts or PredictOptions()
    if opts.dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {DTYPES}, got '{opts.dtype}'")
    output_path = Path(output_path)
    if Path(input_path).resolve() == output_path.resolve():
        raise OutputError("output path is the input path; choose another -o")
    if not str(output_path).lower().endswith((".tif", ".tiff")):
        raise OutputError(f"output '{output_path}' must end in .tif (a Cloud Optimized GeoTIFF)")
    check_output_path(output_path, opts.overwrite, create=False)  # fail before any compute

    model.prepare_for_inference(opts.precision)
    correction = None
    if opts.gedi_correction:  # load before the long part: a bad path fails at once
        from canopy.predict.correction import load_correction

        correction = load_correction(opts.gedi_correction, device=model.device)
    stride = opts.stride or default_stride(model.cfg.tile_size)
    if not 0 < stride <= model.cfg.tile_size:
        raise InputError(f"--stride must be between 1 and the model tile size "
                         f"{model.cfg.tile_size}, got {stride}")
    img = read_rgb_on_grid(input_path, model.cfg.gsd, bands=opts.bands, crs=opts.crs,
                           scale=opts.scale)
    n_tiles = count_tiles(img.valid, model.cfg.tile_size, stride)
    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=n_tiles, unit="tile", desc=Path(input_path).name, file=sys.stderr,
                   leave=False, disable=None)
    try:
        height, spread = predict_array(
            model, img.rgb, img.valid, precision=opts.precision, batch_size=opts.batch_size,
            with_std=opts.uncertainty, stride=stride, progress=bar.update if bar else None,
            lanes=opts.lanes,
        )
    finally:
        if bar is not None:
            bar.close()

    if correction is not None:
        height, spread = correct_heights(correction, height, spread, img.rgb, img.valid,
                                         img.transform, img.crs)

    data, nodata = to_output_dtype(height, opts.dtype)
    descriptions, bands = ["canopy_height"], [data]
    if spread is not None:
        spread_out, _ = to_output_dtype(spread, opts.dtype)
        bands.append(spread_out)
        descriptions.append("canopy_height_std")
    tags = output_tags(model, opts, Path(input_path).name, img.resampling, stride,
                       img.valid.shape)
    if opts.gedi_correction:
        tags["CANOPY_GEDI_CORRECTION"] = Path(opts.gedi_correction).name
    return write_cog(output_path, np.stack(bands), crs=img.crs, transform=img.transform,
                     nodata=nodata, descriptions=descriptions, units="m", tags=tags,
                     overwrite=opts.overwrite)
