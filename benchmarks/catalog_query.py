"""Benchmark: spatial queries over a catalog of synthetic footprints (not a test).

Builds N synthetic 1 km x 1 km tile footprints scattered over the conterminous US (rows made by
the same code path as real assets: AssetRecord -> frame_from_records), saves the catalog as
GeoParquet, reloads it, and times ``Catalog.query(bbox=...)`` over random boxes.

    .venv/bin/python benchmarks/catalog_query.py            # 100,000 footprints, 200 queries
    .venv/bin/python benchmarks/catalog_query.py --n 1000000

Numbers are wall-clock on whatever machine runs it; the script prints the command line and the
machine's CPU count with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_catalog.catalog import Catalog, frame_from_records  # noqa: E402
from data_catalog.schema import AssetRecord, asset_id_for  # noqa: E402

CONUS = (-124.7, 24.5, -66.9, 49.4)  # lon/lat box the synthetic tiles are drawn from
TILE_DEG = 0.01  # ~1 km, the size of a NEON CHM tile


def synthetic_records(n: int, rng: np.random.Generator) -> list[AssetRecord]:
    lon = rng.uniform(CONUS[0], CONUS[2] - TILE_DEG, n)
    lat = rng.uniform(CONUS[1], CONUS[3] - TILE_DEG, n)
    footprints = shapely.box(lon, lat, lon + TILE_DEG, lat + TILE_DEG)
    kinds = np.array(["imagery", "chm", "lidar", "gedi"])[rng.integers(0, 4, n)]
    records = []
    for i in range(n):
        path = f"/data/synthetic/tile_{i:07d}.tif"
        records.append(
            AssetRecord(
                asset_id=asset_id_for(path),
                kind=str(kinds[i]),
                path=path,
                geometry=footprints[i],
                crs="EPSG:4326",
                native_bounds=tuple(footprints[i].bounds),
                res_x=1.0,
                res_y=1.0,
                width=1000,
                height=1000,
                bands=1,
                dtype="float32",
                nodata="-9999.0",
                checksum=f"sha256:{i:064x}",
                size=4_000_000,
                mtime_ns=0,
            )
        )
    return records


def random_bboxes(count: int, size_deg: float, rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    lon = rng.uniform(CONUS[0], CONUS[2] - size_deg, count)
    lat = rng.uniform(CONUS[1], CONUS[3] - size_deg, count)
    return [(x, y, x + size_deg, y + size_deg) for x, y in zip(lon, lat)]


def timed_ms(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return (time.perf_counter() - start) * 1000, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="synthetic footprints")
    parser.add_argument("--queries", type=int, default=200, help="random bboxes per size")
    parser.add_argument("--sizes", default="0.1,1.0", help="bbox edge lengths in degrees, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    results: dict[str, object] = {"command": command, "cpus": os.cpu_count(), "python": platform.python_version()}

    build_ms, records = timed_ms(synthetic_records, args.n, rng)
    frame_ms, frame = timed_ms(frame_from_records, records)
    results["build_records_s"] = round(build_ms / 1000, 2)
    results["frame_from_records_s"] = round(frame_ms / 1000, 2)

    with tempfile.TemporaryDirectory() as folder:
        catalog = Catalog(Path(folder) / "synthetic.parquet", frame)
        save_ms, _ = timed_ms(catalog.save)
        results["save_s"] = round(save_ms / 1000, 2)
        results["file_mib"] = round(catalog.path.stat().st_size / 2**20, 1)
        load_ms, loaded = timed_ms(Catalog.open, catalog.path)
        results["load_s"] = round(load_ms / 1000, 2)

    index_ms, _ = timed_ms(lambda: loaded.frame.sindex)  # built once, on the first query
    results["sindex_build_ms"] = round(index_ms, 1)

    for size in (float(s) for s in args.sizes.split(",")):
        boxes = random_bboxes(args.queries, size, rng)
        indexed, hits = [], []
        for bbox in boxes:
            ms, result = timed_ms(loaded.query, bbox=bbox)
            indexed.append(ms)
            hits.append(len(result))
        # The same boxes without the index, to show what the STRtree buys.
        brute = [timed_ms(lambda b=b: loaded.frame[loaded.frame.intersects(shapely.box(*b))])[0] for b in boxes[:20]]
        results[f"bbox_{size:g}deg"] = {
            "median_ms": round(float(np.median(indexed)), 2),
            "p95_ms": round(float(np.percentile(indexed, 95)), 2),
            "mean_hits": round(float(np.mean(hits)), 1),
            "no_index_median_ms": round(float(np.median(brute)), 1),
        }
    kind_ms = [timed_ms(loaded.query, bbox=b, kinds=["chm"])[0] for b in random_bboxes(args.queries, 1.0, rng)]
    results["bbox_1deg_kind_chm_median_ms"] = round(float(np.median(kind_ms)), 2)

    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
