"""Reproduce the bundled default model, and its evaluation against two baselines.

    python -m canopy.train.default_model                  # writes canopy/weights/default/
    python -m canopy.train.default_model --out /tmp/m --steps 50   # a quick look

What it does, in one run:

1. **Data.** Real RGB/CHM pairs from ``../shared/data/rgb_chm_pairs``: NEON BART_041 (CHM
   rasterised from its LAZ at 1 m, first returns, pit-filled) and the Kootenay drone pair
   (photogrammetric CHM, 0.5 m), plus procedural scenes from :mod:`canopy.synth` (exact labels,
   never real data). **NEON OSBS_029 is held out entirely**: no chip of it is trained on or used
   for model selection; it is only predicted at the end.
2. **Training** with :func:`canopy.train.loop.train`, a ViT-Ti/16 trained from scratch (no
   pretrained weights can be downloaded here) plus a DPT decoder, at 0.5 m GSD on 96-px chips.
3. **Evaluation** on the held-out pair with :func:`canopy.evaluate.evaluate` (prediction averaged
   onto the 0.5 m CHM grid), next to two baselines measured in the same run: the training-set
   mean height everywhere, and a gradient-boosted per-pixel regressor on colour and texture
   features trained on the same chips.
4. ``MODEL_CARD.md`` with data, settings, command, time and every number.

Why 0.5 m: the labels are at 0.5 m (OSBS, Kootenay) and 1 m (BART), so a finer model grid adds
no verified detail, and a 40 m NEON plot is still 80 px (at HRCH's 0.6 m it would be 67 px,
at 0.25 m four times the compute per metre on two CPU cores). Kootenay's imagery is native there.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
SHARED = (ROOT / ".." / "shared" / "data" / "rgb_chm_pairs").resolve()
DEFAULT_OUT = ROOT / "canopy" / "weights" / "default"


@dataclass(frozen=True)
class Recipe:
    gsd: float = 0.5
    chip_size: int = 96
    real_stride: int = 16               # dense, overlapping real chips (crops of small plots)
    arch: str = "vit_tiny"
    n_bins: int = 128
    max_height_m: float = 64.0
    synthetic_scenes: int = 16
    synthetic_val_scenes: int = 4
    synthetic_scene_px: int = 288
    synthetic_stride: int = 48
    # OSBS (80 px at 0.5 m: ten partly padded chips) and BART (eleven) are weighted up: with
    # 4× each and 32 synthetic scenes, v1 of this recipe predicted ≈ 0 m over the whole OSBS plot,
    # the part it trained on included (see MODEL_CARD.md, "Recipe history")
    real_repeats: tuple[tuple[str, int], ...] = (("BART_041", 8), ("OSBS_029", 16), ("kootenay", 2))
    holdout: str = "block"              # 'block': east 40 % of every real scene; 'site': all of OSBS
    holdout_share: float = 0.4
    steps: int = 1600
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    # one thread: on a shared 2-core box, two threads stall on each other whenever another job
    # holds a core (measured 1.05 s/step with one thread against 1.9–6.3 s with two)
    threads: int | None = 1
    gbm_pixels: int = 300_000


def real_pairs(work: Path) -> list[tuple]:
    """The three real pairs (imagery, chm, chm_crs or None); BART's CHM is made from its LAZ."""
    from data_catalog.lidar import chm_from_las, write_chm_geotiff

    bart_chm = work / "BART_041_chm_1m.tif"
    if not bart_chm.exists():
        chm, transform, crs = chm_from_las(SHARED / "neon_bart_041" / "BART_041.laz", resolution=1.0)
        write_chm_geotiff(bart_chm, chm, transform, crs)
    return [
        (str(SHARED / "neon_bart_041" / "BART_041.tif"), str(bart_chm), None),
        (str(SHARED / "kootenay_bc_drone" / "kootenayOrtho_from_rda.tif"),
         str(SHARED / "kootenay_bc_drone" / "kootenayCHM.tif"), None),
        (str(SHARED / "neon_osbs_029" / "OSBS_029.tif"),
         str(SHARED / "neon_osbs_029" / "OSBS_029_CHM.tif"), "EPSG:32617"),
    ]


