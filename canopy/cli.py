"""The ``canopy`` command line: a thin Typer app; every command calls a library function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Tuple

import typer

from canopy.console import ProgressBars, flag_for
from canopy.errors import CanopyError, NoDefaultModelError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Canopy height maps from RGB imagery (ViT + DPT, HighResCanopyHeight-compatible).",
)

SAMPLE_SCENE = Path(__file__).resolve().parent / "data" / "sample_osbs_029.tif"


@app.command()
def predict(
    input: Optional[Path] = typer.Argument(None, help="RGB raster readable by GDAL (GeoTIFF, COG, VRT)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output COG path (.tif), or a folder with --aoi."),
    aoi: Optional[str] = typer.Option(None, "--aoi", help="Area of interest: a vector file, WKT, 'minx,miny,maxx,maxy' (lon/lat) or a place name ('California', 'São Paulo'). Switches to the tiled state-scale engine."),
    imagery: Optional[str] = typer.Option(None, "--imagery", help="With --aoi: a folder of rasters, a VRT/raster, a catalog .parquet, a STAC JSON (ItemCollection/Catalog/Collection), or a STAC API search 'stac+https://host/api?collections=naip&datetime=2020/2022' (COGs read over HTTP, never downloaded)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="With --aoi: address of a running dask scheduler (default: a local cluster)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="With --aoi: worker processes of the local cluster (default 1)."),
    cell_size: int = typer.Option(4096, "--cell-size", min=64, help="With --aoi: output cell size in pixels."),
    torch_threads: Optional[int] = typer.Option(None, "--torch-threads", min=1, help="With --aoi: torch threads per worker."),
    lanes: Optional[int] = typer.Option(None, "--lanes", min=1, help="CPU: batches run at once, each on its share of the torch threads (default: automatic, one thread per lane up to 4 lanes). Does not change the output."),
    gedi_correction: Optional[Path] = typer.Option(None, "--gedi-correction", help="Folder of a GEDI correction model (canopy train-gedi-correction): heights × its smooth per-block factor field."),
    verify: bool = typer.Option(False, "--verify", help="With --aoi, on resume: re-hash every finished cell instead of trusting unchanged size and mtime."),
    skip_bad_scenes: bool = typer.Option(False, "--skip-bad-scenes", help="With --aoi: leave out imagery files that cannot be read (truncated, not RGB, no CRS) instead of stopping; they are listed in summary.json."),
    checkpoint: str = typer.Option(
        "default", "--checkpoint", "-c",
        help="Model: HRCH v1 .pth (float or compressed_*), a native model folder/.safetensors, "
             "or a random-weight variant name (micro, hrch_v1_large_random) for plumbing tests."),
    device: str = typer.Option("auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", help="auto (on a GPU bf16; on a CPU the fastest of fp32, bf16 and int8 for this model, from a short timed probe cached per machine), fp32, bf16 (autocast) or int8 (CPU: int8 ViT Linear layers and decoder convolutions, scales per tile)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Model tiles per forward pass (default: 8 on a CPU, 64 on a GPU)."),
    dtype: str = typer.Option("float32", help="float32 (metres, NaN nodata) or uint8 (whole metres, nodata 255)."),
    uncertainty: bool = typer.Option(False, "--uncertainty", help="Add a band with the per-pixel spread (std, m) of the height distribution."),
    ood_band: bool = typer.Option(False, "--ood-band", help="Add a band with the out-of-distribution score of each 48 m tile (> 1: unlike the model's training data; models with an ood.safetensors, such as the default). One raster or every --aoi cell."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    bands: Optional[str] = typer.Option(None, help="Bands read as R,G,B (e.g. 1,2,3 for an RGBN image), or R,G,B,NIR for a 4-band model (1,2,3,4)."),
    crs: Optional[str] = typer.Option(None, help="CRS for a raster without one, e.g. EPSG:32617."),
    scale: Optional[Tuple[float, float]] = typer.Option(None, help="MIN MAX: map non-uint8 data linearly to 0..255."),
    stride: Optional[int] = typer.Option(None, min=1, help="Model-tile stride in pixels (default: tile size × 3/4)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Predict canopy height for one raster (a COG + QGIS .qml), or with --aoi over an area of
    interest (a folder of COG cells, a mosaic, an overview, a STAC collection; resumable)."""
    from canopy.predict.options import PredictOptions

    # every option is validated here, before any raster is read or model loaded
    opts = PredictOptions(device=device, precision=precision, batch_size=batch_size, dtype=dtype,
                          uncertainty=uncertainty, ood_band=ood_band, stride=stride, lanes=lanes,
                          gedi_correction=str(gedi_correction) if gedi_correction else None,
                          torch_threads=torch_threads, bands=bands, crs=crs, scale=scale)
    if aoi is not None:
        if input is not None and imagery is not None:
            raise CanopyError(f"give the imagery once: '{input}' and --imagery '{imagery}' were "
                              "both given (with --aoi, use --imagery)")
        if output.suffix.lower() in (".tif", ".tiff"):
            raise CanopyError(f"-o '{output}' ends in {output.suffix}, but --aoi writes a folder "
                              "(cells, mosaic, overview, STAC): give a folder name")
        return _predict_aoi(aoi, imagery or input, output, checkpoint, opts, overwrite, scheduler,
                            workers, cell_size, quiet, verify, skip_bad_scenes)
    if input is None:
        raise CanopyError("give an input raster, or --aoi with --imagery")
    if imagery is not None:
        raise CanopyError("--imagery goes with --aoi; for one raster give it as the input")
    from canopy.io.cog import check_output_path
    from canopy.model.checkpoints import load_model
    from canopy.model.device import resolve_device
    from canopy.predict.raster import predict_raster
    from data_catalog.raster import check_complete, open_raster

    # cheap checks first: a big checkpoint takes a while to load
    with open_raster(input) as ds:
        check_complete(ds, input)
    check_output_path(output, overwrite, create=False)
    model = load_model(checkpoint, device=resolve_device(opts.device))
    _say_what_the_model_is(checkpoint, model.cfg)
    with ProgressBars(input.name, enabled=not quiet) as bars:
        out = predict_raster(input, output, model, opts, overwrite=overwrite, progress=bars)
    typer.echo(f"wrote {out}")


