"""`canopy predict --aoi` over HTTP (a STAC API search, COGs read by range requests) against the
same run over the same COGs on local disk, in one run (issue 19, item 8).

Imagery: the real Autzen (Eugene, Oregon) 0.305 m aerial orthophoto in ../shared/data/overhead_rgb
cut into four COG quadrants (512-px blocks, DEFLATE), served with a STAC API by
tests/stac_fixture_server.py on 127.0.0.1. The AOI is the middle half of the image in each
direction (a quarter of its area), so range reads should fetch about a quarter of the bytes.
Model: ``micro`` (seeded random weights: speed and plumbing only), fp32, 1 worker.

Reports: bytes fetched per km² of output and as a share of the assets' size, file requests per
cell, and seconds of each run.

    python benchmarks/stac_http.py --out benchmarks/results/stac_http.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SRC = ROOT.parent / "shared" / "data" / "overhead_rgb" / "autzen_eugene_oregon.jpg"


def make_cogs(folder: Path) -> tuple[list[Path], tuple[float, float, float, float]]:
    import rasterio
    import rasterio.shutil
    from rasterio.crs import CRS
    from rasterio.warp import transform_bounds
    from rasterio.windows import Window

    crs = CRS.from_wkt(SRC.with_suffix(".prj").read_text())
    out = []
    with rasterio.open(SRC) as src:
        h, w = src.height, src.width
        for i, (r0, c0) in enumerate(((0, 0), (0, w // 2), (h // 2, 0), (h // 2, w // 2))):
            win = Window(c0, r0, w // 2 if c0 == 0 else w - w // 2, h // 2 if r0 == 0 else h - h // 2)
            tmp = folder / f".q{i}.tif"
            with rasterio.open(tmp, "w", driver="GTiff", width=int(win.width), height=int(win.height),
                               count=3, dtype="uint8", crs=crs,
                               transform=src.window_transform(win)) as dst:
                dst.write(src.read(window=win))
            rasterio.shutil.copy(tmp, folder / f"autzen_q{i}.tif", driver="COG", blocksize=512,
                                 compress="deflate")
            tmp.unlink()
            out.append(folder / f"autzen_q{i}.tif")
        l, b, r, t = src.bounds
        mid = (l + (r - l) / 4, b + (t - b) / 4, r - (r - l) / 4, t - (t - b) / 4)
        aoi = transform_bounds(crs, "EPSG:4326", *mid, densify_pts=21)
    return out, aoi


def main() -> None:
    import httpx

    from canopy.predict.engine import predict_aoi
    from canopy.predict.options import PredictOptions
    from tests.services.conftest import free_port
    from tests.test_stac_remote import _item

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cell-size", type=int, default=1024)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stac-bench-"))
    data = work / "served"
    data.mkdir()
    cogs, aoi = make_cogs(data)
    items = [_item(p) for p in cogs]
    (data / "items.json").write_text(json.dumps(items))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    from tests.stac_fixture_server import start

    server = start(data, port)
    try:
        job = ("micro", PredictOptions(precision="fp32", batch_size=8))
        spec = ",".join(f"{v:.7f}" for v in aoi)
        local = work / "local"
        local.mkdir()
        for c in cogs:
            shutil.copy(c, local / c.name)
        t0 = time.perf_counter()
        a = predict_aoi(spec, local, work / "run_local", *job, cell_px=args.cell_size, workers=1)
        t_local = time.perf_counter() - t0
        before = httpx.get(base + "/admin/stats").json()
        t0 = time.perf_counter()
        b = predict_aoi(spec, f"stac+{base}/?collections=osbs", work / "run_http", *job,
                        cell_px=args.cell_size, workers=1)
        t_http = time.perf_counter() - t0
        after = httpx.get(base + "/admin/stats").json()
        from data_catalog.aoi import area_km2, resolve_aoi

        km2 = area_km2(resolve_aoi(spec).geometry)
        total = sum(c.stat().st_size for c in cogs)
        fetched = after["bytes"] - before["bytes"]
        result = {
            "command": "python benchmarks/stac_http.py " + " ".join(sys.argv[1:]),
            "aoi_km2": round(km2, 4), "cells": b.cells_done, "cell_px": args.cell_size,
            "assets_bytes": total, "fetched_bytes": fetched,
            "fetched_share_of_assets": round(fetched / total, 3),
            "fetched_mb_per_km2": round(fetched / 1e6 / km2, 2),
            "file_requests": after["requests"] - before["requests"],
            "requests_per_cell": round((after["requests"] - before["requests"]) / max(1, b.cells_done), 1),
            "seconds_local": round(t_local, 1), "seconds_http": round(t_http, 1),
            "http_over_local": round(t_http / t_local, 3), "local_cells": a.cells_done,
        }
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