def holdout_split_x(imagery: str, share: float) -> float:
    """Easting east of which a scene is held out (the eastern ``share`` of its width)."""
    import rasterio

    with rasterio.open(imagery) as src:
        left, _, right, _ = src.bounds
    return right - share * (right - left)


def mask_held_out(rec, split_x: float):
    """Blank the held-out part of a chip: no pixel of it is seen as input or label.

    Returns None when nothing labelled is left. Column centres are compared with ``split_x``
    on each grid (image and, possibly coarser, target) over the chip's bounds.
    """
    import dataclasses

    left, _, right, _ = rec.bounds

    def held(width: int) -> np.ndarray:
        centres = left + (np.arange(width) + 0.5) * (right - left) / width
        return centres >= split_x

    img_cols, tgt_cols = held(rec.image.shape[-1]), held(rec.target.shape[-1])
    if not img_cols.any():
        return rec
    image, valid, target = rec.image.copy(), rec.valid.copy(), rec.target.copy()
    image[:, :, img_cols] = 0
    valid[:, img_cols] = False
    target[:, tgt_cols] = np.nan
    # a label cell straddling the boundary would average held-out pixels: drop it too
    edge = np.flatnonzero(~tgt_cols)
    if edge.size and tgt_cols.any():
        target[:, edge[-1]] = np.nan
    out = dataclasses.replace(rec, image=image, valid=valid, target=target)
    return out if np.isfinite(out.target).any() and out.valid.any() else None


def build_records(recipe: Recipe, work: Path):
    """Training chips (real, with the held-out part removed, repeated; synthetic), synthetic
    validation chips, the evaluation targets [(imagery, chm, chm_crs, split_x)], a summary."""
    from data_catalog.chips import ChipSampler
    from canopy.train.datasets import SyntheticSpec, records_from_sampler, synthetic_records

    pairs = real_pairs(work)
    if recipe.holdout == "site":  # OSBS unseen: a test of generalisation to a new site
        train_pairs = [p for p in pairs if "OSBS" not in p[0]]
        evaluation = [(*p, -math.inf) for p in pairs if "OSBS" in p[0]]
    elif recipe.holdout == "block":
        train_pairs = pairs
        evaluation = [(*p, holdout_split_x(p[0], recipe.holdout_share)) for p in pairs]
    else:
        raise ValueError(f"holdout must be 'block' or 'site', got {recipe.holdout!r}")
    split_of = {p[0]: x for *p, x in evaluation}
    sampler = ChipSampler([(i, c, crs) if crs else (i, c) for i, c, crs in train_pairs],
                          chip_size=recipe.chip_size, gsd=recipe.gsd, stride=recipe.real_stride,
                          split_fractions=(1, 0, 0), chm_mode="native", seed=recipe.seed)
    real, _ = records_from_sampler(sampler, "train")
    repeats = dict(recipe.real_repeats)
    train = []
    per_site: dict[str, int] = {}
    for rec in real:
        if rec.origin in split_of:
            rec = mask_held_out(rec, split_of[rec.origin])
            if rec is None:
                continue
        stem = Path(rec.origin).stem
        n = next((k_n for k, k_n in repeats.items() if k.lower() in stem.lower()), 1)
        train += [rec] * n
        per_site[stem] = per_site.get(stem, 0) + 1
    syn_train, _ = synthetic_records(
        SyntheticSpec(recipe.synthetic_scenes, recipe.synthetic_scene_px, recipe.gsd, recipe.seed),
        recipe.chip_size, recipe.synthetic_stride)
    syn_val, _ = synthetic_records(
        SyntheticSpec(recipe.synthetic_val_scenes, recipe.synthetic_scene_px, recipe.gsd,
                      recipe.seed + 1_000_003), recipe.chip_size, recipe.chip_size)
    held = ("the eastern {:.0%} of each real scene (no pixel of it trained on, as input or "
            "label)".format(recipe.holdout_share) if recipe.holdout == "block"
            else "all of NEON OSBS_029")
    summary = {
        "real training chips (before repeats)": per_site,
        "real chips repeated": dict(recipe.real_repeats),
        "synthetic training chips": len(syn_train),
        "synthetic validation chips": len(syn_val),
        "held out": held,
    }
    return train + syn_train, syn_val, evaluation, summary