def _predict_aoi(aoi, imagery, output, checkpoint, opts, overwrite, scheduler, workers, cell_size,
                 quiet, verify, skip_bad_scenes=False):
    from canopy.model.device import resolve_device
    from canopy.predict.engine import predict_aoi

    if imagery is None:
        raise CanopyError("--aoi needs --imagery (a folder, a raster/VRT or a catalog .parquet)")
    if scheduler is None:  # a remote cluster's workers may have GPUs this login node lacks
        resolve_device(opts.device)
    with ProgressBars(enabled=not quiet) as bars:
        summary = predict_aoi(aoi, imagery, output, str(checkpoint), opts, cell_px=cell_size,
                              scheduler=scheduler, workers=workers, overwrite=overwrite,
                              progress=bars, verify=verify, skip_bad_scenes=skip_bad_scenes)
    typer.echo(
        f"{summary.cells_done} cell(s) written, {summary.cells_skipped} already done, "
        f"{summary.cells_empty} without data, in {summary.seconds:.1f} s; "
        f"mosaic: {summary.mosaic if summary.mosaic else 'none (no cell had data)'}"
        + (f"; {len(summary.skipped_scenes)} imagery file(s) skipped (listed in summary.json)"
           if summary.skipped_scenes else "")
    )
    from canopy.predict.raster import ood_message

    if summary.ood_unlike_share is not None and ood_message(summary.ood_unlike_share):
        typer.echo(ood_message(summary.ood_unlike_share).replace("this map", "this run's map"),
                   err=True)


def _say_what_the_model_is(checkpoint: str, cfg) -> None:
    """One line on stderr when the model's heights are not to be trusted as they are."""
    if not cfg.trained:
        typer.echo(f"warning: '{checkpoint}' has random weights; its output is not canopy height",
                   err=True)
    elif checkpoint in ("default", None):
        typer.echo("note: the bundled default model is a small demonstration model, far off on "
                   "landscapes it has not seen (canopy/weights/default/MODEL_CARD.md); for maps "
                   "anyone decides on, use released weights (-c) or train on your own lidar",
                   err=True)


