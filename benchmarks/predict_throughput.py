"""Throughput of ``canopy predict`` on one raster, fp32 vs bf16 (issue: foundation, item 8).

Random weights are fine for speed (never for quality). Each precision runs in its own process so
its peak RSS is its own. Prints a Markdown table and writes a JSON next to --json.

    python benchmarks/predict_throughput.py --size 2048 --checkpoint hrch_v1_large_random
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_scene(path: Path, size: int) -> Path:
    """A size×size uint8 RGB raster at 0.6 m built by mirroring the real NEON sample scene."""
    import rasterio
    from affine import Affine

    with rasterio.open(ROOT / "canopy" / "data" / "sample_osbs_029.tif") as ds:
        tile = ds.read()
    reps = -(-size // tile.shape[1]) + 1
    row = np.concatenate([tile if i % 2 == 0 else tile[:, :, ::-1] for i in range(reps)], axis=2)
    big = np.concatenate([row if i % 2 == 0 else row[:, ::-1] for i in range(reps)], axis=1)
    big = np.ascontiguousarray(big[:, :size, :size])
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32617", transform=Affine(0.6, 0, 404000, 0, -0.6, 3286000),
                       tiled=True, compress="deflate") as out:
        out.write(big)
    return path


def run_one(src: str, out: str, checkpoint: str, precision: str, batch_size: int) -> dict:
    import torch

    from canopy.model.checkpoints import load_model
    from canopy.predict.options import PredictOptions
    from canopy.predict.raster import predict_raster

    model = load_model(checkpoint)
    t0 = time.perf_counter()
    predict_raster(src, out, model, PredictOptions(precision=precision, batch_size=batch_size),
                   overwrite=True)
    seconds = time.perf_counter() - t0
    import rasterio

    with rasterio.open(out) as ds:
        pixels = ds.width * ds.height
    return {"precision": precision, "seconds": seconds, "pixels": pixels,
            "px_per_s": pixels / seconds, "torch_threads": torch.get_num_threads(),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--checkpoint", default="hrch_v1_large_random")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", default=None)
    ap.add_argument("--_one", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        src, out, ckpt, prec = args._one
        print(json.dumps(run_one(src, out, ckpt, prec, args.batch_size)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="canopy_bench_"))
    src = make_scene(tmp / "scene.tif", args.size)
    results = []
    for prec in args.precisions:
        out = tmp / f"chm_{prec}.tif"
        res = subprocess.run([sys.executable, __file__, "--batch-size", str(args.batch_size),
                              "--_one", str(src), str(out), args.checkpoint, prec],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"{prec}: {results[-1]['px_per_s']:.0f} px/s", file=sys.stderr)

    import rasterio

    arrays = {}
    for prec in args.precisions:
        with rasterio.open(tmp / f"chm_{prec}.tif") as ds:
            arrays[prec] = ds.read(1)
    max_diff = None
    if {"fp32", "bf16"} <= set(arrays):
        max_diff = float(np.nanmax(np.abs(arrays["fp32"] - arrays["bf16"])))

    cmd = f"python benchmarks/predict_throughput.py --size {args.size} --checkpoint {args.checkpoint}"
    print(f"\n`{cmd}` — {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| precision | seconds | px/s | peak RSS (GiB) |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['precision']} | {r['seconds']:.1f} | {r['px_per_s']:,.0f} | {r['peak_rss_gib']:.2f} |")
    if max_diff is not None:
        print(f"\nlargest |fp32 − bf16| difference: {max_diff:.3f} m")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": cmd, "results": results,
                                               "max_abs_diff_fp32_bf16_m": max_diff}, indent=2))


if __name__ == "__main__":
    main()
