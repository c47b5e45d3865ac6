"""Canopy height of an xarray ``DataArray``, lazily, as the Pangeo/STAC ecosystem works.

``predict(da)`` takes RGB(N) imagery as a ``DataArray`` with dims ``(band, y, x)`` and a CRS and
regular pixel grid — what rioxarray, odc-stac and stackstac give for STAC items — and returns a
dask-backed ``DataArray`` of heights (metres, NaN without imagery) on the same grid, computed
chunk by chunk when asked (``.compute()``, ``.rio.to_raster()``, a dask cluster).

Invariant: the heights equal ``canopy predict`` on a GeoTIFF of the same pixels, whatever the
chunking. Why it holds: the model tiles sit on one lattice from the array's corner (as one
raster's tiles do), and each chunk is computed by the one-raster path's own window functions
(:func:`canopy.predict.raster._read_window`, ``_predict_window``) from a slice holding every
tile that overlaps it plus the edge rule's context — the same inputs, so the same numbers. The
model is loaded once per process (:func:`canopy.predict.engine.worker_model`).

The imagery must already be at the model's GSD (±1 %): resampling is the loader's job here
(``odc.stac.load(..., resolution=0.6)``, ``stackstac.stack(..., resolution=0.6)`` or
``da.rio.reproject(resolution=0.6)``); a DataArray at another GSD is refused, not silently
predicted at the wrong scale.
"""

from __future__ import annotations

import math

import numpy as np
from affine import Affine

from canopy.errors import OptionError


def _georef(da) -> tuple[Affine, str]:
    """(transform of pixel corners, CRS) of ``da`` from its x/y coordinates (pixel centres) and
    its CRS (rioxarray's ``rio.crs``, a ``spatial_ref`` coordinate, or ``attrs['crs']``)."""
    if "x" not in da.dims or "y" not in da.dims:
        raise OptionError("imagery", f"the DataArray needs x and y dimensions, has {da.dims}")
    x, y = np.asarray(da["x"], np.float64), np.asarray(da["y"], np.float64)
    if len(x) < 2 or len(y) < 2:
        raise OptionError("imagery", "the DataArray needs at least 2 × 2 pixels")
    dx, dy = np.diff(x), np.diff(y)
    if not (np.allclose(dx, dx[0], rtol=1e-6) and np.allclose(dy, dy[0], rtol=1e-6)):
        raise OptionError("imagery", "the DataArray's x/y coordinates are not a regular grid")
    crs = None
    try:
        crs = da.rio.crs
    except AttributeError:  # rioxarray not imported: read what it would have read
        pass
    if crs is None and "spatial_ref" in da.coords:
        crs = da["spatial_ref"].attrs.get("crs_wkt") or da["spatial_ref"].attrs.get("spatial_ref")
    crs = crs or da.attrs.get("crs")
    if crs is None:
        raise OptionError("imagery", "the DataArray has no CRS (rioxarray's write_crs, a "
                                     "spatial_ref coordinate or attrs['crs'])")
    t = Affine(dx[0], 0, x[0] - dx[0] / 2, 0, dy[0], y[0] - dy[0] / 2)
    return t, str(crs)