@app.command()
def demo(
    output: Path = typer.Option(Path("demo_out"), "-o", "--output", help="Output folder."),
    checkpoint: str = typer.Option("default", "--checkpoint", "-c", help="Model to run (default: the bundled trained model)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the map of an earlier demo in the folder."),
):
    """Run the main job on the bundled real sample scene (NEON OSBS, Florida, 0.1 m RGB)."""
    from canopy.model.checkpoints import load_model
    from canopy.predict.options import PredictOptions
    from canopy.predict.raster import predict_raster

    typer.echo(f"sample scene: {SAMPLE_SCENE.name} (NEON AOP RGB, OSBS Florida, CC0)")
    try:
        model = load_model(checkpoint)
    except NoDefaultModelError:
        typer.echo(
            "No trained default model is bundled with this install, so the demo has no heights to show.\n"
            "Run it with released weights instead:\n"
            "  canopy demo --checkpoint /path/to/SSLhuge_satellite.pth\n"
            "(HighResCanopyHeight v1 checkpoints: s3://dataforgood-fb-data/forests/v1/models/)"
        )
        return
    out = output / "sample_chm.tif"
    predict_raster(SAMPLE_SCENE, out, model, PredictOptions(uncertainty=True), overwrite=overwrite)
    import numpy as np
    import rasterio

    with rasterio.open(out) as ds:
        h = ds.read(1)
    h = h[np.isfinite(h)]
    typer.echo(f"model: {model.cfg.name} v{model.cfg.version} at {model.cfg.gsd:g} m"
               + (" (a small demonstration model: read canopy/weights/default/MODEL_CARD.md)"
                  if checkpoint == "default" else ""))
    typer.echo(f"heights: median {np.median(h):.1f} m, 95th percentile {np.percentile(h, 95):.1f} m "
               f"over {h.size:,} pixels ({h.size * model.cfg.gsd ** 2:,.0f} m²)")
    typer.echo(f"wrote {out} (and {out.with_suffix('.qml').name}); open it in QGIS")


def _register_subcommands() -> None:
    from data_catalog.cli import app as catalog_app

    from canopy.evaluate.cli import register as register_evaluate
    from canopy.pretrain_cli import register as register_pretrain
    from canopy.synth_cli import register as register_synth
    from canopy.train.cli import register as register_train
    from canopy.train.gedi_cli import register as register_gedi_correction

    app.add_typer(catalog_app, name="catalog",
                  help="Spatial index of imagery, lidar CHMs/point clouds and GEDI shots.")
    register_evaluate(app)
    register_pretrain(app)
    register_synth(app)
    register_train(app)
    register_gedi_correction(app)


_register_subcommands()


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=file or sys.stderr)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False,
             help="Serve maps: tiles, WMTS, statistics, exports, jobs, web map (canopy serve --help).")
def serve(ctx: typer.Context) -> None:
    # the server lives in services/, which imports canopy; canopy must not import it back
    # (tests/test_architecture.py), so the command hands over to its module's own entry point
    import os

    os.execv(sys.executable, [sys.executable, "-m", "services", *ctx.args])


def main() -> None:
    import atexit
    import gc
    import warnings

    # At exit Python's last garbage collection walks every object torch, GDAL and dask left:
    # 1.3 s of a 5 s command here (docs/performance.md). Frozen objects are skipped; the
    # process ends anyway, and every file was closed by its own block before this runs.
    atexit.register(gc.freeze)
    warnings.showwarning = _one_line_warning
    from canopy.errors import USER_ERRORS, OptionError, OutputExistsError, RunInterrupted

    try:
        app()
    except RunInterrupted as exc:  # before USER_ERRORS: Ctrl-C exits 130 as shells expect
        how = f" with {flag_for(exc.remedy)}" if exc.remedy else ""
        typer.echo(f"{exc}; run the same command{how} to go on from there", err=True)
        sys.exit(130)
    except OptionError as exc:  # the library names the field; the user typed a flag
        typer.echo(f"error: {exc.render(flag_for)}", err=True)
        sys.exit(2)
    except OutputExistsError as exc:
        typer.echo(f"error: {exc} (use {flag_for(exc.remedy)} to go on with it)"
                   if exc.remedy != "overwrite" else
                   f"error: {exc} (use --overwrite to replace it)", err=True)
        sys.exit(2)
    except USER_ERRORS as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # full disk, permissions, a vanished file: still one line
        typer.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        sys.exit(2)
    except Exception as exc:
        import rasterio.errors

        if isinstance(exc, rasterio.errors.RasterioError):
            typer.echo(f"error: {str(exc).splitlines()[0]}", err=True)
            sys.exit(2)
        raise
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
