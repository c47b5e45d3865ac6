"""The GEDI correction on synthetic scenes: the numbers of docs/gedi_correction.md.

    python benchmarks/gedi_correction_synthetic.py benchmark --scenario cover -o result.json

Fits on ``n_train`` procedural scenes whose "decoder" is the exact CHM with a known bias, then
scores ``n_test`` other scenes (GEDI MAE and map MAE against the exact CHM) for the decoder as
is, one global factor and the fitted model. Synthetic data only: it shows the method learns what
it should, not how it does on real imagery.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from canopy.errors import InputError
from canopy.model.gedi_correction import CorrectionConfig
from canopy.train.gedi_correction import FitOptions, fit_correction
from canopy.train.gedi_samples import FOOTPRINT_MIN_VALID_SHARE, block_samples
from data_catalog.gedi import footprint_percentiles


BIAS_SCENARIOS = ("uniform", "cover")


def biased_decoder(chm: np.ndarray, gsd: float, scenario: str) -> np.ndarray:
    """A stand-in for a decoder with a known bias, made from the exact CHM (synthetic only).

    * ``uniform``: 0.7 × CHM everywhere (the factor to learn is 1/0.7 ≈ 1.43).
    * ``cover``: under-estimates more where the canopy is closed, as RGB models do in dense tall
      forest: CHM × (0.95 − 0.5 × canopy cover within ~100 m). The right factor depends on what
      the imagery shows, which one global factor cannot follow.
    """
    if scenario == "uniform":
        return (0.7 * chm).astype(np.float32)
    if scenario == "cover":
        from scipy import ndimage

        cover = ndimage.gaussian_filter((chm > 2.0).astype(np.float32), sigma=100.0 / gsd,
                                        mode="reflect", truncate=3.0)
        return (chm * (0.95 - 0.5 * cover)).astype(np.float32)
    raise InputError(f"unknown bias scenario '{scenario}' (one of {', '.join(BIAS_SCENARIOS)})")


def _synthetic_scene(seed: int, side_px: int, gsd: float, scenario: str, track_spacing_m: float):
    import geopandas as gpd
    from affine import Affine

    from canopy.synth import DEFAULT_ORIGIN, GediConfig, gedi_like_shots, make_scene

    scene = make_scene(side_px, side_px, gsd, seed, layers=())
    shots = gedi_like_shots(scene.chm, gsd, seed, GediConfig(track_spacing_m=track_spacing_m))
    # scenes side by side, 10 km apart, on the model's pixel lattice
    x0 = round((DEFAULT_ORIGIN[0] + 10_000.0 * seed) / gsd) * gsd
    y0 = round(DEFAULT_ORIGIN[1] / gsd) * gsd
    transform = Affine(gsd, 0, x0, 0, -gsd, y0)
    gdf = gpd.GeoDataFrame({"rh95": shots["rh95"], "rh98": shots["rh98"]},
                           geometry=gpd.points_from_xy(x0 + shots["x"], y0 - shots["y"]),
                           crs="EPSG:32617")
    return scene, biased_decoder(scene.chm, gsd, scenario), transform, gdf


def _map_scores(pred: np.ndarray, chm: np.ndarray) -> dict:
    e = pred.astype(np.float64) - chm
    trees = chm >= 2.0
    return {"mae": float(np.abs(e).mean()), "bias": float(e.mean()),
            "mae_trees": float(np.abs(e[trees]).mean()), "bias_trees": float(e[trees].mean())}


def synthetic_benchmark(scenario: str = "cover", n_train: int = 12, n_test: int = 4,
                        area_km2: float = 4.0, gsd: float = 0.6, cfg: CorrectionConfig | None = None,
                        opts: FitOptions | None = None, track_spacing_m: float = 150.0,
                        log: Callable[[str], None] | None = None) -> dict:
    """Fit on ``n_train`` synthetic scenes with a biased stand-in decoder; score ``n_test`` others.

    Scores on the test scenes: GEDI MAE (footprint percentile of the map vs the shots' noisy RH,
    at their mis-located reported positions) and map MAE vs the exact CHM, for the decoder as is,
    one global factor, and the fitted model applied with :func:`apply_correction`.
    """
    from canopy.predict.correction import apply_correction

    cfg = cfg or CorrectionConfig(gsd=gsd, decoder=f"synthetic-{scenario}")
    opts = opts or FitOptions()
    side = int(round(math.sqrt(area_km2 * 1e6) / gsd))
    t0 = time.time()
    samples = []
    for seed in range(1, n_train + 1):
        scene, height, transform, shots = _synthetic_scene(seed, side, gsd, scenario, track_spacing_m)
        s, _ = block_samples(scene.rgb, np.ones(height.shape, bool), height, transform,
                             "EPSG:32617", shots, cfg, source=f"train{seed}")
        samples += s
        if log:
            log(f"train scene {seed}: {len(s)} blocks, {sum(len(b.rh) for b in s)} shots")
    model, report = fit_correction(
        samples, cfg, opts, progress=(lambda ev: log(ev.message) if ev.message else None) if log else None)
    g = report.global_factor
    # "exact_chm" scores the true CHM itself: the floor GEDI noise and geolocation error leave
    names = ("decoder", "global_factor", "corrected", "exact_chm")
    scores = {k: {"gedi": [], "map": []} for k in names}
    for seed in range(1000 + 1, 1000 + n_test + 1):
        scene, height, transform, shots = _synthetic_scene(seed, side, gsd, scenario, track_spacing_m)
        corrected = apply_correction(height, scene.rgb, transform, "EPSG:32617", model)
        pts = shots.geometry
        rh = shots[cfg.rh_metric].to_numpy()
        maps = (("decoder", height), ("global_factor", g * height), ("corrected", corrected),
                ("exact_chm", scene.chm))
        for name, m in maps:
            pct = footprint_percentiles(m, transform, pts.x.to_numpy(), pts.y.to_numpy(),
                                        cfg.percentile, diameter_m=cfg.footprint_diameter_m,
                                        min_valid_share=FOOTPRINT_MIN_VALID_SHARE)
            ok = np.isfinite(pct)
            scores[name]["gedi"].append(np.abs(pct[ok] - rh[ok]))
            scores[name]["map"].append((_map_scores(m, scene.chm), m.size))
        if log:
            log(f"test scene {seed} scored")
    summary = {}
    for name, parts in scores.items():
        gedi_err = np.concatenate(parts["gedi"])
        weights = np.array([w for _, w in parts["map"]], np.float64)
        map_keys = parts["map"][0][0].keys()
        summary[name] = {
            "gedi_mae": float(gedi_err.mean()), "n_gedi_shots": int(gedi_err.size),
            **{f"chm_{k}": float(np.average([d[k] for d, _ in parts["map"]], weights=weights))
               for k in map_keys},
        }
    return {"scenario": scenario, "n_train_scenes": n_train, "n_test_scenes": n_test,
            "area_km2_per_scene": area_km2, "gsd": gsd, "config": cfg.to_dict(),
            "fit_options": asdict(opts), "fit": report.to_dict(), "test": summary,
            "seconds": round(time.time() - t0, 1)}


def _main(argv: Sequence[str] | None = None) -> None:
    """``python benchmarks/gedi_correction_synthetic.py benchmark``: the numbers of docs/gedi_correction.md."""
    import argparse

    parser = argparse.ArgumentParser(prog="benchmarks/gedi_correction_synthetic.py")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("benchmark", help="fit and score on synthetic scenes")
    bench.add_argument("--scenario", choices=BIAS_SCENARIOS, default="cover")
    bench.add_argument("--train-scenes", type=int, default=12)
    bench.add_argument("--test-scenes", type=int, default=4)
    bench.add_argument("--area-km2", type=float, default=4.0)
    bench.add_argument("--steps", type=int, default=FitOptions.steps)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    bench.add_argument("-o", "--output", type=Path, help="write the result JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # a command-line entry point: its own process
    result = synthetic_benchmark(args.scenario, args.train_scenes, args.test_scenes, args.area_km2,
                                 opts=FitOptions(steps=args.steps, seed=args.seed),
                                 log=lambda m: print(m, flush=True))
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    print(json.dumps(result["test"], indent=2))


if __name__ == "__main__":
    _main()
