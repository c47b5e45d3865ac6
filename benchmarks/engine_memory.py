"""Peak memory of the state-scale engine as the input grows (state-scale issue, item 7).

Runs ``predict_aoi`` with a small model on a 4096² and a 16384² raster (0.6 m, mirrored from the
real NEON sample scene) with the same cell size, one worker process, and reports the peak summed
RSS of the driver and its workers. Memory should be set by the cell size, not by the AOI.

    python benchmarks/engine_memory.py --sizes 4096 16384 --checkpoint micro
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def run(size: int, checkpoint: str, cell_px: int, out: Path) -> dict:
    from distributed import Client, LocalCluster
    import rasterio
    from rasterio.warp import transform_bounds

    from canopy.predict.engine import predict_aoi
    from canopy.predict.options import PredictOptions
    from engine_vs_reference import PeakRSS, make_scene

    scene = make_scene(out / "scene.tif", size, cell_px)
    with rasterio.open(scene) as ds:
        w, s, e, n = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    eps = 1e-6
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=40)
        client = Client(cluster)
        summary = predict_aoi(f"{w + eps},{s + eps},{e - eps},{n - eps}", scene, out / "run",
                              checkpoint, PredictOptions(batch_size=8), cell_px=cell_px,
                              client=client)
        client.close()
        cluster.close()
        dt = time.perf_counter() - t0
    return {"size": size, "cells": summary.cells_done, "seconds": dt,
            "px_per_s": size * size / dt, "peak_rss_gib": rss.peak / 2**30}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--checkpoint", default="micro")
    ap.add_argument("--cell-px", type=int, default=4096)
    ap.add_argument("--json", default=None)
    ap.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        size, ckpt, cell = args._one
        with tempfile.TemporaryDirectory(prefix="canopy_mem_") as tmp:
            print(json.dumps(run(int(size), ckpt, int(cell), Path(tmp))))
        return
    results = []
    for size in args.sizes:
        res = subprocess.run([sys.executable, __file__, "--_one", str(size), args.checkpoint,
                              str(args.cell_px)], capture_output=True, text=True, check=True)
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(results[-1], file=sys.stderr, flush=True)
    print(f"\n`python benchmarks/engine_memory.py --sizes {' '.join(map(str, args.sizes))} "
          f"--checkpoint {args.checkpoint} --cell-px {args.cell_px}`\n")
    print("| input | cells | seconds | px/s | peak RSS (GiB) |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['size']}² | {r['cells']} | {r['seconds']:.0f} | {r['px_per_s']:,.0f} | {r['peak_rss_gib']:.2f} |")
    growth = results[-1]["peak_rss_gib"] / results[0]["peak_rss_gib"]
    print(f"\npeak RSS ratio largest/smallest input: {growth:.2f} (target ≤ 1.25)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
