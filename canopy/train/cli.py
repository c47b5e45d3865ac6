"""The ``train`` command: thin — parse options, build the data, call :func:`canopy.train.loop.train`.

User errors surface as ``canopy.errors`` exceptions (the main CLI prints ``error: …``, exit 2).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


def _parse_fractions(text: str) -> tuple[float, float, float]:
    from canopy.errors import InputError

    try:
        parts = tuple(float(v) for v in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise InputError(f"--split-fractions {text!r}: expected three numbers TRAIN,VAL,TEST, e.g. 0.8,0.1,0.1")
    return parts  # type: ignore[return-value]


def _command_line() -> str:
    args = sys.argv[1:]
    if args and args[0] == "train":
        return "canopy " + " ".join(shlex.quote(a) for a in args)
    return "canopy train (called as a library)"


def train_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoint, log.csv, model/.")],
    catalog: Annotated[Optional[Path], typer.Option(
        help="Catalog (.parquet) whose imagery and CHM rows are paired into chips.")] = None,
    aoi: Annotated[Optional[str], typer.Option(
        help="Area of interest: vector file, WKT, bbox 'minx,miny,maxx,maxy' or place name.")] = None,
    pairs: Annotated[Optional[list[str]], typer.Option(
        "--pairs", help="IMAGE.tif:CHM.tif[:EPSG:NNNN for a CHM without CRS]; repeat. The CHM "
                        "may be a height-normalised LAS/LAZ (rasterised at --lidar-resolution).")] = None,
    synthetic: Annotated[int, typer.Option(
        help="Add N procedural scenes (canopy synth: SYNTHETIC, exact labels) to the training set.")] = 0,
    backbone: Annotated[Optional[Path], typer.Option(
        help="Backbone-only weights (.safetensors/.pth; DINOv2, DINOv3 (incl. SAT-493M), timm, "
             "Hugging Face or canopy 'backbone.*' naming).")] = None,
    arch: Annotated[str, typer.Option(
        help="Backbone variant when no --backbone is given: vit_micro, vit_tiny, vit_small, vit_base, ...")] = "vit_small",
    init_model: Annotated[Optional[str], typer.Option(
        help="Start from a whole height model (native folder, .safetensors or HRCH .pth).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the training chips (instead of --steps).")] = None,
    batch_size: Annotated[int, typer.Option(help="Chips per step (global, split across DDP ranks).")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the decoder (warm-up, cosine decay).")] = 1e-3,
    precision: Annotated[str, typer.Option(help="auto (bf16 on GPUs and on CPUs with native bf16, else fp32), fp32 or bf16 (autocast; also on CPU).")] = "auto",
    finetune_blocks: Annotated[int, typer.Option(
        help="Also train the last N backbone blocks (-1: the whole backbone; 0: frozen).")] = 0,
    cosub: Annotated[bool, typer.Option(
        "--cosub", help="Submodel co-training (needs --finetune-blocks).")] = False,
    drop_path: Annotated[float, typer.Option(help="Stochastic depth on fine-tuned blocks.")] = 0.1,
    gedi_weight: Annotated[float, typer.Option(
        help="Weight of the sparse GEDI footprint loss (0: off).")] = 0.0,
    gedi: Annotated[Optional[Path], typer.Option(
        help="GEDI shots (GeoParquet/GeoJSON points or an ingest folder); default: the catalog's.")] = None,
    gedi_rh: Annotated[str, typer.Option(help="RH column to fit: rh95 or rh98.")] = "rh95",
    gsd: Annotated[float, typer.Option(help="Model ground sample distance, m.")] = 0.25,
    chip_size: Annotated[int, typer.Option(help="Chip (and model tile) size, px.")] = 128,
    stride: Annotated[Optional[int], typer.Option(help="Chip lattice step, px (default: half a chip).")] = None,
    block_size: Annotated[float, typer.Option(help="Spatial block for train/val/test splits, m.")] = 1000.0,
    split_fractions: Annotated[str, typer.Option(help="TRAIN,VAL,TEST shares of the blocks.")] = "0.8,0.1,0.1",
    chm_crs: Annotated[Optional[str], typer.Option(help="CRS of CHM files that carry none.")] = None,
    bands: Annotated[Optional[str], typer.Option(
        help="Imagery bands read as R,G,B or R,G,B,NIR, e.g. 1,2,3,4: four train a 4-band model "
             "(an RGB --backbone grows a near-infrared input).")] = None,
    lidar_resolution: Annotated[float, typer.Option(help="CHM cell for LAS/LAZ pairs, m.")] = 1.0,
    max_date_gap_days: Annotated[float, typer.Option(
        help="Drop labels of imagery/CHM pairs acquired further apart (when the catalog knows).")] = 730.0,
    n_bins: Annotated[int, typer.Option(help="Height bins of a fresh head.")] = 256,
    max_height: Annotated[float, typer.Option(help="Top bin of a fresh head, m.")] = 100.0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of weights, order, augmentation and splits.")] = 0,
    device: Annotated[str, typer.Option(help="auto (a GPU when there is one), cpu or cuda.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads.")] = None,
    name: Annotated[str, typer.Option(help="Model name written in its config and card.")] = "canopy_trained",
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also log to TensorBoard (if installed).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
) -> None:
    """Train the height decoder (and optionally the last backbone blocks) on lidar CHM chips."""
    from canopy.train.datasets import DataSpec, build_data
    from canopy.train.losses import LossConfig
    from canopy.predict.options import parse_bands
    from canopy.train.loop import TrainConfig, _prepare_out_dir, train

    band_list = parse_bands(bands) if bands else None
    cfg = TrainConfig(
        in_bands=len(band_list) if band_list else 3,
        out_dir=str(out), arch=arch, backbone_path=str(backbone) if backbone else None,
        init_model=init_model, n_bins=n_bins, max_height_m=max_height, gsd=gsd,
        chip_size=chip_size, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr,
        precision=precision, finetune_blocks=finetune_blocks, drop_path=drop_path, cosub=cosub,
        loss=LossConfig(gedi_weight=gedi_weight, gedi_rh_column=gedi_rh,
                        gedi_percentile=float(gedi_rh[2:]) if gedi_rh[2:].isdigit() else 95.0),
        seed=seed, device=device, threads=threads, model_name=name, tensorboard=tensorboard,
    )
    cfg.check()  # cheap option errors before reading any raster
    _prepare_out_dir(out, resume, create=False)
    spec = DataSpec(
        catalog=str(catalog) if catalog else None, aoi=aoi, pairs=tuple(pairs or ()),
        synthetic=synthetic, gedi=str(gedi) if gedi else None, use_gedi=gedi_weight > 0,
        rh_column=gedi_rh, gsd=gsd, chip_size=chip_size, stride=stride, block_size_m=block_size,
        split_fractions=_parse_fractions(split_fractions), seed=seed,
        max_date_gap_days=max_date_gap_days, lidar_resolution=lidar_resolution, chm_crs=chm_crs,
        work_dir=str(out), bands=band_list,
    )
    from canopy.console import ProgressBars

    train_records, val_records, summary = build_data(spec)
    with ProgressBars("train", enabled=not quiet) as bars:
        result = train(cfg, train_records, val_records, resume=resume, data_summary=summary,
                       command=_command_line(), progress=bars)
    if result.finished:
        v = result.final_val
        tail = (f"; val MAE {v['val_mae']:.2f} m (mean-height baseline {v['baseline_mae']:.2f} m)"
                if v else "")
        typer.echo(f"trained {result.total_steps} steps in {result.seconds / 60:.1f} min{tail}; "
                   f"model: {result.model_dir}")
    else:
        typer.echo(f"stopped at step {result.steps_done}/{result.total_steps}; continue with --resume")


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to ``app``."""
    app.command("train")(train_command)
