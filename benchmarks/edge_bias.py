"""Heights near imagery edges: one-raster prediction against a state run (`--aoi`) of the same
scene, by distance from the footprint edge, and both against lidar where the scene has a CHM.

    python benchmarks/edge_bias.py -o /tmp/edge_bias.json

For each real scene the scene is predicted twice with the bundled default model: as one raster
(`canopy predict scene.tif`) and as a state run over the scene's own lon/lat box
(`canopy predict --aoi BOX --imagery scene.tif`, whose cells reach past the imagery). Pixels are
binned by their distance (metres) to the nearest pixel without imagery in the run's grid; a run
that lets the fill colour into model inputs shows low heights in the first bins. Where a lidar
CHM exists, the MAE and bias of each map against it are reported too (`canopy evaluate`).
Real data from ../shared/data; nothing is written outside the output folder's scratch copy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SCENES = {  # name: (RGB, lidar CHM or None, the CHM's CRS when it carries none)
    "BART_041": ("rgb_chm_pairs/neon_bart_041/BART_041.tif", None, None),
    "OSBS_029": ("rgb_chm_pairs/neon_osbs_029/OSBS_029.tif",
                 "rgb_chm_pairs/neon_osbs_029/OSBS_029_CHM.tif", "EPSG:32617"),
    "kootenay": ("rgb_chm_pairs/kootenay_bc_drone/kootenayOrtho_from_rda.tif",
                 "rgb_chm_pairs/kootenay_bc_drone/kootenayCHM.tif", None),
    "SJER_005": ("overhead_rgb/neon_SJER_005.tif", None, None),
}
BANDS_M = (0, 4, 8, 12, 16, 20, 24, 28, 40)


def distance_to_edge_m(valid: np.ndarray, gsd: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.distance_transform_edt(np.pad(valid, 1, constant_values=False))[1:-1, 1:-1] * gsd


def banded_means(height: np.ndarray, dist: np.ndarray) -> dict:
    out = {}
    for lo, hi in zip(BANDS_M[:-1], BANDS_M[1:]):
        sel = (dist >= lo) & (dist < hi) & np.isfinite(height)
        out[f"{lo}-{hi} m"] = {"mean_height": float(height[sel].mean()) if sel.any() else None,
                               "pixels": int(sel.sum())}
    return out


def run_scene(name: str, rgb: Path, chm: Path | None, chm_crs: str | None, work: Path,
              checkpoint: str) -> dict:
    import rasterio
    from rasterio.warp import reproject, transform_bounds
    from rasterio.enums import Resampling

    from canopy.evaluate import evaluate
    from canopy.model.checkpoints import load_model
    from canopy.predict.engine import predict_aoi
    from canopy.predict.options import PredictOptions
    from canopy.predict.raster import predict_raster

    model = load_model(checkpoint)
    one = predict_raster(rgb, work / f"{name}_one.tif", model)
    with rasterio.open(rgb) as ds:
        w, s, e, n = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)
    t0 = time.perf_counter()
    run = predict_aoi(f"{w},{s},{e},{n}", rgb, work / f"{name}_aoi", checkpoint,
                      PredictOptions(), cell_px=256)
    seconds = time.perf_counter() - t0
    result = {"scene": str(rgb.relative_to(DATA)), "aoi_seconds": round(seconds, 1)}
    with rasterio.open(run.mosaic) as m:
        aoi_h = m.read(1)
        # the imagery footprint on the run's grid, from the scene's own mask
        with rasterio.open(rgb) as ds:
            valid = np.zeros(aoi_h.shape, np.float32)
            reproject(ds.dataset_mask().astype(np.float32) / 255, valid, src_transform=ds.transform,
                      src_crs=ds.crs, dst_transform=m.transform, dst_crs=m.crs,
                      resampling=Resampling.average)
        footprint = valid >= 0.5
        gsd = m.res[0]
        aoi_on_grid = np.where(footprint, aoi_h, np.nan)
        one_on_grid = np.full(aoi_h.shape, np.nan, np.float32)
        with rasterio.open(one) as o:
            reproject(o.read(1), one_on_grid, src_transform=o.transform, src_crs=o.crs,
                      dst_transform=m.transform, dst_crs=m.crs, src_nodata=np.nan,
                      dst_nodata=np.nan, resampling=Resampling.nearest)
    dist = distance_to_edge_m(footprint, gsd)
    result["one_raster"] = banded_means(one_on_grid, dist)
    result["aoi"] = banded_means(aoi_on_grid, dist)
    if chm is not None:
        for label, pred in (("one_raster", one), ("aoi", run.mosaic)):
            rep = evaluate(pred, [chm], work / f"{name}_{label}_eval", overwrite=True,
                           reference_crs=chm_crs)
            o = rep["pooled"]["overall"]
            result[f"{label}_vs_lidar"] = {"mae": o["mae"], "bias": o["bias"], "r2": o["r2"],
                                           "n": o["n"]}
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, help="write the results here (JSON)")
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--scenes", nargs="*", default=list(SCENES))
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scenes:
            rgb, chm, chm_crs = SCENES[name]
            results[name] = run_scene(name, DATA / rgb, DATA / chm if chm else None, chm_crs,
                                      Path(tmp), args.checkpoint)
            print(json.dumps({name: results[name]}, indent=1), flush=True)
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
