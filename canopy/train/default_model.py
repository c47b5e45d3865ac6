"""Reproduce the bundled default model (v2) and its leave-one-site-out evaluation.

    python -m canopy.train.default_model fold TEAK --run-dir runs/dm2   # one held-out site
    python -m canopy.train.default_model final --run-dir runs/dm2       # weights + card
    python -m canopy.train.default_model all --run-dir runs/dm2 --jobs 2

What a run does:

1. **Data** (:mod:`canopy.train.sites`): every real RGB/lidar pair in ``../shared/data`` whose
   licence allows shipping weights (NEON TEAK, OSBS, BART: CC0), CHMs derived from the plots'
   point clouds at 1 m with the project's LAS/LAZ → CHM path, co-registration checked per plot
   (a plot whose brightness/height correlation peak lies far from its site's is not trained on).
   The Kootenay pair (GPL-3) is judged on, never trained on. Procedural scenes from
   :mod:`canopy.synth` are added when ``--synthetic`` > 0 (exact labels, never real data).
2. **Folds**: for each site, a model trained on every *other* site, then scored on all plots of
   the held-out site next to three baselines fitted in the same run: the training-set mean
   height, a per-pixel gradient-boosted regressor on colour and texture, and the site's own mean
   height (an oracle constant that knows the answer's mean).
3. **Final**: the model trained on every shippable site, scored on Kootenay, with the
   out-of-distribution reference of its training tiles (:mod:`canopy.model.ood`), written with
   its card, the fold table and how well the OOD score separated large errors on held-out sites.

A site with few chips has them repeated up to about ``site_chips`` an epoch, so one BART plot
is not drowned by the TEAK plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from canopy.train.sites import ROOT, Pair, check_sites, coregistration, derive_chm

DEFAULT_OUT = ROOT / "canopy" / "weights" / "default"
FOLD_SITES = ("TEAK", "OSBS", "BART")
LARGE_ERROR_M = 5.0


@dataclass(frozen=True)
class Recipe:
    gsd: float = 0.5
    chip_size: int = 96
    real_stride: int = 16
    arch: str = "vit_tiny"
    n_bins: int = 128
    max_height_m: float = 64.0
    chm_resolution: float = 1.0          # NEON clouds of 4–8 pts/m²: 0.5 m cells would be empty
    site_chips: int = 48                 # a small site's chips repeated up to about this many
    synthetic_scenes: int = 0
    synthetic_val_scenes: int = 4
    synthetic_scene_px: int = 288
    synthetic_stride: int = 48
    steps: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    threads: int = 1
    backbone: str | None = None          # a pretrained backbone.safetensors; None: random init
    gsd_coarsen: float = 1.0             # augmentation: imagery up to 2× coarser
    sensor: float = 0.1
    haze: float = 0.3
    # a plot whose correlation peak lies this far from its site's median is not trained on: sun
    # shadows of one flight move the peak by a few metres alike; 5 m apart means another flight
    # or a misregistered plot (docs/data_inputs.md)
    coreg_tolerance_m: float = 5.0
    ood_k: int = 3
    gbm_pixels: int = 200_000

    def key(self) -> str:
        """A short name of the choices that differ between compared variants."""
        bb = "pretrained" if self.backbone else "random"
        return f"{bb}_syn{self.synthetic_scenes}"

    def recorded(self) -> dict:
        """The recipe as the shipped files record it: the backbone by file name (the card's
        command says where it comes from), not a path on the machine that trained it."""
        return {**asdict(self), "backbone": Path(self.backbone).name if self.backbone else None}


log = logging.getLogger(__name__)
_say = log.info  # progress lines; main() shows them on stdout


# ------------------------------------------------------------------------------- pretraining

PRETRAIN_STEPS = 700
PRETRAIN_BATCH = 16


def pretrain_backbone(run_dir: Path, steps: int = PRETRAIN_STEPS, threads: int = 1) -> Path:
    """DINOv2 ViT-Ti/16 from scratch on the open-licence images of ``overhead_rgb/`` except
    NEON OSBS's (:func:`canopy.train.sites.pretraining_images`): no TEAK, BART or Kootenay image
    is among them, so one backbone serves every fold without having seen its held-out site.
    128-px windows at 0.3 m, global crops 96 px, four local crops of 48 px. Returns
    ``backbone.safetensors`` (resumes a stopped run)."""
    from canopy.pretrain_cli import RasterWindows
    from canopy.train.sites import pretraining_images
    from ssl_backbone.methods import config_for
    from ssl_backbone.pretrain import pretrain

    torch.set_num_threads(threads)
    out = run_dir / "pretrain"
    source = RasterWindows(pretraining_images(exclude_sites=("OSBS",)), window_px=128, gsd=0.3)
    epochs = steps * PRETRAIN_BATCH / len(source)
    cfg = config_for("dinov2", {
        "arch": "vit_tiny", "batch_size": PRETRAIN_BATCH, "epochs": epochs,
        "warmup_epochs": epochs / 10, "prototypes": 2048, "head_hidden": 768,
        "head_bottleneck": 192, "ibot_prototypes": 2048, "warmup_teacher_temp_epochs": epochs / 5,
        "freeze_last_layer_epochs": 0.0, "momentum_teacher": 0.99, "base_lr": 0.01,
        "drop_path_rate": 0.0, "crops": {"global_size": 96, "local_size": 48, "n_local": 4}})
    result = pretrain(cfg, source, out / "run", log_every=50,
                      resume=(out / "run" / "checkpoint.pt").exists(),
                      progress=lambda e: _say(f"[pretrain] {json.dumps(e, default=str)[:160]}"))
    return result.backbone_path


# ------------------------------------------------------------------------------------ data


def prepared_pairs(work: Path, recipe: Recipe) -> tuple[list[tuple[Pair, str]], dict]:
    """Every pair with its CHM path (shippable and evaluation-only), and the co-registration
    check of the shippable ones."""
    from canopy.train.sites import evaluation_only_pairs, shippable_pairs

    work.mkdir(parents=True, exist_ok=True)
    pairs = [(p, derive_chm(p, work, recipe.chm_resolution))
             for p in shippable_pairs() + evaluation_only_pairs()]
    coreg = {p.name: coregistration(p.imagery, chm, p.crs) for p, chm in pairs if p.las}
    checked = check_sites(coreg, {p.name: p.site for p, _ in pairs if p.las},
                          recipe.coreg_tolerance_m)
    return pairs, checked


def training_records(pairs: list[tuple[Pair, str]], recipe: Recipe):
    """Chips of the given pairs, each site repeated to about ``site_chips`` (module docstring),
    plus synthetic training chips; synthetic validation chips; a summary."""
    from canopy.train.datasets import SyntheticSpec, records_from_sampler, synthetic_records
    from data_catalog.chips import ChipSampler

    sampler = ChipSampler([(p.imagery, chm, p.crs) if p.crs else (p.imagery, chm)
                           for p, chm in pairs],
                          chip_size=recipe.chip_size, gsd=recipe.gsd, stride=recipe.real_stride,
                          split_fractions=(1, 0, 0), chm_mode="native", seed=recipe.seed)
    real, _ = records_from_sampler(sampler, "train")
    site_of = {p.imagery: p.site for p, _ in pairs}
    by_site: dict[str, list] = {}
    for rec in real:
        by_site.setdefault(site_of[rec.origin], []).append(rec)
    train, summary = [], {"real chips": {}, "repeats": {}}
    for site, recs in sorted(by_site.items()):
        n = max(1, round(recipe.site_chips / len(recs)))
        train += recs * n
        summary["real chips"][site] = len(recs)
        summary["repeats"][site] = n
    if recipe.synthetic_scenes:
        syn, _ = synthetic_records(SyntheticSpec(recipe.synthetic_scenes, recipe.synthetic_scene_px,
                                                 recipe.gsd, recipe.seed),
                                   recipe.chip_size, recipe.synthetic_stride)
        train += syn
        summary["synthetic chips"] = len(syn)
    val, _ = synthetic_records(SyntheticSpec(recipe.synthetic_val_scenes, recipe.synthetic_scene_px,
                                             recipe.gsd, recipe.seed + 1_000_003),
                               recipe.chip_size, recipe.chip_size)
    return train, val, summary


def train_model(pairs, recipe: Recipe, out: Path, name: str):
    """Train on ``pairs``; returns (model with its OOD reference, TrainResult, mean height,
    gradient-boosting baseline, data summary)."""
    from canopy.model.checkpoints import load_model
    from canopy.model.ood import build_reference
    from canopy.train.augment import AugmentConfig
    from canopy.train.datasets import label_mean
    from canopy.train.loop import TrainConfig, train
    from data_catalog.raster import read_rgb_on_grid

    records, val, summary = training_records(pairs, recipe)
    _say(f"[{name}] {len(records)} training chips {summary}")
    cfg = TrainConfig(
        out_dir=str(out / "train"), arch=recipe.arch, backbone_path=recipe.backbone,
        n_bins=recipe.n_bins, max_height_m=recipe.max_height_m, gsd=recipe.gsd,
        chip_size=recipe.chip_size, steps=recipe.steps, batch_size=recipe.batch_size,
        lr=recipe.lr, finetune_blocks=-1, backbone_lr_mult=1.0 if not recipe.backbone else 0.5,
        precision="fp32", seed=recipe.seed, device="cpu", threads=recipe.threads,
        model_name="canopy_default", model_version="2", log_every=50, checkpoint_every=100,
        augment=AugmentConfig(gsd_coarsen=recipe.gsd_coarsen, sensor=recipe.sensor,
                              haze=recipe.haze, colour=0.1))
    result = train(cfg, records, val, resume=(out / "train" / "checkpoint.pt").exists(),
                   data_summary=summary, command=f"python -m canopy.train.default_model ({name})",
                   progress=lambda e: e.message and _say(f"[{name}] {e.message}"))
    model = load_model(result.model_dir)
    images = []
    for p, _ in pairs:
        g = read_rgb_on_grid(p.imagery, recipe.gsd, crs=p.crs)
        images.append((g.rgb, g.valid, p.name))
    model.ood = build_reference(model, images, k=recipe.ood_k, tile=recipe.chip_size)
    real = {p.imagery for p, _ in pairs}
    gbm = fit_gbm([r for r in records if r.origin in real] or records, recipe.gbm_pixels,
                  recipe.seed)
    return model, result, label_mean(records), gbm, summary


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


def score_pair(model, gbm, train_mean: float, pair: Pair, chm: str, work: Path) -> dict:
    """Predict one pair's image with the model and the baselines; every prediction averaged
    onto the CHM's grid. Returns arrays: ``ref``, ``model``, ``train_mean``, ``gbm``, ``ood``."""
    import rasterio

    from canopy.evaluate.report import align_reference
    from canopy.predict.options import PredictOptions
    from canopy.predict.raster import predict_raster
    from data_catalog.raster import read_rgb_on_grid, warp_average

    path = work / f"{pair.name}_model.tif"
    has_ood = getattr(model, "ood", None) is not None
    predict_raster(pair.imagery, path, model,
                   PredictOptions(device="cpu", precision="fp32", ood_band=has_ood,
                                  uncertainty=True),
                   overwrite=True)
    with rasterio.open(path) as src:
        ap = align_reference(src, str(path), chm, pair.crs)
        if ap.evaluation_grid != "reference":
            raise RuntimeError(f"{pair.name}: the CHM is finer than the model's grid")
        win, wt = ap.pred_window, src.window_transform(ap.pred_window)
        full = src.read(1)
        ood = src.read(src.count, window=win) if has_ood else None

    def on_ref(arr):
        return warp_average(arr, wt, src.crs, ap.ref.shape, ap.grid.transform, ap.grid.crs)

    g = read_rgb_on_grid(pair.imagery, model.cfg.gsd, crs=pair.crs)
    if g.rgb.shape[1:] != full.shape:
        raise RuntimeError(f"{pair.name}: baseline grid {g.rgb.shape[1:]} != map {full.shape}")
    gb = np.clip(gbm.predict(pixel_features(g.rgb)), 0, None).reshape(full.shape)
    gb = np.where(np.isfinite(full), gb, np.nan).astype(np.float32)
    r0, c0 = int(win.row_off), int(win.col_off)
    gb = gb[r0:r0 + int(win.height), c0:c0 + int(win.width)]
    ok = np.isfinite(ap.pred) & np.isfinite(ap.ref)
    out = {"ref": np.where(ok, ap.ref, np.nan), "model": np.where(ok, ap.pred, np.nan),
           "train_mean": np.where(ok, train_mean, np.nan), "gbm": np.where(ok, on_ref(gb), np.nan)}
    out["ood"] = np.where(ok, on_ref(ood), np.nan) if ood is not None else None
    out["std"] = np.where(ok, ap.std, np.nan)
    return out


