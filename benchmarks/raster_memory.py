"""Peak memory of one-raster prediction as the raster grows: windows (the default) against one
piece (the whole raster in memory, as before).

    python benchmarks/raster_memory.py --sizes 4096 8192 16384 --checkpoint micro

The input is a VRT that repeats a real scene (the Kootenay drone ortho, 0.5 m, from
../shared/data) until it covers ``size × size`` pixels at the model's GSD; each run is a fresh
process (``canopy.predict.raster.predict_raster`` with the model loaded first), and its peak RSS
is the process's ``ru_maxrss``. Random weights (``micro`` by default): memory and plumbing only.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT.parent / "shared" / "data" / "rgb_chm_pairs" / "kootenay_bc_drone" / "kootenayOrtho_from_rda.tif"

CHILD = r"""
import json, resource, sys, time
from canopy.model.checkpoints import load_model
from canopy.predict.options import PredictOptions
from canopy.predict.raster import predict_raster
src, out, checkpoint, window = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = load_model(checkpoint)
t0 = time.perf_counter()
predict_raster(src, out, model, PredictOptions(precision="fp32", device="cpu"), window_px=window)
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def repeated_vrt(path: Path, gsd: float, size: int) -> Path:
    """A VRT repeating SCENE (mirrored copies would need a warp; plain copies are fine for
    memory) to cover size × size pixels at ``gsd``."""
    import rasterio
    from xml.sax.saxutils import escape

    with rasterio.open(SCENE) as ds:
        w, h, res, crs, t = ds.width, ds.height, ds.res[0], ds.crs, ds.transform
    need = size * gsd / res  # source pixels per side
    nx, ny = math.ceil(need / w), math.ceil(need / h)
    width, height = nx * w, ny * h
    bands = []
    for b in (1, 2, 3):
        sources = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(str(SCENE))}</SourceFilename>'
            f"<SourceBand>{b}</SourceBand><SrcRect xOff=\"0\" yOff=\"0\" xSize=\"{w}\" ySize=\"{h}\"/>"
            f'<DstRect xOff="{i * w}" yOff="{j * h}" xSize="{w}" ySize="{h}"/></SimpleSource>'
            for j in range(ny) for i in range(nx))
        bands.append(f'<VRTRasterBand dataType="Byte" band="{b}">{sources}</VRTRasterBand>')
    path.write_text(f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>'
                    f"{escape(crs.to_wkt())}</SRS><GeoTransform>{t.c!r}, {res!r}, 0, {t.f!r}, 0, "
                    f"{-res!r}</GeoTransform>{''.join(bands)}</VRTDataset>")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--checkpoint", default="micro")
    parser.add_argument("--one-piece-up-to", type=int, default=8192,
                        help="also run the one-piece computation for sizes up to this")
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args(argv)
    from canopy.model.checkpoints import load_config

    gsd = load_config(args.checkpoint).gsd
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            vrt = repeated_vrt(Path(tmp) / f"scene_{size}.vrt", gsd, size)
            modes = [("windows", 4096)] + ([("one piece", 10**9)] if size <= args.one_piece_up_to else [])
            for mode, window in modes:
                out = Path(tmp) / f"out_{size}_{window}.tif"
                t0 = time.perf_counter()
                res = subprocess.run([sys.executable, "-c", CHILD, str(vrt), str(out), args.checkpoint,
                                      str(window)], capture_output=True, text=True)
                if res.returncode:
                    raise SystemExit(res.stderr)
                row = {"size": size, "mode": mode, **json.loads(res.stdout.splitlines()[-1]),
                       "wall_seconds": time.perf_counter() - t0}
                results.append(row)
                print(json.dumps(row), flush=True)
                out.unlink(missing_ok=True)
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
