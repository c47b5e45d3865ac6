"""Fitting the GEDI correction network (``canopy train-gedi-correction``).

The network (:mod:`canopy.model.gedi_correction`) predicts one log-factor per block of imagery;
it is fitted so that factor × the decoder's footprint percentile matches each GEDI shot's RH
(Huber loss over shots), starting from the best single factor and shrunk towards it. Samples come
from :mod:`canopy.train.gedi_samples`; the measured effect on synthetic scenes is
``benchmarks/gedi_correction_synthetic.py`` (docs/gedi_correction.md).
"""

from __future__ import annotations

import math
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from canopy.errors import InputError, OptionError, OutputError, OutputExistsError
from canopy.model.gedi_correction import CorrectionConfig, GediCorrectionNet, save_correction
from canopy.train.gedi_samples import BlockSample, TrainingScene, samples_from_scenes
from canopy.train.gedi_samples import decoder_gsd
from canopy.progress import ProgressCallback
from canopy.progress import report as report_progress


# ---------------------------------------------------------------------------------------------
# fitting


@dataclass
class FitOptions:
    steps: int = 400
    batch_blocks: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    huber_delta_m: float = 2.0      # metres: GEDI RH noise is ~1-2 m, errors beyond are outliers
    # Pull each block's log-factor towards the global one. Blocks whose shots all fall on bare
    # ground (percentile 0) carry no information about the factor, yet their factor is
    # interpolated into neighbouring forest; without this pull it would drift anywhere.
    shrink_to_global: float = 0.1
    val_share: float = 0.2          # of blocks, chosen by a hash of the block key (stable)
    min_val_blocks: int = 2         # fewer than this: no validation split
    augment: bool = True            # 90° rotations and flips (a height factor has no direction)
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise OptionError("steps", f"must be ≥ 0, got {self.steps}")
        if self.batch_blocks < 1:
            raise OptionError("batch_blocks", f"must be ≥ 1, got {self.batch_blocks}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise OptionError("lr", f"must be a positive number, got {self.lr}")
        if not 0 <= self.val_share < 1:
            raise OptionError("val_share", f"must be in [0, 1), got {self.val_share}")


@dataclass
class ShotScores:
    n_shots: int
    mae: float              # mean |factor × percentile − RH| (m)
    bias: float             # mean (factor × percentile − RH) (m)
    rmse: float


@dataclass
class FitReport:
    """What fitting did and how well, saved as metrics.json next to the model."""

    n_blocks_train: int
    n_blocks_val: int
    global_factor: float                     # the best single factor for the training shots
    train_before: ShotScores                 # factor 1 (the decoder as is)
    train_global: ShotScores                 # one global factor
    train_after: ShotScores                  # the fitted model
    val_before: ShotScores | None = None
    val_global: ShotScores | None = None
    val_after: ShotScores | None = None
    block_factors: dict = field(default_factory=dict)  # min / median / max over blocks
    steps: int = 0
    seconds: float = 0.0
    loss_log: list = field(default_factory=list)       # [step, loss]
    scenes: list = field(default_factory=list)         # SceneShots as dicts

    def to_dict(self) -> dict:
        return asdict(self)


def split_blocks(samples: Sequence[BlockSample], opts: FitOptions) -> tuple[list[int], list[int]]:
    """Validation blocks by a hash of their key: the same block is always on the same side."""
    cut = int(round(opts.val_share * 10_000))
    val = [i for i, s in enumerate(samples) if zlib.crc32(s.key.encode()) % 10_000 < cut]
    if len(val) < opts.min_val_blocks or len(val) == len(samples):
        return list(range(len(samples))), []
    val_set = set(val)
    return [i for i in range(len(samples)) if i not in val_set], val


def shot_scores(samples: Sequence[BlockSample], factors: np.ndarray) -> ShotScores:
    pred = np.concatenate([s.pred * f for s, f in zip(samples, factors)]).astype(np.float64)
    rh = np.concatenate([s.rh for s in samples]).astype(np.float64)
    e = pred - rh
    return ShotScores(int(e.size), float(np.abs(e).mean()), float(e.mean()),
                      float(np.sqrt((e * e).mean())))


def least_squares_factor(samples: Sequence[BlockSample]) -> float:
    """argmin_f Σ (f·p − rh)²  = Σ p·rh / Σ p² over all shots."""
    p = np.concatenate([s.pred for s in samples]).astype(np.float64)
    rh = np.concatenate([s.rh for s in samples]).astype(np.float64)
    den = float((p * p).sum())
    return float((p * rh).sum() / den) if den > 0 else 1.0


def _batch(samples: Sequence[BlockSample], idx: Sequence[int], rng: np.random.Generator | None,
           device) -> tuple[torch.Tensor, ...]:
    rgb, valid, scal, pred, rh, owner = [], [], [], [], [], []
    for j, i in enumerate(idx):
        s = samples[i]
        img, ok = s.rgb, s.valid
        if rng is not None:  # same rotation/flip for image and mask
            k = int(rng.integers(4))
            img, ok = np.rot90(img, k, axes=(1, 2)), np.rot90(ok, k)
            if rng.random() < 0.5:
                img, ok = img[:, :, ::-1], ok[:, ::-1]
        rgb.append(np.ascontiguousarray(img))
        valid.append(np.ascontiguousarray(ok))
        scal.append(s.scalars)
        pred.append(s.pred)
        rh.append(s.rh)
        owner.append(np.full(len(s.pred), j))
    t = [torch.from_numpy(np.stack(rgb)), torch.from_numpy(np.stack(valid)),
         torch.from_numpy(np.stack(scal)), torch.from_numpy(np.concatenate(pred)),
         torch.from_numpy(np.concatenate(rh)), torch.from_numpy(np.concatenate(owner))]
    return tuple(v.to(device) for v in t)


@torch.no_grad()
def predict_block_factors(model: GediCorrectionNet, samples: Sequence[BlockSample],
                          device="cpu") -> np.ndarray:
    """The fitted factor of each block, one block at a time (as apply_correction runs them)."""
    model.eval()
    out = np.empty(len(samples))
    for i in range(len(samples)):
        rgb, valid, scal, *_ = _batch(samples, [i], None, device)
        out[i] = float(torch.exp(model.log_factor(rgb, valid, scal))[0])
    return out


def _lr_at(step: int, opts: FitOptions) -> float:
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    span = max(1, opts.steps - opts.warmup_steps)
    return opts.lr * 0.5 * (1 + math.cos(math.pi * (step - opts.warmup_steps) / span))


def fit_correction(samples: Sequence[BlockSample], cfg: CorrectionConfig,
                   opts: FitOptions = FitOptions(), *, device="cpu",
                   progress: ProgressCallback | None = None) -> tuple[GediCorrectionNet, FitReport]:
    """Fit a correction model so that factor × footprint percentile matches GEDI RH."""
    if not samples:
        raise InputError("no block holds a usable GEDI shot: nothing to fit the correction on")
    t0 = time.time()
    train_idx, val_idx = split_blocks(samples, opts)
    train = [samples[i] for i in train_idx]
    val = [samples[i] for i in val_idx]
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(opts.seed)
        model = GediCorrectionNet(cfg).to(device)
    g = least_squares_factor(train)
    log_g = model.set_constant_factor(g)
    rng = np.random.default_rng(opts.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "cls" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "cls" not in n)]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr)
    loss_log = []
    model.train()
    for step in range(opts.steps):
        for group in optim.param_groups:
            group["lr"] = _lr_at(step, opts)
        replace = len(train) < opts.batch_blocks
        idx = rng.choice(len(train), size=opts.batch_blocks, replace=replace)
        rgb, valid, scal, pred, rh, owner = _batch(train, idx, rng if opts.augment else None, device)
        log_f = model.log_factor(rgb, valid, scal)
        loss = F.huber_loss(torch.exp(log_f)[owner] * pred, rh, delta=opts.huber_delta_m)
        loss = loss + opts.shrink_to_global * ((log_f - log_g) ** 2).mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        if step % opts.log_every == 0 or step == opts.steps - 1:
            loss_log.append([step, round(float(loss.detach()), 4)])
            report_progress(progress, "steps", step + 1, opts.steps,
                   f"step {step}/{opts.steps}: loss {float(loss.detach()):.3f}")
    model.eval()
    f_train = predict_block_factors(model, train, device)
    report = FitReport(
        n_blocks_train=len(train), n_blocks_val=len(val), global_factor=g,
        train_before=shot_scores(train, np.ones(len(train))),
        train_global=shot_scores(train, np.full(len(train), g)),
        train_after=shot_scores(train, f_train), steps=opts.steps, loss_log=loss_log)
    all_f = f_train
    if val:
        f_val = predict_block_factors(model, val, device)
        report.val_before = shot_scores(val, np.ones(len(val)))
        report.val_global = shot_scores(val, np.full(len(val), g))
        report.val_after = shot_scores(val, f_val)
        all_f = np.concatenate([f_train, f_val])
    report.block_factors = {"min": float(all_f.min()), "median": float(np.median(all_f)),
                            "max": float(all_f.max())}
    report.seconds = round(time.time() - t0, 2)
    return model, report