def site_metrics(arrays: list[dict], name: str, block: int = 10) -> dict:
    """MAE, bias, RMSE, R², block-R² (means of ``block``×``block`` cells, 10 m at 1 m, at least
    half valid) and tree-cover IoU (≥ 2 m) of predictor ``name`` pooled over a site's plots, with
    the metrics `canopy evaluate` uses (:mod:`canopy.evaluate.metrics`)."""
    from canopy.evaluate.metrics import bias, block_mean_pairs, mae, r2, rmse, tree_cover_iou

    def value(v: float) -> float | None:
        return None if math.isnan(v) else v

    p = np.concatenate([a[name].ravel() for a in arrays])
    r = np.concatenate([a["ref"].ravel() for a in arrays])
    blocks = [block_mean_pairs(a[name], a["ref"], block, 0.5) for a in arrays]
    bp, br = np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])
    return {"n": int((np.isfinite(p) & np.isfinite(r)).sum()), "mae": mae(p, r),
            "bias": bias(p, r), "rmse": rmse(p, r), "r2": value(r2(p, r)),
            "block_r2": value(r2(bp, br)) if len(bp) > 2 else None, "n_blocks": len(bp),
            "tree_cover_iou": value(tree_cover_iou(p, r, 2.0))}


PREDICTORS = ("model", "train_mean", "gbm", "own_mean")


