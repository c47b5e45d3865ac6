"""State-scale prediction: one Dask task per output cell, resumable, seam-free.

The driver (this process) resolves the AOI into grid cells (grid.py), indexes the imagery,
and submits one task per unfinished cell to a ``dask.distributed`` cluster (a LocalCluster by
default, or ``--scheduler ADDRESS``). Each task reads only the imagery window its cell needs plus
the halo of model tiles that overlap it, runs the blended model tiles, masks pixels outside the
AOI or without imagery, and writes ``cells/{id}.tif`` atomically. The driver appends each result
to the manifest as it arrives, then builds the mosaic, overview, STAC collection and style.

The model is loaded once per worker process (a module-level cache keyed by checkpoint and
device), never shipped with tasks. A state is ~10⁵ cells, so tasks are submitted in a bounded
window rather than as one giant graph (docs/geo_conventions.md).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from affine import Affine
from rasterio.features import geometry_mask

import canopy
from canopy.errors import CanopyError, InputError, OptionError, OutputError, RunInterrupted
from canopy.io.cog import check_free_space, check_writable, estimated_cog_bytes
from canopy.io.outputs import (
    OOD_UNLIKE_SHARE, TileLattice, dates_tag, prediction_tags, unlike_counts, write_prediction)
from canopy.model.ood import window_scores
from canopy.predict.blend import default_stride, edge_reach, predict_array
from canopy.predict.grid import Cell, cells_for_aoi, tile_window
from canopy.predict.manifest import Manifest, check_or_write_run, ood_unlike_share, sha256_file
from canopy.predict.options import PredictOptions
from canopy.predict.sources import (
    Scene, index_imagery, read_mosaic, scene_resampling, scenes_for_window)
from canopy.progress import ProgressCallback, report

CELLS_DIR = "cells"
DEFAULT_CELL_PX = 4096


# ---------------------------------------------------------------------------------------------
# worker side

_MODELS: dict = {}
_CHOICES: dict = {}
_LOAD_LOCK = threading.RLock()
_CORRECTIONS: dict = {}


def worker_correction(path: str):
    if path not in _CORRECTIONS:
        from canopy.predict.correction import load_correction

        _CORRECTIONS.clear()
        _CORRECTIONS[path] = load_correction(path)
    return _CORRECTIONS[path]


def worker_device(device: str) -> str:
    """The device this worker runs on: ``auto`` is a GPU when the worker has one; ``cuda`` on
    a node with several GPUs: worker k of a LocalCluster takes GPU k mod n."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" or torch.cuda.device_count() < 2:
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
        return f"cuda:{int(name) % torch.cuda.device_count()}"
    except (ValueError, TypeError):  # not inside a worker, or a non-numeric worker name
        return device


def worker_model(checkpoint: str, opts: PredictOptions):
    """The model for this worker process, loaded on first use and kept, in the precision
    ``opts`` asks for (``auto`` resolved here, on the worker's own hardware).

    One thread loads it, the others wait (a lock): two threads building a seeded random-weight
    model at once interleave the global RNG and get different weights (found with dask's
    threaded scheduler, ``canopy.xarray``)."""
    key = (checkpoint, opts.device, opts.precision)
    with _LOAD_LOCK:
        return _worker_model(checkpoint, opts, key)


def _worker_model(checkpoint: str, opts: PredictOptions, key):
    if key not in _MODELS:
        from canopy.model.auto import batch_size_for, choose_precision
        from canopy.model.checkpoints import load_model

        _MODELS.clear()  # one model per worker: never two big ones side by side
        _CHOICES.clear()
        model = load_model(checkpoint, device=worker_device(opts.device))
        choice = choose_precision(model, opts.precision,
                                  batch_size=batch_size_for(model.device, opts.batch_size))
        model.prepare_for_inference(choice.precision)
        # the same model answers for the resolved settings the driver sends with each cell
        for k in (key, (checkpoint, model.device.type, choice.precision)):
            _MODELS[k], _CHOICES[k] = model, choice
    return _MODELS[key]


def resolve_on_worker(checkpoint: str, opts: PredictOptions) -> tuple[str, str, str]:
    """(device type, precision, reason) a worker runs ``opts`` with: ``auto`` settings are
    resolved where the model runs (its GPU, its CPU's probe), and the model stays loaded."""
    worker_model(checkpoint, opts)
    choice = _CHOICES[(checkpoint, opts.device, opts.precision)]
    return choice.device.type, choice.precision, choice.reason


