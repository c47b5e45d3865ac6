"""``canopy predict`` for one raster: read → model grid → blended tiles → COG.

The output follows the contract of :mod:`canopy.io.outputs` (the same tags and bands as a cell of
a state run). Everything that can be wrong with the request is checked before the imagery is
read and the model runs: the options (:class:`PredictOptions`), the output path, the stride
against the model's tile and the GEDI correction's folder.
"""

from __future__ import annotations

import copy
from pathlib import Path

from canopy.errors import OutputError
from canopy.io.cog import check_free_space, check_output_path, estimated_cog_bytes
from canopy.io.outputs import TileLattice, dates_tag, prediction_tags, write_prediction
from canopy.model.auto import choose_precision
from canopy.predict.blend import count_tiles, default_stride, predict_array, tile_starts
from canopy.predict.options import PredictOptions
from canopy.progress import ProgressCallback, report
from data_catalog.raster import output_grid, read_rgb_on_grid

__all__ = ["PredictOptions", "predict_raster"]


def predict_raster(input_path, output_path, model, opts: PredictOptions | None = None, *,
                   overwrite: bool = False, progress: ProgressCallback | None = None) -> Path:
    """Predict canopy height for one GDAL-readable RGB raster and write a COG (+ .qml).

    ``opts.precision`` ``auto`` is resolved for ``model`` on this machine
    (:func:`canopy.model.auto.choose_precision`; the choice is reported and written in the
    output's tags). ``progress`` receives ``tiles`` counts as model tiles finish."""
    opts = opts or PredictOptions()
    output_path = Path(output_path)
    if Path(input_path).resolve() == output_path.resolve():
        raise OutputError("output path is the input path; choose another -o")
    if not str(output_path).lower().endswith((".tif", ".tiff")):
        raise OutputError(f"output '{output_path}' must end in .tif (a Cloud Optimized GeoTIFF)")
    check_output_path(output_path, overwrite, create=False)  # fail before any compute
    tile = model.cfg.tile_size
    opts.check_for(tile)

    choice = choose_precision(model, opts.precision, batch_size=opts.batch_size)
    if opts.precision == "auto":
        report(progress, "tiles", 0, None, message=choice.reason)
        if choice.precision == "int8" and not model.is_int8:
            # int8 quantises in place; the caller's model must stay as it was given
            model = copy.deepcopy(model)
    opts = opts.replace(precision=choice.precision, device=model.device.type)
    model.prepare_for_inference(opts.precision)
    correction = None
    if opts.gedi_correction:  # load before the long part: a bad path fails at once
        from canopy.predict.correction import load_correction

        correction = load_correction(opts.gedi_correction, device=model.device)
    stride = opts.stride or default_stride(tile)
    _, _, out_h, out_w = output_grid(input_path, model.cfg.gsd, crs=opts.crs)
    check_free_space(output_path.parent,
                     estimated_cog_bytes(out_h * out_w, opts.dtype, 2 if opts.uncertainty else 1),
                     f"a {out_w}×{out_h} px map")
    img = read_rgb_on_grid(input_path, model.cfg.gsd, bands=opts.bands, crs=opts.crs,
                           scale=opts.scale)
    n_tiles = count_tiles(img.valid, tile, stride)
    done = 0
    report(progress, "tiles", 0, n_tiles)

    def tiles_done(n: int) -> None:
        nonlocal done
        done += n
        report(progress, "tiles", done, n_tiles)

    height, spread = predict_array(
        model, img.rgb, img.valid, precision=opts.precision, batch_size=opts.batch_size,
        with_std=opts.uncertainty, stride=stride, progress=tiles_done, lanes=opts.lanes)
    if correction is not None:
        from canopy.predict.correction import correct_heights

        height, spread = correct_heights(correction, height, spread, img.rgb, img.valid,
                                         img.transform, img.crs)

    h, w = img.valid.shape
    lattice = TileLattice(tile, stride, count_row=len(tile_starts(h, tile, stride)),
                          count_col=len(tile_starts(w, tile, stride)))
    tags = prediction_tags(model.cfg, opts, lattice=lattice, sources=[Path(input_path).name],
                           resampling=img.resampling, imagery_dates=_imagery_dates(input_path))
    return write_prediction(output_path, height, spread, crs=img.crs, transform=img.transform,
                            dtype=opts.dtype, tags=tags, overwrite=overwrite)


def _imagery_dates(path) -> str:
    """The input's acquisition date(s) from its tags, as the catalog reads them."""
    import rasterio

    from data_catalog.imagery import acquisition_time

    with rasterio.open(path) as ds:
        when = acquisition_time(ds.tags())
    if when is None:
        return "unknown"
    return dates_tag([when.start.date().isoformat(), when.end.date().isoformat()])
