"""``canopy train-gedi-correction``: thin; parses options and calls
:func:`canopy.train.gedi_correction.train_gedi_correction`. User errors (canopy.errors) propagate
to the main CLI, which prints one line and exits non-zero."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def train_gedi_correction_command(
    output: Annotated[Path, typer.Option("-o", "--output", help="Run folder to write (model.safetensors, config.json, metrics.json).")],
    catalog: Annotated[Optional[Path], typer.Option(help="Catalog .parquet: its imagery and the GEDI shots over it.")] = None,
    imagery: Annotated[Optional[list[Path]], typer.Option(help="RGB raster; repeat for several (instead of --catalog).")] = None,
    gedi: Annotated[Optional[list[Path]], typer.Option(help="GEDI shots: GeoParquet/GeoJSON points with rh95/rh98, or a `catalog add gedi` folder; repeatable.")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="The decoder whose heights are corrected: checkpoint path, native folder or name.")] = "default",
    heights: Annotated[Optional[list[Path]], typer.Option(help="Heights already predicted by the decoder, one per --imagery (e.g. `canopy predict` outputs): the decoder is not run.")] = None,
    rh: Annotated[str, typer.Option("--rh", help="GEDI metric to match: rh95 or rh98 (the footprint percentile follows).")] = "rh95",
    steps: Annotated[int, typer.Option(min=0, help="Optimiser steps.")] = 400,
    batch_blocks: Annotated[int, typer.Option(min=1, help="Blocks per step.")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")] = 2e-3,
    block_px: Annotated[int, typer.Option(help="Block side in pixels of the height map.")] = 1024,
    input_px: Annotated[int, typer.Option(help="The block is averaged down to this many pixels.")] = 256,
    scalars: Annotated[str, typer.Option(help="Extra inputs, comma-separated: latlon, sun (none by default).")] = "",
    sun_elevation: Annotated[Optional[float], typer.Option(help="Sun elevation (degrees) of imagery without a CANOPY_SUN_ELEVATION tag; needed with --scalars sun.")] = None,
    interpolation: Annotated[str, typer.Option(help="Factor field between block centres: bilinear or bicubic.")] = "bilinear",
    seed: Annotated[int, typer.Option(help="Seed of initialisation, batches and augmentation.")] = 0,
    device: Annotated[str, typer.Option(help="auto (a GPU when there is one), cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option(help="Decoder precision: auto (as canopy predict chooses it), fp32, bf16 or int8 (CPU).")] = "auto",
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Decoder tiles per forward pass (default: 8 on a CPU, 64 on a GPU).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Write into a non-empty run folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress messages.")] = False,
) -> None:
    """Fit the GEDI correction model: one factor per imagery block so that factor × the decoder's
    footprint percentile matches GEDI RH. Apply it with `canopy predict --gedi-correction DIR`."""
    from canopy.errors import InputError
    from canopy.model.device import resolve_device
    from canopy.model.gedi_correction import CorrectionConfig
    from canopy.train.gedi_correction import FitOptions, check_run_dir, train_gedi_correction
    from canopy.train.gedi_samples import scenes_from_catalog, scenes_from_files

    if catalog is not None and (imagery or gedi):
        raise InputError("give --catalog or --imagery with --gedi, not both")
    if precision not in ("auto", "fp32", "bf16", "int8"):
        raise InputError(f"--precision must be auto, fp32, bf16 or int8, got '{precision}'")
    check_run_dir(output, overwrite)  # before any reading or compute
    dev = resolve_device(device)
    cfg = CorrectionConfig(block_px=block_px, input_px=input_px, rh_metric=rh.lower(),
                           scalars=tuple(s.strip() for s in scalars.split(",") if s.strip()),
                           interpolation=interpolation)
    opts = FitOptions(steps=steps, batch_blocks=batch_blocks, lr=lr, seed=seed)
    if catalog is not None:
        if heights:
            raise InputError("--heights goes with --imagery, not with --catalog")
        scenes = scenes_from_catalog(catalog)
    else:
        scenes = scenes_from_files([str(p) for p in imagery or []], [str(p) for p in gedi or []],
                                   [str(p) for p in heights] if heights else None)
    decoder = None if heights else model
    from canopy.console import ProgressBars

    with ProgressBars("fit", enabled=not quiet) as bars:
        report = train_gedi_correction(scenes, output, cfg, opts, decoder=decoder, device=dev,
                                       precision=precision, batch_size=batch_size,
                                       sun_elevation=sun_elevation, overwrite=overwrite,
                                       progress=bars)
    val = report.val_after is not None
    before = report.val_before if val else report.train_before
    after = report.val_after if val else report.train_after
    typer.echo(
        f"wrote {output}: {report.n_blocks_train} training blocks; GEDI MAE on "
        f"{'validation' if val else 'training'} shots {before.mae:.2f} m → {after.mae:.2f} m "
        f"(one global factor {report.global_factor:.3f}: "
        f"{(report.val_global if val else report.train_global).mae:.2f} m)")


def register(app: typer.Typer) -> None:
    """Add ``train-gedi-correction`` to the ``canopy`` app."""
    app.command("train-gedi-correction")(train_gedi_correction_command)