def predict_cell(cell: Cell, aoi_wkb: bytes, scenes: list[Scene], checkpoint: str,
                 opts: PredictOptions, out_dir: str) -> dict:
    """Predict one output cell and write its COG; returns the manifest record."""
    t0 = time.time()
    if opts.torch_threads:
        import torch

        # per call, not per model load: OpenMP's thread count is a per-thread setting, and the
        # executor thread that runs this task need not be the one that loaded the model
        torch.set_num_threads(opts.torch_threads)
    model = worker_model(checkpoint, opts)
    tile = model.cfg.tile_size
    stride = opts.stride or default_stride(tile)
    dr, dc, nr, nc = tile_window(cell, tile, stride)
    window_transform = cell.transform @ Affine.translation(dc, dr)
    record = {"id": cell.id, "epsg": cell.epsg, "host": socket.gethostname()}
    rgb, valid, used = read_mosaic(scenes, cell.crs, window_transform, (nr, nc), cell.gsd)
    if not valid[-dr:-dr + cell.cell_px, -dc:-dc + cell.cell_px].any():
        return {**record, "status": "empty", "reason": "no imagery", "seconds": time.time() - t0}

    margin = 0
    if not valid.all():
        # imagery ends inside the window: the edge rule mirrors it into the rest, and needs the
        # context around the window to give every pixel the input any other window would
        margin = 2 * edge_reach(tile)
        wt = window_transform @ Affine.translation(-margin, -margin)
        # (scenes seen only in that context count as sources: their pixels may be mirrored in)
        rgb, valid, used = read_mosaic(scenes, cell.crs, wt, (nr + 2 * margin, nc + 2 * margin),
                                       cell.gsd)
    height, spread = predict_array(model, rgb, valid, precision=opts.precision,
                                   batch_size=opts.batch_size, with_std=opts.uncertainty,
                                   stride=stride, origin=(0, 0), margin=margin,
                                   fixed_batch=True, lanes=opts.lanes)
    crop = (slice(-dr, -dr + cell.cell_px), slice(-dc, -dc + cell.cell_px))
    height = height[crop]
    spread = spread[crop] if spread is not None else None
    if opts.gedi_correction:
        # the factor of a block depends on the whole block's imagery: read the blocks around the
        # cell (not just its tile halo) so every cell gets what a whole-area call would give
        from canopy.predict.correction import correct_heights, required_window

        corr = worker_correction(opts.gedi_correction)
        win = required_window(cell.transform, (cell.cell_px, cell.cell_px), corr)
        wt = win.transform(cell.transform)
        rgb_c, ok_c, _ = read_mosaic(scenes, cell.crs, wt, (win.height, win.width), cell.gsd)
        height, spread = correct_heights(corr, height, spread, rgb_c, ok_c, cell.transform,
                                         cell.crs, rgb_transform=wt)
    outside = geometry_mask([shapely.from_wkb(aoi_wkb)], out_shape=height.shape,
                            transform=cell.transform, invert=False)
    height[outside] = np.nan
    if spread is not None:
        spread[outside] = np.nan
    if not np.isfinite(height).any():
        return {**record, "status": "empty", "reason": "outside AOI", "seconds": time.time() - t0}

    ood, scores = None, None
    if getattr(model, "ood", None) is not None:
        # the cell's own tiles (canopy.model.ood), read from what was read for its heights
        r_off, c_off = margin - dr, margin - dc

        def cell_pixels(r, c, h, w):
            rs, cs = slice(r_off + r, r_off + r + h), slice(c_off + c, c_off + c + w)
            return rgb[:, rs, cs], valid[rs, cs]

        scores = window_scores(model, cell_pixels, (0, 0, cell.cell_px, cell.cell_px),
                               cell.cell_px, cell.cell_px)
        ood = unlike_counts(scores, height)
        scores[~np.isfinite(height)] = np.nan  # the band covers the mapped pixels only
    dates = [d for s in scenes if s.path in used for d in _scene_dates(s)]
    # the tiles this cell computed: its window's, from the first halo tile on (cell pixels)
    lattice = TileLattice(tile, stride, origin_col=dc, origin_row=dr,
                          count_col=(nc - tile) // stride + 1, count_row=(nr - tile) // stride + 1)
    tags = prediction_tags(model.cfg, opts, lattice=lattice, sources=used,
                           resampling=[scene_resampling(s, cell.crs, cell.gsd)
                                       for s in scenes if s.path in used],
                           imagery_dates=dates_tag(dates), cell=cell.id)
    if ood and ood[1]:
        tags[OOD_UNLIKE_SHARE] = f"{ood[0] / ood[1]:.4f}"
    rel = f"{CELLS_DIR}/{cell.id}.tif"
    path = write_prediction(Path(out_dir) / rel, height, spread, crs=cell.crs,
                            transform=cell.transform, dtype=opts.dtype, tags=tags, overwrite=True,
                            qml=True,  # each cell opens styled in QGIS too
                            ood=scores if opts.ood_band else None)
    st = path.stat()
    return {**record, "status": "done", "path": rel, "bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path), "sources": used,
            "items": [s.item for s in scenes if s.path in used and s.item],
            "datetime_start": min(dates) if dates else None,
            "datetime_end": max(dates) if dates else None,
            **({"ood_unlike": ood} if ood else {}),
            "seconds": round(time.time() - t0, 3)}


def _scene_dates(scene: Scene) -> list[str]:
    """The acquisition date(s) a scene's datetime text holds, as ISO dates."""
    from data_catalog.imagery import parse_datetimes

    return [d.date().isoformat() for d in parse_datetimes(scene.datetime or "")]


# ---------------------------------------------------------------------------------------------
# driver side


@dataclass
class RunSummary:
    out_dir: Path
    cells_total: int
    cells_done: int
    cells_skipped: int
    cells_empty: int
    seconds: float
    mosaic: Path | None
    dashboard: str | None
    skipped_scenes: list = field(default_factory=list)  # {"path", "error"} of imagery left out
    ood_unlike_share: float | None = None  # of the mapped pixels (models with an OOD reference)


def _aoi_sha(geom) -> str:
    return hashlib.sha256(shapely.to_wkb(shapely.normalize(geom), hex=False)).hexdigest()


def _imagery_sha(scenes: list[Scene]) -> str:
    h = hashlib.sha256()
    for s in sorted(scenes, key=lambda s: s.path):
        if s.version is not None or "://" in s.path:  # remote: the item and its HTTP version
            h.update(f"{s.path}|{s.item}|{s.version}".encode())
            continue
        st = os.stat(s.path)
        h.update(f"{s.path}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _model_identity(checkpoint: str) -> tuple[str, str]:
    from canopy.model.checkpoints import RANDOM_VARIANTS, DEFAULT_MODEL_DIR, load_model

    path = Path(checkpoint)
    if checkpoint in RANDOM_VARIANTS:
        return checkpoint, checkpoint
    if checkpoint in ("default", None):
        path = DEFAULT_MODEL_DIR
        load_model("default")  # raises the plain "no trained default model" error
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.exists():
        raise InputError(f"checkpoint '{checkpoint}' not found")
    st = weights.stat()
    return str(path.resolve()), hashlib.sha256(f"{weights.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()


def _visible(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _absolute_if_path(value: str | None) -> str | None:
    if value is None or not Path(value).exists():
        return value  # a registered name ('micro', 'default'), or missing (reported later)
    return str(Path(value).resolve())


def _correction_identity(path: str | None) -> str | None:
    if not path:
        return None
    folder = Path(path)
    weights = folder / "model.safetensors" if folder.is_dir() else folder
    if not weights.exists():
        raise OptionError("gedi_correction", f"'{path}' holds no model.safetensors")
    return sha256_file(weights)


def connect(scheduler: str | None, workers: int | None, threads: int | None):
    """A Client on ``scheduler``, or on a new LocalCluster of worker processes."""
    from distributed import Client

    if scheduler:
        try:
            return Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise InputError(f"scheduler '{scheduler}' did not answer ({type(exc).__name__})") from None
    return Client(local_cluster(workers or 1))


def local_cluster(n_workers: int = 1, **kwargs):
    """A LocalCluster of single-threaded worker processes (torch threads itself, per task).

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``; glibc then stops adapting
    its mmap threshold, so every large activation tensor is a fresh mmap and its page faults.
    With two torch threads that made a ViT-L tile 1.75× slower here (1.08 vs 0.62 s in int8);
    our workers allocate big short-lived tensors by design, so they start without it. Workers
    of an existing cluster (``--scheduler``) should be started the same way (README).
    """
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                            dashboard_address=":0", silence_logs=40, **kwargs)


def predict_aoi(
    aoi,
    imagery,
    out_dir,
    checkpoint: str = "default",
    opts: PredictOptions | None = None,
    *,
    cell_px: int = DEFAULT_CELL_PX,
    scheduler: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    max_in_flight: int | None = None,
    client=None,
    verify: bool = False,
    skip_bad_scenes: bool = False,
) -> RunSummary:
    """Predict canopy height over an AOI into a folder of COG cells + mosaic + STAC + manifest.

    ``checkpoint`` is a model path or name (each worker loads it once); ``opts`` the prediction
    options (``bands``/``scale``/``crs`` are for one raster only: a state run needs uint8 RGB
    scenes with a CRS). ``client`` (a ``distributed.Client``) is used as is and left open;
    otherwise one is made from ``scheduler`` or a new LocalCluster and closed at the end.
    ``verify`` re-hashes every finished cell on resume instead of trusting unchanged size +
    mtime. ``skip_bad_scenes`` leaves out imagery files that fail the header check (unreadable,
    truncated, not RGB) instead of stopping; they are listed in ``summary.json`` and the
    summary. ``progress`` receives ``cells`` counts, and the Dask dashboard's address as a
    message. A cell whose task fails is logged as failed (the run goes on), then the run ends
    with an error naming it; running the command again retries it.
    """
    from data_catalog.aoi import resolve_aoi

    from canopy.model.checkpoints import load_config

    t0 = time.time()
    # workers of a remote cluster see paths as given: hand them absolute ones (shared filesystem)
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise OptionError("output", f"'{out_dir}' is a file; an area of interest writes a folder")
    check_writable(out_dir)
    opts = opts or PredictOptions()
    unsupported = [name for name in ("bands", "scale", "crs") if getattr(opts, name) is not None]
    if unsupported:
        raise OptionError(unsupported[0], "is not supported with an area of interest yet: state "
                                          "runs need uint8 RGB scenes with a CRS (make a VRT that "
                                          "selects bands)")
    checkpoint = _absolute_if_path(str(checkpoint))
    opts = opts.replace(gedi_correction=_absolute_if_path(opts.gedi_correction))
    model_cfg = load_config(checkpoint)
    opts.check_for(model_cfg.tile_size)
    if opts.ood_band:
        from canopy.model.checkpoints import has_ood_reference

        if not has_ood_reference(checkpoint):
            raise OptionError("ood_band", "this model carries no out-of-distribution reference "
                                          "(ood.safetensors beside its weights)")
        if opts.dtype != "float32":
            raise OptionError("ood_band", "the score band is a fraction; it needs --dtype float32")
    if model_cfg.backbone.in_chans != 3:
        raise OptionError("aoi", f"the model reads {model_cfg.backbone.in_chans} bands (R,G,B,NIR); "
                                 "area-of-interest runs read RGB scenes: predict its rasters one "
                                 "at a time with --bands")
    area = resolve_aoi(aoi)
    scenes, bad_scenes = index_imagery(imagery, skip_bad=skip_bad_scenes, aoi=area.geometry)
    scenes = [s for s in scenes if not Path(s.path).is_relative_to(out_dir)]
    for bad in bad_scenes:
        report(progress, "cells", 0, None, message=f"skipped {bad['error']}")
    if not scenes:
        raise OptionError("imagery", f"'{imagery}' holds no rasters outside the output folder")
    coverage = shapely.union_all([s.footprint for s in scenes])
    if not area.geometry.intersects(coverage):
        raise InputError(f"the AOI '{area.name}' does not intersect any of the {len(scenes)} imagery scene(s)")

    own_client = client is None
    if own_client and scheduler is None and opts.torch_threads is None:
        # dask sets OMP_NUM_THREADS=1 in its workers: without this, one core does all the work
        opts = opts.replace(torch_threads=max(1, (os.cpu_count() or 1) // (workers or 1)))
    client = connect(scheduler, workers, opts.torch_threads) if own_client else client
    try:
        return _run_cells(client, area, scenes, coverage, bad_scenes, out_dir, checkpoint, opts,
                          cell_px, overwrite, progress, max_in_flight, verify, t0)
    finally:
        if own_client:
            cluster = getattr(client, "cluster", None)
            client.close(timeout=10)
            if cluster is not None and scheduler is None:
                cluster.close(timeout=10)


def _resolve_auto(client, out_dir: Path, checkpoint: str, opts: PredictOptions,
                  progress: ProgressCallback | None) -> PredictOptions:
    """``auto`` device and precision, decided on a worker (its GPU, its CPU's timed probe,
    :mod:`canopy.model.auto`). A run resumed with the same ``auto`` settings keeps what it was
    started with: a probe is a timing and may choose otherwise on another day, which would
    make the folder look like another run."""
    if "auto" not in (opts.device, opts.precision):
        return opts
    import json

    from canopy.predict.manifest import RUN_FILE

    try:
        old = json.loads((out_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        old = {}
    if old.get("asked") == _asked(opts):
        report(progress, "cells", 0, None, message=f"precision {old['precision']} on "
                                                   f"{old['device']}, as this run started")
        return opts.replace(device=old["device"], precision=old["precision"],
                            batch_size=old["batch_size"])
    device, precision, reason = client.submit(resolve_on_worker, checkpoint, opts,
                                              pure=False).result()
    report(progress, "cells", 0, None, message=f"{reason} ({device})")
    from canopy.model.auto import batch_size_for

    return opts.replace(device=device, precision=precision,
                        batch_size=batch_size_for(device, opts.batch_size))


def _asked(opts: PredictOptions) -> dict:
    """What the user asked for, before ``auto`` and default settings were resolved."""
    return {"device": opts.device, "precision": opts.precision, "batch_size": opts.batch_size}


def _run_cells(client, area, scenes, coverage, bad_scenes, out_dir, checkpoint, opts, cell_px,
               overwrite, progress, max_in_flight, verify, t0) -> RunSummary:
    """The part of :func:`predict_aoi` that needs the cluster: settings resolved on a worker,
    the run's identity, the cells, the mosaics."""
    from canopy.model.checkpoints import load_config
    from canopy.predict.mosaic import finish_outputs

    dashboard = getattr(client, "dashboard_link", None)
    if dashboard:
        report(progress, "cells", 0, None, message=f"Dask dashboard: {dashboard}")
    asked = _asked(opts)
    opts = _resolve_auto(client, out_dir, checkpoint, opts, progress)
    model_ref, model_sha = _model_identity(checkpoint)
    cfg = load_config(checkpoint)
    stride = opts.stride or default_stride(cfg.tile_size)
    opts = opts.replace(stride=stride)
    run = {
        "format": 1, "software": f"canopy-height {canopy.__version__}",
        "aoi": area.name, "aoi_sha256": _aoi_sha(area.geometry), "model": cfg.name,
        "model_version": cfg.version,
        "model_ref": model_ref, "model_sha256": model_sha, "gsd": cfg.gsd, "cell_px": cell_px,
        "stride": stride, "dtype": opts.dtype, "precision": opts.precision,
        "uncertainty": opts.uncertainty, "imagery_sha256": _imagery_sha(scenes),
        # written only when on: a run from before the option had none, and is the same run
        **({"ood_band": True} if opts.ood_band else {}),
        "gedi_correction_sha256": _correction_identity(opts.gedi_correction),
        "imagery": sorted(s.path for s in scenes), "trained": cfg.trained,
        # a different batch shape or device can change the last bits (see blend.fixed_batch)
        "batch_size": opts.batch_size, "device": opts.device.split(":")[0],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "asked": asked,  # not identity: what the user asked for, before auto was resolved
    }
    resumed = check_or_write_run(out_dir, run, overwrite)
    manifest = Manifest.load(out_dir) if resumed else Manifest(out_dir)
    if not resumed:
        manifest.path.unlink(missing_ok=True)

    from shapely.strtree import STRtree

    tree = STRtree([s.footprint for s in scenes])
    corr_cfg = None
    if opts.gedi_correction:
        from canopy.predict.correction import load_correction, required_window

        corr_cfg = load_correction(opts.gedi_correction)
    cells = cells_for_aoi(area.geometry.intersection(coverage.buffer(1e-6)), cfg.gsd, cell_px)
    todo, skipped, no_imagery = [], 0, 0
    for cell, geom in cells:
        if manifest.is_finished(cell.id, verify=verify):
            skipped += 1
            continue
        dr, dc, nr, nc = tile_window(cell, cfg.tile_size, stride)
        # the scenes a cell needs: those reaching its tiles or the context the edge rule reads
        ctx = 2 * edge_reach(cfg.tile_size)
        dr, dc, nr, nc = dr - ctx, dc - ctx, nr + 2 * ctx, nc + 2 * ctx
        wt = cell.transform @ Affine.translation(dc, dr)
        if corr_cfg is not None:
            # the correction reads whole blocks around the cell: every scene reaching them counts,
            # or a block's factor would differ between neighbouring cells (a seam)
            win = required_window(cell.transform, (cell.cell_px, cell.cell_px), corr_cfg)
            r0, c0 = min(dr, win.row_off), min(dc, win.col_off)
            r1 = max(dr + nr, win.row_off + win.height)
            c1 = max(dc + nc, win.col_off + win.width)
            wt, (nr, nc) = cell.transform @ Affine.translation(c0, r0), (r1 - r0, c1 - c0)
        hit = scenes_for_window(scenes, cell.crs, wt, (nr, nc), tree)
        if not hit:  # no scene reaches this cell: nothing to schedule
            manifest.append({"id": cell.id, "epsg": cell.epsg, "status": "empty",
                             "reason": "no imagery"})
            no_imagery += 1
            continue
        aoi_wkb = shapely.to_wkb(geom.intersection(shapely.box(*cell.bounds)))
        todo.append((cell, aoi_wkb, hit))

    # a full disk would stop the run hours in: say so now (cells + the overview's sixteenth)
    bands = 1 + opts.uncertainty + opts.ood_band
    check_free_space(out_dir, estimated_cog_bytes(len(todo) * cell_px * cell_px * 17 // 16,
                                                  opts.dtype, bands),
                     f"{len(todo)} cell(s) of {cell_px}² px")
    done, empty = 0, no_imagery
    finished = skipped + no_imagery
    report(progress, "cells", finished, len(cells))
    failed: list[dict] = []
    cell_of: dict = {}  # key → (cell, future) of the tasks in flight
    try:
        from distributed import as_completed

        n_workers = max(1, len(client.scheduler_info().get("workers", {})) or 1)
        window = max_in_flight or 2 * n_workers
        pending = iter(todo)
        futures = as_completed()

        def submit_next() -> None:
            item = next(pending, None)
            if item is not None:
                fut = client.submit(predict_cell, *item, checkpoint, opts, str(out_dir), pure=False)
                cell_of[fut.key] = (item[0], fut)
                futures.add(fut)

        for _ in range(window):
            submit_next()
        for fut in futures:
            cell, _ = cell_of.pop(fut.key)
            try:
                rec = fut.result()
                if rec["status"] == "done" and not _visible(out_dir / rec["path"], rec["bytes"]):
                    raise OutputError(f"{rec['path']} was written by a worker but is not visible "
                                      "here: workers and driver must share the output folder")
            except Exception as exc:  # one bad scene or a lost worker must not sink a state run
                rec = {"id": cell.id, "epsg": cell.epsg, "status": "failed",
                       "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
                failed.append(rec)
            manifest.append(rec)
            done += rec["status"] == "done"
            empty += rec["status"] == "empty"
            finished += 1
            report(progress, "cells", finished, len(cells))
            submit_next()
    except KeyboardInterrupt:
        # Ctrl-C: stop the cells in flight (a worker busy with a ViT-L cell would otherwise hold
        # the cluster's shutdown for minutes), keep what is logged, and say how to go on
        client.cancel([f for _, f in cell_of.values()])
        raise RunInterrupted(
            f"interrupted: {done} cell(s) written in this run, {skipped + done + empty} of "
            f"{len(cells)} finished and kept") from None

    if failed:
        raise CanopyError(
            f"{len(failed)} cell(s) failed, first {failed[0]['id']}: {failed[0]['error']} "
            f"(logged in {manifest.path}; run the same command again to retry them)"
        )
    mosaic = finish_outputs(out_dir, manifest, run, area, skipped_scenes=bad_scenes)
    return RunSummary(out_dir, len(cells), done, skipped, empty, time.time() - t0, mosaic, dashboard,
                      bad_scenes, ood_unlike_share(manifest.records.values()))
