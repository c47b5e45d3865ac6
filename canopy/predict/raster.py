"""``canopy predict`` for one raster: read → model grid → blended tiles → COG, in windows.

The output follows the contract of :mod:`canopy.io.outputs` (the same tags and bands as a cell of
a state run). Everything that can be wrong with the request is checked before the imagery is
read and the model runs: the options (:class:`PredictOptions`), the output path and the room for
it, the stride against the model's tile and the GEDI correction's folder.

Memory is bounded by the window, not the raster: the output grid is cut into windows of
``window_px`` (4096) pixels; each window reads the imagery of the model tiles that overlap it
(tiles sit on one lattice from the raster's corner, as in a single pass) through fixed blocks
of that grid (:class:`data_catalog.raster.LatticeReader`, so a pixel reads the same in every
window), plus the context the edge rule needs where imagery ends, and its heights are written
into the COG's staging file. The next window is read, and the last one written, in threads
while the model runs. A pixel's height is the same float64 blend of the same tiles,
computed in the same order with the same batch shape (``fixed_batch``), whatever the window
size: the map is byte-identical to one computed in one piece (tested). A raster of one window
is predicted in one piece, as before.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.windows import Window

from canopy.errors import OptionError, OutputError
from canopy.io import outputs
from canopy.io.cog import check_free_space, check_output_path, cog_writer, estimated_cog_bytes
from canopy.model.auto import batch_size_for, choose_precision, own_model
from canopy.model.ood import window_scores
from canopy.predict.blend import default_stride, edge_reach, predict_array, tile_starts
from canopy.predict.options import PredictOptions
from canopy.progress import ProgressCallback, report
from data_catalog.errors import RasterError
from data_catalog.raster import (
    READ_BLOCK_PX, LatticeReader, check_rgb_dtype, grids_coincide, open_raster, output_grid,
    resampling_onto, resolve_crs, rgb_bands)

__all__ = ["PredictOptions", "predict_raster"]

WINDOW_PX = 4096
OOD_WARN_SHARE = 0.25  # warn when a quarter of the map scores unlike the training data


def predict_raster(input_path, output_path, model, opts: PredictOptions | None = None, *,
                   overwrite: bool = False, progress: ProgressCallback | None = None,
                   window_px: int = WINDOW_PX) -> Path:
    """Predict canopy height for one GDAL-readable RGB raster and write a COG (+ .qml).

    ``opts.precision`` ``auto`` is resolved for ``model`` on this machine
    (:func:`canopy.model.auto.choose_precision`; the choice is reported and written in the
    output's tags). ``progress`` receives ``tiles`` counts as model tiles finish. The raster is
    predicted in windows of ``window_px`` pixels (module docstring); the result does not depend
    on it."""
    opts = opts or PredictOptions()
    output_path = Path(output_path)
    n_in = model.cfg.backbone.in_chans
    if opts.bands is not None and len(opts.bands) != n_in:
        raise OptionError("bands", f"gives {len(opts.bands)} bands; the model reads {n_in} "
                                   f"({'R,G,B,NIR' if n_in == 4 else 'R,G,B'})")
    if Path(input_path).resolve() == output_path.resolve():
        raise OutputError("output path is the input path; choose another -o")
    if not str(output_path).lower().endswith((".tif", ".tiff")):
        raise OutputError(f"output '{output_path}' must end in .tif (a Cloud Optimized GeoTIFF)")
    check_output_path(output_path, overwrite, create=False)  # fail before any compute
    tile = model.cfg.tile_size
    opts.check_for(tile)

    opts = opts.replace(batch_size=batch_size_for(model.device, opts.batch_size))
    choice = choose_precision(model, opts.precision, batch_size=opts.batch_size)
    if opts.precision == "auto":
        report(progress, "tiles", 0, None, message=choice.reason)
        model = own_model(model, choice.precision)
    opts = opts.replace(precision=choice.precision, device=model.device.type)
    model.prepare_for_inference(opts.precision)
    correction = None
    if opts.gedi_correction:  # load before the long part: a bad path fails at once
        from canopy.predict.correction import load_correction

        correction = load_correction(opts.gedi_correction, device=model.device)
    stride = opts.stride or default_stride(tile)
    gsd = model.cfg.gsd
    crs, transform, height, width = output_grid(input_path, gsd, crs=opts.crs)
    windows = [(r0, c0, min(window_px, height - r0), min(window_px, width - c0))
               for r0 in range(0, height, window_px) for c0 in range(0, width, window_px)]
    has_ood = getattr(model, "ood", None) is not None
    if opts.ood_band and not has_ood:
        raise OptionError("ood_band", "this model carries no out-of-distribution reference "
                                      "(ood.safetensors beside its weights)")
    if opts.ood_band and opts.dtype != "float32":
        raise OptionError("ood_band", "the score band is a fraction; it needs --dtype float32")
    n_bands = 1 + opts.uncertainty + opts.ood_band
    staged = len(windows) > 1  # a map larger than a window is staged on disk, not in memory
    check_free_space(output_path.parent,
                     estimated_cog_bytes(height * width, opts.dtype, n_bands) * (2 if staged else 1),
                     f"a {width}×{height} px map")

    rows, cols = tile_starts(height, tile, stride), tile_starts(width, tile, stride)
    lattice = outputs.TileLattice(tile, stride, count_row=len(rows), count_col=len(cols))
    with open_raster(input_path) as ds:
        src_crs = resolve_crs(input_path, ds.crs, opts.crs)
        bands = rgb_bands(ds, input_path, opts.bands, count=model.cfg.backbone.in_chans)
        check_rgb_dtype(ds, bands, input_path, opts.scale)
        own_grid = (crs == src_crs and ds.transform == transform
                    and grids_coincide(ds.transform, src_crs, transform, crs))
        method = "none" if own_grid else resampling_onto(ds, crs, transform, (height, width),
                                                         src_crs).name
        tags = outputs.prediction_tags(model.cfg, opts, lattice=lattice,
                                       sources=[Path(input_path).name], resampling=method,
                                       imagery_dates=_imagery_dates(ds))
        # enough warped blocks kept for a window and its context, so a window reads each once
        span = -(-(window_px + 2 * tile + 4 * edge_reach(tile)) // READ_BLOCK_PX) + 1
        reader = LatticeReader(ds, crs, gsd, src_crs=src_crs, bands=bands, scale=opts.scale,
                               anchor=(transform.c, transform.f), max_blocks=span * span)
        grid = _Grid(reader, transform, height, width)
        plans = [(w, _tiles_over(w, rows, cols, tile)) for w in windows]
        total = sum(len(r) * len(c) for _, (r, c) in plans)
        done = 0
        report(progress, "tiles", 0, total)

        def tiles_done(n: int) -> None:
            nonlocal done
            done += n
            report(progress, "tiles", done, total)

        any_valid = False
        unlike = [0, 0]  # pixels scored unlike the training data, pixels scored
        with cog_writer(output_path, width=width, height=height, count=n_bands,
                        dtype=opts.dtype, crs=crs, transform=transform,
                        nodata=outputs.nodata_for(opts.dtype),
                        descriptions=[outputs.HEIGHT_BAND, outputs.STD_BAND][:1 + opts.uncertainty]
                        + [outputs.OOD_BAND] * opts.ood_band,
                        units=outputs.band_units([outputs.HEIGHT_BAND] * (1 + opts.uncertainty)
                                                 + [outputs.OOD_BAND] * opts.ood_band),
                        tags=tags, overwrite=overwrite,
                        stage_on_disk=staged, threads="ALL_CPUS") as dst:  # one command: all cores
            def write(window, result):
                r0, c0, h, w = window
                for b, values in enumerate(result, start=1):
                    dst.write(outputs.to_output_dtype(values, opts.dtype)[0], b,
                              window=Window(c0, r0, w, h))

            # One reader thread reads the next window while the model runs on this one, and one
            # writer thread encodes the last window's heights: a GPU does not wait for GDAL. At
            # most one window is read ahead and one waits to be written, so memory stays bounded;
            # each dataset is used by one thread at a time.
            with ThreadPoolExecutor(1, "canopy-read") as reads, \
                    ThreadPoolExecutor(1, "canopy-write") as writes:
                def read_ahead(i):
                    if i >= len(plans):
                        return None
                    window, (trows, tcols) = plans[i]
                    return reads.submit(_read_window, grid, window, trows, tcols, tile, correction,
                                        model.ood.tile if has_ood else None)

                pending_read, pending_write = read_ahead(0), None
                for i, (window, (trows, tcols)) in enumerate(plans):
                    read = pending_read.result()
                    pending_read = read_ahead(i + 1)
                    before = done
                    if read is not None:
                        result = _predict_window(model, grid, window, trows, tcols, read, stride,
                                                 opts, correction, tiles_done)
                        any_valid = True
                        if has_ood:  # the OOD tiles' pixels came with the read (one thread per dataset)
                            scores = window_scores(model, lambda r, c, h, w: read[4][(r, c)],
                                                   window, height, width)
                            counts = outputs.unlike_counts(scores, result[0])
                            unlike = [a + b for a, b in zip(unlike, counts)]
                            if opts.ood_band:
                                result = (*result, scores)
                        if pending_write is not None:
                            pending_write.result()
                        pending_write = writes.submit(write, window, result)
                    tiles_done(len(trows) * len(tcols) - (done - before))  # tiles w/o imagery
                if pending_write is not None:
                    pending_write.result()
            if not any_valid:
                raise RasterError(f"'{input_path}' has no valid pixels (all nodata or masked)")
            if has_ood and unlike[1]:
                share = unlike[0] / unlike[1]
                dst.update_tags(**{outputs.OOD_UNLIKE_SHARE: f"{share:.4f}"})
                if ood_message(share):
                    report(progress, "tiles", done, total, message=ood_message(share))
    return output_path


def ood_message(share: float) -> str | None:
    """One line for the log when much of a map is unlike the model's training data."""
    if share < OOD_WARN_SHARE:
        return None
    return (f"warning: {share:.0%} of this map is unlike the model's training data "
            f"({outputs.OOD_UNLIKE_SHARE}); expect errors of several metres there")


class _Grid:
    """The output grid of one raster, read in windows: pixels off the grid are no imagery."""

    def __init__(self, reader: LatticeReader, transform: Affine, height: int, width: int):
        self.reader, self.transform, self.height, self.width = reader, transform, height, width

    def read(self, r0: int, c0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        rgb, valid = self.reader.read(self.transform @ Affine.translation(c0, r0), (h, w))
        rs = slice(max(0, -r0), max(0, min(h, self.height - r0)))
        cs = slice(max(0, -c0), max(0, min(w, self.width - c0)))
        inside = np.zeros((h, w), bool)
        inside[rs, cs] = True
        return rgb, valid & inside


def _tiles_over(window, rows, cols, tile) -> tuple[list[int], list[int]]:
    """The raster's tiles (its lattice from the corner) that overlap ``window``."""
    r0, c0, h, w = window
    return ([s for s in rows if s < r0 + h and s + tile > r0],
            [s for s in cols if s < c0 + w and s + tile > c0])


def _read_window(grid: _Grid, window, trows, tcols, tile, correction, ood_tile=None):
    """The imagery one output window needs (its tiles, the edge rule's context where imagery
    ends, the GEDI correction's window, the out-of-distribution tiles over it), or None when
    the window holds no imagery."""
    r0, c0, h, w = window
    tr0, tc0 = trows[0], tcols[0]
    th, tw = trows[-1] + tile - tr0, tcols[-1] + tile - tc0  # the tiles' span
    rgb, valid = grid.read(tr0, tc0, th, tw)
    if not valid[r0 - tr0:r0 - tr0 + h, c0 - tc0:c0 - tc0 + w].any():
        return None
    margin = 0
    if not valid.all():
        # imagery ends in these tiles: the edge rule mirrors it, with its context around them
        margin = 2 * edge_reach(tile)
        rgb, valid = grid.read(tr0 - margin, tc0 - margin, th + 2 * margin, tw + 2 * margin)
    extra = None
    if correction is not None:
        from canopy.predict.correction import required_window

        wt = grid.transform @ Affine.translation(c0, r0)
        win = required_window(wt, (h, w), correction)
        rgb_c, valid_c = grid.read(r0 + win.row_off, c0 + win.col_off, win.height, win.width)
        extra = (wt, win, rgb_c[:3], valid_c)  # the correction model reads RGB
    ood = None
    if ood_tile:
        from canopy.model.ood import window_tiles

        ood = {(r, c): grid.read(r, c, ood_tile, ood_tile)
               for r, c in window_tiles(window, grid.height, grid.width, ood_tile)}
    return rgb, valid, margin, extra, ood


def _predict_window(model, grid: _Grid, window, trows, tcols, read, stride, opts, correction,
                    progress):
    """(height[, spread]) of one output window from what :func:`_read_window` read."""
    r0, c0, h, w = window
    tr0, tc0 = trows[0], tcols[0]
    rgb, valid, margin, extra, _ = read
    height, spread = predict_array(model, rgb, valid, precision=opts.precision,
                                   batch_size=opts.batch_size, with_std=opts.uncertainty,
                                   stride=stride, origin=(0, 0), margin=margin, fixed_batch=True,
                                   lanes=opts.lanes, progress=progress)
    crop = (slice(r0 - tr0, r0 - tr0 + h), slice(c0 - tc0, c0 - tc0 + w))
    height = height[crop]
    spread = spread[crop] if spread is not None else None
    if correction is not None:
        from canopy.predict.correction import correct_heights

        wt, win, rgb_c, ok_c = extra
        height, spread = correct_heights(correction, height, spread, rgb_c, ok_c, wt,
                                         grid.reader.crs, rgb_transform=win.transform(wt))
    return (height,) if spread is None else (height, spread)


def _imagery_dates(ds) -> str:
    """The input's acquisition date(s) from its tags, as the catalog reads them."""
    from data_catalog.imagery import acquisition_time

    when = acquisition_time(ds.tags())
    if when is None:
        return "unknown"
    return outputs.dates_tag([when.start.date().isoformat(), when.end.date().isoformat()])
