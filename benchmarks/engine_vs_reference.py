"""The state-scale engine against the HighResCanopyHeight notebook's loop, same raster, same weights.

Reference (``run_chm_model.ipynb::windowed_infer_loop`` as described in
docs/reference_model.md): 1024-px windows that do not overlap (the last row/column
shifted to end at the edge), each cut into 256-px tiles at stride 192, all tiles of a window in
one batch, Gaussian apodisation (1 in the central 224², 0 in a 16-px border, blurred with σ = 8,
floor 1e-14), no blending between windows; the model is the released forward pass restated
from a state dict (benchmarks/hrch_reference.py: explicit attention matmuls, all bin logits),
loaded from a checkpoint in the released layout and warmed up before the loop is timed. Run as
published (fp32) and in bf16 autocast, so precision and engineering are told apart.

One-raster ``canopy predict`` (``--cli``): the whole command in a new process, with no
precision flag and with ``--precision bf16``; ``auto``'s probe (once per machine, cached) is run
first and reported apart.

Engine: ``canopy predict --aoi`` (predict_aoi) on a LocalCluster with one worker process, cells
aligned with the raster, timed twice: cold (cluster start + model load included) and warm; with
``--warm-only`` the model is loaded on the worker first and one run is timed.

Each variant runs in its own process; peak RSS is the largest summed RSS of that process and its
children, sampled every 0.1 s. Random weights measure speed only; ``--edge-checkpoint`` names a
trained model for the edge-error figure of both loops.

    python benchmarks/engine_vs_reference.py --size 2048 --checkpoint hrch_v1_large_random
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GSD = 0.6


# --------------------------------------------------------------------------------- helpers


class PeakRSS:
    """Largest summed RSS of this process and its children while the block runs."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, False

        def poll():
            while not self._stop:
                try:
                    rss = self.proc.memory_info().rss + sum(
                        c.memory_info().rss for c in self.proc.children(recursive=True))
                    self.peak = max(self.peak, rss)
                except Exception:
                    pass
                time.sleep(0.1)

        self._t = threading.Thread(target=poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()


def scene_cell(cell_px: int) -> tuple[int, int]:
    """(ix, iy) of the engine cell at the scene's upper-left corner: in Florida near the NEON
    sample's own place (≈ 405 km E, 3,286 km N in UTM 17), whatever the cell size. (A fixed
    cell index put a 4096-px-cell scene at 59° N, 311 km east of zone 17's meridian: the engine
    then mapped it in zone 18, warped and over four cells, which the first 4096² runs timed.)"""
    cell_m = cell_px * GSD
    return round(405_504 / cell_m), round(3_285_811 / cell_m) - 1


def make_scene(path: Path, size: int, cell_px: int) -> Path:
    """size² uint8 RGB at 0.6 m in EPSG:32617, mirrored from the real NEON sample scene, with its
    upper-left corner on the engine's cell lattice so one cell is one block of the raster."""
    import rasterio
    from affine import Affine

    with rasterio.open(ROOT / "canopy" / "data" / "sample_osbs_029.tif") as ds:
        tile = ds.read()
    tile = np.where(tile == 255, 254, tile)  # the sample's nodata value must not punch holes
    reps = -(-size // tile.shape[1]) + 1
    row = np.concatenate([tile if i % 2 == 0 else tile[:, :, ::-1] for i in range(reps)], axis=2)
    cell_m = cell_px * GSD
    ix, iy = scene_cell(cell_px)
    x0, y0 = ix * cell_m, (iy + 1) * cell_m
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32617", transform=Affine(GSD, 0, x0, 0, -GSD, y0), tiled=True,
                       compress="deflate", BIGTIFF="IF_SAFER") as out:
        for r0 in range(0, size, 1024):
            h = min(1024, size - r0)
            rows = np.arange(r0, r0 + h) % (2 * tile.shape[1])
            rows = np.where(rows < tile.shape[1], rows, 2 * tile.shape[1] - 1 - rows)
            out.write(np.ascontiguousarray(row[:, rows, :size]),
                      window=rasterio.windows.Window(0, r0, size, h))
    return path


def apodisation(tile: int = 256, border: int = 16, sigma: float = 8.0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    w = np.zeros((tile, tile), np.float64)
    w[border:tile - border, border:tile - border] = 1.0
    return np.maximum(gaussian_filter(w, sigma), 1e-14)


def reference_geometry(tile: int = 256) -> dict:
    """The notebook's window/stride/apodisation for a model tile: as published for 256-px tiles
    (1024-px windows, stride 192, 16-px border, σ 8), scaled in proportion for other tiles."""
    return {"tile": tile, "window": 4 * tile, "stride": tile * 3 // 4,
            "border": max(1, tile // 16), "sigma": tile / 32}


def window_starts(n: int, window: int) -> list[int]:
    s = list(range(0, max(n - window, 0) + 1, window))
    if s[-1] + window < n:
        s.append(n - window)  # last window shifted to end at the edge (overwrites)
    return s


def reference_loop(released, img: np.ndarray, precision: str, window: int = 1024, tile: int = 256,
                   stride: int = 192, border: int = 16, sigma: float = 8.0) -> np.ndarray:
    """The notebook's method, faithfully: no overlap between windows, no blending across them.
    ``released`` is (state dict, config): the released forward (benchmarks/hrch_reference.py)."""
    import torch

    from benchmarks.hrch_reference import released_heights

    _, h, w = img.shape
    out = np.zeros((h, w), np.float32)
    weight = apodisation(tile, border, sigma)

    for r0 in window_starts(h, window):
        for c0 in window_starts(w, window):
            win = img[:, r0:r0 + window, c0:c0 + window]
            pos = [(r, c) for r in range(0, window - tile + 1, stride)
                   for c in range(0, window - tile + 1, stride)]
            batch = torch.from_numpy(np.stack([win[:, r:r + tile, c:c + tile] for r, c in pos]))
            hgt = released_heights(*released, batch, precision).numpy()
            num = np.zeros((window, window))
            den = np.zeros((window, window))
            for (r, c), p in zip(pos, hgt):
                num[r:r + tile, c:c + tile] += weight * p
                den[r:r + tile, c:c + tile] += weight
            out[r0:r0 + window, c0:c0 + window] = num / den
    return out


def ref_tile_count(size: int, window: int = 1024, tile: int = 256, stride: int = 192) -> int:
    n_win = -(-size // window)
    per = ((window - tile) // stride + 1) ** 2
    return n_win * n_win * per


# --------------------------------------------------------------------------------- variants


def run_reference(scene: str, checkpoint: str, precision: str, out: str) -> dict:
    """The released loop with the model loaded and warmed up (one window's batch run first), as
    the released notebook is usually timed: its load and first call are reported apart."""
    import rasterio
    import torch

    from benchmarks.hrch_reference import released_heights
    from canopy.model.checkpoints import infer_config

    t0 = time.perf_counter()
    sd = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    cfg = infer_config(sd, source=checkpoint)
    t_load = time.perf_counter() - t0
    geo = reference_geometry(cfg.tile_size)
    with rasterio.open(scene) as ds:
        img, profile = ds.read(), ds.profile
    n = ((geo["window"] - geo["tile"]) // geo["stride"] + 1) ** 2
    t0 = time.perf_counter()
    released_heights(sd, cfg, torch.from_numpy(img[:, :geo["tile"], :geo["tile"]].copy())[None]
                     .expand(n, -1, -1, -1), precision)
    t_warm = time.perf_counter() - t0
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        pred = reference_loop((sd, cfg), img, precision, **geo)
        dt = time.perf_counter() - t0
    profile.update(count=1, dtype="float32", nodata=float("nan"), compress="deflate")
    with rasterio.open(out, "w", **profile) as o:
        o.write(pred, 1)
    return {"variant": f"reference {precision}", "seconds": dt, "px_per_s": pred.size / dt,
            "load_s": t_load, "warm_up_s": t_warm,
            "tiles": ref_tile_count(img.shape[1], geo["window"], geo["tile"], geo["stride"]),
            "peak_rss_gib": rss.peak / 2**30}


def run_cli(scene: str, checkpoint: str, precision: str, out: str) -> dict:
    """``canopy predict scene.tif -o out.tif -c checkpoint`` as a user runs it (a new process:
    import, model load, auto choices, prediction, COG); ``precision`` ``default`` adds no flag."""
    import rasterio

    cmd = [sys.executable, "-m", "canopy.cli", "predict", scene, "-o", out, "-c", checkpoint,
           "-q", "--overwrite"]
    if precision != "default":
        cmd += ["--precision", precision]
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    with rasterio.open(out) as ds:
        pixels, ran = ds.width * ds.height, ds.tags()["CANOPY_PRECISION"]
    name = "canopy predict, no flags" if precision == "default" else f"canopy predict --precision {precision}"
    return {"variant": name, "seconds": dt, "px_per_s": pixels / dt, "precision_ran": ran,
            "peak_rss_gib": rss.peak / 2**30, "command": " ".join(cmd[3:])}


def run_probe(checkpoint: str) -> dict:
    """Run ``auto``'s timed probe for this model once (it is cached per machine, so the timed
    commands find it done, as every run after a user's first does); its cost is reported."""
    from canopy.model.auto import choose_precision
    from canopy.model.checkpoints import load_model

    model = load_model(checkpoint)
    t0 = time.perf_counter()
    choice = choose_precision(model, "auto")
    return {"seconds": time.perf_counter() - t0, "chose": choice.precision, "reason": choice.reason}


def released_layout_file(checkpoint: str, tmp: Path) -> str:
    """A checkpoint file in the released v1 layout: ``checkpoint`` itself when it is a file,
    else the registered model (random weights, seeded) saved as ``{'state_dict': …}``."""
    if Path(checkpoint).is_file():
        return checkpoint
    import torch

    from canopy.model.checkpoints import load_model

    path = tmp / f"{checkpoint}.pth"
    torch.save({"state_dict": load_model(checkpoint).state_dict()}, path)
    return str(path)


def _preload(checkpoint, opts) -> None:
    """Load the model in a worker (client.run), so a warm timing excludes it."""
    from canopy.predict.engine import worker_model

    worker_model(checkpoint, opts)


def run_engine(scene: str, checkpoint: str, precision: str, out: str, cell_px: int,
               batch: int, threads: int, stride: int = 0, cold: bool = True) -> dict:
    from distributed import Client
    import rasterio
    from rasterio.warp import transform_bounds

    from canopy.predict.engine import local_cluster, predict_aoi
    from canopy.predict.options import PredictOptions

    with rasterio.open(scene) as ds:
        w, s, e, n = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
        pixels = ds.width * ds.height
    # an AOI a hair inside the raster: cells are exactly the raster's blocks
    eps = 1e-6
    aoi = f"{w + eps},{s + eps},{e - eps},{n - eps}"
    job = (checkpoint, PredictOptions(precision=precision, batch_size=batch,
                                      torch_threads=threads, stride=stride or None))
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        cluster = local_cluster(1)  # the engine's own LocalCluster settings
        client = Client(cluster)
        t_cold = None
        if cold:
            predict_aoi(aoi, scene, Path(out) / "cold", *job, cell_px=cell_px, client=client)
            t_cold = time.perf_counter() - t0
        else:
            client.run(_preload, *job)
        t1 = time.perf_counter()
        warm = predict_aoi(aoi, scene, Path(out) / "warm", *job, cell_px=cell_px, client=client)
        t_warm = time.perf_counter() - t1
        done = sorted(r["id"] for r in (json.loads(line) for line in
                      open(Path(out) / "warm" / "manifest.jsonl")) if r["status"] == "done")
        client.close()
        cluster.close()
    name = f"engine {precision}" + (f" stride {stride}" if stride else "")
    return {"variant": name, "seconds": t_warm, "seconds_cold": t_cold,
            "px_per_s": pixels / t_warm, "cells": warm.cells_done,
            "peak_rss_gib": rss.peak / 2**30, "mosaic": str(Path(out) / "warm" / "mosaic.vrt"),
            "cell_ids": done}


def edge_scene(path: Path, size: int) -> Path:
    """Real imagery at its own 0.5 m GSD: the Kootenay drone ortho (UTM 11) mirrored to size²."""
    import rasterio
    from affine import Affine

    src = ROOT.parent / "shared" / "data" / "rgb_chm_pairs" / "kootenay_bc_drone" / "kootenayOrtho_from_rda.tif"
    with rasterio.open(src) as ds:
        a = ds.read()[:3]
        crs, t = ds.crs, ds.transform
    ry = np.arange(size) % (2 * a.shape[1])
    ry = np.where(ry < a.shape[1], ry, 2 * a.shape[1] - 1 - ry)
    rx = np.arange(size) % (2 * a.shape[2])
    rx = np.where(rx < a.shape[2], rx, 2 * a.shape[2] - 1 - rx)
    big = np.ascontiguousarray(a[:, ry][:, :, rx])
    x0 = np.floor(t.c / 512) * 512  # on the engine's lattice (cells of 1024 px at 0.5 m = 512 m)
    y0 = np.ceil(t.f / 512) * 512
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs=crs, transform=Affine(t.a, 0, x0, 0, t.e, y0), tiled=True,
                       compress="deflate") as out:
        out.write(big)
    return path


def _ratio_at(a: np.ndarray, col_borders, row_borders) -> dict:
    """Mean |Δ| across the given borders ÷ mean |Δ| elsewhere (horizontal + vertical pairs)."""
    from canopy.evaluate.metrics import _pair_sums

    h, w = a.shape
    a = a.astype(np.float64)
    across_c = np.isin(np.arange(1, w), col_borders)
    across_r = np.isin(np.arange(1, h), row_borders)
    sums = _pair_sums(a[:, 1:] - a[:, :-1], np.broadcast_to(across_c, (h, w - 1)))
    sums += _pair_sums(a[1:] - a[:-1], np.broadcast_to(across_r[:, None], (h - 1, w)))
    return sums.metrics()


def edge_errors(args, tmp: Path) -> dict:
    """Edge error of the reference loop and of the engine, trained weights, real imagery."""
    import rasterio

    from canopy.evaluate.metrics import tile_border_positions
    from canopy.model.checkpoints import load_config

    scene = edge_scene(tmp / "edge_scene.tif", args.edge_size)
    cfg = load_config(args.edge_checkpoint)
    geo = reference_geometry(cfg.tile_size)
    out = {"checkpoint": args.edge_checkpoint, "scene": f"Kootenay ortho mirrored to "
           f"{args.edge_size}² px at 0.5 m", "reference_geometry": geo}
    sub("ref", scene, released_layout_file(args.edge_checkpoint, tmp), "fp32", tmp / "edge_ref.tif")
    with rasterio.open(tmp / "edge_ref.tif") as ds:
        a = ds.read(1)
    borders = sorted({w0 + t + d for w0 in window_starts(a.shape[1], geo["window"])
                      for t in range(0, geo["window"] - geo["tile"] + 1, geo["stride"])
                      for d in (0, geo["tile"]) if 0 < w0 + t + d < a.shape[1]})
    out["reference"] = _ratio_at(a, borders, borders)
    for eighths in args.edge_strides:  # engine stride as eighths of the tile: 6 = the default
        stride = round(cfg.tile_size * eighths / 8)
        eng = sub("engine", scene, args.edge_checkpoint, args.edge_precision,
                  tmp / f"edge_engine_{eighths}", 1024, args.batch_size, args.threads, stride, 1)
        with rasterio.open(eng["mosaic"]) as m:
            a = m.read(1)
            g = m.res[0]
            col0, row0 = round(m.bounds.left / g), round(-m.bounds.top / g)
        r = _ratio_at(a, tile_border_positions(a.shape[1], cfg.tile_size, stride, (-col0) % stride),
                      tile_border_positions(a.shape[0], cfg.tile_size, stride, (-row0) % stride))
        out[f"engine {args.edge_precision}, stride {eighths}/8 tile ({stride} px)"] = r
    return out


def scene_cells(size: int, cell_px: int) -> list:
    """The engine cells that make up the size² scene of :func:`make_scene`."""
    from canopy.predict.grid import Cell

    ix, iy = scene_cell(cell_px)
    n = size // cell_px
    return [Cell(32617, ix + j, iy - i, cell_px, GSD) for i in range(n) for j in range(n)]


def engine_tiles(size: int, cell_px: int, tile=256, stride=192) -> int:
    from canopy.predict.grid import tile_window

    total = 0
    for cell in scene_cells(size, cell_px):
        _, _, nr, nc = tile_window(cell, tile, stride)
        total += ((nr - tile) // stride + 1) * ((nc - tile) // stride + 1)
    return total


def sub(*args) -> dict:
    res = subprocess.run([sys.executable, __file__, "--_run", *map(str, args)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--checkpoint", default="hrch_v1_large_random")
    ap.add_argument("--cell-px", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=1, help="alternate the variants this many times; best kept")
    ap.add_argument("--engine", nargs="*", default=["bf16", "fp32", "int8", "int8:224"],
                    help="engine variants PRECISION[:STRIDE] (default stride: 3/4 of the tile)")
    ap.add_argument("--cli", nargs="*", default=["default", "bf16"],
                    help="one-raster `canopy predict` variants, whole command: 'default' (no "
                         "precision flag) or a precision")
    ap.add_argument("--edge-checkpoint", default=None,
                    help="trained model for the edge-error figure, measured on a real 0.5 m "
                         "scene (the Kootenay drone ortho, mirrored to --edge-size px)")
    ap.add_argument("--edge-size", type=int, default=1152)
    ap.add_argument("--edge-only", action="store_true", help="only the edge-error figures")
    ap.add_argument("--edge-strides", type=float, nargs="+", default=[6, 7],
                    help="engine strides for the edge figure, in eighths of the tile (6: default "
                         "192/256; 7: 224/256)")
    ap.add_argument("--edge-precision", default="fp32", choices=["fp32", "bf16", "int8"],
                    help="engine precision for the edge figure (the reference runs fp32)")
    ap.add_argument("--warm-only", action="store_true",
                    help="time the engine once after loading the model on its worker, instead "
                         "of a cold run (cluster start + model load) then a warm one")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_run", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._run:
        kind, *rest = args._run
        if kind == "ref":
            print(json.dumps(run_reference(*rest)))
        elif kind == "cli":
            print(json.dumps(run_cli(*rest)))
        elif kind == "probe":
            print(json.dumps(run_probe(*rest)))
        else:
            scene, ckpt, prec, out, cell, batch, threads, stride, cold = rest
            print(json.dumps(run_engine(scene, ckpt, prec, out, int(cell), int(batch), int(threads),
                                        int(stride), bool(int(cold)))))
        return

    tmp = Path(tempfile.mkdtemp(prefix="canopy_engine_bench_"))
    if args.edge_only:
        if not args.edge_checkpoint:
            ap.error("--edge-only needs --edge-checkpoint")
        edge = edge_errors(args, tmp)
        print(json.dumps(edge, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps({"command": " ".join(
                ["python benchmarks/engine_vs_reference.py", *sys.argv[1:]]), "edge_error": edge},
                indent=2))
        return
    from canopy.model.checkpoints import load_config
    from canopy.predict.blend import default_stride, tile_starts

    tile = load_config(args.checkpoint).tile_size
    if args.size < reference_geometry(tile)["window"]:
        ap.error(f"--size must be at least the reference window, {reference_geometry(tile)['window']} px")
    scene = make_scene(tmp / "scene.tif", args.size, args.cell_px)
    checkpoint = released_layout_file(args.checkpoint, tmp)
    probe = sub("probe", checkpoint) if args.cli else None  # once per machine, cached: not timed
    best: dict[str, dict] = {}
    for rep in range(args.repeats):
        variants = [("ref", "fp32", 0), ("ref", "bf16", 0)] + [("cli", v, 0) for v in args.cli] + [
            ("engine", v.split(":")[0], int(v.split(":")[1]) if ":" in v else 0) for v in args.engine]
        for kind, prec, stride in variants:
            out = tmp / f"{kind}_{prec}_{stride}_{rep}"
            if kind == "ref":
                r = sub("ref", scene, checkpoint, prec, f"{out}.tif")
                r["output"] = f"{out}.tif"
            elif kind == "cli":
                r = sub("cli", scene, checkpoint, prec, f"{out}.tif")
                r["tiles"] = len(tile_starts(args.size, tile, default_stride(tile))) ** 2
            else:
                r = sub("engine", scene, checkpoint, prec, out, args.cell_px, args.batch_size,
                        args.threads, stride, int(not args.warm_only))
                r["stride"] = stride or default_stride(tile)
                expected = sorted(c.id for c in scene_cells(args.size, args.cell_px))
                if r["cell_ids"] != expected:  # the tile count assumes cells = the scene's blocks
                    raise RuntimeError(f"the engine mapped cells {r['cell_ids']}, expected the "
                                       f"scene's blocks {expected}")
            print(f"{r['variant']}: {r['px_per_s']:,.0f} px/s", file=sys.stderr, flush=True)
            if r["variant"] not in best or r["px_per_s"] > best[r["variant"]]["px_per_s"]:
                best[r["variant"]] = r
    ref32, ref16 = best["reference fp32"]["px_per_s"], best["reference bf16"]["px_per_s"]
    for r in best.values():
        r["x_ref_fp32"], r["x_ref_bf16"] = r["px_per_s"] / ref32, r["px_per_s"] / ref16

    # model FLOPs of the tiles actually run ÷ measured bf16 matmul rate on this machine
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from canopy.model.checkpoints import load_model

    model = load_model(args.checkpoint)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(model.normalize(torch.zeros(1, 3, tile, tile)))
    gflop = fc.get_total_flops() / 1e9
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    a @ a
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    mm = 2 * 2048**3 * 5 / (time.perf_counter() - t0) / 1e9
    for r in best.values():  # model FLOPs of the tiles run per second ÷ the bf16 matmul rate
        if r["variant"].startswith("engine"):
            r["tiles"] = engine_tiles(args.size, args.cell_px, tile=tile, stride=r["stride"])
        r["share_of_bf16_matmul_floor"] = r["tiles"] * gflop / r["seconds"] / mm
    summary = {"command": " ".join(["python benchmarks/engine_vs_reference.py", *sys.argv[1:]]),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "size": args.size,
               "gflop_per_tile": gflop, "bf16_matmul_gflops": mm, "auto_probe": probe,
               "results": best}
    engines = [r for r in best.values() if r["variant"].startswith("engine")]
    for r in engines:  # time per km² at 0.6 m and what it means for California (a projection)
        r["seconds_per_km2"] = 1e6 / (r["px_per_s"] * GSD * GSD)
        r["california_cpu_days_projection"] = 409_938 * r["seconds_per_km2"] / 86400

    if args.edge_checkpoint:
        summary["edge_error"] = edge_errors(args, tmp)

    print(f"\n`{summary['command']}` — {summary['machine']}\n")
    print("| variant | px/s | × ref fp32 | × ref bf16 | seconds | tiles | FLOPs ÷ bf16 matmul rate | peak RSS (GiB) |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in best.values():
        print(f"| {r['variant']} | {r['px_per_s']:,.0f} | {r['x_ref_fp32']:.2f} | {r['x_ref_bf16']:.2f} "
              f"| {r['seconds']:.1f} | {r['tiles']} | {r['share_of_bf16_matmul_floor']:.0%} "
              f"| {r['peak_rss_gib']:.2f} |")
    print(f"\nGFLOP per tile {gflop:.0f}; bf16 matmul {mm:.0f} GFLOP/s; reference tiles "
          f"{best['reference bf16']['tiles']}, reaching "
          f"{best['reference bf16']['share_of_bf16_matmul_floor']:.0%} of the matmul floor in bf16")
    for r in engines:
        print(f"{r['variant']}: {r['tiles']} tiles, {r['share_of_bf16_matmul_floor']:.0%} of the "
              f"matmul floor, {r['seconds_per_km2']:.0f} s per km² at 0.6 m → California "
              f"(409,938 km²) ≈ {r['california_cpu_days_projection']:,.0f} days on this CPU (projection)")
    if "edge_error" in summary:
        print(f"edge error (trained {args.edge_checkpoint}): {summary['edge_error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
