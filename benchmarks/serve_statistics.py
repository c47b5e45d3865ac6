"""Zonal statistics of a ~10 km² polygon on an ``--aoi`` run, through the real server.

Builds (once, cached in benchmarks/.cache/) a run with the engine's layout and default cell size
(4096 px at 0.6 m): ``canopy predict --aoi`` with the seeded ``micro`` model over a synthetic
RGB mosaic of about 4 × 4 km in UTM 10N — random weights, so the heights are plumbing, but the
files, cells, overviews and sizes are what a state run writes. Then starts ``canopy serve`` on
it and times ``POST /layers/{id}/statistics`` for a 10 km² polygon with 2,000 vertices that
spans several cells: the first request (cold: files not yet open in the worker) and repeats.
Target (issue 15): under one second.

    python benchmarks/serve_statistics.py [--out benchmarks/results/serve_statistics.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache" / "serve_statistics"
LON, LAT = -121.5, 38.5  # Sacramento valley, UTM 10N


def build_run() -> Path:
    import rasterio
    from affine import Affine
    from pyproj import Transformer

    run = CACHE / "layers" / "run"
    if (run / "summary.json").exists():
        return run
    img = CACHE / "imagery"
    img.mkdir(parents=True, exist_ok=True)
    x, y = Transformer.from_crs(4326, 32610, always_xy=True).transform(LON, LAT)
    size = 7000  # px at 0.6 m: 4.2 km
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(3, size // 16 + 1, size // 16 + 1)).astype(np.uint8)
    rgb = np.repeat(np.repeat(base, 16, axis=1), 16, axis=2)[:, :size, :size]
    t = Affine(0.6, 0, x - size * 0.3, 0, -0.6, y + size * 0.3)
    with rasterio.open(img / "mosaic.tif", "w", driver="GTiff", width=size, height=size, count=3,
                       dtype="uint8", crs="EPSG:32610", transform=t, tiled=True,
                       compress="deflate") as ds:
        ds.write(rgb)
    west, south = Transformer.from_crs(32610, 4326, always_xy=True).transform(x - 1950, y - 1950)
    east, north = Transformer.from_crs(32610, 4326, always_xy=True).transform(x + 1950, y + 1950)
    subprocess.run([sys.executable, "-m", "canopy.cli", "predict", "--aoi",
                    f"{west},{south},{east},{north}", "--imagery", str(img), "-o", str(run),
                    "-c", "micro", "--precision", "fp32"], check=True)
    return run


def polygon(vertices: int, km2: float) -> dict:
    """A wobbly closed ring around the centre with about ``km2`` of area."""
    from pyproj import Geod

    geod = Geod(ellps="WGS84")
    angles = np.linspace(0, 360, vertices, endpoint=False)
    radius = math.sqrt(km2 * 1e6 / math.pi)
    r = radius * (1 + 0.08 * np.sin(np.radians(angles) * 7))
    lons, lats, _ = geod.fwd(np.full(vertices, LON), np.full(vertices, LAT), angles, r)
    ring = [[float(a), float(b)] for a, b in zip(lons, lats)] + [[float(lons[0]), float(lats[0])]]
    # scale to the asked area (the wobble changes it a little)
    area = abs(geod.polygon_area_perimeter(lons, lats)[0]) / 1e6
    k = math.sqrt(km2 / area)
    ring = [[LON + (a - LON) * k, LAT + (b - LAT) * k] for a, b in ring]
    return {"type": "Polygon", "coordinates": [ring]}


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    run = build_run()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "services", "--layers", str(run.parent),
                               "--port", str(port), "--log-level", "warning"], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        cells = json.loads((run / "summary.json").read_text())["cells_done"]
        body = polygon(2000, 10.0)
        times, feat = [], None
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(1 + args.repeats):
                t0 = time.perf_counter()
                r = c.post("/layers/run/statistics", json=body)
                times.append(time.perf_counter() - t0)
                r.raise_for_status()
                feat = r.json()["features"][0]
        result = {"cells_in_run": cells, "polygon_km2": feat["area_m2"] / 1e6,
                  "valid_pixels": feat["valid_pixels"], "vertices": 2000,
                  "first_s": round(times[0], 3), "repeat_s": [round(t, 3) for t in times[1:]],
                  "repeat_median_s": round(float(np.median(times[1:])), 3),
                  "target_s": 1.0, "machine": f"{os.cpu_count()} cores"}
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        server.terminate()
        server.wait(20)


if __name__ == "__main__":
    main()