class _ArrayGrid:
    """The one-raster path's grid, read from one in-memory block of the array: pixels off the
    array (or outside the block) are no imagery."""

    def __init__(self, block: np.ndarray, valid: np.ndarray, offset: tuple[int, int],
                 transform: Affine, shape: tuple[int, int]):
        self.block, self.valid, self.offset = block, valid, offset
        self.transform, (self.height, self.width) = transform, shape

    def read(self, r0: int, c0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        rgb = np.zeros((self.block.shape[0], h, w), np.uint8)
        ok = np.zeros((h, w), bool)
        br, bc = self.offset
        bh, bw = self.valid.shape
        rs, re = max(r0, br, 0), min(r0 + h, br + bh, self.height)
        cs, ce = max(c0, bc, 0), min(c0 + w, bc + bw, self.width)
        if rs < re and cs < ce:
            rgb[:, rs - r0:re - r0, cs - c0:ce - c0] = self.block[:, rs - br:re - br, cs - bc:ce - bc]
            ok[rs - r0:re - r0, cs - c0:ce - c0] = self.valid[rs - br:re - br, cs - bc:ce - bc]
        return rgb, ok


def _chunk(block, valid, offset, window, trows, tcols, shape, transform, checkpoint, opts):
    from canopy.predict.engine import worker_model
    from canopy.predict.raster import _predict_window, _read_window

    model = worker_model(checkpoint, opts)
    tile = model.cfg.tile_size
    grid = _ArrayGrid(np.asarray(block), np.asarray(valid), offset, transform, shape)
    _, _, h, w = window
    if not trows or not tcols:
        return np.full((h, w), np.nan, np.float32)
    read = _read_window(grid, window, trows, tcols, tile, None)
    if read is None:
        return np.full((h, w), np.nan, np.float32)
    return _predict_window(model, grid, window, trows, tcols, read, opts.stride, opts, None,
                           None)[0].astype(np.float32)


def predict(da, checkpoint: str = "default", *, precision: str = "fp32", batch_size: int = 8,
            chunk: int = 2048, bands=None, nodata=None):
    """Heights (``y``, ``x``) of ``da`` (``band``, ``y``, ``x``; uint8 RGB, or RGBN with
    ``bands`` picking red, green, blue as 1-based numbers, default 1,2,3; four numbers, R, G, B,
    NIR, default 1,2,3,4, for a model that reads four bands), lazily in ``chunk``
    px blocks. ``nodata`` (default: rioxarray's ``rio.nodata``, else ``attrs['nodata']``/
    ``_FillValue``): a pixel with that value in every band is no imagery (GDAL's dataset mask,
    the rule ``canopy predict`` reads files by), as is NaN in any band."""
    import dask
    import dask.array as dsa
    import xarray as xr

    from canopy.model.checkpoints import load_config
    from canopy.predict.blend import default_stride, edge_reach, tile_starts
    from canopy.predict.options import PredictOptions
    from canopy.predict.raster import _tiles_over

    if "band" not in da.dims:
        raise OptionError("imagery", f"the DataArray needs a band dimension, has {da.dims}")
    transform, crs = _georef(da)
    cfg = load_config(checkpoint)
    res = abs(transform.a)
    if not math.isclose(res, cfg.gsd, rel_tol=0.01) or not math.isclose(abs(transform.e), cfg.gsd, rel_tol=0.01):
        raise OptionError("imagery", f"the DataArray's pixels are {res:g} × {abs(transform.e):g}; "
                                     f"the model needs {cfg.gsd:g} m: resample it first (e.g. "
                                     f"odc.stac.load(..., resolution={cfg.gsd:g}))")
    n_in = cfg.backbone.in_chans  # 3, or 4 for a model trained on RGB + near-infrared
    picks = [b - 1 for b in (bands or range(1, n_in + 1))]
    if len(picks) != n_in or max(picks) >= da.sizes["band"] or min(picks) < 0:
        raise OptionError("bands", f"need {'three' if n_in == 3 else 'four'} band numbers "
                                   f"in 1..{da.sizes['band']} (the model reads "
                                   f"{'R,G,B' if n_in == 3 else 'R,G,B,NIR'})")
    arr = da.transpose("band", "y", "x").data
    arr = arr if isinstance(arr, dsa.Array) else dsa.from_array(arr, chunks=(-1, chunk, chunk))
    rgb = arr[picks]
    if nodata is None:
        try:
            nodata = da.rio.nodata
        except AttributeError:
            nodata = None
        nodata = nodata if nodata is not None else da.attrs.get("nodata", da.attrs.get("_FillValue"))
    bad = dsa.isnan(rgb).any(axis=0) if np.issubdtype(rgb.dtype, np.floating) else None
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        hit = (rgb == nodata).all(axis=0)
        bad = hit if bad is None else (bad | hit)
    valid = ~bad if bad is not None else dsa.ones(rgb.shape[1:], bool, chunks=rgb.chunksize[1:])
    if rgb.dtype != np.uint8:
        raise OptionError("imagery", f"RGB must be uint8, got {rgb.dtype} (scale it first)")
    opts = PredictOptions(precision=precision, batch_size=batch_size)
    tile = cfg.tile_size
    stride = default_stride(tile)
    opts = opts.replace(stride=stride)
    H, W = rgb.shape[1:]
    rows, cols = tile_starts(H, tile, stride), tile_starts(W, tile, stride)
    reach = 2 * edge_reach(tile)
    blocks = []
    for r0 in range(0, H, chunk):
        row = []
        for c0 in range(0, W, chunk):
            h, w = min(chunk, H - r0), min(chunk, W - c0)
            trows, tcols = _tiles_over((r0, c0, h, w), rows, cols, tile)
            # every input the window may read: its tiles' span plus the edge rule's context
            a0 = max(0, (trows[0] if trows else r0) - reach)
            b0 = max(0, (tcols[0] if tcols else c0) - reach)
            a1 = min(H, (trows[-1] + tile if trows else r0 + h) + reach)
            b1 = min(W, (tcols[-1] + tile if tcols else c0 + w) + reach)
            part = dask.delayed(_chunk)(rgb[:, a0:a1, b0:b1], valid[a0:a1, b0:b1], (a0, b0),
                                        (r0, c0, h, w), trows, tcols, (H, W), transform,
                                        checkpoint, opts)
            row.append(dsa.from_delayed(part, (h, w), np.float32))
        blocks.append(row)
    heights = dsa.block(blocks)
    out = xr.DataArray(heights, dims=("y", "x"), coords={"y": da["y"], "x": da["x"]},
                       name="canopy_height",
                       attrs={"units": "m", "long_name": "canopy height", "crs": crs,
                              "CANOPY_MODEL": cfg.name if hasattr(cfg, "name") else str(checkpoint)})
    if "spatial_ref" in da.coords:
        out = out.assign_coords(spatial_ref=da["spatial_ref"])
    return out