def evaluate_site(model, gbm, train_mean, pairs, work: Path) -> tuple[dict, dict]:
    """Scores of every predictor on one site's plots, and the pixels the OOD analysis needs."""
    arrays = [score_pair(model, gbm, train_mean, p, chm, work) for p, chm in pairs]
    own = float(np.nanmean(np.concatenate([a["ref"].ravel() for a in arrays])))
    for a in arrays:
        a["own_mean"] = np.where(np.isfinite(a["ref"]), own, np.nan)
    scores = {k: site_metrics(arrays, k) for k in PREDICTORS}
    scores["own_mean"]["value_m"] = own
    from canopy.evaluate.metrics import calibration_shares

    scores["model"]["calibration"] = calibration_shares(
        *(np.concatenate([a[k].ravel() for a in arrays]) for k in ("model", "std", "ref")))
    ok = [np.isfinite(a["model"]) & np.isfinite(a["ref"]) for a in arrays]
    pixels = {"abs_err": np.concatenate([np.abs(a["model"] - a["ref"])[m] for a, m in zip(arrays, ok)]),
              "ood": (np.concatenate([a["ood"][m] for a, m in zip(arrays, ok)])
                      if arrays[0]["ood"] is not None else None),
              "plots": [p.name for p, _ in pairs]}
    return scores, pixels


