"""Benchmark: GEDI L2A ingestion throughput (read + filter + write GeoParquet), in shots per second.

Not a test. Builds a synthetic granule by replicating the real V001 subset in ../shared/data
(same beams, datasets, dtypes and values; shot numbers made unique; positions spread along a
synthetic track across several 1° cells so that several partitions are written), then times:

* ``read``   — ``read_gedi_l2a``
* ``filter`` — ``filter_shots`` with the default ``GediFilters``
* ``ingest`` — ``ingest_gedi``: read + filter + Hilbert sort + GeoParquet partitions, end to end
* ``query``  — ``shots_in_bbox`` for a 0.1° box inside one cell

    .venv/bin/python benchmarks/gedi_ingest.py                 # 100,000 shots, 3 repeats
    .venv/bin/python benchmarks/gedi_ingest.py --shots 1000000

Prints the command, the machine's CPU count and the best-of-N timings as JSON.
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

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_catalog.gedi import GediFilters, filter_shots, ingest_gedi, read_gedi_l2a, shots_in_bbox  # noqa: E402

SAMPLE = (
    Path(__file__).resolve().parents[1]
    / ".."
    / "shared"
    / "data"
    / "gedi"
    / "rgedi_sub_2019108"
    / "GEDI02_A_2019108080338_O01964_T05337_02_001_01_sub.h5"
)


def write_synthetic_granule(sample: Path, out: Path, n_shots: int) -> int:
    """Replicate every top-level per-shot dataset of each beam until ``n_shots`` in total."""
    with h5py.File(sample, "r") as src, h5py.File(out, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        beams = [k for k in src if k.startswith("BEAM")]
        sizes = {b: src[b]["shot_number"].shape[0] for b in beams}
        total = sum(sizes.values())
        written = 0
        for index, beam in enumerate(beams):
            g_src = src[beam]
            n = n_shots * sizes[beam] // total if index < len(beams) - 1 else n_shots - written
            reps = -(-n // sizes[beam])
            g_dst = dst.create_group(beam)
            for key, value in g_src.attrs.items():
                g_dst.attrs[key] = value
            for name, ds in g_src.items():
                if not isinstance(ds, h5py.Dataset) or ds.shape[:1] != (sizes[beam],):
                    continue
                data = np.concatenate([ds[()]] * reps)[:n]
                if name == "shot_number":
                    data = data + np.repeat(np.arange(reps, dtype=np.uint64), sizes[beam])[:n] * np.uint64(10**6)
                elif name in ("lat_lowestmode", "lon_lowestmode"):
                    # A straight track 4° long (lat) by 2° (lon): shots land in several 1° cells.
                    t = np.linspace(0, 1, n)
                    data = data + (4.0 * t if name == "lat_lowestmode" else 2.0 * t)
                chunks = (min(n, 65536),) + ds.shape[1:] if n else None
                g_dst.create_dataset(name, data=data, chunks=chunks, compression="gzip", compression_opts=1)
            written += n
    return written


def best_of(repeats: int, fn):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample", type=Path, default=SAMPLE)
    args = parser.parse_args()
    if not args.sample.is_file():
        sys.exit(f"sample granule not found: {args.sample}")

    with tempfile.TemporaryDirectory() as tmp:
        granule = Path(tmp) / "GEDI02_A_2019108080338_O01964_T05337_02_001_01_synthetic.h5"
        n = write_synthetic_granule(args.sample, granule, args.shots)
        t_read, shots = best_of(args.repeats, lambda: read_gedi_l2a(granule))
        t_filter, (_, report) = best_of(args.repeats, lambda: filter_shots(shots, GediFilters()))
        t_ingest, partitions = best_of(args.repeats, lambda: ingest_gedi(granule, Path(tmp) / "shots"))
        cell = partitions[0]["bbox"]
        box = (cell[0], cell[1], cell[0] + 0.1, cell[1] + 0.1)
        t_query, found = best_of(args.repeats, lambda: shots_in_bbox(Path(tmp) / "shots", box))
        size_mb = sum(Path(p["path"]).stat().st_size for p in partitions) / 1e6

    result = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "shots": n,
        "shots_kept": report.n_remaining,
        "partitions": len(partitions),
        "parquet_mb": round(size_mb, 1),
        "read_s": round(t_read, 3),
        "filter_s": round(t_filter, 4),
        "ingest_s": round(t_ingest, 3),
        "ingest_shots_per_s": round(n / t_ingest),
        "read_shots_per_s": round(n / t_read),
        "query_ms": round(1000 * t_query, 1),
        "query_shots": len(found),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