# --------------------------------------------------------------------------------- baselines


def pixel_features(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel colour and texture features of a (3,H,W) uint8 image → (H·W, F) float32.

    Colour: R, G, B, brightness, excess green, chroma. Texture at 3 window sizes (≈ 1.5, 3.5,
    7.5 m at 0.5 m): local mean and standard deviation of brightness and excess green, local mean
    gradient magnitude, and the pixel's darkness relative to its surroundings (shadow cue).
    """
    from scipy import ndimage

    x = rgb.astype(np.float32) / 255.0
    r, g, b = x
    bright = x.mean(0)
    exg = 2 * g - r - b
    chroma = x.max(0) - x.min(0)
    grad = np.hypot(ndimage.sobel(bright, 0), ndimage.sobel(bright, 1))
    feats = [r, g, b, bright, exg, chroma]
    for size in (3, 7, 15):
        for f in (bright, exg):
            m = ndimage.uniform_filter(f, size)
            sq = ndimage.uniform_filter(f * f, size)
            feats += [m, np.sqrt(np.clip(sq - m * m, 0, None))]
        feats.append(ndimage.uniform_filter(grad, size))
        feats.append(bright - ndimage.uniform_filter(bright, size))
    return np.stack([f.ravel() for f in feats], axis=1).astype(np.float32)


def fit_gbm(records, n_pixels: int, seed: int):
    """Gradient-boosted trees on per-pixel features of the training chips (labels at each
    chip's lidar cell, repeated over the pixels it covers)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    per_chip = max(200, n_pixels // max(1, len(records)))
    for rec in records:
        f = pixel_features(rec.image)
        h, w = rec.image.shape[1:]
        th, tw = rec.target.shape
        rows = (np.arange(h) * th // h)[:, None]
        cols = (np.arange(w) * tw // w)[None, :]
        y = rec.target[rows, cols].ravel()
        ok = np.flatnonzero(np.isfinite(y) & rec.valid.ravel())
        if ok.size == 0:
            continue
        pick = rng.choice(ok, min(per_chip, ok.size), replace=False)
        xs.append(f[pick])
        ys.append(np.clip(y[pick], 0, None))
    model = HistGradientBoostingRegressor(loss="absolute_error", max_iter=300, learning_rate=0.1,
                                          max_leaf_nodes=63, random_state=seed)
    model.fit(np.concatenate(xs), np.concatenate(ys))
    return model


# -------------------------------------------------------------------------------- evaluation


def held_out_reference(chm: str, chm_crs: str | None, split_x: float, out: Path) -> Path:
    """The CHM with everything west of ``split_x`` (the trained-on part) set to NaN."""
    import rasterio

    from data_catalog.chm import read_chm

    c = read_chm(chm, crs=chm_crs)  # float32 metres, every nodata variant NaN
    arr = c.array
    cols = c.transform.c + (np.arange(arr.shape[1]) + 0.5) * c.transform.a
    arr[:, cols < split_x] = np.nan
    with rasterio.open(out, "w", driver="GTiff", width=arr.shape[1], height=arr.shape[0], count=1,
                       dtype="float32", crs=c.crs, transform=c.transform, nodata=float("nan"),
                       compress="deflate") as dst:
        dst.write(arr, 1)
    return out


def evaluate_held_out(model, gbm, mean_height: float, targets: list, work: Path) -> dict:
    """Predict each evaluation scene three ways; score the held-out part against its CHM."""
    import rasterio

    from canopy.evaluate import evaluate
    from canopy.io.cog import write_cog
    from canopy.predict.options import PredictOptions
    from canopy.predict.raster import predict_raster
    from data_catalog.raster import read_rgb_on_grid

    results: dict = {"sites": {}}
    for image, chm, chm_crs, split_x in targets:
        site = Path(image).stem
        ref = held_out_reference(chm, chm_crs, split_x, work / f"{site}_heldout_chm.tif")
        paths = {name: work / f"{site}_pred_{name}.tif" for name in ("model", "mean_height", "gbm")}
        predict_raster(image, paths["model"], model, PredictOptions(), overwrite=True)
        with rasterio.open(paths["model"]) as src:
            valid = np.isfinite(src.read(1))
            profile = dict(crs=src.crs, transform=src.transform)
        grid = read_rgb_on_grid(image, model.cfg.gsd)
        gbm_pred = gbm.predict(pixel_features(grid.rgb)).reshape(valid.shape).astype(np.float32)
        write_cog(paths["mean_height"], np.where(valid, mean_height, np.nan).astype(np.float32)[None],
                  nodata=float("nan"), overwrite=True, **profile)
        write_cog(paths["gbm"], np.where(valid, np.clip(gbm_pred, 0, None), np.nan)[None],
                  nodata=float("nan"), overwrite=True, **profile)
        results["sites"][site] = {}
        for name, path in paths.items():
            o = evaluate(path, [ref], work / f"eval_{site}_{name}", overwrite=True)["pooled"]["overall"]
            results["sites"][site][name] = {k: o.get(k) for k in
                                            ("mae", "rmse", "bias", "r2", "tree_cover_iou", "n")}
    pooled = {}
    for name in ("model", "mean_height", "gbm"):
        rows = [r[name] for r in results["sites"].values()]
        n = sum(r["n"] for r in rows)
        pooled[name] = {"n": n,
                        "mae": sum(r["mae"] * r["n"] for r in rows) / n,
                        "bias": sum(r["bias"] * r["n"] for r in rows) / n,
                        "rmse": math.sqrt(sum(r["rmse"] ** 2 * r["n"] for r in rows) / n)}
    results["pooled"] = pooled
    return results


# ------------------------------------------------------------------------------------ card


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _site_holdout(path: str | None) -> dict | None:
    """The OSBS results of an earlier ``--holdout site`` run's evaluation.json (OSBS never seen)."""
    if not path or not Path(path).exists():
        return None
    data = json.loads(Path(path).read_text())
    res = data["results"]
    return res["sites"]["OSBS_029"] if "sites" in res else res  # both file layouts


def _site_holdout_rows(res: dict) -> list[str]:
    names = {"model": "model trained without OSBS", "mean_height": "training-set mean height",
             "gbm": "gradient-boosted per-pixel regressor"}
    return [f"| {names[k]} | {_fmt(res[k]['mae'])} | {_fmt(res[k]['rmse'])} | "
            f"{_fmt(res[k]['bias'])} | {_fmt(res[k]['r2'])} |" for k in names]


def _verdict(evals: dict) -> str:
    """One honest sentence comparing the model with both baselines on the pooled held-out blocks."""
    p = evals["pooled"]
    m, c, g = p["model"]["mae"], p["mean_height"]["mae"], p["gbm"]["mae"]
    first = (f"On the held-out blocks it beats the training-set mean height (MAE {m:.2f} m vs "
             f"{c:.2f} m)" if m < c else
             f"On the held-out blocks it does not even beat the training-set mean height (MAE "
             f"{m:.2f} m vs {c:.2f} m)")
    if g < m:
        better = [s for s, r in evals["sites"].items() if r["model"]["mae"] < r["gbm"]["mae"]]
        where = f"; the model wins on {', '.join(better)} only" if better else ""
        return (first + f", but a per-pixel gradient-boosted regressor on colour and texture "
                f"does better still ({g:.2f} m{where}): a ViT trained from scratch on a few hundred "
                "real chips has not learned more than hand-made texture features.")
    return first + f" and the per-pixel gradient-boosted regressor ({g:.2f} m)."


def model_card(recipe: Recipe, summary: dict, result, evals: dict, mean_height: float,
               seconds_total: float, command: str, n_params: int, size_mb: float,
               site_holdout_json: str | None = None) -> str:
    labels = {"model": "**this model**",
              "mean_height": f"training-set mean height ({mean_height:.2f} m) everywhere",
              "gbm": "gradient-boosted trees, per-pixel colour + texture features"}
    v = result.final_val
    lines = [
        "# canopy default model v1 — ViT-Ti/16 + DPT at 0.5 m, trained from scratch on tiny data",
        "",
        "**Read this first.** A demonstration model. It was trained in "
        f"{result.seconds / 60:.0f} minutes on one CPU core of a shared machine, from scratch (no "
        "pretrained backbone can be downloaded here), on three small real plots and procedural "
        "synthetic scenes. " + _verdict(evals) + " These are not paper-scale numbers, and on a "
        "landscape it has never seen it can be far off (see below). For real maps use the "
        "HighResCanopyHeight v1 weights (`--checkpoint SSLhuge_satellite.pth`) or train on real "
        "lidar with `canopy train`.",
        "",
        "## Model",
        "- backbone: ViT-Ti/16 (width 192, 12 blocks, 3 heads, LayerScale), random init, trained "
        f"fully; decoder: DPT (reassemble 24/48/96/192, fusion width 96), {recipe.n_bins} height "
        f"bins up to {recipe.max_height_m:g} m (HRCH-style linear bin normalisation)",
        f"- {n_params / 1e6:.1f} M parameters, {size_mb:.1f} MB (float32 safetensors)",
        f"- ground sample distance **{recipe.gsd:g} m**, tile {recipe.chip_size} px "
        f"({recipe.chip_size * recipe.gsd:g} m); `canopy predict` resamples any input to 0.5 m.",
        "- why 0.5 m: the labels are 0.5 m (OSBS, Kootenay) and 1 m (BART), so a finer grid adds "
        "no verified detail; a 40 m NEON plot is still 80 px (67 px at HRCH's 0.6 m); 0.25 m "
        "would cost four times the compute per metre on a CPU. 128 bins over 0–64 m (0.5 m "
        "apart) instead of HRCH's 256 over 0–100 m: the per-pixel bin arithmetic dominated a "
        "CPU training step, and no training label exceeds 40 m.",
        "",
        "## Data",
        "- NEON BART_041 (Bartlett, New Hampshire; tall closed broadleaf): RGB 0.1 m, CHM "
        "rasterised from the plot's LAZ at 1 m (first returns, pit-filled). NEON data CC0.",
        "- NEON OSBS_029 (Ordway-Swisher, Florida; open pine on sand): RGB 0.1 m, NEON CHM 0.5 m. "
        "CC0. This is the README demo scene: its western 60 % was trained on.",
        "- Kootenay, British Columbia (drone): RGB 0.5 m, photogrammetric (SfM) CHM 0.5 m. From "
        "the ForestTools R package, **GPL-3**: mind that licence if you redistribute these weights.",
        f"- {summary['synthetic training chips']} chips from {recipe.synthetic_scenes} procedural "
        "scenes of `canopy.synth` (SYNTHETIC: crowns with sun-angle shadows, fields, roads, "
        "buildings, exact CHM) and another "
        f"{recipe.synthetic_val_scenes} scenes for validation.",
        f"- **held out for evaluation: {summary['held out']}.** Real chips overlapping it have "
        "those pixels blanked (image zeroed, masked, label removed); label cells straddling the "
        "boundary are dropped.",
        f"- real chips (96 px, every 8 m) before repetition: "
        f"{summary['real training chips (before repeats)']}, repeated "
        f"{dict(recipe.real_repeats)} times per epoch to weigh real against synthetic pixels. "
        "Labels coarser than 0.5 m (BART's 1 m) are compared with the prediction averaged onto "
        "their grid, never upsampled.",
        "",
        "## Training",
        f"- command: `{command}`",
        f"- {recipe.steps} steps × {recipe.batch_size} chips of {recipe.chip_size} px; AdamW "
        f"lr {recipe.lr:g} (warm-up 8 %, cosine), fp32, 0.25·SiLog(λ 0.85, ε 1 m) + L1 (+ the "
        "logit-scale penalty), dihedral + colour augmentation, seed 0; everything else at the "
        "`canopy train` defaults (docs/training.md)",
        f"- training time {result.seconds / 60:.1f} min (whole script, with data, baselines "
        f"and evaluation, {seconds_total / 60:.1f} min), one thread of a shared 2-core x86 VM",
        f"- synthetic validation scenes: MAE {v['val_mae']:.2f} m, RMSE {v['val_rmse']:.2f} m, "
        f"bias {v['val_bias']:+.2f} m (mean-height baseline {v['baseline_mae']:.2f} m); "
        "per-epoch curve in `training_log.csv`",
        "",
        "## Evaluation on the held-out blocks",
        "Each scene predicted whole at 0.5 m, scored with `canopy evaluate` on its CHM's grid, "
        "only where the CHM lies in the held-out eastern part. Both baselines were fitted in the "
        "same run on the same training pixels.",
        "",
        "| scene | predictor | MAE (m) | RMSE (m) | bias (m) | R² | tree-cover IoU (2 m) | pixels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for site, rows in evals["sites"].items():
        for name, label in labels.items():
            e = rows[name]
            lines.append(f"| {site} | {label} | {_fmt(e['mae'])} | {_fmt(e['rmse'])} | "
                         f"{_fmt(e['bias'])} | {_fmt(e['r2'])} | {_fmt(e['tree_cover_iou'])} | "
                         f"{e['n']:,} |")
    for name, label in labels.items():
        e = evals["pooled"][name]
        lines.append(f"| all three (pixel-weighted) | {label} | {_fmt(e['mae'])} | "
                     f"{_fmt(e['rmse'])} | {_fmt(e['bias'])} | | | {e['n']:,} |")
    lines += [
        "",
        "These blocks are 16 m × 40 m (NEON) and 57 m × 109 m (Kootenay) of the same flights "
        "the model was trained on: a test of mapping nearby canopy of a known kind, with a few "
        "thousand pixels per site. Differences of a few tenths of a metre are within what "
        "another block could reverse.",
        "",
    ]
    site = _site_holdout(site_holdout_json)
    if site:
        site_recipe = json.loads(Path(site_holdout_json).read_text()).get("recipe", {})
        differs = {k: v for k, v in site_recipe.items()
                   if k not in ("holdout", "threads") and k in asdict(recipe)
                   and json.dumps(v) != json.dumps(asdict(recipe)[k])}
        which = ("The same recipe" if not differs else
                 "The recipe with " + ", ".join(f"{k} = {v}" for k, v in differs.items()))
        lines += [
            "## A landscape it has never seen",
            f"{which}, with OSBS_029 held out entirely (`python -m canopy.train.default_model "
            "--holdout site`: trained on BART, Kootenay and synthetic scenes only), scored on the "
            "whole OSBS plot (`evaluation_site_holdout.json`):",
            "",
            "| predictor | MAE (m) | RMSE (m) | bias (m) | R² |",
            "|---|---|---|---|---|",
            *_site_holdout_rows(site),
            "",
            f"Both learned predictors do far worse than a constant there: the model over-predicts "
            f"by {site['model']['bias']:+.1f} m on average, the trees by {site['gbm']['bias']:+.1f} m. "
            "With two real sites to learn from, the likely reason is that OSBS's open pine over "
            "bright sand resembles nothing in the training set and gets read as the tall canopy it "
            "most resembles; the synthetic scenes did not prevent that. More real sites or a "
            "pretrained backbone are the remedy, not more steps.",
            "",
        ]
    lines += [
        "## Recipe history",
        "- v1 of this recipe (32 synthetic scenes; real chips repeated BART ×4, OSBS ×4, "
        "Kootenay ×2) scored a pooled held-out MAE of 1.57 m (mean height 3.05 m, trees 1.06 m) "
        "but predicted ≈ 0.3 m over the whole OSBS demo plot, the part it trained on included "
        "(median and 95th percentile 0.3 m; the lidar says 0–10 m): OSBS's ten partly padded "
        "chips were 3 % of an epoch. The current recipe weights the small NEON plots up and halves "
        "the synthetic scenes. It was chosen for that reason before its held-out numbers were "
        "seen, and it is the only other recipe that was run.",
        "",
        "## Limitations",
        "- About 0.01 km² of real labels from three sites: expect errors of several metres on "
        "other landscapes, and do not use the maps for decisions.",
        "- The Kootenay CHM is photogrammetric (surface of what the drone saw), not lidar.",
        "- 0.5 m input is assumed; other resolutions are resampled, which changes what the "
        "model sees.",
        "",
        "Reproduce: `python -m canopy.train.default_model` (same seed, same data: the same "
        "numbers up to floating-point differences between machines).",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ main


def _print_messages(event) -> None:
    """This script's own progress display: the training loop's log lines."""
    if event.message:
        print(event.message, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train and evaluate the bundled default model.")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="where model.safetensors etc. go")
    ap.add_argument("--run-dir", default=None, help="training run folder (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=Recipe.steps)
    ap.add_argument("--threads", type=int, default=Recipe.threads)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--holdout", choices=["block", "site"], default=Recipe.holdout,
                    help="block: the east 40 %% of each real scene; site: all of OSBS_029")
    ap.add_argument("--site-holdout-json", default=None,
                    help="evaluation.json of a --holdout site run, quoted in the model card")
    args = ap.parse_args(argv)
    if not SHARED.exists():
        print(f"error: real data not found at {SHARED}", file=sys.stderr)
        return 2
    from canopy.model.checkpoints import load_model, save_native
    from canopy.train.datasets import label_mean
    from canopy.train.loop import TrainConfig, train

    t_start = time.perf_counter()
    recipe = Recipe(steps=args.steps, threads=args.threads, holdout=args.holdout)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="canopy_default_"))
    work = run_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    train_records, val_records, targets, summary = build_records(recipe, work)
    print(f"{len(train_records)} training chips, {len(val_records)} validation chips", flush=True)
    cfg = TrainConfig(
        out_dir=str(run_dir / "train"), arch=recipe.arch, n_bins=recipe.n_bins,
        max_height_m=recipe.max_height_m, gsd=recipe.gsd, chip_size=recipe.chip_size,
        steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, finetune_blocks=-1,
        precision="fp32", seed=recipe.seed, device=args.device, threads=recipe.threads,
        model_name="canopy_default", model_version="1", log_every=25, checkpoint_every=100,
    )
    command = "python -m canopy.train.default_model" + (
        f" --steps {args.steps}" if args.steps != Recipe.steps else "") + (
        f" --holdout {args.holdout}" if args.holdout != Recipe.holdout else "")
    result = train(cfg, train_records, val_records, resume=(run_dir / "train" / "checkpoint.pt").exists(),
                   data_summary=summary, command=command, progress=_print_messages)
    model = load_model(result.model_dir)
    mean_height = label_mean(train_records)
    print("fitting the gradient-boosting baseline", flush=True)
    gbm = fit_gbm(train_records, recipe.gbm_pixels, recipe.seed)
    evals = evaluate_held_out(model, gbm, mean_height, targets, work)
    print(json.dumps(evals, indent=2), flush=True)
    out = Path(args.out)
    model.cfg.source = (f"canopy.train.default_model (ViT-Ti/16 from scratch; real: "
                        f"{', '.join(summary['real training chips (before repeats)'])}; synthetic)")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_native(model, tmp)
    size_mb = (tmp / "model.safetensors").stat().st_size / 1e6
    n_params = sum(p.numel() for p in model.parameters())
    card = model_card(recipe, summary, result, evals, mean_height, time.perf_counter() - t_start,
                      command, n_params, size_mb, args.site_holdout_json)
    (tmp / "MODEL_CARD.md").write_text(card)
    (tmp / "evaluation.json").write_text(json.dumps(
        {"held_out": summary["held out"], "results": evals, "mean_height_m": mean_height,
         "synthetic_validation": result.final_val, "recipe": asdict(recipe),
         "train_seconds": result.seconds}, indent=2, default=str) + "\n")
    shutil.copy(run_dir / "train" / "log.csv", tmp / "training_log.csv")
    if args.site_holdout_json:
        shutil.copy(args.site_holdout_json, tmp / "evaluation_site_holdout.json")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"default model written to {out} ({size_mb:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