def check_run_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty output folder unless ``overwrite`` (checked before any compute)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output '{out}' exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder '{out}' is not empty")
    return out



def train_gedi_correction(scenes: Sequence[TrainingScene], out_dir: str | os.PathLike,
                          cfg: CorrectionConfig, opts: FitOptions = FitOptions(), *, decoder=None,
                          device="cpu", precision: str = "fp32", batch_size: int | None = None,
                          sun_elevation: float | None = None, overwrite: bool = False,
                          progress: ProgressCallback | None = None) -> FitReport:
    """``canopy train-gedi-correction``: blocks from ``scenes``, fit, save into ``out_dir``."""
    check_run_dir(out_dir, overwrite)
    gsd, name = decoder_gsd(decoder, next((s.heights for s in scenes if s.heights), None))
    cfg.gsd, cfg.decoder = gsd, name
    samples, reports = samples_from_scenes(
        scenes, cfg, decoder=decoder, device=device, precision=precision, batch_size=batch_size,
        sun_elevation=sun_elevation, progress=progress)
    report_progress(progress, "steps", 0, opts.steps, f"{len(samples)} blocks, "
           f"{sum(len(s.rh) for s in samples)} shots; fitting {opts.steps} steps")
    model, report = fit_correction(samples, cfg, opts, device=device, progress=progress)
    report.scenes = [asdict(r) for r in reports]
    save_correction(model, out_dir, report.to_dict())
    return report


