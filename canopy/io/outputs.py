"""The output contract: what a canopy-height raster says about itself, written in one place.

One-raster prediction and every cell of a state run write their COGs through
:func:`write_prediction` with tags from :func:`prediction_tags`, so both carry the same tag set
(tested); evaluation, the mosaics and the server read tags and bands by the names defined here,
never by re-typed strings. The tags:

* model: ``CANOPY_SOFTWARE``, ``CANOPY_MODEL``, ``CANOPY_MODEL_VERSION``, ``CANOPY_MODEL_SOURCE``,
  ``CANOPY_MODEL_LICENCE`` (the weights' licence, which a map made with them may fall under),
  ``CANOPY_MODEL_TRAINED``, ``CANOPY_GSD``, ``CANOPY_PRECISION``, ``CANOPY_GEDI_CORRECTION``;
* input: ``CANOPY_SOURCE_IMAGES`` (file names, ``;``-separated), ``CANOPY_IMAGERY_DATES``
  (``first/last`` acquisition, or ``unknown``), ``CANOPY_RESAMPLING`` (how imagery reached the
  model's grid: ``none``, ``average``, ``bilinear``, ``nearest``; ``;``-separated when scenes
  differ), ``CANOPY_CELL`` (the grid cell id of a state run, ``none`` for one raster);
* model-tile lattice (:class:`TileLattice`): tiles of ``CANOPY_TILE_SIZE`` px start at
  ``CANOPY_TILE_ORIGIN_ROW/COL + k·CANOPY_TILE_STRIDE`` for k = 0 … ``CANOPY_TILE_COUNT_ROW/COL``
  − 1, in the raster's own pixels (origins may be negative: a cell's first tile starts in its
  halo). A mosaic, whose tiles continue beyond every edge, has no counts.

* out-of-distribution (models that carry a reference, :mod:`canopy.model.ood`):
  ``CANOPY_OOD_UNLIKE_SHARE``, the share of the map's pixels whose tile scores above 1 (unlike
  the training data), written by one-raster prediction and on every cell of a state run (the
  run's share is in its ``summary.json``).

Band 1 is ``canopy_height`` in metres; with uncertainty, band 2 is ``canopy_height_std``; with
``--ood-band``, the last band is ``canopy_ood_score`` (unitless, > 1: unlike the training data).
float32 outputs use NaN as nodata, uint8 outputs whole metres with nodata 255 (as the Meta maps).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

import canopy

HEIGHT_BAND = "canopy_height"
STD_BAND = "canopy_height_std"
UNITS = "m"
UINT8_NODATA = 255

SOFTWARE = "CANOPY_SOFTWARE"
MODEL = "CANOPY_MODEL"
MODEL_VERSION = "CANOPY_MODEL_VERSION"
MODEL_SOURCE = "CANOPY_MODEL_SOURCE"
MODEL_LICENCE = "CANOPY_MODEL_LICENCE"
MODEL_TRAINED = "CANOPY_MODEL_TRAINED"
GSD = "CANOPY_GSD"
PRECISION = "CANOPY_PRECISION"
GEDI_CORRECTION = "CANOPY_GEDI_CORRECTION"
SOURCE_IMAGES = "CANOPY_SOURCE_IMAGES"
IMAGERY_DATES = "CANOPY_IMAGERY_DATES"
RESAMPLING = "CANOPY_RESAMPLING"
CELL = "CANOPY_CELL"
TILE_SIZE = "CANOPY_TILE_SIZE"
TILE_STRIDE = "CANOPY_TILE_STRIDE"
TILE_ORIGIN_ROW = "CANOPY_TILE_ORIGIN_ROW"
TILE_ORIGIN_COL = "CANOPY_TILE_ORIGIN_COL"
TILE_COUNT_ROW = "CANOPY_TILE_COUNT_ROW"
TILE_COUNT_COL = "CANOPY_TILE_COUNT_COL"
OVERVIEW_FACTOR = "CANOPY_OVERVIEW_FACTOR"
OOD_UNLIKE_SHARE = "CANOPY_OOD_UNLIKE_SHARE"
OOD_BAND = "canopy_ood_score"
OOD_UNLIKE = 1.0  # a tile scoring above this is unlike the model's training data

#: every tag a prediction raster (one raster or a cell) carries
PREDICTION_TAGS = (SOFTWARE, MODEL, MODEL_VERSION, MODEL_SOURCE, MODEL_LICENCE, MODEL_TRAINED,
                   GSD, PRECISION, GEDI_CORRECTION, SOURCE_IMAGES, IMAGERY_DATES, RESAMPLING,
                   CELL, TILE_SIZE, TILE_STRIDE, TILE_ORIGIN_ROW, TILE_ORIGIN_COL, TILE_COUNT_ROW,
                   TILE_COUNT_COL)


@dataclass(frozen=True)
class TileLattice:
    """Model tiles of ``size`` px starting at ``origin + k·stride`` along each axis, in the
    raster's own pixels: for k = 0 … ``count`` − 1 when a count is given (one raster: its tiles
    start at its first pixel; a state-run cell: at its first halo tile), for every integer k
    otherwise (a mosaic: the zone's lattice continues across cells)."""

    size: int
    stride: int
    origin_col: int = 0
    origin_row: int = 0
    count_col: int | None = None
    count_row: int | None = None

    def __post_init__(self) -> None:
        if self.size <= 0 or self.stride <= 0:
            raise ValueError("tile size and stride must be positive")

    def tags(self) -> dict[str, str]:
        tags = {TILE_SIZE: str(self.size), TILE_STRIDE: str(self.stride),
                TILE_ORIGIN_ROW: str(self.origin_row), TILE_ORIGIN_COL: str(self.origin_col)}
        if self.count_row is not None:
            tags[TILE_COUNT_ROW] = str(self.count_row)
        if self.count_col is not None:
            tags[TILE_COUNT_COL] = str(self.count_col)
        return tags

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> "TileLattice | None":
        """The lattice a raster's tags describe, or None when size or stride is absent."""
        try:
            size, stride = int(tags[TILE_SIZE]), int(tags[TILE_STRIDE])
        except (KeyError, ValueError):
            return None

        def opt(key):
            value = tags.get(key)
            return int(value) if value not in (None, "") else None

        return cls(size, stride, opt(TILE_ORIGIN_COL) or 0, opt(TILE_ORIGIN_ROW) or 0,
                   opt(TILE_COUNT_COL), opt(TILE_COUNT_ROW))


def dates_tag(dates: Sequence[str | None]) -> str:
    """``first/last`` of the known acquisition dates, or ``unknown``."""
    known = sorted(d for d in dates if d)
    return f"{known[0]}/{known[-1]}" if known else "unknown"


def prediction_tags(model_cfg, opts, *, lattice: TileLattice, sources: Sequence[str],
                    resampling: Sequence[str] | str, imagery_dates: str = "unknown",
                    cell: str | None = None) -> dict[str, str]:
    """The tags of a prediction raster (see the module docstring); ``opts`` are the
    :class:`canopy.predict.options.PredictOptions` it was made with."""
    methods = [resampling] if isinstance(resampling, str) else sorted(set(resampling))
    return {
        SOFTWARE: f"canopy-height {canopy.__version__}",
        MODEL: model_cfg.name,
        MODEL_VERSION: model_cfg.version,
        MODEL_SOURCE: model_cfg.source or "unknown",  # GDAL drops an empty tag: say so instead
        MODEL_LICENCE: model_cfg.licence or "unknown",
        MODEL_TRAINED: str(model_cfg.trained).lower(),
        GSD: f"{model_cfg.gsd:g}",
        PRECISION: opts.precision,
        GEDI_CORRECTION: Path(opts.gedi_correction).name if opts.gedi_correction else "none",
        SOURCE_IMAGES: ";".join(Path(s).name for s in sources) or "unknown",
        IMAGERY_DATES: imagery_dates,
        RESAMPLING: ";".join(methods) if methods else "none",
        CELL: cell or "none",
        **lattice.tags(),
    }


def unlike_counts(scores: np.ndarray, heights: np.ndarray) -> list[int]:
    """[pixels unlike the training data, pixels scored] where the map has a height (the
    ``ood_unlike`` a state run's manifest keeps, and one raster's tag sums); ``scores`` loses
    its pixels without height in place."""
    scores[~np.isfinite(heights)] = np.nan
    return [int(np.count_nonzero(scores > OOD_UNLIKE)), int(np.count_nonzero(np.isfinite(scores)))]


def to_output_dtype(height: np.ndarray, dtype: str) -> tuple[np.ndarray, float | int]:
    """float32 metres with NaN nodata, or uint8 whole metres with nodata 255 (as the Meta maps)."""
    if dtype == "float32":
        return height.astype(np.float32), float("nan")
    if dtype == "uint8":
        out = np.full(height.shape, UINT8_NODATA, np.uint8)
        ok = np.isfinite(height)
        out[ok] = np.clip(np.rint(height[ok]), 0, UINT8_NODATA - 1).astype(np.uint8)
        return out, UINT8_NODATA
    raise ValueError(f"dtype must be float32 or uint8, got '{dtype}'")


def nodata_for(dtype: str) -> float | int:
    return UINT8_NODATA if dtype == "uint8" else math.nan


def band_units(descriptions) -> list[str]:
    """Each output band's unit: metres, except the out-of-distribution score (a ratio)."""
    return ["" if d == OOD_BAND else UNITS for d in descriptions]


def write_prediction(path: str | os.PathLike, height: np.ndarray, spread: np.ndarray | None, *,
                     crs, transform, dtype: str, tags: Mapping[str, str], overwrite: bool = False,
                     qml: bool = True, ood: np.ndarray | None = None) -> Path:
    """Heights (and their spread, and the out-of-distribution score: float32 only) as a COG with
    the contract's bands, units and nodata."""
    from canopy.io.cog import write_cog  # rasterio: only when writing (metrics import this module)

    data, nodata = to_output_dtype(height, dtype)
    bands, descriptions = [data], [HEIGHT_BAND]
    if spread is not None:
        bands.append(to_output_dtype(spread, dtype)[0])
        descriptions.append(STD_BAND)
    if ood is not None:
        if dtype != "float32":
            raise ValueError("the out-of-distribution band is a fraction: it needs float32 output")
        bands.append(ood.astype(np.float32))
        descriptions.append(OOD_BAND)
    return write_cog(path, np.stack(bands), crs=crs, transform=transform, nodata=nodata,
                     descriptions=descriptions, units=band_units(descriptions), tags=dict(tags),
                     overwrite=overwrite, qml=qml)