def run_fold(site: str, recipe: Recipe, run_dir: Path) -> dict:
    """Train without ``site``; score ``site``. Writes fold_<site>.json (and .npz) in the
    variant's folder."""
    from canopy.evaluate.metrics import auroc
    from canopy.io.outputs import OOD_UNLIKE as UNLIKE

    vdir = run_dir / recipe.key()
    pairs, checked = prepared_pairs(run_dir / "chm", recipe)
    shippable = [(p, c) for p, c in pairs if p.site != "Kootenay"]
    train_pairs = [(p, c) for p, c in shippable
                   if p.site != site and checked.get(p.name, {}).get("accepted", True)]
    test_pairs = [(p, c) for p, c in shippable if p.site == site]
    t0 = time.perf_counter()
    model, result, mean_h, gbm, summary = train_model(train_pairs, recipe, vdir / f"fold_{site}",
                                                      f"{recipe.key()} without {site}")
    scores, pixels = evaluate_site(model, gbm, mean_h, test_pairs, vdir / f"fold_{site}")
    large = pixels["abs_err"] > LARGE_ERROR_M
    ood = pixels["ood"]
    out = {"site": site, "recipe": recipe.recorded(), "scores": scores, "train_mean_m": mean_h,
           "trained_on": sorted({p.name for p, _ in train_pairs}),
           "held_out": [p.name for p, _ in test_pairs], "data": summary,
           "train_seconds": result.seconds, "seconds": time.perf_counter() - t0,
           "ood": {"unlike_share": float((ood > UNLIKE).mean()), "median_score": float(np.median(ood)),
                   "large_error_share": float(large.mean()),
                   "auroc_large_error": auroc(ood, large)}}
    np.savez_compressed(vdir / f"fold_{site}.npz", abs_err=pixels["abs_err"], ood=ood)
    (vdir / f"fold_{site}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    _say(f"[{recipe.key()} without {site}] " + json.dumps(
        {k: round(v["mae"], 2) for k, v in scores.items()}))
    return out


# ------------------------------------------------------------------------------------ final


def _pooled(folds: list[dict], name: str) -> dict:
    rows = [f["scores"][name] for f in folds]
    n = sum(r["n"] for r in rows)
    return {"n": n, "mae": sum(r["mae"] * r["n"] for r in rows) / n,
            "bias": sum(r["bias"] * r["n"] for r in rows) / n,
            "site_mean_mae": sum(r["mae"] for r in rows) / len(rows)}


def load_folds(vdir: Path) -> list[dict]:
    return [json.loads((vdir / f"fold_{s}.json").read_text())
            for s in FOLD_SITES if (vdir / f"fold_{s}.json").exists()]


def ood_summary(vdir: Path) -> dict:
    """AUROC of the OOD score for |error| > 5 m over every fold's held-out pixels pooled."""
    from canopy.evaluate.metrics import auroc
    from canopy.io.outputs import OOD_UNLIKE as UNLIKE

    errs, oods = [], []
    for s in FOLD_SITES:
        f = vdir / f"fold_{s}.npz"
        if f.exists():
            z = np.load(f)
            errs.append(z["abs_err"])
            oods.append(z["ood"])
    if not errs:
        return {}
    e, o = np.concatenate(errs), np.concatenate(oods)
    large = e > LARGE_ERROR_M
    flagged = o > UNLIKE
    return {"auroc_large_error": auroc(o, large), "pixels": int(e.size),
            "large_error_share": float(large.mean()),
            "mae_flagged": float(e[flagged].mean()) if flagged.any() else None,
            "mae_not_flagged": float(e[~flagged].mean()) if (~flagged).any() else None,
            "flagged_share": float(flagged.mean())}


def collect_variants(run_dir: Path) -> dict:
    """Every recipe variant's folds found in ``run_dir`` (only variants with all folds)."""
    variants = {}
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        folds = load_folds(d)
        if len(folds) == len(FOLD_SITES):
            variants[d.name] = {"folds": {f["site"]: f["scores"] for f in folds},
                                "trained_on": {f["site"]: f["trained_on"] for f in folds},
                                "recipe": folds[0]["recipe"],
                                "pooled": {k: _pooled(folds, k) for k in PREDICTORS},
                                "ood": ood_summary(d)}
    return variants


def run_final(recipe: Recipe, run_dir: Path, out: Path) -> dict:
    """Train on every shippable site, score Kootenay, write weights, card and evaluation."""
    from canopy.model.checkpoints import save_native

    t0 = time.perf_counter()
    vdir = run_dir / recipe.key()
    pairs, checked = prepared_pairs(run_dir / "chm", recipe)
    train_pairs = [(p, c) for p, c in pairs
                   if p.site != "Kootenay" and checked.get(p.name, {}).get("accepted", True)]
    eval_pairs = [(p, c) for p, c in pairs if p.site == "Kootenay"]
    model, result, mean_h, gbm, summary = train_model(train_pairs, recipe, vdir / "final",
                                                      f"{recipe.key()} final")
    kootenay, pixels = evaluate_site(model, gbm, mean_h, eval_pairs, vdir / "final")
    from canopy.evaluate.metrics import auroc
    from canopy.io.outputs import OOD_UNLIKE as UNLIKE

    large = pixels["abs_err"] > LARGE_ERROR_M
    koot_ood = {"unlike_share": float((pixels["ood"] > UNLIKE).mean()),
                "auroc_large_error": auroc(pixels["ood"], large)}
    variants = collect_variants(run_dir)
    model.cfg.source = ("canopy.train.default_model v2 (ViT-Ti/16 + DPT; NEON TEAK, OSBS, BART "
                        "lidar, CC0)")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_native(model, tmp)
    evaluation = {
        "recipe": recipe.recorded(), "variant": recipe.key(),
        "trained_on": sorted(p.name for p, _ in train_pairs),
        "not_trained_on_coregistration": sorted(k for k, v in checked.items() if not v["accepted"]),
        "coregistration": checked, "data": summary, "train_mean_m": mean_h,
        "kootenay": {"scores": kootenay, "ood": koot_ood}, "leave_one_site_out": variants,
        "train_seconds": result.seconds, "synthetic_validation": result.final_val}
    evaluation["final_seconds"] = time.perf_counter() - t0
    (tmp / "evaluation.json").write_text(json.dumps(evaluation, indent=2, default=str) + "\n")
    shutil.copy(vdir / "final" / "train" / "log.csv", tmp / "training_log.csv")
    size_mb = sum(f.stat().st_size for f in tmp.iterdir()) / 1e6
    (tmp / "MODEL_CARD.md").write_text(model_card(evaluation, recipe, size_mb,
                                                  evaluation["final_seconds"]))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    _say(f"default model written to {out} ({size_mb:.1f} MB)")
    return evaluation


# ------------------------------------------------------------------------------------ card


def _f(v, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


LABELS = {"model": "**this recipe**", "train_mean": "training-set mean height",
          "gbm": "gradient-boosted trees (per-pixel colour + texture)",
          "own_mean": "the site's own mean height (oracle constant)"}


def _fold_rows(folds: dict) -> list[str]:
    rows = []
    for site, scores in folds.items():
        for k, label in LABELS.items():
            s = scores[k]
            rows.append(f"| {site} | {label} | {_f(s['mae'])} | {_f(s['bias'])} | {_f(s['r2'])} | "
                        f"{_f(s['block_r2'])} | {_f(s['tree_cover_iou'])} | {s['n']:,} |")
    return rows


def _commands(recipe: Recipe) -> str:
    syn = f" --synthetic {recipe.synthetic_scenes}" if recipe.synthetic_scenes else ""
    if recipe.backbone:
        return ("`python -m canopy.train.default_model pretrain --run-dir RUN`, then "
                "`python -m canopy.train.default_model all --run-dir RUN --backbone "
                f"RUN/pretrain/run/backbone.safetensors{syn} --steps {recipe.steps} --jobs 2`")
    return f"`python -m canopy.train.default_model all --run-dir RUN{syn} --steps {recipe.steps} --jobs 2`"


def model_card(ev: dict, recipe: Recipe, size_mb: float, seconds: float) -> str:
    chosen = ev["leave_one_site_out"].get(ev["variant"], {})
    pooled = chosen.get("pooled", {})
    m, own = pooled.get("model", {}).get("mae"), pooled.get("own_mean", {}).get("mae")
    folds = chosen.get("folds", {})
    beaten = [s for s, sc in folds.items() if sc["model"]["mae"] < sc["own_mean"]["mae"]]
    lost = [s for s in folds if s not in beaten]
    target = (m is not None and own is not None and m <= 0.8 * own and not lost)
    ood = chosen.get("ood", {})
    koot = ev["kootenay"]
    lines = [
        "# canopy default model v2 — ViT-Ti/16 + DPT at 0.5 m, trained on three NEON lidar sites",
        "",
        "**Read this first.** A small model trained on one CPU core from ~0.03 km² of real lidar "
        "(NEON plots in the Sierra Nevada, Florida and New Hampshire). Judged leave-one-site-out "
        "(each site held out entirely in turn), it " + (
            f"meets the target: every held-out site below its own-mean constant and pooled MAE "
            f"{_f(m)} m ≤ 0.8 × {_f(own)} m." if target else
            f"does **not** meet the target of beating each held-out site's own-mean constant by "
            f"20 %: pooled MAE {_f(m)} m against {_f(own)} m for that oracle constant"
            + (f"; it loses to it on {', '.join(lost)}" if lost else "") + ".")
        + f" On the Kootenay drone scene, a landscape none of the models saw, its MAE is "
        f"{_f(koot['scores']['model']['mae'])} m (bias {_f(koot['scores']['model']['bias'], 1)} m) "
        f"against {_f(koot['scores']['train_mean']['mae'])} m for the training-set mean height"
        + (" — worse than a constant" if koot['scores']['model']['mae'] >
           koot['scores']['train_mean']['mae'] else "")
        + f"; its out-of-distribution score calls {_f(100 * koot['ood']['unlike_share'], 0)} % of "
        "that scene unlike the training data, and `canopy predict` says so. Expect errors of "
        "several metres on any landscape unlike these three. For real maps use the "
        "HighResCanopyHeight v1 weights (`--checkpoint SSLhuge_satellite.pth`) or train on your "
        "own lidar with `canopy train`.",
        "",
        "## Model",
        f"- backbone ViT-Ti/16 ({'pretrained: ' + Path(recipe.backbone).name if recipe.backbone else 'random init'}), "
        f"trained fully; DPT decoder; {recipe.n_bins} height bins up to {recipe.max_height_m:g} m",
        f"- ground sample distance {recipe.gsd:g} m, tile {recipe.chip_size} px; "
        f"{size_mb:.1f} MB on disk (weights + `ood.safetensors`)",
        "- out-of-distribution reference: the embeddings of its training tiles "
        "(`canopy.model.ood`); `canopy predict` writes `CANOPY_OOD_UNLIKE_SHARE` and warns when a "
        "quarter of a map is unlike the training data; `--ood-band` adds the score band.",
        "",
        "## Data (all CC0, NEON)",
        f"- trained on: {', '.join(ev['trained_on'])}; CHMs derived from each plot's point cloud "
        f"at {recipe.chm_resolution:g} m with `data_catalog.lidar.chm_from_las` (TEAK clouds "
        "height-normalised from their ground class; noise classes dropped)",
        "- co-registration checked per plot (`canopy.train.sites.coregistration`: the peak of the "
        "brightness/height cross-correlation, compared with the site's other plots — sun shadows "
        "move it the same way for one flight); not trained on: "
        + (", ".join(ev["not_trained_on_coregistration"]) or "none"),
        f"- chips per site before repeats {ev['data']['real chips']}, repeats "
        f"{ev['data']['repeats']} (a site with few chips repeated up to about "
        f"{recipe.site_chips} an epoch, so one BART plot is not drowned by twelve TEAK plots)"
        + (f"; {ev['data'].get('synthetic chips')} synthetic chips" if recipe.synthetic_scenes else
           "; no synthetic scenes (they did not improve the leave-one-site-out figure, below)"
           if any(k.endswith("syn0") for k in ev["leave_one_site_out"]) and
           len(ev["leave_one_site_out"]) > 1 else "; no synthetic scenes"),
        "- the Kootenay drone pair (GPL-3, photogrammetric CHM) is never trained on: it is "
        "judged below as a site none of the models saw",
        "",
        "## Training",
        f"- commands: {_commands(recipe)} (the folds of every variant compared, then the final "
        "model of the chosen one)",
        f"- {recipe.steps} steps × {recipe.batch_size} chips; AdamW lr {recipe.lr:g}, fp32, "
        f"augmentation: dihedral, colour, imagery up to {1 + recipe.gsd_coarsen:g}× coarser, "
        f"sensor colour ± {recipe.sensor:g}, haze up to {recipe.haze:g}; seed {recipe.seed}",
        f"- final model trained in {ev['train_seconds'] / 60:.1f} min on one thread "
        f"(whole final step {seconds / 60:.1f} min)" if seconds else
        f"- final model trained in {ev['train_seconds'] / 60:.1f} min on one thread",
        "",
        "## Leave-one-site-out",
        "Each row: a model trained on the other sites only, scored on every plot of the held-out "
        "site at 1 m (prediction averaged onto the CHM cells). Baselines fitted in the same run on "
        "the same training pixels; the own-mean constant knows the held-out site's mean height "
        "(an oracle no map user has). Block-R² over 10 m blocks.",
        "",
        "| held-out site | predictor | MAE (m) | bias (m) | R² | block-R² | tree-cover IoU | pixels |",
        "|---|---|---|---|---|---|---|---|",
        *_fold_rows(folds),
        "",
        "Pooled over the held-out sites (pixel-weighted; in brackets each site weighted equally):",
        "",
        "| predictor | MAE (m) | bias (m) |",
        "|---|---|---|",
        *[f"| {LABELS[k]} | {_f(v['mae'])} ({_f(v['site_mean_mae'])}) | {_f(v['bias'])} |"
          for k, v in pooled.items()],
        "",
    ]
    if len(ev["leave_one_site_out"]) > 1:
        lines += ["Recipe variants measured in the same folds (pooled MAE, pixel-weighted / each "
                  "site equal); the variant with the lowest pixel-weighted figure ships:", "", "| variant | model | own-mean constant |", "|---|---|---|"]
        for k, v in ev["leave_one_site_out"].items():
            lines.append(f"| {k}{' (shipped)' if k == ev['variant'] else ''} | "
                         f"{_f(v['pooled']['model']['mae'])} / "
                         f"{_f(v['pooled']['model']['site_mean_mae'])} | "
                         f"{_f(v['pooled']['own_mean']['mae'])} |")
        lines.append("")
    ks = koot["scores"]
    lines += [
        "## A site none of the models saw: Kootenay (drone, British Columbia)",
        "",
        "| predictor | MAE (m) | bias (m) | R² | block-R² | tree-cover IoU | pixels |",
        "|---|---|---|---|---|---|---|",
        *[f"| {LABELS[k]} | {_f(ks[k]['mae'])} | {_f(ks[k]['bias'])} | {_f(ks[k]['r2'])} | "
          f"{_f(ks[k]['block_r2'])} | {_f(ks[k]['tree_cover_iou'])} | {ks[k]['n']:,} |" for k in LABELS],
        "",
        f"Reproduced from the shipped weights by `tests/test_default_model.py`. Share of the scene "
        f"the OOD score calls unlike the training data: {_f(koot['ood']['unlike_share'])}; its "
        f"AUROC for |error| > {LARGE_ERROR_M:g} m there: "
        f"{_f(koot['ood']['auroc_large_error'])}. (The fold tables above come from the fold "
        "models, which are not shipped: `python -m canopy.train.default_model folds` remakes them.)",
        "",
        "## Where the map is unreliable",
        "A tile's score is its embedding's distance to the training tiles' (`canopy.model.ood`); "
        "above 1 it is farther than 95 % of training images are from the others. On the "
        "held-out sites of the folds (each fold's model and reference, pixels pooled): "
        f"AUROC for |error| > {LARGE_ERROR_M:g} m {_f(ood.get('auroc_large_error'))}; "
        f"{_f(ood.get('flagged_share'))} of the pixels flagged; MAE where flagged "
        f"{_f(ood.get('mae_flagged'))} m, elsewhere {_f(ood.get('mae_not_flagged'))} m. With "
        "three sites the score can only tell 'like these plots' from 'not'; "
        "read it as a warning, not a calibrated error bar.",
        "",
        "The uncertainty band (`--uncertainty`, the spread of the height-bin distribution) on "
        "the held-out sites — the share of pixels whose error lies within 1σ and 2σ (a "
        "calibrated Gaussian gives 0.68 and 0.95): "
        + "; ".join(f"{s} {_f(sc['model'].get('calibration', {}).get('within_1sigma'))} / "
                    f"{_f(sc['model'].get('calibration', {}).get('within_2sigma'))}"
                    for s, sc in folds.items()) + ".",
        "",
        "## Where it fails",
        *[f"- held-out {s}: MAE {_f(sc['model']['mae'])} m, bias {_f(sc['model']['bias'], 1)} m "
          f"(own-mean constant {_f(sc['own_mean']['mae'])} m)" for s, sc in folds.items()],
        "- three landscapes (Sierra Nevada mixed conifer, Florida longleaf pine on sand, New "
        "Hampshire broadleaf) are all it knows; tropical forest, plantations, urban trees, "
        "agriculture and bare land are unseen.",
        "- inputs other than uint8 RGB: see docs/data_inputs.md (`--scale MIN MAX`).",
        "",
        f"Reproduce: {_commands(recipe)} (same seed and data: the same numbers up to "
        "floating-point differences between machines).",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ main


def _recipe(args) -> Recipe:
    return Recipe(steps=args.steps, threads=args.threads, synthetic_scenes=args.synthetic,
                  backbone=str(Path(args.backbone).resolve()) if args.backbone else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train and judge the bundled default model.")
    ap.add_argument("stage", choices=["pretrain", "fold", "folds", "final", "all", "card"],
                    help="pretrain: the DINOv2 backbone (RUN/pretrain/run/backbone.safetensors); "
                         "fold SITE: one held-out site; folds: every site; final: the shipped "
                         "model and its card; all: folds, then final; card: MODEL_CARD.md again "
                         "from --out's evaluation.json")
    ap.add_argument("site", nargs="?", choices=FOLD_SITES)
    ap.add_argument("--run-dir", help="where CHMs, folds and training runs go (all but card)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--steps", type=int, default=Recipe.steps)
    ap.add_argument("--threads", type=int, default=Recipe.threads)
    ap.add_argument("--synthetic", type=int, default=Recipe.synthetic_scenes)
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from canopy.train.sites import DATA

    if not (DATA / "rgb_chm_pairs").exists():
        print(f"error: real data not found at {DATA}", file=sys.stderr)
        return 2
    if args.stage == "card":
        out = Path(args.out)
        ev = json.loads((out / "evaluation.json").read_text())
        if args.run_dir:  # variants whose folds finished after the final model
            ev["leave_one_site_out"] = collect_variants(Path(args.run_dir))
            (out / "evaluation.json").write_text(json.dumps(ev, indent=2, default=str) + "\n")
        size_mb = sum(f.stat().st_size for f in out.iterdir()
                      if f.name in ("model.safetensors", "ood.safetensors", "config.json")) / 1e6
        (out / "MODEL_CARD.md").write_text(model_card(ev, Recipe(**ev["recipe"]), size_mb,
                                                      ev.get("final_seconds")))
        return 0
    if not args.run_dir:
        ap.error(f"{args.stage} needs --run-dir")
    recipe = _recipe(args)
    torch.set_num_threads(recipe.threads)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / recipe.key()).mkdir(exist_ok=True)
    if args.stage == "pretrain":
        _say(f"backbone: {pretrain_backbone(run_dir, threads=recipe.threads)}")
    elif args.stage == "fold":
        if not args.site:
            ap.error("fold needs a site: " + ", ".join(FOLD_SITES))
        run_fold(args.site, recipe, run_dir)
    elif args.stage == "final":
        run_final(recipe, run_dir, Path(args.out))
    else:
        prepared_pairs(run_dir / "chm", recipe)  # CHMs once, before processes share the folder
        base = [sys.executable, "-m", "canopy.train.default_model"]
        flags = ["--run-dir", str(run_dir), "--steps", str(args.steps), "--threads",
                 str(args.threads), "--synthetic", str(args.synthetic)]
        flags += ["--backbone", args.backbone] if args.backbone else []
        todo = [s for s in FOLD_SITES if not (run_dir / recipe.key() / f"fold_{s}.json").exists()]
        running: list = []
        for site in todo:
            while sum(p.poll() is None for p in running) >= args.jobs:
                time.sleep(1)
            running.append(subprocess.Popen(base + ["fold", site] + flags))
        codes = [p.wait() for p in running]
        if any(codes) or any(not (run_dir / recipe.key() / f"fold_{s}.json").exists() for s in todo):
            print("error: a fold failed (its output is above)", file=sys.stderr)
            return 1
        if args.stage == "all":
            run_final(recipe, run_dir, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
